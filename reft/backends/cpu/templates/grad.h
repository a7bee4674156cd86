// ---- grad.h: the backward ops of training graphs (reft/ir/ops/grad.py gives each formula) --------
// Activations and gradients are float32; a weight operand may be any float dtype (read as float32).
// Matmuls go to the BLAS sgemm (sgemm_ex: either operand transposed, accumulate with beta);
// reductions over rows that cross threads (rms_norm_grad's dw) write fixed blocks of rows into
// shared scratch and fold them in block order in a second kernel, so they do not depend on the
// thread count. Included only in sources whose graph has a backward op (compile.py).

// C[m, n] (ldc) = A . B + beta C, row-major; A is [m, k] (lda), or [k, m] read transposed when TA;
// B is [k, n] (ldb), or [n, k] read transposed when TB
static void sgemm_ex(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float beta, float* C, int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {   // no products: C = beta C (BLAS may return early)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
        return;
    }
    if (g_sgemm) {
        g_sgemm(101 /*RowMajor*/, ta ? 112 : 111, tb ? 112 : 111, (int)m, (int)n, (int)k, 1.0f, A, (int)lda, B, (int)ldb,
                beta, C, (int)ldc);
        return;
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float s = 0.f;
            for (int64_t p = 0; p < k; p++)
                s += (ta ? A[p * lda + i] : A[i * lda + p]) * (tb ? B[j * ldb + p] : B[p * ldb + j]);
            C[i * ldc + j] = s + (beta == 0.f ? 0.f : beta * C[i * ldc + j]);
        }
}

// rows [r0, r0 + n) of a row-major [., K] weight, columns [k0, k0 + kk), as float32 [n, kk] in buf
template <typename WT>
static void block_f32(const WT* W, int64_t K, int64_t r0, int64_t n, int64_t k0, int64_t kk, float* buf) {
    for (int64_t i = 0; i < n; i++) {
        const WT* src = W + (r0 + i) * K + k0;
        float* dst = buf + i * kk;
        int64_t j = 0;
        for (; j + VW <= kk; j += VW) vstore(dst + j, vload_w(src + j));
        for (; j < kk; j++) dst[j] = ld(src[j]);
    }
}

// body_v for j = 0, VW, 2 VW, ... while a whole vector fits in n, then body_s for each remaining j
#define VLOOP(n, body_v, body_s)                            \
    {                                                       \
        int64_t j_ = 0;                                     \
        for (; j_ + VW <= (n); j_ += VW) { const int64_t j = j_; body_v; } \
        for (; j_ < (n); j_++) { const int64_t j = j_; body_s; }          \
    }

// -- zeros_like, sum_rows, scatter_rows ---------------------------------------------------------
static void k_zero_bytes(int ith, int nth, char* out, int64_t bytes) {
    int64_t b0, b1;
    split_range(bytes, ith, nth, 256, &b0, &b1);
    if (b1 > b0) memset(out + b0, 0, b1 - b0);
}

// y[C] = sum over M rows of x[M, C]: threads split the columns, rows are added in order
template <typename XT>
static void k_sum_rows(int ith, int nth, const XT* x, int64_t M, int64_t C, XT* y, float* scratch) {
    int64_t c0, c1;
    split_range(C, ith, nth, VW, &c0, &c1);
    const int64_t n = c1 - c0;
    if (n <= 0) return;
    float* acc = std::is_same<XT, float>::value ? (float*)y + c0 : scratch;
    memset(acc, 0, n * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        const XT* row = x + m * C + c0;
        if constexpr (std::is_same<XT, float>::value) {
            VLOOP(n, vstore(acc + j, vload(acc + j) + vload(row + j)), acc[j] += row[j]);
        } else {
            for (int64_t j = 0; j < n; j++) acc[j] += ld(row[j]);
        }
    }
    if constexpr (!std::is_same<XT, float>::value)
        for (int64_t j = 0; j < n; j++) y[c0 + j] = st<XT>(acc[j]);
}

