// ---- linear.h: y[T, N] = x[T, K] . W[N, K]^T for weights in float32 / float16 / bfloat16 ----
// Batches up to GEMV_MAX_T tokens read the packed weights once, straight from their dtype: a
// plain GEMV for one or two tokens, tiles of tokens x rows that reuse each 8-row block from cache
// for more. Larger batches convert a chunk of weight rows to float32 and call the BLAS sgemm.
// Threads split the N output rows; every kernel takes (ith, nth) and works on its slice.

// Tuning constants come from the target (targets.py, #defines at the top of the source):
// GEMV_MAX_T, TILE_T x TILE_R, GEMM_CHUNK, GEMV_PREFETCH. On AVX-512 (Zen 4, 2 threads, f32
// SmolLM2 layer shapes) the tiles beat rows_f32 + OpenBLAS sgemm up to ~96-128 tokens.

// sum_k a[k] * b[k], a float32, b any weight dtype (VW lanes, then the lanes' hsum)
template <typename WT>
static inline float dot(const float* a, const WT* b, int64_t K) {
    vf s0 = vzero(), s1 = vzero();
    int64_t k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        s0 = vfma(vload(a + k), vload_w(b + k), s0);
        s1 = vfma(vload(a + k + VW), vload_w(b + k + VW), s1);
    }
    float s = hsum(s0 + s1);
    for (; k < K; k++) s += a[k] * ld(b[k]);
    return s;
}

// Reproducible mode (reft_set_deterministic, set by the runtime for steps that carry a seeded
// request, or for good by `reftc compile --deterministic`): every matmul of any batch size takes the
// GEMV / tile kernels, whose sum over K for a (token, row) never depends on the batch, instead of
// the sgemm, whose order changes with the matrix shapes.
static int g_det = 0;
static inline bool gemv_path(int64_t T) { return T <= GEMV_MAX_T || g_det; }

typedef void (*sgemm_fn)(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc);
static sgemm_fn g_sgemm = 0;

// C[T, n] (ldc) = A[T, K] . B[n, K]^T, all float32 row-major
static void gemm_f32(const float* A, int64_t T, int64_t K, const float* B, int64_t n, float* C, int64_t ldc) {
    if (g_sgemm) {
        g_sgemm(101 /*RowMajor*/, 111 /*NoTrans*/, 112 /*Trans*/, (int)T, (int)n, (int)K, 1.0f, A, (int)K, B, (int)K,
                0.0f, C, (int)ldc);
        return;
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < n; j++) C[t * ldc + j] = dot(A + t * K, B + j * K, K);
}

// Weight matrices [N, K] are stored packed for streaming: blocks of RB = 8 rows, each block as
// K/16 chunks of [8 rows][16 values] (N padded to 8 rows, K to 16 values, with zeros), so a
// GEMV reads one sequential stream. packed_at(W, K, n, k) is element (n, k). The layout is the
// same on every target: a 16-value chunk is 16 / VW vectors.
#define RB 8
#define CV (16 / VW)   // vectors per 16-value chunk
static inline int64_t kpad(int64_t K) { return (K + 15) / 16 * 16; }
template <typename WT>
static inline const WT* packed_at(const WT* W, int64_t K, int64_t n, int64_t k) {
    return W + ((n / RB) * (kpad(K) / 16) + k / 16) * (RB * 16) + (n % RB) * 16 + k % 16;
}

