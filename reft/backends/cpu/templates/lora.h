// Multi-adapter LoRA (op lora_add, reft/ir/ops/lora.py): y[t] = base[t] + (a[s] x[t]) b[s] with
// s = ids[t] the token's adapter slot (< 0: the base model, y[t] = base[t]).
// a: [S, R, K] (lora_A, zero-padded to R rows); b: [S, R, N] (lora_B transposed, scaled by alpha / r).
// Work items are (token, column block) pairs, so a decode step of one token still spreads over the
// threads; each item computes its token's R-wide h = a[s] x[t] (R dot products of length K, cheap
// next to the base matmul) and adds sum_r h[r] b[s][r][n0:n1] with vector FMAs. base and y may be
// the same buffer (each element is read before it is written).
#define LORA_MAX_R 256
#define LORA_COLS 256

template <int K, int N, int R>
static void k_lora_add(int ith, int nth, const float* base, const float* x, int64_t T, const float* a,
                       const float* b, const int32_t* ids, float* y) {
    static_assert(R <= LORA_MAX_R, "LoRA rank above LORA_MAX_R");
    constexpr int64_t NB = (N + LORA_COLS - 1) / LORA_COLS;
    int64_t i0, i1;
    split_range(T * NB, ith, nth, 1, &i0, &i1);
    float h[R];
    int64_t have = -1;   // the token whose h is in h[]
    for (int64_t i = i0; i < i1; i++) {
        const int64_t t = i / NB, n0 = (i % NB) * LORA_COLS, n1 = n0 + LORA_COLS < N ? n0 + LORA_COLS : N;
        const float* src = base + t * N;
        float* dst = y + t * N;
        const int32_t s = ids[t];
        if (s < 0) {
            if (dst != src) memcpy(dst + n0, src + n0, (n1 - n0) * sizeof(float));
            continue;
        }
        if (have != t) {
            for (int r = 0; r < R; r++) h[r] = dot<float>(x + t * K, a + ((int64_t)s * R + r) * K, K);
            have = t;
        }
        const float* bs = b + (int64_t)s * R * N;
        int64_t n = n0;
        for (; n + VW <= n1; n += VW) {
            vf acc = vload(src + n);
            for (int r = 0; r < R; r++) acc = vfma(vset(h[r]), vload(bs + (int64_t)r * N + n), acc);
            vstore(dst + n, acc);
        }
        if (n < n1) {
            const int64_t m = n1 - n;
            vf acc = vload_part(src + n, m);
            for (int r = 0; r < R; r++) acc = vfma(vset(h[r]), vload_part(bs + (int64_t)r * N + n, m), acc);
            float tail[VW];
            vstore(tail, acc);
            memcpy(dst + n, tail, m * sizeof(float));
        }
    }
}