// out = base, then out[rows[r]] += src[r] for r in order: threads split the destination rows and
// each scans every index (repeated rows add up in index order; rows outside [0, N) are skipped)
template <typename XT, typename IT>
static void k_scatter_rows(int ith, int nth, const XT* base, int64_t N, const IT* rows, int64_t R, const XT* src,
                           int64_t D, XT* out) {
    int64_t n0, n1;
    split_range(N, ith, nth, 1, &n0, &n1);
    if (n0 >= n1) return;
    memcpy(out + n0 * D, base + n0 * D, (n1 - n0) * D * sizeof(XT));
    for (int64_t r = 0; r < R; r++) {
        const int64_t row = (int64_t)rows[r];
        if (row < n0 || row >= n1) continue;
        XT* o = out + row * D;
        const XT* s = src + r * D;
        if constexpr (std::is_same<XT, float>::value) {
            VLOOP(D, vstore(o + j, vload(o + j) + vload(s + j)), o[j] += s[j]);
        } else {
            for (int64_t j = 0; j < D; j++) o[j] = st<XT>(ld(o[j]) + ld(s[j]));
        }
    }
}

// -- linear gradients ---------------------------------------------------------------------------
// dx[M, K] = dy[M, N] . w[N, K] (w row-major, any float dtype). Threads split the K columns; a
// float32 w is one sgemm per thread, other dtypes convert GEMM_CHUNK rows of the thread's columns
// at a time into scratch and accumulate
template <typename WT>
static void k_linear_grad_input(int ith, int nth, const float* dy, int64_t M, int64_t N, const WT* w, int64_t K,
                                float* dx, float* scratch) {
    int64_t k0, k1;
    split_range(K, ith, nth, 16, &k0, &k1);
    const int64_t kk = k1 - k0;
    if (kk <= 0) return;
    if constexpr (std::is_same<WT, float>::value) {
        sgemm_ex(false, false, M, kk, N, dy, N, w + k0, K, 0.f, dx + k0, K);
    } else {
        if (N == 0) sgemm_ex(false, false, M, kk, 0, dy, N, scratch, kk, 0.f, dx + k0, K);
        for (int64_t c = 0; c < N; c += GEMM_CHUNK) {
            const int64_t n = N - c < GEMM_CHUNK ? N - c : GEMM_CHUNK;
            block_f32<WT>(w, K, c, n, k0, kk, scratch);
            sgemm_ex(false, false, M, kk, n, dy + c, N, scratch, kk, c > 0 ? 1.f : 0.f, dx + k0, K);
        }
    }
}

// dw[N, K] = dy[M, N]^T . x[M, K]: threads split the N rows of dw, one sgemm each
static void k_linear_grad_weight(int ith, int nth, const float* dy, int64_t M, int64_t N, const float* x, int64_t K,
                                 float* dw) {
    int64_t n0, n1;
    split_range(N, ith, nth, 8, &n0, &n1);
    sgemm_ex(true, false, n1 - n0, K, M, dy + n0, N, x, K, 0.f, dw + n0 * K, K);
}

// -- rms_norm_grad --------------------------------------------------------------------------------
// Rows go in blocks of B: a block's dx rows and its dw share (sum of dy x r over the block's rows)
// into part[block, D] (shared scratch); k_rms_norm_grad_fold adds the shares in block order.
template <typename WT, int64_t B, bool OFFSET = false>
static void k_rms_norm_grad(int ith, int nth, const float* dy, const float* x, const WT* w, int64_t rows, int64_t D,
                            float eps, float* dx, float* part, float off = 0.f) {
    const int64_t nb = (rows + B - 1) / B;
    int64_t b0, b1;
    split_range(nb, ith, nth, 1, &b0, &b1);
    for (int64_t b = b0; b < b1; b++) {
        float* p = part + b * D;
        memset(p, 0, D * sizeof(float));
        for (int64_t r = b * B; r < rows && r < (b + 1) * B; r++) {
            const float* xr = x + r * D;
            const float* gr = dy + r * D;
            float ss = 0.f, gx = 0.f;
            for (int64_t i = 0; i < D; i++) {
                ss += xr[i] * xr[i];
                gx += gr[i] * norm_w<OFFSET>(w[i], off) * xr[i];
            }
            const float inv = 1.0f / sqrtf(ss / (float)D + eps);
            const float c = inv * inv * inv * (gx / (float)D);
            for (int64_t i = 0; i < D; i++) {
                dx[r * D + i] = inv * gr[i] * norm_w<OFFSET>(w[i], off) - xr[i] * c;
                p[i] += gr[i] * xr[i] * inv;
            }
        }
    }
}