// One tile: out[t * RB + rr + r] = x[t] . row rr + r of the packed block at w, for TB tokens and
// NR rows. Every (token, row) pair has one accumulator that takes the chunks in order, CV FMAs a
// chunk, and one hsum at the end: whatever the tile shape or the batch, a row's result is bit
// for bit the same, so batching never changes a sequence's logits. Tile p of the P tiles of a
// block prefetches its 1/P share of the next block into L2, so memory streams while the block in
// cache is computed on (SmolLM2's f32 linears, 16 tokens, one AVX-512 thread: 65 ms prefetching
// only from the first tile, 45 ms spread into L2); P = 0: prefetch GEMV_PREFETCH bytes ahead.
template <typename WT, int TB, int NR>
static inline void gemv_tile(const float* x, int64_t K, const WT* w, int rr, int p, int P, float* out) {
    const int64_t KC = kpad(K) / 16;
    const int L = (int)(RB * 16 * sizeof(WT) / 64);   // cache lines per 16-column chunk of a block
    const char* next = (const char*)(w + KC * RB * 16);
    int64_t line = P ? p * KC * L / P : 0;            // next block's lines: [p, p + 1) * KC * L / P
    int credit = 0;
    vf acc[TB][NR];
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < NR; r++) acc[t][r] = vzero();
    auto step = [&](int64_t kc, bool tail) __attribute__((always_inline)) {
        vf xv[TB][CV];
        for (int t = 0; t < TB; t++)
            for (int c = 0; c < CV; c++) {
                const int64_t k = kc * 16 + c * VW;
                xv[t][c] = !tail ? vload(x + t * K + k) : K - k >= VW ? vload(x + t * K + k)
                         : vload_part(x + t * K + k, K - k > 0 ? K - k : 0);
            }
        if (P) {
            for (credit += L; credit >= P; credit -= P, line++) __builtin_prefetch(next + line * 64, 0, 2);
        } else if (GEMV_PREFETCH) {
            const char* pf = (const char*)(w + kc * RB * 16) + GEMV_PREFETCH;
            for (int l = 0; l < L; l++) __builtin_prefetch(pf + l * 64, 0, 3);
        }
        for (int r = 0; r < NR; r++)
            for (int c = 0; c < CV; c++) {
                const vf wv = vload_w(w + (kc * RB + rr + r) * 16 + c * VW);
                for (int t = 0; t < TB; t++) acc[t][r] = vfma(wv, xv[t][c], acc[t][r]);
            }
    };
    int64_t kc = 0;
    for (; kc < K / 16; kc++) step(kc, false);   // the K tail apart: no partial loads in the loop
    if (kc < KC) step(kc, true);
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < NR; r++) out[t * RB + rr + r] = hsum(acc[t][r]);
}

// y[t, row - r0] (ldy) for rows [r0, r1) and T tokens (T <= GEMV_MAX_T, or any T in reproducible
// mode). Up to GEMV_BLOCK_T tokens take a whole 8-row block per pass over x (the plain GEMV:
// streams fastest); more tokens go in tiles of TILE_T tokens x TILE_R rows that reuse each block
// from cache, so each block comes from memory once per step. Tokens are taken in slabs of up to
// GEMV_MAX_T (whole tiles) per block, the size of the output buffer.
template <typename WT>
static void gemv_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y,
                      int64_t ldy) {
    const int64_t KC = kpad(K) / 16;
    const bool whole = T <= GEMV_BLOCK_T;
    constexpr int64_t SLAB = GEMV_MAX_T / TILE_T * TILE_T;             // tokens per slab: whole tiles
    const int G = (int)((T + TILE_T - 1) / TILE_T), P = whole ? 0 : (RB / TILE_R) * G;   // token groups, tiles
    float out[SLAB * RB];
    for (int64_t nb = r0 / RB; nb * RB < r1; nb++) {
        const WT* w = W + nb * KC * RB * 16;
        for (int64_t s0 = 0; s0 < T; s0 += SLAB) {
            const int64_t TS = T - s0 < SLAB ? T - s0 : SLAB;
            if (whole) {
                if (T == 1) gemv_tile<WT, 1, RB>(x, K, w, 0, 0, 0, out);
#if GEMV_BLOCK_T >= 2
                else gemv_tile<WT, 2, RB>(x, K, w, 0, 0, 0, out);
#endif
            } else {
                const int GS = (int)((TS + TILE_T - 1) / TILE_T), g0 = (int)(s0 / TILE_T);
                for (int h = 0; h < RB / TILE_R; h++) {
                    const int rr = h * TILE_R;
                    if (nb * RB + rr >= r1 || nb * RB + rr + TILE_R <= r0) continue;   // rows outside [r0, r1)
                    for (int g = 0; g < GS; g++) {
                        const float* xg = x + (s0 + g * TILE_T) * K;
                        float* og = out + g * TILE_T * RB;
                        const int p = h * G + g0 + g;
                        switch (TS - g * TILE_T < TILE_T ? TS - g * TILE_T : TILE_T) {
                            case 1: gemv_tile<WT, 1, TILE_R>(xg, K, w, rr, p, P, og); break;
#if TILE_T >= 2
                            case 2: gemv_tile<WT, 2, TILE_R>(xg, K, w, rr, p, P, og); break;
#endif
#if TILE_T >= 3
                            case 3: gemv_tile<WT, 3, TILE_R>(xg, K, w, rr, p, P, og); break;
#endif
#if TILE_T >= 4
                            case 4: gemv_tile<WT, 4, TILE_R>(xg, K, w, rr, p, P, og); break;
#endif
                            default: break;
                        }
                    }
                }
            }
            for (int r = 0; r < RB; r++) {
                const int64_t row = nb * RB + r;
                if (row >= r0 && row < r1)
                    for (int64_t t = 0; t < TS; t++) y[(s0 + t) * ldy + row - r0] = out[t * RB + r];
            }
        }
    }
}

