// ---- linear.h: y[T, N] = x[T, K] . W[N, K]^T for weights in float32 / float16 / bfloat16 ----
// Decode-sized batches (T <= GEMV_MAX_T) stream each weight row once for all T rows (GEMV);
// larger batches convert a chunk of weight rows to float32 and call the BLAS sgemm on it.
// Threads split the N output rows; every kernel takes (ith, nth) and works on its slice.

#define GEMV_MAX_T 8
#define GEMM_CHUNK 256

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

// rows [n0, n1) of y (ldy) for T <= GEMV_MAX_T: 4 weight rows x TB tokens per pass
template <typename WT, int TB>
static void gemv_block(const float* x, int64_t K, const WT* W, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    int64_t n = n0;
#if defined(__AVX512F__)
    for (; n + 4 <= n1; n += 4) {
        __m512 acc[4][TB];
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < TB; t++) acc[r][t] = _mm512_setzero_ps();
        const WT* w = W + n * K;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = load16(w + r * K + k);
            for (int t = 0; t < TB; t++) {
                __m512 xv = _mm512_loadu_ps(x + t * K + k);
                for (int r = 0; r < 4; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        if (k < K) {
            __mmask16 m = tail_mask(K - k);
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = load16(w + r * K + k, m);
            for (int t = 0; t < TB; t++) {
                __m512 xv = _mm512_maskz_loadu_ps(m, x + t * K + k);
                for (int r = 0; r < 4; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        for (int t = 0; t < TB; t++)
            for (int r = 0; r < 4; r++) y[t * ldy + n + r] = _mm512_reduce_add_ps(acc[r][t]);
    }
#endif
    for (; n < n1; n++)
        for (int t = 0; t < TB; t++) y[t * ldy + n] = dot(x + t * K, W + n * K, K);
}

template <typename WT>
static void gemv_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) gemv_block<WT, 4>(x + t * K, K, W, n0, n1, y + t * ldy, ldy);
    switch (T - t) {
        case 3: gemv_block<WT, 3>(x + t * K, K, W, n0, n1, y + t * ldy, ldy); break;
        case 2: gemv_block<WT, 2>(x + t * K, K, W, n0, n1, y + t * ldy, ldy); break;
        case 1: gemv_block<WT, 1>(x + t * K, K, W, n0, n1, y + t * ldy, ldy); break;
    }
}

// weight rows [r0, r0 + n) as float32: a pointer into W itself, or converted into `buf`
template <typename WT>
static const float* rows_f32(const WT* W, int64_t K, int64_t r0, int64_t n, float* buf) {
    for (int64_t i = 0; i < n * K; i++) buf[i] = ld(W[r0 * K + i]);
    return buf;
}
template <>
const float* rows_f32<float>(const float* W, int64_t K, int64_t r0, int64_t n, float* buf) { return W + r0 * K; }

// y[:, n0:n1] = x . W[n0:n1]^T, by GEMV or by chunked GEMM
template <typename WT>
static void matmul_rows(const float* x, int64_t T, int64_t K, const WT* W, int64_t n0, int64_t n1, float* y,
                        int64_t ldy, float* scratch) {
    if (T <= GEMV_MAX_T) { gemv_rows<WT>(x, T, K, W, n0, n1, y, ldy); return; }
    for (int64_t c = n0; c < n1; c += GEMM_CHUNK) {
        int64_t n = n1 - c < GEMM_CHUNK ? n1 - c : GEMM_CHUNK;
        gemm_f32(x, T, K, rows_f32<WT>(W, K, c, n, scratch), n, y + c, ldy);
    }
}

// y = x W^T (+ b)
template <typename WT, int64_t K, int64_t N>
static void k_linear(int ith, int nth, const float* x, int64_t T, const WT* W, const float* b, float* y,
                     float* scratch) {
    int64_t n0, n1;
    split_range(N, ith, nth, 16, &n0, &n1);
    if (n0 >= n1) return;
    matmul_rows<WT>(x, T, K, W, n0, n1, y, N, scratch);
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
    split_range(F, ith, nth, 16, &f0, &f1);
    const int64_t C = T <= GEMV_MAX_T ? (f1 - f0) : GEMM_CHUNK;
    float* g = scratch;            // [T, C]
    float* u = scratch + T * C;    // [T, C]
    float* wbuf = u + T * C;       // weight rows converted for GEMM
    for (int64_t c = f0; c < f1; c += C) {
        int64_t n = f1 - c < C ? f1 - c : C;
        matmul_rows<WT>(x, T, K, W + c * K, 0, n, g, C, wbuf);
        matmul_rows<WT>(x, T, K, W + (F + c) * K, 0, n, u, C, wbuf);
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < n; j++) {
                float gv = g[t * C + j] + (b ? b[c + j] : 0.f), uv = u[t * C + j] + (b ? b[F + c + j] : 0.f);
                y[t * F + c + j] = (ACT == 0 ? act_silu(gv) : act_gelu_tanh(gv)) * uv;
            }
    }
}
