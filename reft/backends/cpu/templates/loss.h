// ---- loss.h: linear_cross_entropy and its gradient, chunked (reft/ir/ops/loss.py) -----------------
// The [T, V] logits never exist: a tile of CR token rows x CVB vocabulary rows is computed by one
// sgemm into per-thread scratch, used and dropped (CR and CVB come from lower.py, which sizes the
// scratch). A head of float16 / bfloat16 is converted CVB rows at a time.
//   forward   threads split the token rows; each row keeps a running max and sum of exponentials over
//             the vocabulary tiles (online logsumexp) and picks its target's logit on the way;
//             per-row losses go to shared scratch and k_cross_entropy_sum adds them in row order
//             (float64), so the loss does not depend on the thread count
//   backward  threads split the vocabulary: per tile dz = G (e^(z - lse) - onehot(target)), then
//             dhead[tile] += dz^T x (rows of dhead are the thread's own) and the thread's share of
//             dx += dz head[tile] into its own scratch; k_cross_entropy_dx adds the shares
// Rows whose target is the ignore index get lse 0, loss 0 and no gradient. A target outside [0, V)
// that is not the ignore index makes the loss NaN. CAP (Gemma 2's final soft-capping): the logits are
// cap * tanh(z / cap), and dz carries the factor 1 - tanh^2.

template <typename WT>
static inline const float* head_rows(const WT* head, int64_t D, int64_t v0, int64_t n, float* buf) {
    if constexpr (std::is_same<WT, float>::value) {
        (void)n; (void)buf;
        return head + v0 * D;
    } else {
        block_f32<WT>(head, D, v0, n, 0, D, buf);
        return buf;
    }
}

static inline float row_max(const float* z, int64_t n) {
    vf mv = vset(-INFINITY);
    int64_t j = 0;
    for (; j + VW <= n; j += VW) mv = vmax(mv, vload(z + j));
    float m = hmax(mv);
    for (; j < n; j++) m = z[j] > m ? z[j] : m;
    return m;
}

// sum of e^(z - m) over n values
static inline float row_sumexp(const float* z, int64_t n, float m) {
    vf s = vzero();
    int64_t j = 0;
    for (; j + VW <= n; j += VW) s += vexp(vload(z + j) - m);
    float r = hsum(s);
    for (; j < n; j++) r += expf(z[j] - m);
    return r;
}

// lse[T] and per-row losses nll[T] (shared scratch); work: per-thread [CR * CVB + CVB * D + 3 CR]
template <typename WT, typename IT, int64_t CR, int64_t CVB, bool CAP = false>
static void k_linear_cross_entropy(int ith, int nth, const float* x, int64_t T, int64_t D, const WT* head, int64_t V,
                                   const IT* targets, int64_t ignore, float* lse, float* nll, float* work,
                                   float cap = 0.f) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    float* z = work;                 // [CR, CVB]
    float* buf = z + CR * CVB;       // [CVB, D]
    float* m = buf + CVB * D;        // [CR] running max
    float* s = m + CR;               // [CR] running sum of e^(z - m)
    float* zt = s + CR;              // [CR] the target's logit
    for (int64_t c = t0; c < t1; c += CR) {
        const int64_t n = t1 - c < CR ? t1 - c : CR;
        for (int64_t i = 0; i < n; i++) { m[i] = -INFINITY; s[i] = 0.f; zt[i] = NAN; }
        for (int64_t vb = 0; vb < V; vb += CVB) {
            const int64_t nv = V - vb < CVB ? V - vb : CVB;
            sgemm_ex(false, true, n, nv, D, x + c * D, D, head_rows<WT>(head, D, vb, nv, buf), D, 0.f, z, nv);
            for (int64_t i = 0; i < n; i++) {
                float* zr = z + i * nv;
                if constexpr (CAP) softcap_row(zr, nv, cap);
                const float bm = row_max(zr, nv), mn = bm > m[i] ? bm : m[i];
                s[i] = s[i] * expf(m[i] - mn) + row_sumexp(zr, nv, mn);   // e^-inf = 0 on the first tile
                m[i] = mn;
                const int64_t tg = (int64_t)targets[c + i];
                if (tg >= vb && tg < vb + nv) zt[i] = zr[tg - vb];
            }
        }
        for (int64_t i = 0; i < n; i++) {
            const bool valid = (int64_t)targets[c + i] != ignore;
            const float L = m[i] + logf(s[i]);
            lse[c + i] = valid ? L : 0.f;
            nll[c + i] = valid ? L - zt[i] : 0.f;
        }
    }
}

