// ---- elementwise.h: broadcasting binary ops, unary ops and casts, strided N-d copies ---------
// Shapes and strides arrive as small arrays (rank <= 8) computed by the forward function;
// strides are in elements, 0 on broadcast dims.

#define MAX_RANK 8

// flat output index -> source offset under (shape, strides)
static inline int64_t offset_of(int64_t i, int rank, const int64_t* shape, const int64_t* strides) {
    int64_t off = 0;
    for (int d = rank - 1; d >= 0; d--) {
        off += (i % shape[d]) * strides[d];
        i /= shape[d];
    }
    return off;
}

enum { OP_ADD = 0, OP_MUL = 1 };
enum { UN_SILU = 0, UN_GELU_TANH = 1, UN_CAST = 2 };

template <int OP, typename XT, typename YT, typename OT>
static void k_binary(int ith, int nth, const XT* x, const YT* y, OT* out, int rank, const int64_t* shape,
                     const int64_t* xs, const int64_t* ys) {
    int64_t n = 1;
    for (int d = 0; d < rank; d++) n *= shape[d];
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        float a = ld(x[offset_of(i, rank, shape, xs)]), b = ld(y[offset_of(i, rank, shape, ys)]);
        out[i] = st<OT>(OP == OP_ADD ? a + b : a * b);
    }
}

// same-shape fast path
template <int OP, typename XT, typename YT, typename OT>
static void k_binary_flat(int ith, int nth, const XT* x, const YT* y, OT* out, int64_t n) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        float a = ld(x[i]), b = ld(y[i]);
        out[i] = st<OT>(OP == OP_ADD ? a + b : a * b);
    }
}

template <int OP, typename XT, typename OT>
static void k_unary(int ith, int nth, const XT* x, OT* out, int64_t n) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        float a = ld(x[i]);
        out[i] = st<OT>(OP == UN_SILU ? act_silu(a) : OP == UN_GELU_TANH ? act_gelu_tanh(a) : a);
    }
}

// out = x * factor (a float32 constant)
template <typename XT, typename OT>
static void k_scale(int ith, int nth, const XT* x, OT* out, int64_t n, float factor) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) out[i] = st<OT>(ld(x[i]) * factor);
}

// out = cap * tanh(x / cap), VW values at a time (the last vector partial, as softcap_row)
template <typename XT, typename OT>
static void k_softcap(int ith, int nth, const XT* x, OT* out, int64_t n, float cap) {
    int64_t i0, i1;
    split_range(n, ith, nth, 4 * VW, &i0, &i1);
    float buf[VW];
    for (int64_t i = i0; i < i1; i += VW) {
        const int64_t m = i1 - i < VW ? i1 - i : VW;
        for (int64_t j = 0; j < m; j++) buf[j] = ld(x[i + j]);
        softcap_row(buf, m, cap);
        for (int64_t j = 0; j < m; j++) out[i + j] = st<OT>(buf[j]);
    }
}

// integer casts keep integers exact
template <typename XT, typename OT>
static void k_cast_int(int ith, int nth, const XT* x, OT* out, int64_t n) {
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) out[i] = (OT)x[i];
}

// dst[offset_of(i, dst strides)] = src[offset_of(i, src strides)] over `shape`
template <typename T>
static void k_copy_nd(int ith, int nth, const T* src, T* dst, int rank, const int64_t* shape, const int64_t* ss,
                      const int64_t* ds) {
    int64_t n = 1;
    for (int d = 0; d < rank; d++) n *= shape[d];
    int64_t i0, i1;
    split_range(n, ith, nth, 64, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) dst[offset_of(i, rank, shape, ds)] = src[offset_of(i, rank, shape, ss)];
}