template <int64_t B>
static void k_rms_norm_grad_fold(int ith, int nth, const float* part, int64_t rows, int64_t D, float* dw) {
    const int64_t nb = (rows + B - 1) / B;
    int64_t i0, i1;
    split_range(D, ith, nth, VW, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        float s = 0.f;
        for (int64_t b = 0; b < nb; b++) s += part[b * D + i];
        dw[i] = s;
    }
}

// -- rope_grad: the inverse rotation (rope with every angle negated) --------------------------------
template <typename IT, int64_t H, int64_t D, int64_t ROT>
static void k_rope_grad(int ith, int nth, const float* dy, const IT* pos, int64_t T, const float* inv_freq, float* dx,
                        LongRope<IT> lr = {}) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    constexpr int64_t half = ROT / 2;
    float tab[2 * half > 0 ? 2 * half : 1];
    for (int64_t t = t0; t < t1; t++) {
        rope_rows<IT>(pos, t, 1, inv_freq, lr, half, tab);
        for (int64_t h = 0; h < H; h++) {
            const float* src = dy + (t * H + h) * D;
            float* out = dx + (t * H + h) * D;
            for (int64_t i = 0; i < half; i++) {
                const float c = tab[i], s = tab[half + i], x1 = src[i], x2 = src[i + half];
                out[i] = x1 * c + x2 * s;
                out[i + half] = x2 * c - x1 * s;
            }
            for (int64_t i = ROT; i < D; i++) out[i] = src[i];
        }
    }
}

// -- activations --------------------------------------------------------------------------------
// d/dg act(g) and act(g) per lane. silu: s = 1 / (1 + e^-g), act = g s, act' = s (1 + g (1 - s));
// gelu_tanh: t = tanh(c (g + 0.044715 g^3)) = 1 - 2 / (e^2z + 1), act = g (1 + t) / 2,
// act' = (1 + t) / 2 + g (1 - t^2) c (1 + 3 0.044715 g^2) / 2
template <int ACT>
static inline vf act_grad_v(vf g, vf* act) {
    if constexpr (ACT == 0) {
        const vf s = 1.f / (vexp(-g) + 1.f);
        if (act) *act = g * s;
        return s * (1.f + g * (1.f - s));
    } else {
        const float c = 0.7978845608028654f;
        const vf z = g * (vfma(g * g, vset(0.044715f), vset(1.f)) * c);
        const vf t = 1.f - 2.f / (vexp(z + z) + 1.f);
        if (act) *act = g * 0.5f * (1.f + t);
        return 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * c * vfma(g * g, vset(3 * 0.044715f), vset(1.f));
    }
}

// out[0:n] = dy * act'(x), VW lanes at a time (the last vector partial)
template <int ACT>
static inline void act_grad_row(const float* dy, const float* x, int64_t n, float* out) {
    for (int64_t j = 0; j < n; j += VW) {
        const int64_t m = n - j < VW ? n - j : VW;
        const vf r = vload_part(dy + j, m) * act_grad_v<ACT>(vload_part(x + j, m), nullptr);
        memcpy(out + j, &r, m * sizeof(float));
    }
}

// silu_grad (ACT 0), gelu_tanh_grad (ACT 1) over n values
template <int ACT>
static void k_act_grad(int ith, int nth, const float* dy, const float* x, int64_t n, float* out) {
    int64_t i0, i1;
    split_range(n, ith, nth, 4 * VW, &i0, &i1);
    if (i1 > i0) act_grad_row<ACT>(dy + i0, x + i0, i1 - i0, out + i0);
}

// softcap_grad: out = dy (1 - tanh(x / cap)^2) over n values
static void k_softcap_grad(int ith, int nth, const float* dy, const float* x, int64_t n, float cap, float* out) {
    int64_t i0, i1;
    split_range(n, ith, nth, 4 * VW, &i0, &i1);
    for (int64_t j = i0; j < i1; j += VW) {
        const int64_t m = i1 - j < VW ? i1 - j : VW;
        const vf t = vtanh(vload_part(x + j, m) / cap);
        const vf r = vload_part(dy + j, m) * (1.f - t * t);
        memcpy(out + j, &r, m * sizeof(float));
    }
}

