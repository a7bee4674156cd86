// ---- router_grouped.h: DeepSeek-V3's router (moe_router mode sigmoid_group_topk) ---------------
// Sigmoid scores; the correction bias is added for choosing only. The E experts form G groups of
// E / G, each scored by the sum of its two best biased scores; the TG best groups stay (the lower
// group first on ties), and the KS best biased scores among their experts are chosen (the lower id
// first). Weights: the unbiased scores, divided by their sum (+ 1e-20) when NORM, times scale.
// Threads split tokens (reft/ir/ops/moe.py). Included only by plans that route this way.
template <typename XT, int64_t E, int64_t KS, bool NORM, int64_t G, int64_t TG>
static void k_router_sigmoid_group_topk(int ith, int nth, const XT* logits, int64_t T, int32_t* ids, float* w,
                                        const float* bias, float scale) {
    constexpr int64_t GS = E / G;   // experts per group
    int64_t t0, t1;
    split_range(T, ith, nth, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        float s[E], c[E], gs[G];
        bool kept[G], taken[E];
        for (int64_t e = 0; e < E; e++) {
            s[e] = 1.0f / (1.0f + expf(-ld(logits[t * E + e])));
            c[e] = s[e] + bias[e];
            taken[e] = false;
        }
        for (int64_t g = 0; g < G; g++) {   // the two best of each group
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int64_t e = g * GS; e < (g + 1) * GS; e++) {
                if (c[e] > b1) { b2 = b1; b1 = c[e]; }
                else if (c[e] > b2) b2 = c[e];
            }
            gs[g] = GS > 1 ? b1 + b2 : b1;
            kept[g] = false;
        }
        for (int64_t j = 0; j < TG; j++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!kept[g] && (best < 0 || gs[g] > gs[best])) best = g;
            kept[best] = true;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < KS; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (kept[e / GS] && !taken[e] && (best < 0 || c[e] > c[best])) best = e;
            if (best < 0) best = 0;   // NaN scores: any id, but never out of bounds
            taken[best] = true;
            ids[t * KS + j] = (int32_t)best;
            w[t * KS + j] = s[best];
            sum += s[best];
        }
        for (int64_t j = 0; j < KS; j++)   // the reference's order: w / (sum + 1e-20), then * scale
            w[t * KS + j] = (NORM ? w[t * KS + j] / (sum + 1e-20f) : w[t * KS + j]) * scale;
    }
}