// packed rows [r0, r0 + n) as a float32 row-major [n, K] matrix in buf
template <typename WT>
static const float* rows_f32(const WT* W, int64_t K, int64_t r0, int64_t n, float* buf) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < K; k += 16) {
            const WT* src = packed_at(W, K, r0 + i, k);
            if (K - k >= 16) {
                for (int c = 0; c < CV; c++) vstore(buf + i * K + k + c * VW, vload_w(src + c * VW));
            } else {
                for (int64_t j = 0; j < K - k; j++) buf[i * K + k + j] = ld(src[j]);
            }
        }
    return buf;
}

// Row-major weights [N, K] (training plans: a weight the optimizer writes in place, or that a
// backward op reads, is not packed). The kernels see the tag type rowmajor<WT> (a WT in memory) and
// matmul_rows sends it here: up to GEMV_MAX_T tokens a dot per (token, row); above, float32 rows go
// straight to the sgemm and other dtypes are converted GEMM_CHUNK rows at a time.
template <typename WT> struct rowmajor { WT v; };
template <typename T> struct is_rowmajor { static constexpr bool value = false; };
template <typename WT> struct is_rowmajor<rowmajor<WT>> { static constexpr bool value = true; };

template <typename WT>
static void rm_matmul_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y,
                           int64_t ldy, float* scratch) {
    if (gemv_path(T)) {
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = r0; r < r1; r++) y[t * ldy + r - r0] = dot<WT>(x + t * K, W + r * K, K);
        return;
    }
    if constexpr (std::is_same<WT, float>::value) {
        gemm_f32(x, T, K, W + r0 * K, r1 - r0, y, ldy);
    } else {
        for (int64_t c = r0; c < r1; c += GEMM_CHUNK) {
            const int64_t n = r1 - c < GEMM_CHUNK ? r1 - c : GEMM_CHUNK;
            for (int64_t i = 0; i < n * K; i += VW) {
                if (n * K - i >= VW) vstore(scratch + i, vload_w(W + c * K + i));
                else for (int64_t j = i; j < n * K; j++) scratch[j] = ld(W[c * K + j]);
            }
            gemm_f32(x, T, K, scratch, n, y + (c - r0), ldy);
        }
    }
}

