// ---- moe.h: mixture-of-experts kernels: router, dispatch and the grouped expert matmuls ----------
// A token's KS slots (slot s = t * KS + j: its j-th chosen expert) are the unit of work. The router
// picks the experts, k_moe_dispatch lists the slots by expert (order, offsets: reft/ir/ops/moe.py),
// and each grouped matmul gathers one expert's rows of x, multiplies them by that expert's matrix
// with the linear kernels (matmul_rows: the GEMV and tiles for a few rows, the sgemm above
// GEMV_MAX_T, quant.h for quantized experts) and scatters the results. Threads split the output
// rows of every expert as a linear splits N, so a decode step streams only the chosen experts'
// weights, each once, whatever the number of experts. Included only by plans with experts.
// GPT-OSS adds optional bias rows [E, N] (trailing arguments, null: none), the clamped SwiGLU
// (ACT 2 of k_expert_glu, and the standalone k_swiglu_oai) and the top-k-then-softmax router.

// expert e's [N, K] matrix of a stack [E, N, K], in the weight's storage: packed 8-row blocks
// (linear.h), quantized rows (quant.h), or row-major
template <typename WT>
static inline const WT* expert_matrix(const WT* W, int64_t e, int64_t N, int64_t K) {
    if constexpr (is_quant<WT>::value) return (const WT*)((const uint8_t*)W + e * N * QF<WT>::row_bytes(K));
    else if constexpr (is_rowmajor<WT>::value) return W + e * N * K;
    else return W + e * ((N + RB - 1) / RB) * RB * kpad(K);
}

// ids[t, :], w[t, :] = the KS most probable of softmax(logits[t]) (the lower id first on ties), their
// probabilities renormalised to sum 1 when NORM (Mixtral; Qwen3-MoE with norm_topk_prob)
template <typename XT, int64_t E, int64_t KS, bool NORM>
static void k_router_softmax_topk(int ith, int nth, const XT* logits, int64_t T, int32_t* ids, float* w) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const XT* x = logits + t * E;
        float p[E];
        float mx = ld(x[0]), sum = 0.f, kept = 0.f;
        for (int64_t e = 1; e < E; e++) mx = ld(x[e]) > mx ? ld(x[e]) : mx;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(ld(x[e]) - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        for (int64_t j = 0; j < KS; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)   // taken experts are marked -1
                if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
            if (best < 0) best = 0;   // NaN logits: any id, but never out of bounds
            ids[t * KS + j] = (int32_t)best;
            w[t * KS + j] = p[best];
            kept += p[best];
            p[best] = -1.f;
        }
        if (NORM)
            for (int64_t j = 0; j < KS; j++) w[t * KS + j] /= kept;
    }
}

// ids[t, :] = the KS largest logits[t] (the lower id first on ties), w[t, :] = softmax over those KS
// only (GPT-OSS). NORM has nothing to do: the weights sum to 1 already (every router takes it).
template <typename XT, int64_t E, int64_t KS, bool NORM>
static void k_router_topk_softmax(int ith, int nth, const XT* logits, int64_t T, int32_t* ids, float* w) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        float x[E], top[KS], sum = 0.f;
        for (int64_t e = 0; e < E; e++) x[e] = ld(logits[t * E + e]);
        for (int64_t j = 0; j < KS; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)   // taken experts are marked -inf
                if (x[e] != -INFINITY && (best < 0 || x[e] > x[best])) best = e;
            if (best < 0) best = 0;   // NaN / -inf logits: any id, but never out of bounds
            ids[t * KS + j] = (int32_t)best;
            top[j] = x[best];
            x[best] = -INFINITY;
        }
        const float mx = top[0];   // the largest
        for (int64_t j = 0; j < KS; j++) sum += (top[j] = expf(top[j] - mx));
        for (int64_t j = 0; j < KS; j++) w[t * KS + j] = top[j] / sum;
    }
}

