// ---- attention.h: KV-cache page writes and paged causal GQA attention (online softmax) -------
// A query row at position p of sequence s reads cached positions j <= p (and p - j < window)
// through page_table[s]; the H / HKV query heads sharing a KV head are processed together so
// each cached K/V row is loaded once for the whole group. SOFTCAP (a template flag, so kernels
// without it compile as before): scores become softcap * tanh(s / softcap) before the softmax.
// sinks (GPT-OSS; null: none): a logit per query head that joins the softmax's denominator, folded
// in after the keys by sink_scale.
// Threads take the work items of an attention kernel in turn (item w goes to thread w % nth), not
// as contiguous ranges: under a causal mask a late row sees more keys than an early one, and
// halving a 512-token prompt gave the second of two threads 3/4 of the attention work. The kernels
// that list a row's partner rows first (training, below) deal whole rows in turn, so each row's
// list is made once.

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

// y[0:n] = y * c + a * x[0:n] (x of any float dtype): the online-softmax update of an output row
template <typename XT>
static inline void rescale_axpy(float* y, float c, float a, const XT* x, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(y + i, vfma(vset(a), vload_w(x + i), vload(y + i) * c));
    for (; i < n; i++) y[i] = y[i] * c + a * ld(x[i]);
}

// Positions are visited one page (PS slots) at a time: the scores of a page's slots first, then
// one max, their exponentials as vectors, one rescale of the running sums, then the V rows.
// Pages are fixed by position, so a row's result depends only on its own cache, not on the batch.
// y[0:n] += a * x[0:n]
template <typename XT>
static inline void axpy(float* y, float a, const XT* x, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(y + i, vfma(vset(a), vload_w(x + i), vload(y + i)));
    for (; i < n; i++) y[i] += a * ld(x[i]);
}

// one page of the online softmax: s[0:PSV] (a page's scores, -inf where no slot) becomes
// e^(s - m') with m' = max(m, max s); the running sum l and max m move on to m', and the return value
// e^(m - m') is what the output accumulator must be multiplied by
template <int64_t PSV>
static inline float softmax_page(float* s, float& m, float& l) {
    vf mv = vset(-INFINITY);
    for (int64_t jj = 0; jj < PSV; jj += VW) mv = vmax(mv, vload(s + jj));
    const float mn = fmaxf(m, hmax(mv));
    const float corr = expf(m - mn);   // 0 on the first page (m = -inf)
    vf sum = vzero();
    for (int64_t jj = 0; jj < PSV; jj += VW) {
        const vf e = vexp(vload(s + jj) - mn);
        vstore(s + jj, e);
        sum += e;
    }
    l = l * corr + hsum(sum);
    m = mn;
    return corr;
}

// what the output (acc / l) is multiplied by once a sink logit joins the denominator: the running
// max m becomes max(m, sink), so acc and l rescale by e^(m - m'), and l gains e^(sink - m')
static inline float sink_scale(float m, float l, const float* sinks, int64_t h) {
    if (!sinks) return 1.0f / l;
    const float mn = fmaxf(m, sinks[h]), c = expf(m - mn);
    return c / (l * c + expf(sinks[h] - mn));
}

