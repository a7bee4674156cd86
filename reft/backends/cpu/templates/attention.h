// ---- attention.h: KV-cache page writes and paged causal GQA attention (online softmax) -------
// A query row at position p of sequence s reads cached positions j <= p (and p - j < window)
// through page_table[s]; the H / HKV query heads sharing a KV head are processed together so
// each cached K/V row is loaded once for the whole group.

template <typename CT, typename IT, typename PT, int64_t PS, int64_t HKV, int64_t D>
static void k_kv_cache_write(int ith, int nth, CT* kc, CT* vc, const float* k, const float* v, const IT* pos,
                             const IT* sid, const PT* table, int64_t T, int64_t MP) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        int64_t p = (int64_t)pos[t], page = (int64_t)table[(int64_t)sid[t] * MP + p / PS];
        CT* kd = kc + ((page * PS + p % PS) * HKV) * D;
        CT* vd = vc + ((page * PS + p % PS) * HKV) * D;
        for (int64_t i = 0; i < HKV * D; i++) {
            kd[i] = st<CT>(k[t * HKV * D + i]);
            vd[i] = st<CT>(v[t * HKV * D + i]);
        }
    }
}

template <typename CT>
static inline float dot_cache(const float* q, const CT* k, int64_t D) {
    float s = 0.f;
    for (int64_t i = 0; i < D; i++) s += q[i] * ld(k[i]);
    return s;
}
template <>
inline float dot_cache<float>(const float* q, const float* k, int64_t D) { return dot<float>(q, k, D); }

template <typename CT, typename IT, typename PT, int64_t PS, int64_t H, int64_t HKV, int64_t D>
static void k_paged_attention(int ith, int nth, const float* q, const CT* kc, const CT* vc, const IT* pos,
                              const IT* sid, const PT* table, int64_t T, int64_t MP, float scale, int64_t window,
                              float* out) {
    const int64_t G = H / HKV;
    int64_t w0, w1;
    split_range(T * HKV, ith, nth, 1, &w0, &w1);
    float m[G], l[G], acc[G][D], sc[G];
    for (int64_t w = w0; w < w1; w++) {
        const int64_t t = w / HKV, kvh = w % HKV, p = (int64_t)pos[t];
        const PT* pages = table + (int64_t)sid[t] * MP;
        const float* qg = q + (t * H + kvh * G) * D;
        for (int64_t g = 0; g < G; g++) {
            m[g] = -INFINITY;
            l[g] = 0.f;
            for (int64_t i = 0; i < D; i++) acc[g][i] = 0.f;
        }
        int64_t j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        for (int64_t j = j0; j <= p; j++) {
            int64_t slot = ((int64_t)pages[j / PS] * PS + j % PS) * HKV + kvh;
            const CT* kr = kc + slot * D;
            const CT* vr = vc + slot * D;
            for (int64_t g = 0; g < G; g++) {
                float s = dot_cache<CT>(qg + g * D, kr, D) * scale;
                if (s > m[g]) {
                    float corr = expf(m[g] - s);
                    l[g] *= corr;
                    for (int64_t i = 0; i < D; i++) acc[g][i] *= corr;
                    m[g] = s;
                }
                sc[g] = expf(s - m[g]);
                l[g] += sc[g];
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t i = 0; i < D; i++) acc[g][i] += sc[g] * ld(vr[i]);
        }
        for (int64_t g = 0; g < G; g++) {
            float inv = 1.0f / l[g];
            float* o = out + (t * H + kvh * G + g) * D;
            for (int64_t i = 0; i < D; i++) o[i] = acc[g][i] * inv;
        }
    }
}

// causal attention among the rows of the batch (no cache)
template <typename XT, typename IT, int64_t H, int64_t HKV, int64_t D>
static void k_causal_attention(int ith, int nth, const XT* q, const XT* k, const XT* v, const IT* pos,
                               const IT* sid, int64_t T, float scale, int64_t window, XT* out) {
    const int64_t G = H / HKV;
    int64_t w0, w1;
    split_range(T * H, ith, nth, 1, &w0, &w1);
    float qv[D], acc[D];
    for (int64_t w = w0; w < w1; w++) {
        const int64_t t = w / H, h = w % H, kvh = h / G, p = (int64_t)pos[t];
        for (int64_t i = 0; i < D; i++) { qv[i] = ld(q[(t * H + h) * D + i]); acc[i] = 0.f; }
        float m = -INFINITY, l = 0.f;
        for (int64_t u = 0; u < T; u++) {
            int64_t pu = (int64_t)pos[u];
            if (sid[u] != sid[t] || pu > p || (window > 0 && p - pu >= window)) continue;
            float s = 0.f;
            for (int64_t i = 0; i < D; i++) s += qv[i] * ld(k[(u * HKV + kvh) * D + i]);
            s *= scale;
            if (s > m) {
                float corr = expf(m - s);
                l *= corr;
                for (int64_t i = 0; i < D; i++) acc[i] *= corr;
                m = s;
            }
            float e = expf(s - m);
            l += e;
            for (int64_t i = 0; i < D; i++) acc[i] += e * ld(v[(u * HKV + kvh) * D + i]);
        }
        for (int64_t i = 0; i < D; i++) out[(t * H + h) * D + i] = st<XT>(acc[i] / l);
    }
}