// order = the T * KS slots by ascending expert, each expert's in slot order; expert e owns
// order[offsets[e] : offsets[e + 1]]. A counting sort of a few integers: one thread.
template <int64_t E, int64_t KS>
static void k_moe_dispatch(int ith, int nth, const int32_t* ids, int64_t T, int32_t* order, int32_t* offsets) {
    (void)nth;
    if (ith != 0) return;
    int64_t next[E + 1] = {};
    for (int64_t s = 0; s < T * KS; s++)
        if ((uint32_t)ids[s] < (uint32_t)E) next[ids[s] + 1]++;   // ids come from the router: always in range
    for (int64_t e = 0; e < E; e++) next[e + 1] += next[e];
    for (int64_t e = 0; e <= E; e++) offsets[e] = (int32_t)next[e];
    for (int64_t s = 0; s < T * KS; s++)
        if ((uint32_t)ids[s] < (uint32_t)E) order[next[ids[s]]++] = (int32_t)s;
}

// xg[i] = x[slots[i] / div] (K floats each; div = KS: a token's row serves all of its slots, 1: a
// row per slot)
static inline void gather_rows(const float* x, const int32_t* slots, int64_t n, int64_t div, int64_t K, float* xg) {
    for (int64_t i = 0; i < n; i++) memcpy(xg + i * K, x + (slots[i] / div) * K, K * sizeof(float));
}

// fn(e, slots, rows) for each expert's slots, in pieces of at most T rows: the scratch holds T
// gathered rows, and a router gives an expert at most one slot per token, so there is one piece
// per chosen expert unless ids repeat within a token
template <typename Fn>
static inline void for_expert_pieces(int64_t E, int64_t T, const int32_t* order, const int32_t* offsets, Fn fn) {
    for (int64_t e = 0; e < E; e++)
        for (int64_t p = offsets[e]; p < offsets[e + 1]; p += T)
            fn(e, order + p, offsets[e + 1] - p < T ? offsets[e + 1] - p : T);
}

// y[0:n] += b[0:n] (an expert's bias row; b null: none)
static inline void add_bias(float* y, const float* b, int64_t n) {
    if (b)
        for (int64_t r = 0; r < n; r++) y[r] += b[r];
}

// y[s, :] = x[s / KS] . W[e]^T (+ b[e]) for every slot s of every expert e (x [T, K], y [T * KS, N], b [E, N])
template <typename WT, int64_t E, int64_t KS, int64_t K, int64_t N>
static void k_expert_linear(int ith, int nth, const float* x, int64_t T, const int32_t* order, const int32_t* offsets,
                            const WT* W, float* y, float* scratch, const float* b = nullptr) {
    int64_t n0, n1;
    split_range(N, ith, nth, RB, &n0, &n1);
    if (n0 >= n1) return;
    const int64_t n = n1 - n0;
    float* xg = scratch;          // [rows, K]
    float* yg = xg + T * K;       // [rows, n]
    for_expert_pieces(E, T, order, offsets, [&](int64_t e, const int32_t* slots, int64_t rows) {
        gather_rows(x, slots, rows, KS, K, xg);
        matmul_rows<WT>(xg, rows, K, expert_matrix(W, e, N, K), n0, n1, yg, n, yg + T * n);
        for (int64_t i = 0; i < rows; i++) {
            add_bias(yg + i * n, b ? b + e * N + n0 : nullptr, n);
            memcpy(y + slots[i] * N + n0, yg + i * n, n * sizeof(float));
        }
    });
}

// GPT-OSS's clamped SwiGLU (ACT 2 of the expert kernels): y = (clamp(u + bu, -limit, limit) + 1) *
// g' / (1 + e^(-alpha g')), g' = min(g + bg, limit); biases bg, bu may be null
static inline void swiglu_oai_apply(const float* g, const float* u, const float* bg, const float* bu, int64_t n,
                                    float* y, float alpha, float limit) {
    for (int64_t j = 0; j < n; j += VW) {
        const int64_t m = n - j < VW ? n - j : VW;
        vf gv = vload_part(g + j, m), uv = vload_part(u + j, m);
        if (bg) {
            gv += vload_part(bg + j, m);
            uv += vload_part(bu + j, m);
        }
        const vf lim = vset(limit);
        gv = gv > lim ? lim : gv;
        uv = vmax(uv > lim ? lim : uv, -lim);
        const vf r = (uv + 1.f) * (gv / (vexp(gv * -alpha) + 1.f));
        memcpy(y + j, &r, m * sizeof(float));
    }
}