template <typename CT, typename IT, typename PT, int64_t PS, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_paged_attention(int ith, int nth, const float* q, const CT* kc, const CT* vc, const IT* pos,
                              const IT* sid, const PT* table, int64_t T, int64_t MP, float scale, int64_t window,
                              float* out, float softcap = 0.f, const float* sinks = nullptr) {
    constexpr int64_t G = H / HKV, PSV = (PS + VW - 1) / VW * VW;   // query heads per KV head; page in vectors
    float m[G], l[G], acc[G][D];
    alignas(64) float s[G][PSV];
    for (int64_t w = ith; w < T * HKV; w += nth) {   // in turn (top of file)
        const int64_t t = w / HKV, kvh = w % HKV, p = (int64_t)pos[t];
        const PT* pages = table + (int64_t)sid[t] * MP;
        const float* qg = q + (t * H + kvh * G) * D;
        for (int64_t g = 0; g < G; g++) {
            m[g] = -INFINITY;
            l[g] = 0.f;
            for (int64_t i = 0; i < D; i++) acc[g][i] = 0.f;
        }
        const int64_t j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        for (int64_t pg = j0 / PS; pg <= p / PS; pg++) {
            const int64_t a = pg * PS > j0 ? pg * PS : j0, b = (pg + 1) * PS - 1 < p ? (pg + 1) * PS - 1 : p;
            const int64_t base = (int64_t)pages[pg] * PS;
            for (int64_t g = 0; g < G; g++) {
                for (int64_t jj = 0; jj < PSV; jj++) s[g][jj] = -INFINITY;
                for (int64_t j = a; j <= b; j++)
                    s[g][j - pg * PS] = dot<CT>(qg + g * D, kc + ((base + j % PS) * HKV + kvh) * D, D) * scale;
                if constexpr (SOFTCAP) softcap_row(&s[g][a - pg * PS], b - a + 1, softcap);
                const float corr = softmax_page<PSV>(s[g], m[g], l[g]);
                for (int64_t i = 0; i < D; i++) acc[g][i] *= corr;
            }
            for (int64_t j = a; j <= b; j++) {
                const CT* vr = vc + ((base + j % PS) * HKV + kvh) * D;
                for (int64_t g = 0; g < G; g++) axpy<CT>(acc[g], s[g][j - pg * PS], vr, D);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const float inv = sink_scale(m[g], l[g], sinks, kvh * G + g);
            float* o = out + (t * H + kvh * G + g) * D;
            for (int64_t i = 0; i < D; i++) o[i] = acc[g][i] * inv;
        }
    }
}

// ---- causal attention among the rows of a batch (no cache): training and eval_loss ----
// A row's visible rows are listed once (partner_rows) and shared by its H heads; each (row, head)
// then takes its scores as one vector row (score_row), their max, their exponentials as vectors
// (exp_row) and the V rows weighted by them. Buffers hold a multiple of VW floats: the tail past n
// is -inf, so whole vectors of e^(s - m) give 0 there.

// the rows of the batch that row r sees as a query (KEYS = true: same sequence, pos <= pos[r], inside
// the window), or that see row r as a key (KEYS = false), in order, into idx; their count
template <bool KEYS, typename IT>
static inline int64_t partner_rows(const IT* pos, const IT* sid, int64_t T, int64_t r, int64_t window, int32_t* idx) {
    int64_t n = 0;
    for (int64_t o = 0; o < T; o++) {
        const int64_t pq = (int64_t)pos[KEYS ? r : o], pk = (int64_t)pos[KEYS ? o : r];
        if (sid[o] == sid[r] && pk <= pq && !(window > 0 && pq - pk >= window)) idx[n++] = (int32_t)o;
    }
    return n;
}
static inline int64_t vpad(int64_t n) { return (n + VW - 1) / VW * VW; }
// s[n : vpad(n)] = -inf; the max of s[0:n] (-inf for none)
static inline float pad_max(float* s, int64_t n) {
    for (int64_t j = n; j < vpad(n); j++) s[j] = -INFINITY;
    vf m = vset(-INFINITY);
    for (int64_t j = 0; j < n; j += VW) m = vmax(m, vload(s + j));
    return hmax(m);
}
// s[0:n] = e^(s - m) (s padded by pad_max); their sum
static inline float exp_row(float* s, int64_t n, float m) {
    vf acc = vzero();
    for (int64_t j = 0; j < n; j += VW) {
        const vf e = vexp(vload(s + j) - m);
        vstore(s + j, e);
        acc += e;
    }
    return hsum(acc);
}
// s[j] = scale * (qr . row idx[j] of the KV head kvh), soft-capped with SOFTCAP (and slope[j] =
// d(capped) / d(uncapped) = 1 - tanh^2 if slope is given)
template <typename XT, int64_t HKV, int64_t D, bool SOFTCAP>
static inline void score_row(const float* qr, const XT* k, int64_t kvh, const int32_t* idx, int64_t n, float scale,
                             float softcap, float* s, float* slope = nullptr) {
    for (int64_t j = 0; j < n; j++) s[j] = dot<XT>(qr, k + ((int64_t)idx[j] * HKV + kvh) * D, D) * scale;
    if constexpr (SOFTCAP) {
        softcap_row(s, n, softcap);
        if (slope)
            for (int64_t j = 0; j < n; j++) slope[j] = 1.f - (s[j] / softcap) * (s[j] / softcap);
    }
}

template <typename XT, typename IT, int64_t H, int64_t HKV, int64_t D, bool SOFTCAP = false>
static void k_causal_attention(int ith, int nth, const XT* q, const XT* k, const XT* v, const IT* pos,
                               const IT* sid, int64_t T, float scale, int64_t window, XT* out, float softcap = 0.f,
                               const float* sinks = nullptr) {
    const int64_t G = H / HKV;
    std::vector<int32_t> idx(T);
    std::vector<float> sbuf(vpad(T));
    float* s = sbuf.data();
    float qv[D], acc[D];
    for (int64_t t = ith; t < T; t += nth) {   // rows in turn (top of file)
        const int64_t n = partner_rows<true>(pos, sid, T, t, window, idx.data());
        for (int64_t h = 0; h < H; h++) {
            const int64_t kvh = h / G;
            for (int64_t i = 0; i < D; i++) { qv[i] = ld(q[(t * H + h) * D + i]); acc[i] = 0.f; }
            score_row<XT, HKV, D, SOFTCAP>(qv, k, kvh, idx.data(), n, scale, softcap, s);
            const float m = pad_max(s, n), l = exp_row(s, n, m);
            for (int64_t j = 0; j < n; j++) axpy<XT>(acc, s[j], v + ((int64_t)idx[j] * HKV + kvh) * D, D);
            const float inv = sink_scale(m, l, sinks, h);
            for (int64_t i = 0; i < D; i++) out[(t * H + h) * D + i] = st<XT>(acc[i] * inv);
        }
    }
}
