// ---- attention_grad.h: causal_attention_grad, flash-style (probabilities recomputed) ---------------
// Two kernels with a barrier between them (ops/grad.py gives the formulas):
//   k_attention_grad_q   threads split the (query row, head) pairs: each row's logsumexp (a pass
//                        over its keys), Delta = dout . out, then dq = scale sum_u P (dout . v_u -
//                        Delta) k_u; lse and Delta go to shared scratch [2, T, H]
//   k_attention_grad_kv  threads split the (key row, KV head) pairs: dk and dv sum over the query
//                        rows that see the key and the query heads of its group, so no two threads
//                        write one row
// A query row at position p of sequence s sees the rows u of s with pos[u] <= p (and p - pos[u] <
// window); rows of a sequence may be anywhere in the batch. SOFTCAP: the scores were soft-capped,
// c tanh(s / c), and dS carries the factor 1 - tanh^2.

// Both kernels list a row's partners once (partner_rows in attention.h) and take each (row, head)'s
// scores as one vector row (score_row in attention.h) with vector exponentials, then the dot
// products with dout and the axpys.

template <typename IT, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_attention_grad_q(int ith, int nth, const float* dout, const float* q, const float* k, const float* v,
                               const float* out, const IT* pos, const IT* sid, int64_t T, float scale, int64_t window,
                               float* dq, float* stats, float softcap = 0.f) {
    constexpr int64_t G = H / HKV;
    float* lse = stats;           // [T, H]
    float* delta = stats + T * H; // [T, H]
    std::vector<int32_t> idx(T);
    std::vector<float> buf(3 * vpad(T));
    float *s = buf.data(), *e = s + vpad(T), *slope = e + vpad(T);
    float acc[D];
    for (int64_t t = ith; t < T; t += nth) {   // rows in turn (top of attention.h)
        const int64_t n = partner_rows<true>(pos, sid, T, t, window, idx.data());
        for (int64_t h = 0; h < H; h++) {
            const int64_t w = t * H + h, kvh = h / G;
            const float* qr = q + w * D;
            const float* dor = dout + w * D;
            score_row<float, HKV, D, SOFTCAP>(qr, k, kvh, idx.data(), n, scale, softcap, s, slope);
            const float m = pad_max(s, n);
            memcpy(e, s, vpad(n) * sizeof(float));
            const float L = m + logf(exp_row(e, n, m)), dlt = dot<float>(dor, out + w * D, D);
            lse[w] = L;
            delta[w] = dlt;
            exp_row(s, n, L);   // the probabilities
            for (int64_t i = 0; i < D; i++) acc[i] = 0.f;
            for (int64_t j = 0; j < n; j++) {
                const int64_t r = ((int64_t)idx[j] * HKV + kvh) * D;
                float ds = s[j] * (dot<float>(dor, v + r, D) - dlt) * scale;
                if constexpr (SOFTCAP) ds *= slope[j];
                axpy<float>(acc, ds, k + r, D);
            }
            memcpy(dq + w * D, acc, D * sizeof(float));
        }
    }
}

template <typename IT, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_attention_grad_kv(int ith, int nth, const float* dout, const float* q, const float* k, const float* v,
                                const IT* pos, const IT* sid, int64_t T, float scale, int64_t window, const float* stats,
                                float* dk, float* dv, float softcap = 0.f) {
    constexpr int64_t G = H / HKV;
    const float* lse = stats;
    const float* delta = stats + T * H;
    std::vector<int32_t> idx(T);
    std::vector<float> buf(2 * vpad(T * G));
    float *p = buf.data(), *slope = p + vpad(T * G);
    float ak[D], av[D];
    for (int64_t u = ith; u < T; u += nth) {   // rows in turn (top of attention.h)
        const int64_t n = partner_rows<false>(pos, sid, T, u, window, idx.data());
        for (int64_t kvh = 0; kvh < HKV; kvh++) {
            const int64_t w = u * HKV + kvh;
            const float* kr = k + w * D;
            const float* vr = v + w * D;
            // scores of the (query row, head of the group) pairs, j * G + g, then e^(s - lse)
            for (int64_t j = 0; j < n; j++)
                for (int64_t g = 0; g < G; g++)
                    p[j * G + g] = dot<float>(q + ((int64_t)idx[j] * H + kvh * G + g) * D, kr, D) * scale;
            const int64_t ng = n * G;
            if constexpr (SOFTCAP) {
                softcap_row(p, ng, softcap);
                for (int64_t j = 0; j < ng; j++) slope[j] = 1.f - (p[j] / softcap) * (p[j] / softcap);
            }
            for (int64_t j = 0; j < n; j++)
                for (int64_t g = 0; g < G; g++) p[j * G + g] -= lse[(int64_t)idx[j] * H + kvh * G + g];
            pad_max(p, ng);
            exp_row(p, ng, 0.f);
            for (int64_t i = 0; i < D; i++) ak[i] = av[i] = 0.f;
            for (int64_t j = 0; j < n; j++)
                for (int64_t g = 0; g < G; g++) {
                    const int64_t qh = (int64_t)idx[j] * H + kvh * G + g;
                    const float* dor = dout + qh * D;
                    const float pr = p[j * G + g];
                    float ds = pr * (dot<float>(dor, vr, D) - delta[qh]) * scale;
                    if constexpr (SOFTCAP) ds *= slope[j * G + g];
                    axpy<float>(ak, ds, q + qh * D, D);
                    axpy<float>(av, pr, dor, D);
                }
            memcpy(dk + w * D, ak, D * sizeof(float));
            memcpy(dv + w * D, av, D * sizeof(float));
        }
    }
}
