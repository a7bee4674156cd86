// ---- linear.h: y[T, N] = x[T, K] . W[N, K]^T for weights in float32 / float16 / bfloat16 ----
// Batches up to GEMV_MAX_T tokens read the packed weights once, straight from their dtype: one or
// two tokens per pass over the matrix (GEMV), from three tokens tiles of 4 tokens x 4 rows that
// reuse each 8-row block from cache. Larger batches convert a chunk of weight rows to float32
// and call the BLAS sgemm on it.
// Threads split the N output rows; every kernel takes (ith, nth) and works on its slice.

// The tiles beat rows_f32 + OpenBLAS sgemm up to ~96-128 tokens here (Zen4, 2 threads, f32
// weights, SmolLM2-135M layer shapes: 16 tokens 24 vs 57 ms, 64 tokens 78 vs 110 ms, 128 tokens
// 182 vs 180 ms; 1B shapes: 64 tokens 99 vs 146 ms); 64 leaves a margin. Without AVX-512 the
// tiles are scalar and the sgemm wins sooner.
#if defined(__AVX512F__)
#define GEMV_MAX_T 64   // keep in step with lower.py (which sizes scratch for this larger value)
#else
#define GEMV_MAX_T 4
#endif
#define GEMM_CHUNK 256
#define GEMV_PREFETCH 4096   // bytes ahead of the packed weight stream

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
// GEMV reads one sequential stream. packed_at(W, K, n, k) is element (n, k).
#define RB 8
static inline int64_t kpad(int64_t K) { return (K + 15) / 16 * 16; }
template <typename WT>
static inline const WT* packed_at(const WT* W, int64_t K, int64_t n, int64_t k) {
    return W + ((n / RB) * (kpad(K) / 16) + k / 16) * (RB * 16) + (n % RB) * 16 + k % 16;
}

// y[t, row - r0] (ldy) for rows [r0, r1) and TB <= 2 rows of x
template <typename WT, int TB>
static void gemv_block(const float* x, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y, int64_t ldy) {
    const int64_t KC = kpad(K) / 16;
    for (int64_t nb = r0 / RB; nb * RB < r1; nb++) {
        const WT* w = W + nb * KC * RB * 16;
        float out[TB][RB];
#if defined(__AVX512F__)
        __m512 acc[TB][RB];
        for (int t = 0; t < TB; t++)
            for (int r = 0; r < RB; r++) acc[t][r] = _mm512_setzero_ps();
        for (int64_t kc = 0; kc < KC; kc++) {
            __mmask16 m = (kc + 1) * 16 <= K ? (__mmask16)0xffff : tail_mask(K - kc * 16);
            __m512 xv[TB];
            for (int t = 0; t < TB; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * K + kc * 16);
            {   // software prefetch 4 KiB ahead in the stream: +2-3% decode on the 1B shape here
                const char* pf = (const char*)(w + kc * RB * 16) + GEMV_PREFETCH;
                for (int l = 0; l < (int)(RB * 16 * sizeof(WT)); l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
            }
            for (int r = 0; r < RB; r++) {
                __m512 wv = load16(w + (kc * RB + r) * 16);
                for (int t = 0; t < TB; t++) acc[t][r] = _mm512_fmadd_ps(wv, xv[t], acc[t][r]);
            }
        }
        for (int t = 0; t < TB; t++)
            for (int r = 0; r < RB; r++) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
#else
        for (int t = 0; t < TB; t++)
            for (int r = 0; r < RB; r++) {
                float s = 0.f;
                for (int64_t k = 0; k < K; k++) s += x[t * K + k] * ld(w[(k / 16 * RB + r) * 16 + k % 16]);
                out[t][r] = s;
            }
#endif
        for (int r = 0; r < RB; r++) {
            int64_t row = nb * RB + r;
            if (row >= r0 && row < r1)
                for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = out[t][r];
        }
    }
}

#if defined(__AVX512F__)
// The sums of a, b, c, d as one 4-vector, added in the order of _mm512_reduce_add_ps (GCC's:
// lanes 8 apart, then 4, 2, 1), so that a token's result is bit for bit the one gemv_block gives
// it alone: batching never changes a sequence's logits. 14 instructions for four sums.
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));   // +8
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));  // +4
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4e));                                                // +2
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xb1));                                                // +1
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), q));
}
#endif