// y = swiglu_oai(g, u) elementwise (the op before fuse_glu folds it into expert_glu)
template <typename XT, typename OT>
static void k_swiglu_oai(int ith, int nth, const XT* g, const XT* u, OT* out, int64_t n, float alpha, float limit) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    float gf[64], uf[64], yf[64];
    for (int64_t i = i0; i < i1; i += 64) {
        const int64_t m = i1 - i < 64 ? i1 - i : 64;
        for (int64_t j = 0; j < m; j++) { gf[j] = ld(g[i + j]); uf[j] = ld(u[i + j]); }
        swiglu_oai_apply(gf, uf, nullptr, nullptr, m, yf, alpha, limit);
        for (int64_t j = 0; j < m; j++) out[i + j] = st<OT>(yf[j]);
    }
}

// y[s, :] = act(x[s / KS] . Wg[e]^T) * (x[s / KS] . Wu[e]^T), W[e] = [Wg; Wu] ([2F, K]): k_linear_glu
// per expert; b [E, 2F] the experts' [bg; bu] rows (null: none); ACT 2: swiglu_oai_apply(alpha, limit)
template <typename WT, int64_t E, int64_t KS, int64_t K, int64_t F, int ACT>
static void k_expert_glu(int ith, int nth, const float* x, int64_t T, const int32_t* order, const int32_t* offsets,
                         const WT* W, float* y, float* scratch, const float* b = nullptr, float alpha = 0.f,
                         float limit = 0.f) {
    int64_t f0, f1;
    split_range(F, ith, nth, RB, &f0, &f1);
    if (f0 >= f1) return;
    float* xg = scratch;          // [rows, K]
    for_expert_pieces(E, T, order, offsets, [&](int64_t e, const int32_t* slots, int64_t rows) {
        gather_rows(x, slots, rows, KS, K, xg);
        const WT* We = expert_matrix(W, e, 2 * F, K);
        const int64_t C = rows <= GEMV_MAX_T ? (f1 - f0) : GEMM_CHUNK;
        float* g = xg + T * K;    // [rows, C]
        float* u = g + rows * C;  // [rows, C]
        float* wbuf = u + rows * C;
        for (int64_t c = f0; c < f1; c += C) {
            const int64_t m = f1 - c < C ? f1 - c : C;
            matmul_rows<WT>(xg, rows, K, We, c, c + m, g, C, wbuf, c > f0);
            matmul_rows<WT>(xg, rows, K, We, F + c, F + c + m, u, C, wbuf, true);
            const float* bg = b ? b + e * 2 * F + c : nullptr;
            const float* bu = b ? b + e * 2 * F + F + c : nullptr;
            for (int64_t i = 0; i < rows; i++) {
                if constexpr (ACT == 2)
                    swiglu_oai_apply(g + i * C, u + i * C, bg, bu, m, y + slots[i] * F + c, alpha, limit);
                else
                    glu_apply<ACT>(g + i * C, u + i * C, bg, bu, m, y + slots[i] * F + c);
            }
        }
    });
}

// y[t, :] = sum over token t's slots s, experts ascending, of w[s] * (x[s] . W[e]^T + b[e]) (x [T * KS, K],
// b [E, N] or null)
template <typename WT, int64_t E, int64_t KS, int64_t K, int64_t N>
static void k_expert_linear_sum(int ith, int nth, const float* x, int64_t T, const int32_t* order,
                                const int32_t* offsets, const float* w, const WT* W, float* y, float* scratch,
                                const float* b = nullptr) {
    int64_t n0, n1;
    split_range(N, ith, nth, RB, &n0, &n1);
    if (n0 >= n1) return;
    const int64_t n = n1 - n0;
    for (int64_t t = 0; t < T; t++) memset(y + t * N + n0, 0, n * sizeof(float));
    float* xg = scratch;          // [rows, K]
    float* yg = xg + T * K;       // [rows, n]
    for_expert_pieces(E, T, order, offsets, [&](int64_t e, const int32_t* slots, int64_t rows) {
        gather_rows(x, slots, rows, 1, K, xg);
        matmul_rows<WT>(xg, rows, K, expert_matrix(W, e, N, K), n0, n1, yg, n, yg + T * n);
        for (int64_t i = 0; i < rows; i++) {
            add_bias(yg + i * n, b ? b + e * N + n0 : nullptr, n);
            float* out = y + (slots[i] / KS) * N + n0;
            const float ws = w[slots[i]];
            for (int64_t r = 0; r < n; r++) out[r] += ws * yg[i * n + r];
        }
    });
}