// loss = scale * sum of nll[0:T] (float64, in row order)
static void k_cross_entropy_sum(int ith, int nth, const float* nll, int64_t T, const float* scale, float* loss) {
    (void)nth;
    if (ith != 0) return;
    double total = 0.0;
    for (int64_t t = 0; t < T; t++) total += (double)nll[t];
    *loss = *scale * (float)total;
}

// dhead[V, D] and each thread's share of dx in part = its own scratch [T, D]; work: per-thread
// [CR * CVB + CVB * D] after part. dloss may be null (1); dhead may be null (a frozen head: LoRA and
// freeze fine-tuning read only dx).
template <typename WT, typename IT, int64_t CR, int64_t CVB, bool CAP = false>
static void k_linear_cross_entropy_grad(int ith, int nth, const float* x, int64_t T, int64_t D, const WT* head,
                                        int64_t V, const IT* targets, int64_t ignore, const float* scale,
                                        const float* lse, const float* dloss, float* dhead, float* part, float* work,
                                        float cap = 0.f) {
    int64_t v0, v1;
    split_range(V, ith, nth, 16, &v0, &v1);
    const float G = *scale * (dloss ? *dloss : 1.f);
    float* z = work;                 // [CR, CVB]
    float* buf = z + CR * CVB;       // [CVB, D]
    if (v0 >= v1 || T == 0) memset(part, 0, T * D * sizeof(float));
    if (T == 0 && v1 > v0 && dhead) memset(dhead + v0 * D, 0, (v1 - v0) * D * sizeof(float));
    for (int64_t vb = v0; vb < v1 && T > 0; vb += CVB) {
        const int64_t nv = v1 - vb < CVB ? v1 - vb : CVB;
        const float* w = head_rows<WT>(head, D, vb, nv, buf);
        for (int64_t c = 0; c < T; c += CR) {
            const int64_t n = T - c < CR ? T - c : CR;
            sgemm_ex(false, true, n, nv, D, x + c * D, D, w, D, 0.f, z, nv);
            for (int64_t i = 0; i < n; i++) {
                float* zr = z + i * nv;
                const int64_t tg = (int64_t)targets[c + i];
                if (tg == ignore) {
                    memset(zr, 0, nv * sizeof(float));
                    continue;
                }
                const float L = lse[c + i];
                if constexpr (CAP) {   // t = tanh(z / cap): dz = G (e^(cap t - L) - onehot) (1 - t^2)
                    for (int64_t j = 0; j < nv; j += VW) {
                        const int64_t mm = nv - j < VW ? nv - j : VW;
                        const vf t = vtanh(vload_part(zr + j, mm) / cap);
                        vf d = vexp(t * cap - L) * G;
                        for (int64_t l = 0; l < mm; l++)
                            if (vb + j + l == tg) d[l] -= G;
                        d = d * (1.f - t * t);
                        memcpy(zr + j, &d, mm * sizeof(float));
                    }
                    continue;
                }
                VLOOP(nv, vstore(zr + j, vexp(vload(zr + j) - L) * G), zr[j] = expf(zr[j] - L) * G);
                if (tg >= vb && tg < vb + nv) zr[tg - vb] -= G;
            }
            if (dhead) sgemm_ex(true, false, nv, D, n, z, nv, x + c * D, D, c > 0 ? 1.f : 0.f, dhead + vb * D, D);
            sgemm_ex(false, false, n, D, nv, z, nv, w, D, vb > v0 ? 1.f : 0.f, part + c * D, D);
        }
    }
}

// dx[t] = the threads' shares of row t added in thread order (share j at scratch + j * stride)
static void k_cross_entropy_dx(int ith, int nth, const float* scratch, int64_t stride, int64_t T, int64_t D, float* dx) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        float* o = dx + t * D;
        memcpy(o, scratch + t * D, D * sizeof(float));
        for (int th = 1; th < nth; th++) {
            const float* p = scratch + th * stride + t * D;
            VLOOP(D, vstore(o + j, vload(o + j) + vload(p + j)), o[j] += p[j]);
        }
    }
}
