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

template <typename IT>
static inline bool sees(const IT* pos, const IT* sid, int64_t t, int64_t u, int64_t window) {
    const int64_t p = (int64_t)pos[t], pu = (int64_t)pos[u];
    return sid[u] == sid[t] && pu <= p && !(window > 0 && p - pu >= window);
}

// the score of q . k and its d(score)/d(q . k * scale): 1, or 1 - tanh^2 when soft-capped
template <bool SOFTCAP>
static inline float capped(float s, float softcap, float* slope) {
    if constexpr (SOFTCAP) {
        const float t = tanhf(s / softcap);
        *slope = 1.f - t * t;
        return softcap * t;
    }
    *slope = 1.f;
    return s;
}

template <typename IT, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_attention_grad_q(int ith, int nth, const float* dout, const float* q, const float* k, const float* v,
                               const float* out, const IT* pos, const IT* sid, int64_t T, float scale, int64_t window,
                               float* dq, float* stats, float softcap = 0.f) {
    constexpr int64_t G = H / HKV;
    float* lse = stats;           // [T, H]
    float* delta = stats + T * H; // [T, H]
    int64_t w0, w1;
    split_range(T * H, ith, nth, 1, &w0, &w1);
    float acc[D];
    for (int64_t w = w0; w < w1; w++) {
        const int64_t t = w / H, h = w % H, kvh = h / G;
        const float* qr = q + w * D;
        const float* dor = dout + w * D;
        float m = -INFINITY, l = 0.f;
        for (int64_t u = 0; u < T; u++) {
            if (!sees(pos, sid, t, u, window)) continue;
            float slope;
            const float s = capped<SOFTCAP>(dot<float>(qr, k + (u * HKV + kvh) * D, D) * scale, softcap, &slope);
            if (s > m) {
                l *= expf(m - s);
                m = s;
            }
            l += expf(s - m);
        }
        const float L = m + logf(l), dlt = dot<float>(dor, out + w * D, D);
        lse[w] = L;
        delta[w] = dlt;
        for (int64_t i = 0; i < D; i++) acc[i] = 0.f;
        for (int64_t u = 0; u < T; u++) {
            if (!sees(pos, sid, t, u, window)) continue;
            const float* kr = k + (u * HKV + kvh) * D;
            float slope;
            const float p = expf(capped<SOFTCAP>(dot<float>(qr, kr, D) * scale, softcap, &slope) - L);
            const float ds = p * (dot<float>(dor, v + (u * HKV + kvh) * D, D) - dlt) * slope;
            axpy<float>(acc, ds * scale, kr, D);
        }
        memcpy(dq + w * D, acc, D * sizeof(float));
    }
}

template <typename IT, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_attention_grad_kv(int ith, int nth, const float* dout, const float* q, const float* k, const float* v,
                                const IT* pos, const IT* sid, int64_t T, float scale, int64_t window, const float* stats,
                                float* dk, float* dv, float softcap = 0.f) {
    constexpr int64_t G = H / HKV;
    const float* lse = stats;
    const float* delta = stats + T * H;
    int64_t w0, w1;
    split_range(T * HKV, ith, nth, 1, &w0, &w1);
    float ak[D], av[D];
    for (int64_t w = w0; w < w1; w++) {
        const int64_t u = w / HKV, kvh = w % HKV;
        const float* kr = k + w * D;
        const float* vr = v + w * D;
        for (int64_t i = 0; i < D; i++) ak[i] = av[i] = 0.f;
        for (int64_t t = 0; t < T; t++) {
            if (!sees(pos, sid, t, u, window)) continue;
            for (int64_t g = 0; g < G; g++) {
                const int64_t qh = t * H + kvh * G + g;
                const float* qr = q + qh * D;
                const float* dor = dout + qh * D;
                float slope;
                const float p = expf(capped<SOFTCAP>(dot<float>(qr, kr, D) * scale, softcap, &slope) - lse[qh]);
                const float ds = p * (dot<float>(dor, vr, D) - delta[qh]) * slope;
                axpy<float>(ak, ds * scale, qr, D);
                axpy<float>(av, p, dor, D);
            }
        }
        memcpy(dk + w * D, ak, D * sizeof(float));
        memcpy(dv + w * D, av, D * sizeof(float));
    }
}
