// ---- mla.h: multi-head latent attention (DeepSeek-V3) in the absorbed form -------------------
// The cache holds one row [c; k_r] of C + R values per token (the latent and the rope key every head
// shares): multi-query attention with the latent as value. A head's score is q_lat . c + q_rope . k_r
// times scale; its output the softmax-weighted sum of the latents. The heads of a token are processed
// HB at a time so each cached row is loaded once per block of heads (reft/ir/ops/mla.py). head_linear
// multiplies each head by its own matrix (the absorbed W_UK^T and W_UV, row-major). Included only by
// plans with latent attention. Known cost: a decode token reads its cache once per block of 16 heads
// (DeepSeek-V3's 128 heads: 8 passes); splitting the pages between threads with all heads each
// (flash-decoding) would read it once.

// y[t, h, :] = x[t, h, :] . W[h]^T for W [H, N, K] (row-major: rowmajor<T>); threads split the H * N
// output rows, a thread gathers the x rows of each head it touches (scratch [T, K], then the
// matmul's own)
template <typename WT, int64_t H, int64_t K, int64_t N>
static void k_head_linear(int ith, int nth, const float* x, int64_t T, const WT* W, float* y, float* scratch) {
    int64_t r0, r1;
    split_range(H * N, ith, nth, 1, &r0, &r1);
    if (r0 >= r1) return;
    float* xg = scratch;
    for (int64_t h = r0 / N; h * N < r1; h++) {
        const int64_t a = r0 > h * N ? r0 - h * N : 0, b = r1 < (h + 1) * N ? r1 - h * N : N;
        for (int64_t t = 0; t < T; t++) memcpy(xg + t * K, x + (t * H + h) * K, K * sizeof(float));
        matmul_rows<WT>(xg, T, K, W + h * N * K, a, b, y + h * N + a, H * N, xg + T * K);
    }
}

// cache[page, slot, 0, :] = [latent[t]; k_rope[t]] at each token's position
template <typename CT, typename IT, typename PT, int64_t PS, int64_t C, int64_t R>
static void k_latent_cache_write(int ith, int nth, CT* cache, const float* lat, const float* kr, const IT* pos,
                                 const IT* sid, const PT* table, int64_t T, int64_t MP) {
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t p = (int64_t)pos[t], page = (int64_t)table[(int64_t)sid[t] * MP + p / PS];
        CT* d = cache + (page * PS + p % PS) * (C + R);
        for (int64_t i = 0; i < C; i++) d[i] = st<CT>(lat[t * C + i]);
        for (int64_t i = 0; i < R; i++) d[C + i] = st<CT>(kr[t * R + i]);
    }
}

// Paged latent attention: like k_paged_attention (attention.h) with every query head on one KV head.
// Positions go one page at a time: the scores of a page's slots, one max, their exponentials, one
// rescale of the running sums, then the latent rows; results depend only on the row's own cache.
template <typename CT, typename IT, typename PT, int64_t PS, int64_t H, int64_t C, int64_t R>
static void k_paged_latent_attention(int ith, int nth, const float* ql, const float* qr, const CT* cache,
                                     const IT* pos, const IT* sid, const PT* table, int64_t T, int64_t MP,
                                     float scale, float* out) {
    constexpr int64_t HB = H < 16 ? H : 16, NB = (H + HB - 1) / HB, PSV = (PS + VW - 1) / VW * VW;
    float m[HB], l[HB], acc[HB][C];
    alignas(64) float s[HB][PSV];
    for (int64_t w = ith; w < T * NB; w += nth) {   // in turn (attention.h)
        const int64_t t = w / NB, h0 = (w % NB) * HB, G = H - h0 < HB ? H - h0 : HB, p = (int64_t)pos[t];
        const PT* pages = table + (int64_t)sid[t] * MP;
        for (int64_t g = 0; g < G; g++) {
            m[g] = -INFINITY;
            l[g] = 0.f;
            for (int64_t i = 0; i < C; i++) acc[g][i] = 0.f;
        }
        for (int64_t pg = 0; pg <= p / PS; pg++) {
            const int64_t b = (pg + 1) * PS - 1 < p ? (pg + 1) * PS - 1 : p;
            const CT* rows = cache + (int64_t)pages[pg] * PS * (C + R);
            for (int64_t g = 0; g < G; g++) {
                const float* qa = ql + (t * H + h0 + g) * C;
                const float* qb = qr + (t * H + h0 + g) * R;
                for (int64_t jj = 0; jj < PSV; jj++) s[g][jj] = -INFINITY;
                for (int64_t j = pg * PS; j <= b; j++) {
                    const CT* row = rows + (j - pg * PS) * (C + R);
                    s[g][j - pg * PS] = (dot<CT>(qa, row, C) + dot<CT>(qb, row + C, R)) * scale;
                }
                const float corr = softmax_page<PSV>(s[g], m[g], l[g]);
                for (int64_t i = 0; i < C; i++) acc[g][i] *= corr;
            }
            for (int64_t j = pg * PS; j <= b; j++) {
                const CT* row = rows + (j - pg * PS) * (C + R);
                for (int64_t g = 0; g < G; g++) axpy<CT>(acc[g], s[g][j - pg * PS], row, C);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const float inv = 1.0f / l[g];
            float* o = out + (t * H + h0 + g) * C;
            for (int64_t i = 0; i < C; i++) o[i] = acc[g][i] * inv;
        }
    }
}

// latent attention among the rows of the batch (no cache): each (token, head) over the rows of its
// sequence at positions <= its own, online softmax
template <typename IT, int64_t H, int64_t C, int64_t R>
static void k_latent_attention(int ith, int nth, const float* ql, const float* qr, const float* lat, const float* kr,
                               const IT* pos, const IT* sid, int64_t T, float scale, float* out) {
    float acc[C];
    for (int64_t w = ith; w < T * H; w += nth) {   // in turn (attention.h)
        const int64_t t = w / H, p = (int64_t)pos[t];
        for (int64_t i = 0; i < C; i++) acc[i] = 0.f;
        float m = -INFINITY, l = 0.f;
        for (int64_t u = 0; u < T; u++) {
            if (sid[u] != sid[t] || (int64_t)pos[u] > p) continue;
            const float sc = (dot<float>(ql + w * C, lat + u * C, C) + dot<float>(qr + w * R, kr + u * R, R)) * scale;
            float corr = 1.f;
            if (sc > m) {
                corr = expf(m - sc);
                l *= corr;
                m = sc;
            }
            const float e = expf(sc - m);
            l += e;
            rescale_axpy<float>(acc, corr, e, lat + u * C, C);
        }
        for (int64_t i = 0; i < C; i++) out[w * C + i] = acc[i] / l;
    }
}
