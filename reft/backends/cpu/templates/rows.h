// ---- rows.h: row-wise kernels: embedding gather, row selection, RMSNorm (+ residual), softmax,
// standalone rotary embedding, each token's sequence extent. Threads split the rows.

// PACKED: the table is stored in the packed layout of linear.h (shared with a tied LM head);
// a quantized table (quant.h) is read in its block rows
template <typename WT, typename OT, typename IT, bool PACKED>
static void k_embedding(int ith, int nth, const IT* ids, int64_t T, const WT* table, int64_t D, OT* out) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t v = (int64_t)ids[t];
        if constexpr (is_quant<WT>::value) {
            qembedding_row<WT, OT>(table, v, D, out + t * D);
        } else {
            for (int64_t i = 0; i < D; i++)
                out[t * D + i] = st<OT>(ld(PACKED ? *packed_at(table, D, v, i) : table[v * D + i]));
        }
    }
}

// out[r] = x[rows[r]] for rows of `rowbytes` bytes
template <typename IT>
static void k_take_rows(int ith, int nth, const char* x, const IT* rows, int64_t R, int64_t rowbytes, char* out) {
    int64_t r0, r1;
    split_range(R, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) memcpy(out + r * rowbytes, x + (int64_t)rows[r] * rowbytes, rowbytes);
}

// the norm's scale: w, or off + w with OFFSET (Gemma's 1 + w, added in float32)
template <bool OFFSET, typename WT>
static inline float norm_w(WT w, float off) { return OFFSET ? ld(w) + off : ld(w); }

template <typename XT, typename WT, bool OFFSET = false>
static void k_rms_norm(int ith, int nth, const XT* x, const WT* w, int64_t rows, int64_t D, float eps, XT* y,
                       float off = 0.f) {
    int64_t r0, r1;
    split_range(rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const XT* xr = x + r * D;
        float ss = 0.f;
        for (int64_t i = 0; i < D; i++) { float v = ld(xr[i]); ss += v * v; }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) y[r * D + i] = st<XT>(ld(xr[i]) * inv * norm_w<OFFSET>(w[i], off));
    }
}

// s = x + r; y = rms_norm(s) * w (or off + w)
template <typename WT, bool OFFSET = false>
static void k_add_rms_norm(int ith, int nth, const float* x, const float* res, const WT* w, int64_t rows,
                           int64_t D, float eps, float* s, float* y, float off = 0.f) {
    int64_t r0, r1;
    split_range(rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        float ss = 0.f;
        for (int64_t i = 0; i < D; i++) {
            float v = x[r * D + i] + res[r * D + i];
            s[r * D + i] = v;
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) y[r * D + i] = s[r * D + i] * inv * norm_w<OFFSET>(w[i], off);
    }
}

template <typename XT>
static void k_softmax(int ith, int nth, const XT* x, int64_t rows, int64_t D, XT* y) {
    int64_t r0, r1;
    split_range(rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        float m = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < D; i++) m = fmaxf(m, ld(x[r * D + i]));
        for (int64_t i = 0; i < D; i++) sum += expf(ld(x[r * D + i]) - m);
        for (int64_t i = 0; i < D; i++) y[r * D + i] = st<XT>(expf(ld(x[r * D + i]) - m) / sum);
    }
}

// x[T, H, D] rotated on its first ROT dims (sizes are template arguments: no variable-length
// arrays in kernels — GCC 12 -O3 -march=x86-64-v4 miscompiled this loop over a VLA)
template <typename XT, typename IT, int64_t H, int64_t D, int64_t ROT>
static void k_rope(int ith, int nth, const XT* x, const IT* pos, int64_t T, const float* inv_freq, XT* y,
                   LongRope<IT> lr = {}) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    constexpr int64_t half = ROT / 2;
    float tab[2 * half > 0 ? 2 * half : 1], h[D > 0 ? D : 1];
    for (int64_t t = t0; t < t1; t++) {
        rope_rows<IT>(pos, t, 1, inv_freq, lr, half, tab);
        for (int64_t hh = 0; hh < H; hh++) {
            const XT* src = x + (t * H + hh) * D;
            for (int64_t i = 0; i < D; i++) h[i] = ld(src[i]);
            rope_apply(h, tab, half);
            for (int64_t i = 0; i < D; i++) y[(t * H + hh) * D + i] = st<XT>(h[i]);
        }
    }
}

// ext[t] = 1 + the largest position of t's sequence in the batch (seq_extent); rows of a sequence
// may be anywhere in the batch, so each row scans all of them (once per step, not per layer)
template <typename IT, typename ST>
static void k_seq_extent(int ith, int nth, const IT* pos, const ST* sid, int64_t T, IT* ext) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        int64_t m = (int64_t)pos[t];
        for (int64_t u = 0; u < T; u++)
            if (sid[u] == sid[t] && (int64_t)pos[u] > m) m = (int64_t)pos[u];
        ext[t] = (IT)(m + 1);
    }
}