// y[:, 0 : r1 - r0] = x . W[r0:r1]^T, by GEMV or by chunked GEMM. `ready`: an earlier call of the
// same kernel with the same x and scratch has already prepared x (quantized weights round the
// activations once per kernel call, not once per chunk of rows)
template <typename WT>
static void matmul_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y,
                        int64_t ldy, float* scratch, bool ready = false) {
    if constexpr (is_quant<WT>::value) {   // block-quantized weights: quant.h
        qmatmul_rows<WT>(x, T, K, W, r0, r1, y, ldy, scratch, ready);
    } else if constexpr (is_rowmajor<WT>::value) {   // row-major weights (training plans): above
        rm_matmul_rows(x, T, K, &W->v, r0, r1, y, ldy, scratch);
    } else {
        if (gemv_path(T)) { gemv_rows<WT>(x, T, K, W, r0, r1, y, ldy); return; }
        for (int64_t c = r0; c < r1; c += GEMM_CHUNK) {
            int64_t n = r1 - c < GEMM_CHUNK ? r1 - c : GEMM_CHUNK;
            gemm_f32(x, T, K, rows_f32<WT>(W, K, c, n, scratch), n, y + (c - r0), ldy);
        }
    }
}

// y = x W^T (+ b)
template <typename WT, int64_t K, int64_t N>
static void k_linear(int ith, int nth, const float* x, int64_t T, const WT* W, const float* b, float* y,
                     float* scratch) {
    int64_t n0, n1;
    split_range(N, ith, nth, RB, &n0, &n1);
    if (n0 >= n1) return;
    matmul_rows<WT>(x, T, K, W, n0, n1, y + n0, N, scratch);
    if (b)
        for (int64_t t = 0; t < T; t++)
            for (int64_t n = n0; n < n1; n++) y[t * N + n] += b[n];
}

static inline float act_silu(float g) { return g / (1.0f + expf(-g)); }
static inline float act_gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// y[0:n] = act(g + bg) * (u + bu), VW values at a time with e^x from vexp; the last vector is
// partial, so every value goes through the same code whatever n is (a value never depends on the
// chunk it fell in). act: silu g / (1 + e^-g); gelu_tanh 0.5 g (1 + tanh z), tanh z = 1 - 2 / (e^2z + 1)
template <int ACT>
static inline void glu_apply(const float* g, const float* u, const float* bg, const float* bu, int64_t n, float* y) {
    for (int64_t j = 0; j < n; j += VW) {
        const int64_t m = n - j < VW ? n - j : VW;
        vf gv = vload_part(g + j, m), uv = vload_part(u + j, m);
        if (bg) {
            gv += vload_part(bg + j, m);
            uv += vload_part(bu + j, m);
        }
        vf a;
        if constexpr (ACT == 0) {
            a = gv / (vexp(-gv) + 1.f);
        } else {
            const vf z = gv * (vfma(gv * gv, vset(0.044715f), vset(1.f)) * 0.7978845608028654f);
            a = gv * 0.5f * (2.f - 2.f / (vexp(z + z) + 1.f));
        }
        const vf r = a * uv;
        memcpy(y + j, &r, m * sizeof(float));
    }
}

// y[T, F] = act(x Wg^T + bg) * (x Wu^T + bu), W = [Wg; Wu] ([2F, K])
template <typename WT, int64_t K, int64_t F, int ACT>
static void k_linear_glu(int ith, int nth, const float* x, int64_t T, const WT* W, const float* b, float* y,
                         float* scratch) {
    int64_t f0, f1;
    split_range(F, ith, nth, RB, &f0, &f1);
    const int64_t C = T <= GEMV_MAX_T ? (f1 - f0) : GEMM_CHUNK;
    float* g = scratch;            // [T, C]
    float* u = scratch + T * C;    // [T, C]
    float* wbuf = u + T * C;       // weight rows converted for GEMM
    for (int64_t c = f0; c < f1; c += C) {
        int64_t n = f1 - c < C ? f1 - c : C;
        matmul_rows<WT>(x, T, K, W, c, c + n, g, C, wbuf, c > f0);
        matmul_rows<WT>(x, T, K, W, F + c, F + c + n, u, C, wbuf, true);
        for (int64_t t = 0; t < T; t++) glu_apply<ACT>(g + t * C, u + t * C, b ? b + c : nullptr, b ? b + F + c : nullptr, n,
                                                      y + t * F + c);
    }
}