// One tile: out[t * RB + rr + r] = x[t] . row rr + r of the packed block at w, for TB <= 4 tokens
// and RH = 4 rows. 16 accumulators, 4 x vectors and a w vector fit the 32 zmm registers (6 x 4
// tiles measured within noise of these, 3 x 8 and 2 x 8 no better). Tile p of the P tiles of a
// block also prefetches its 1/P share of the next block into L2, so memory streams while the
// block in cache is computed on. SmolLM2's 30 layers of f32 linears, 16 tokens, one thread:
// 65 ms prefetching only from the first tile, 50 ms spread into L1 (_MM_HINT_T0), 45 ms into L2.
static const int RH = 4;
template <typename WT, int TB>
static inline void gemv_tile(const float* x, int64_t K, const WT* w, int rr, int p, int P, float* out) {
#if defined(__AVX512F__)
    const int64_t KC = kpad(K) / 16;
    const int L = (int)(RB * 16 * sizeof(WT) / 64);   // cache lines per 16-column chunk of a block
    const char* next = (const char*)(w + KC * RB * 16);
    int64_t line = p * KC * L / P;                     // next block's lines: [p, p + 1) * KC * L / P
    int credit = 0;
    __m512 acc[TB][RH];
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < RH; r++) acc[t][r] = _mm512_setzero_ps();
    auto step = [&](int64_t kc, bool tail) __attribute__((always_inline)) {
        __m512 xv[TB];
        for (int t = 0; t < TB; t++)
            xv[t] = tail ? _mm512_maskz_loadu_ps(tail_mask(K - kc * 16), x + t * K + kc * 16)
                         : _mm512_loadu_ps(x + t * K + kc * 16);
        for (credit += L; credit >= P; credit -= P, line++) _mm_prefetch(next + line * 64, _MM_HINT_T1);
        for (int r = 0; r < RH; r++) {
            __m512 wv = load16(w + (kc * RB + rr + r) * 16);
            for (int t = 0; t < TB; t++) acc[t][r] = _mm512_fmadd_ps(wv, xv[t], acc[t][r]);
        }
    };
    int64_t kc = 0;
    for (; kc < K / 16; kc++) step(kc, false);   // the K tail apart: no mask in the loop, ~5% when compute-bound
    if (kc < KC) step(kc, true);
    for (int t = 0; t < TB; t++) _mm_storeu_ps(out + t * RB + rr, reduce4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
#else
    (void)p, (void)P;
    for (int t = 0; t < TB; t++)
        for (int r = rr; r < rr + RH; r++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += x[t * K + k] * ld(w[(k / 16 * RB + r) * 16 + k % 16]);
            out[t * RB + r] = s;
        }
#endif
}

// y[t, row - r0] (ldy) for rows [r0, r1) and 3 <= T <= GEMV_MAX_T: each block comes from memory
// once, then from cache for its other tiles
template <typename WT>
static void gemv_tiles(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y,
                       int64_t ldy) {
    const int64_t KC = kpad(K) / 16;
    const int G = (int)((T + 3) / 4), P = (RB / RH) * G;   // token groups, tiles per block
    float out[GEMV_MAX_T * RB];
    for (int64_t nb = r0 / RB; nb * RB < r1; nb++) {
        const WT* w = W + nb * KC * RB * 16;
        for (int h = 0; h < RB / RH; h++) {
            int rr = h * RH;
            if (nb * RB + rr >= r1 || nb * RB + rr + RH <= r0) continue;   // these rows are outside [r0, r1)
            for (int g = 0; g < G; g++) {
                const float* xg = x + g * 4 * K;
                float* og = out + g * 4 * RB;
                int p = h * G + g;
                switch (T - g * 4 < 4 ? T - g * 4 : 4) {
                    case 1: gemv_tile<WT, 1>(xg, K, w, rr, p, P, og); break;
                    case 2: gemv_tile<WT, 2>(xg, K, w, rr, p, P, og); break;
                    case 3: gemv_tile<WT, 3>(xg, K, w, rr, p, P, og); break;
                    default: gemv_tile<WT, 4>(xg, K, w, rr, p, P, og); break;
                }
            }
        }
        for (int r = 0; r < RB; r++) {
            int64_t row = nb * RB + r;
            if (row >= r0 && row < r1)
                for (int64_t t = 0; t < T; t++) y[t * ldy + row - r0] = out[t * RB + r];
        }
    }
}

// One or two tokens: whole 8-row chunks per pass stream faster than the tiles (SmolLM2's f32
// linears, one thread: 18 vs 23-25 ms; float16 about even)
template <typename WT>
static void gemv_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y, int64_t ldy) {
    if (T >= 3) { gemv_tiles<WT>(x, T, K, W, r0, r1, y, ldy); return; }
    if (T == 2) gemv_block<WT, 2>(x, K, W, r0, r1, y, ldy);
    else gemv_block<WT, 1>(x, K, W, r0, r1, y, ldy);
}

// packed rows [r0, r0 + n) as a float32 row-major [n, K] matrix in buf
template <typename WT>
static const float* rows_f32(const WT* W, int64_t K, int64_t r0, int64_t n, float* buf) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < K; k += 16) {
            const WT* src = packed_at(W, K, r0 + i, k);
            int64_t m = K - k < 16 ? K - k : 16;
            for (int64_t j = 0; j < m; j++) buf[i * K + k + j] = ld(src[j]);
        }
    return buf;
}

// y[:, 0 : r1 - r0] = x . W[r0:r1]^T, by GEMV or by chunked GEMM
template <typename WT>
static void matmul_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t r0, int64_t r1, float* y,
                        int64_t ldy, float* scratch) {
    if constexpr (is_quant<WT>::value) {   // block-quantized weights: quant.h
        qmatmul_rows<WT>(x, T, K, W, r0, r1, y, ldy, scratch);
    } else {
        if (T <= GEMV_MAX_T) { gemv_rows<WT>(x, T, K, W, r0, r1, y, ldy); return; }
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
        matmul_rows<WT>(x, T, K, W, c, c + n, g, C, wbuf);
        matmul_rows<WT>(x, T, K, W, F + c, F + c + n, u, C, wbuf);
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < n; j++) {
                float gv = g[t * C + j] + (b ? b[c + j] : 0.f), uv = u[t * C + j] + (b ? b[F + c + j] : 0.f);
                y[t * F + c + j] = (ACT == 0 ? act_silu(gv) : act_gelu_tanh(gv)) * uv;
            }
    }
}
