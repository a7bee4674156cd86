// ---- qkv_rope.h: fused q/k/v projection, per-head q/k RMSNorm, rotary embedding --------------
// Threads split the H + 2 Hkv output heads. Each thread projects its heads for all T rows into
// scratch, then the epilogue normalises and rotates q/k heads and scatters q, k, v to [T, heads, D].

// cos/sin of pos * inv_freq[i] for each row: tab[t, 0:half] = cos, tab[t, half:rot] = sin
template <typename IT>
static void rope_table(const IT* pos, int64_t T, const float* inv_freq, int64_t half, float* tab) {
    for (int64_t t = 0; t < T; t++) {
        float p = (float)pos[t];
        for (int64_t i = 0; i < half; i++) {
            float a = p * inv_freq[i];
            tab[t * 2 * half + i] = cosf(a);
            tab[t * 2 * half + half + i] = sinf(a);
        }
    }
}

// Scaled rotary beyond a frequency table (default, all zero: none). longrope (Phi-3): a row whose
// sequence reaches past `orig` positions in this batch (ext[t] > orig: ext is the seq_extent op's
// output) rotates with the long factors' frequencies, the others with the short ones; cos and sin
// are scaled by mscale. YaRN (GPT-OSS): only the scale (inv_long and ext null).
template <typename IT>
struct LongRope {
    const float* inv_long;
    const IT* ext;
    int64_t orig;
    float mscale;
};

// rope_table for rows t0..t0+T-1 of pos / ext under longrope or YaRN (inv_short: the short factors'
// frequencies, or YaRN's)
template <typename IT>
static void rope_table_long(const IT* pos, int64_t t0, int64_t T, const float* inv_short, const LongRope<IT>& lr,
                            int64_t half, float* tab) {
    for (int64_t t = 0; t < T; t++) {
        const float* inv = lr.ext && (int64_t)lr.ext[t0 + t] > lr.orig ? lr.inv_long : inv_short;
        const float p = (float)pos[t0 + t];
        for (int64_t i = 0; i < half; i++) {
            const float a = p * inv[i];
            tab[t * 2 * half + i] = cosf(a) * lr.mscale;
            tab[t * 2 * half + half + i] = sinf(a) * lr.mscale;
        }
    }
}

// rows t0..t0+T-1 of the table, by rope_table or (longrope, YaRN: a cos/sin scale) rope_table_long
template <typename IT>
static inline void rope_rows(const IT* pos, int64_t t0, int64_t T, const float* inv_freq, const LongRope<IT>& lr,
                             int64_t half, float* tab) {
    if (lr.mscale != 0.f)
        rope_table_long<IT>(pos, t0, T, inv_freq, lr, half, tab);
    else
        rope_table<IT>(pos + t0, T, inv_freq, half, tab);
}

// in-place rotate-half rotary embedding of one head vector
static inline void rope_apply(float* h, const float* tab, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float c = tab[i], s = tab[half + i], x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}

// OFFSET: the norm scales by off + w (Gemma's 1 + w)
template <bool OFFSET = false>
static inline void rms_apply(float* h, const float* w, int64_t D, float eps, float off = 0.f) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; i++) ss += h[i] * h[i];
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) h[i] = h[i] * inv * (OFFSET ? w[i] + off : w[i]);
}

// norm_off: the q/k norms' offset (0: none); lr: longrope / YaRN (default: none)
template <typename WT, typename IT, int64_t K, int64_t H, int64_t HKV, int64_t D, int64_t ROT>
static void k_qkv_rope(int ith, int nth, const float* x, int64_t T, const WT* W, const float* b, const IT* pos,
                       const float* qn, const float* kn, float eps, const float* inv_freq, float* q, float* k,
                       float* v, float* scratch, float norm_off = 0.f, LongRope<IT> lr = {}) {
    const int64_t HT = H + 2 * HKV;
    int64_t h0, h1;
    split_range(HT, ith, nth, 1, &h0, &h1);
    if (h0 >= h1) return;
    float* tab = scratch;                                   // [T, ROT]
    rope_rows<IT>(pos, 0, T, inv_freq, lr, ROT / 2, tab);
    const int64_t CH = T <= GEMV_MAX_T ? (h1 - h0) : (GEMM_CHUNK / D > 0 ? GEMM_CHUNK / D : 1);
    float* y = tab + T * ROT;                               // [T, CH * D]
    float* wbuf = y + T * CH * D;
    for (int64_t c = h0; c < h1; c += CH) {
        int64_t nh = h1 - c < CH ? h1 - c : CH, ld = CH * D;
        matmul_rows<WT>(x, T, K, W, c * D, (c + nh) * D, y, ld, wbuf, c > h0);
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < nh; j++) {
                int64_t head = c + j;
                float* hv = y + t * ld + j * D;
                if (b)
                    for (int64_t i = 0; i < D; i++) hv[i] += b[head * D + i];
                float* out;
                if (head < H) {
                    if (qn) norm_off != 0.f ? rms_apply<true>(hv, qn, D, eps, norm_off) : rms_apply(hv, qn, D, eps);
                    rope_apply(hv, tab + t * ROT, ROT / 2);
                    out = q + (t * H + head) * D;
                } else if (head < H + HKV) {
                    if (kn) norm_off != 0.f ? rms_apply<true>(hv, kn, D, eps, norm_off) : rms_apply(hv, kn, D, eps);
                    rope_apply(hv, tab + t * ROT, ROT / 2);
                    out = k + (t * HKV + head - H) * D;
                } else {
                    out = v + (t * HKV + head - H - HKV) * D;
                }
                memcpy(out, hv, D * sizeof(float));
            }
    }
}