// y = (gate, up) rows of 2F: out = (dh up act'(gate), dh act(gate))
template <int ACT>
static void k_glu_grad(int ith, int nth, const float* dh, const float* y, int64_t rows, int64_t F, float* out) {
    int64_t r0, r1;
    split_range(rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const float* d = dh + r * F;
        const float* g = y + r * 2 * F;
        const float* u = g + F;
        float* o = out + r * 2 * F;
        for (int64_t j = 0; j < F; j += VW) {
            const int64_t m = F - j < VW ? F - j : VW;
            const vf dv = vload_part(d + j, m);
            vf act;
            const vf dg = dv * vload_part(u + j, m) * act_grad_v<ACT>(vload_part(g + j, m), &act);
            const vf du = dv * act;
            memcpy(o + j, &dg, m * sizeof(float));
            memcpy(o + F + j, &du, m * sizeof(float));
        }
    }
}

// dx = y (dy - sum(dy y)) per row of D
static void k_softmax_grad(int ith, int nth, const float* dy, const float* y, int64_t rows, int64_t D, float* dx) {
    int64_t r0, r1;
    split_range(rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const float* d = dy + r * D;
        const float* p = y + r * D;
        const float s = dot<float>(d, p, D);
        float* o = dx + r * D;
        VLOOP(D, vstore(o + j, vload(p + j) * (vload(d + j) - s)), o[j] = p[j] * (d[j] - s));
    }
}

// -- linear_grad_input on a block-quantized weight (QLoRA: a LoRA base kept in its GGUF blocks) ---
// dx[M, K] = dy[M, N] . W[N, K], W in quant.h's block rows. The forward's integer dot products run
// along a row's blocks; this product runs down W's columns, where no block-wise integer form
// helps, so the blocks are decoded to float32 instead (qrow_f32, GEMM_CHUNK rows at a time, only
// the thread's columns, into scratch) and the BLAS sgemm accumulates each chunk into dx. A training
// batch has hundreds of tokens (M), so each decoded value serves M multiply-adds inside the sgemm
// and the decode is a small share of the product, paid once per call like the forward's. Threads
// split K at the format's decode unit (a block of 32 values, a K-quant super-block of 256) and
// decode only their own blocks; no sums cross threads. llama.cpp's block types only (a unit is at
// byte (k / UNIT) * row_bytes(UNIT) of its row).
template <typename QT>
static void k_linear_grad_input_q(int ith, int nth, const float* dy, int64_t M, int64_t N, const QT* Wq, int64_t K,
                                  float* dx, float* scratch) {
    constexpr int64_t UNIT = 32 * QF<QT>::SUB;
    const uint8_t* W = (const uint8_t*)Wq;
    const int64_t RBY = QF<QT>::row_bytes(K), at = QF<QT>::row_bytes(UNIT);
    int64_t k0, k1;
    split_range(K, ith, nth, UNIT, &k0, &k1);
    const int64_t kk = k1 - k0;
    if (kk <= 0) return;
    if (N == 0) sgemm_ex(false, false, M, kk, 0, dy, N, scratch, kk, 0.f, dx + k0, K);
    for (int64_t c = 0; c < N; c += GEMM_CHUNK) {
        const int64_t n = N - c < GEMM_CHUNK ? N - c : GEMM_CHUNK;
        for (int64_t i = 0; i < n; i++) qrow_f32<QT>(W + (c + i) * RBY + k0 / UNIT * at, kk, scratch + i * kk);
        sgemm_ex(false, false, M, kk, n, dy + c, N, scratch, kk, c > 0 ? 1.f : 0.f, dx + k0, K);
    }
}

// -- dropout (reft/ir/ops/dropout.py): y = x / (1 - p) where the mask keeps x, else 0 ------------------
// An element's mask bits are the (i + 1)-th SplitMix64 output from mix64(key ^ mix64(stream)), i its
// flat index: the same bits as the reference whatever the thread split.
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void k_dropout(int ith, int nth, const float* x, int64_t n, const int64_t* key, uint64_t stream,
                      uint64_t threshold, float scale, float* y) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    const uint64_t base = mix64((uint64_t)key[0] ^ mix64(stream));
    for (int64_t i = i0; i < i1; i++) {
        const uint64_t r = mix64(base + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull);
        y[i] = (r >> 40) >= threshold ? x[i] * scale : 0.f;
    }
}
