// ---- optim.h: the optimizer update: squared global gradient norm, AdamW ---------------------------
// grad_norm_sq runs as two kernels with the forward function's barrier between them: every thread
// sums whole blocks of NORM_BLOCK values (4 vector accumulators, folded by hsum) into `blocks`
// (shared: thread 0's scratch), then thread 0 adds the block sums in float64 in block order. The
// blocks do not depend on the thread count, so neither does the norm (a --resume run with other
// threads clips the same).

#define NORM_BLOCK 8192

static inline float sumsq_block(const float* x, int64_t n) {
    vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t i = 0;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        const vf x0 = vload(x + i), x1 = vload(x + i + VW), x2 = vload(x + i + 2 * VW), x3 = vload(x + i + 3 * VW);
        a0 = vfma(x0, x0, a0); a1 = vfma(x1, x1, a1); a2 = vfma(x2, x2, a2); a3 = vfma(x3, x3, a3);
    }
    for (; i + VW <= n; i += VW) { const vf x0 = vload(x + i); a0 = vfma(x0, x0, a0); }
    if (i < n) { const vf x0 = vload_part(x + i, n - i); a0 = vfma(x0, x0, a0); }
    return hsum((a0 + a1) + (a2 + a3));
}

// blocks[b] = sum of squares of block b; blocks are numbered through the tensors in order
static void k_grad_norm_blocks(int ith, int nth, const float* const* xs, const int64_t* ns, int nt, float* blocks) {
    int64_t total = 0;
    for (int j = 0; j < nt; j++) total += (ns[j] + NORM_BLOCK - 1) / NORM_BLOCK;
    int64_t b0, b1;
    split_range(total, ith, nth, 1, &b0, &b1);
    int64_t first = 0;   // index of tensor j's first block
    for (int j = 0; j < nt && first < b1; j++) {
        const int64_t nb = (ns[j] + NORM_BLOCK - 1) / NORM_BLOCK;
        for (int64_t b = b0 > first ? b0 - first : 0; b < nb && first + b < b1; b++) {
            const int64_t lo = b * NORM_BLOCK, len = ns[j] - lo < NORM_BLOCK ? ns[j] - lo : NORM_BLOCK;
            blocks[first + b] = sumsq_block(xs[j] + lo, len);
        }
        first += nb;
    }
}

static void k_grad_norm_fold(int ith, int nth, const float* blocks, const int64_t* ns, int nt, float* out) {
    (void)nth;
    if (ith != 0) return;
    int64_t total = 0;
    for (int j = 0; j < nt; j++) total += (ns[j] + NORM_BLOCK - 1) / NORM_BLOCK;
    double s = 0.0;
    for (int64_t b = 0; b < total; b++) s += (double)blocks[b];
    *out = (float)s;
}

static inline vf vsqrt(vf v) {   // lane by lane: GCC emits one vector sqrt (vsqrtps / fsqrt) with -fno-math-errno
    vf r;
    for (int l = 0; l < VW; l++) r[l] = __builtin_sqrtf(v[l]);
    return r;
}

// One AdamW step over n values in place (ops/optim.py gives the formula; scalars as torch rounds them).
// sumsq is read only when CLIP (max_norm > 0). Hyper-parameters arrive as the attributes' float64 values.
template <bool CLIP>
static void k_adamw(int ith, int nth, float* p, const float* g, float* m, float* v, int64_t n, const float* lr_p,
                    const int32_t* step_p, const float* sumsq, double beta1_d, double beta2_d, double eps_d,
                    double wd, double max_norm) {
    const double lr = (double)*lr_p, step = (double)*step_p;
    const double bc1 = 1.0 - pow(beta1_d, step), bc2 = 1.0 - pow(beta2_d, step);
    float coef = 1.0f;
    if (CLIP) coef = fminf((float)max_norm / (sqrtf(*sumsq) + 1e-6f), 1.0f);
    const float decay = (float)(1.0 - lr * wd), a1 = (float)(1.0 - beta1_d), beta2 = (float)beta2_d,
                a2 = (float)(1.0 - beta2_d), step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2),
                eps = (float)eps_d;
    int64_t i0, i1;
    split_range(n, ith, nth, 4 * VW, &i0, &i1);
    const vf vc = vset(coef), vdecay = vset(decay), va1 = vset(a1), vb2 = vset(beta2), va2 = vset(a2),
             vss = vset(step_size), vbc = vset(bc2s), veps = vset(eps);
    int64_t i = i0;
    for (; i + VW <= i1; i += VW) {
        const vf gi = vload(g + i) * vc;
        vf mi = vload(m + i), vi_ = vload(v + i);
        mi = mi + (gi - mi) * va1;
        vi_ = vi_ * vb2 + va2 * gi * gi;
        const vf pi = vload(p + i) * vdecay;
        vstore(m + i, mi);
        vstore(v + i, vi_);
        vstore(p + i, pi - vss * (mi / (vsqrt(vi_) / vbc + veps)));
    }
    for (; i < i1; i++) {
        const float gi = g[i] * coef;
        const float mi = m[i] + (gi - m[i]) * a1;
        const float vv = v[i] * beta2 + a2 * gi * gi;
        m[i] = mi;
        v[i] = vv;
        p[i] = p[i] * decay - step_size * (mi / (__builtin_sqrtf(vv) / bc2s + eps));
    }
}
