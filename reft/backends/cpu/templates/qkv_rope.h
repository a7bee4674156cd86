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

// in-place rotate-half rotary embedding of one head vector
static inline void rope_apply(float* h, const float* tab, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float c = tab[i], s = tab[half + i], x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}

static inline void rms_apply(float* h, const float* w, int64_t D, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; i++) ss += h[i] * h[i];
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) h[i] = h[i] * inv * w[i];
}

template <typename WT, typename IT, int64_t K, int64_t H, int64_t HKV, int64_t D, int64_t ROT>
static void k_qkv_rope(int ith, int nth, const float* x, int64_t T, const WT* W, const float* b, const IT* pos,
                       const float* qn, const float* kn, float eps, const float* inv_freq, float* q, float* k,
                       float* v, float* scratch) {
    const int64_t HT = H + 2 * HKV;
    int64_t h0, h1;
    split_range(HT, ith, nth, 1, &h0, &h1);
    if (h0 >= h1) return;
    float* tab = scratch;                                   // [T, ROT]
    rope_table<IT>(pos, T, inv_freq, ROT / 2, tab);
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
                    if (qn) rms_apply(hv, qn, D, eps);
                    rope_apply(hv, tab + t * ROT, ROT / 2);
                    out = q + (t * H + head) * D;
                } else if (head < H + HKV) {
                    if (kn) rms_apply(hv, kn, D, eps);
                    rope_apply(hv, tab + t * ROT, ROT / 2);
                    out = k + (t * HKV + head - H) * D;
                } else {
                    out = v + (t * HKV + head - H - HKV) * D;
                }
                memcpy(out, hv, D * sizeof(float));
            }
    }
}
