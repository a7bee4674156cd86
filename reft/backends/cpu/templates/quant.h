// ---- quant.h: matmuls and embedding lookups on block-quantized weights ------------------------
// A quantized weight [N, K] is N rows of raw blocks, exactly as reft/ir/quantized.py describes
// (GGUF's bytes for llama.cpp types). Every format is read 32 values at a time: QF<T>::codes()
// decodes block j of a row into a Blk32 (32 codes in int16 vectors), QF<T>::scales() the header
// its blocks share (a scale per 16 values, one offset): w[i] = s[i / 16] * q[i] + m. Decode streams the bytes once and multiplies each block with up to 4
// token rows of x: llama.cpp's types as integer dot products with x rounded to int16 (quantize_act),
// reft's weight-only int8/int4 with the codes widened to float32 (sum of m * x comes from per-block
// sums of x computed once per call). Prompt batches dequantize chunks of rows to float32 for the
// sgemm.

struct q8_0_t {}; struct q4_0_t {}; struct q4_1_t {}; struct q5_0_t {}; struct q5_1_t {};
struct q4_k_t {}; struct q5_k_t {}; struct q6_k_t {};
struct int8_t_ {}; template <int G> struct int4_t_ {};
template <> struct is_quant<q8_0_t> { static constexpr bool value = true; };
template <> struct is_quant<q4_0_t> { static constexpr bool value = true; };
template <> struct is_quant<q4_1_t> { static constexpr bool value = true; };
template <> struct is_quant<q5_0_t> { static constexpr bool value = true; };
template <> struct is_quant<q5_1_t> { static constexpr bool value = true; };
template <> struct is_quant<q4_k_t> { static constexpr bool value = true; };
template <> struct is_quant<q5_k_t> { static constexpr bool value = true; };
template <> struct is_quant<q6_k_t> { static constexpr bool value = true; };
template <> struct is_quant<int8_t_> { static constexpr bool value = true; };
template <int G> struct is_quant<int4_t_<G>> { static constexpr bool value = true; };

#define NSV (32 / (2 * VW))   // int16 code vectors per 32-value block

// One decoded block: its 32 codes as int16 vectors (values 0-15 then 16-31), a scale per 16
// values and one offset: w[i] = s[i / 16] * q[i] + m
struct Blk32 {
    vs q[NSV];
    float s0, s1, m;
};

static inline float h2f(const uint8_t* p) { f16 h; memcpy(&h, p, 2); return (float)h; }

// -- code unpacking, 16 values at a time in int16 lanes, then packed into the target's vectors
static inline void pack16(i16x16 a, i16x16 b, vs* q) {   // values 0-15, 16-31
#if VW == 16
    q[0] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                   16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
#elif VW == 8
    q[0] = a;
    q[1] = b;
#else
    q[0] = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
    q[1] = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    q[2] = __builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7);
    q[3] = __builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}
static const i16x16 LANE_BIT = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, -32768};
// 16 where bit i of the 16-bit `bits` is set, per lane i
static inline i16x16 bit16(uint32_t bits) { return (((i16x16){} + (int16_t)bits) & LANE_BIT) != 0 & (int16_t)16; }

// 16 bytes of nibbles -> 32 codes (low nibbles are values 0-15, high 16-31); `bits` = a 32-bit
// mask whose bit i adds 16 to code i; `sub` is subtracted from every code
static inline void codes_nib(Blk32& b, const uint8_t* p, uint32_t bits, int sub) {
    const i16x16 z = vzext16(p);
    i16x16 lo = z & 15, hi = z >> 4;
    if (bits) {
        lo |= bit16(bits & 0xffff);
        hi |= bit16(bits >> 16);
    }
    pack16(lo - (int16_t)sub, hi - (int16_t)sub, b.q);
}

static inline void codes_i8(Blk32& b, const uint8_t* p) {
    pack16(vsext16((const int8_t*)p), vsext16((const int8_t*)p + 16), b.q);
}

static inline uint32_t u32_at(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

// -- the formats: row_bytes(K); SUB, the 32-value blocks that share one header (8 in a K-quant
//    super-block, else 1); scales(row, g, s0, s1, m) for the SUB blocks of header g; codes(row, j,
//    out) for block j; MIN (whether blocks have offsets: only then are sums of x needed). A
//    kernel decodes a header once for all its blocks. ----------
template <typename QT> struct QF;

// a plain block: [f16 scale][f16 min if MIN][codes]
template <int BYTES, bool HAS_MIN> struct Plain {
    static constexpr int SUB = 1;
    static int64_t row_bytes(int64_t K) { return K / 32 * BYTES; }
    static inline void scales(const uint8_t* r, int64_t g, float* s0, float* s1, float* m) {
        const uint8_t* p = r + g * BYTES;
        s0[0] = s1[0] = h2f(p);
        m[0] = HAS_MIN ? h2f(p + 2) : 0.f;
    }
};
template <> struct QF<q8_0_t> : Plain<34, false> {
    static constexpr bool AQ = true, MIN = false;   // int16 activations (quantize_act); offsets m != 0
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) { codes_i8(b, r + j * 34 + 2); }
};
template <> struct QF<q4_0_t> : Plain<18, false> {
    static constexpr bool AQ = true, MIN = false;
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) { codes_nib(b, r + j * 18 + 2, 0, 8); }
};
template <> struct QF<q4_1_t> : Plain<20, true> {
    static constexpr bool AQ = true, MIN = true;
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) { codes_nib(b, r + j * 20 + 4, 0, 0); }
};
template <> struct QF<q5_0_t> : Plain<22, false> {
    static constexpr bool AQ = true, MIN = false;
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 22;
        codes_nib(b, p + 6, u32_at(p + 2), 16);
    }
};
template <> struct QF<q5_1_t> : Plain<24, true> {
    static constexpr bool AQ = true, MIN = true;
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 24;
        codes_nib(b, p + 8, u32_at(p + 4), 0);
    }
};

// K-quants: super-blocks of 256 values; sub-block j % 8 of super-block j / 8
// 6-bit scale and min of sub-block s from the 12 packed bytes (see reft/quant/kquants.py)
static inline void kq_scale_min(const uint8_t* s, int sb, int* sc, int* mn) {
    if (sb < 4) { *sc = s[sb] & 63; *mn = s[sb + 4] & 63; }
    else { *sc = (s[sb + 4] & 15) | ((s[sb - 4] >> 6) << 4); *mn = (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4); }
}
// q4_k / q5_k header: d, dmin, then the packed 6-bit scales and mins
static inline void kq_scales(const uint8_t* p, float* s0, float* s1, float* m) {
    const float d = h2f(p), dmin = h2f(p + 2);
    for (int sb = 0; sb < 8; sb++) {
        int sc, mn;
        kq_scale_min(p + 4, sb, &sc, &mn);
        s0[sb] = s1[sb] = d * (float)sc;
        m[sb] = -(dmin * (float)mn);
    }
}

// 32 codes: the low (hi = 0) or high (hi = 1) nibbles of 32 bytes, plus 16 where bit `bit` of qh[i] is set
static inline void codes_k(Blk32& b, const uint8_t* q, int hi, const uint8_t* qh, int bit) {
    i16x16 c[2];
    for (int h = 0; h < 2; h++) {
        const i16x16 z = vzext16(q + 16 * h);
        c[h] = (hi ? z >> 4 : z) & 15;
        if (qh) c[h] |= ((vzext16(qh + 16 * h) >> bit) & 1) << 4;
    }
    pack16(c[0], c[1], b.q);
}

template <> struct QF<q4_k_t> {
    static constexpr bool AQ = true, MIN = true;
    static constexpr int SUB = 8;
    static int64_t row_bytes(int64_t K) { return K / 256 * 144; }
    static inline void scales(const uint8_t* r, int64_t g, float* s0, float* s1, float* m) {
        kq_scales(r + g * 144, s0, s1, m);
    }
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        const int sb = (int)(j & 7);
        codes_k(b, r + (j >> 3) * 144 + 16 + 32 * (sb >> 1), sb & 1, 0, 0);
    }
};
template <> struct QF<q5_k_t> {
    static constexpr bool AQ = true, MIN = true;
    static constexpr int SUB = 8;
    static int64_t row_bytes(int64_t K) { return K / 256 * 176; }
    static inline void scales(const uint8_t* r, int64_t g, float* s0, float* s1, float* m) {
        kq_scales(r + g * 176, s0, s1, m);
    }
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j >> 3) * 176;
        const int sb = (int)(j & 7);
        codes_k(b, p + 48 + 32 * (sb >> 1), sb & 1, p + 16, sb);
    }
};
template <> struct QF<q6_k_t> {
    static constexpr bool AQ = true, MIN = false;
    static constexpr int SUB = 8;
    static int64_t row_bytes(int64_t K) { return K / 256 * 210; }
    static inline void scales(const uint8_t* r, int64_t g, float* s0, float* s1, float* m) {
        const uint8_t* p = r + g * 210;
        const float d = h2f(p + 208);
        const int8_t* sc = (const int8_t*)(p + 192);   // 16 scales, one per 16 values
        for (int sb = 0; sb < 8; sb++) {
            s0[sb] = d * (float)sc[2 * sb];
            s1[sb] = d * (float)sc[2 * sb + 1];
            m[sb] = 0.f;
        }
    }
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j >> 3) * 210;
        const int h = (int)((j >> 2) & 1), i = (int)(j & 3);       // half of 128 values, quarter of it
        const uint8_t* ql = p + 64 * h + 32 * (i & 1);              // low nibbles (i < 2) or high (i >= 2)
        const uint8_t* qh = p + 128 + 32 * h;                       // 2-bit high parts at bits 2i, 2i + 1
        i16x16 c[2];
        for (int k = 0; k < 2; k++) {
            const i16x16 lo = vzext16(ql + 16 * k), hi = vzext16(qh + 16 * k);
            c[k] = (((i >= 2 ? lo >> 4 : lo) & 15) | (((hi >> (2 * i)) & 3) << 4)) - 32;
        }
        pack16(c[0], c[1], b.q);
    }
};

// reft's formats: int8 rows are [float32 scale][K int8]; int4 groups of G are [f16 scale][f16 min][G/2 nibbles]
// (a row's last group holds K % G values where G does not divide K)
template <> struct QF<int8_t_> {
    static constexpr bool AQ = false, MIN = false;   // weight-only: float activations
    static constexpr int SUB = 1;
    static int64_t row_bytes(int64_t K) { return K + 4; }
    static inline void scales(const uint8_t* r, int64_t, float* s0, float* s1, float* m) {
        memcpy(s0, r, 4);
        s1[0] = s0[0];
        m[0] = 0.f;
    }
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) { codes_i8(b, r + 4 + 32 * j); }
};
template <int G> struct QF<int4_t_<G>> {
    static constexpr bool AQ = false, MIN = true;   // weight-only: float activations
    static constexpr int SUB = 1;
    static int64_t row_bytes(int64_t K) { return K / G * (4 + G / 2) + (K % G ? 4 + K % G / 2 : 0); }   // short last group
    static inline void scales(const uint8_t* r, int64_t j, float* s0, float* s1, float* m) {
        const uint8_t* p = r + (j / (G / 32)) * (4 + G / 2);
        s0[0] = s1[0] = h2f(p);
        m[0] = h2f(p + 2);
    }
    static inline void codes(const uint8_t* r, int64_t j, Blk32& b) {
        codes_nib(b, r + (j / (G / 32)) * (4 + G / 2) + 4 + 16 * (j % (G / 32)), 0, 0);
    }
};

// block j of a row, header and codes (kernels that visit blocks one by one)
template <typename QT>
static inline void qblock(const uint8_t* r, int64_t j, Blk32& b) {
    constexpr int SUB = QF<QT>::SUB;
    float s0[SUB], s1[SUB], m[SUB];
    QF<QT>::scales(r, j / SUB, s0, s1, m);
    QF<QT>::codes(r, j, b);
    b.s0 = s0[j % SUB]; b.s1 = s1[j % SUB]; b.m = m[j % SUB];
}

// -- kernels ---------------------------------------------------------------------------------
// xs[t * NB + j] = sum of x[t, 32j : 32j + 32]
static void block_sums(const float* x, int64_t T, int64_t K, float* xs) {
    const int64_t NB = K / 32;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < NB; j++) {
            float s = 0.f;
            for (int i = 0; i < 32; i++) s += x[t * K + 32 * j + i];
            xs[t * NB + j] = s;
        }
}

#define NQV (32 / VW)   // vectors per 32-value block

// y[t, row - r0] (ldy) = x[t] . W[row] for rows [r0, r1), TB token rows (weight-only formats: the
// codes widened to float32 and scaled once per block, then FMA'd with every token row)
template <typename QT, int TB>
static void qgemv(const float* x, const float* xs, int64_t K, const uint8_t* W, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
    const int64_t RBY = QF<QT>::row_bytes(K), NB = K / 32, BPB = RBY / NB;   // bytes per block (about)
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
        vf acc[TB][NQV];   // one FMA chain per vector of a block
        float mo[TB][2];   // offsets' sums, even and odd blocks
        for (int t = 0; t < TB; t++) {
            for (int i = 0; i < NQV; i++) acc[t][i] = vzero();
            mo[t][0] = mo[t][1] = 0.f;
        }
        auto step = [&](int64_t j, int a) __attribute__((always_inline)) {
            if (GEMV_PREFETCH) __builtin_prefetch(wr + j * BPB + GEMV_PREFETCH, 0, 3);   // ~ a line per block
            Blk32 b;
            qblock<QT>(wr, j, b);
            vf w[NQV];
            for (int i = 0; i < NSV; i++) vwiden16(b.q[i], w[2 * i], w[2 * i + 1]);
            for (int i = 0; i < NQV; i++) w[i] *= i * VW < 16 ? b.s0 : b.s1;
            for (int t = 0; t < TB; t++) {
                const float* xp = x + t * K + 32 * j;
                for (int i = 0; i < NQV; i++) acc[t][i] = vfma(w[i], vload(xp + i * VW), acc[t][i]);
                if constexpr (QF<QT>::MIN) mo[t][a] += b.m * xs[t * NB + j];
            }
        };
        int64_t j = 0;
        for (; j + 1 < NB; j += 2) { step(j, 0); step(j + 1, 1); }
        if (j < NB) step(j, 0);
        for (int t = 0; t < TB; t++) {
            vf s = vzero();
            for (int i = 0; i < NQV; i++) s += acc[t][i];
            y[t * ldy + row - r0] = hsum(s) + (mo[t][0] + mo[t][1]);
        }
    }
}

// -- int16 activations: matmuls on llama.cpp's block types round their activations to int16 per
//    32 values (codes rint(x / d), d = max|x| / 32767) and decode runs on integer dot products of
//    codes, one float scale per block: fewer and narrower instructions than widening every code to
//    float32 (SmolLM2 Q4_K_M 1T tg 75.6 -> 93.8 t/s). 16 bits, not llama.cpp's 8: its int8 rounding
//    is noise that flips near-tied greedy choices (SmolLM2 Q4_1 then no longer answers "Paris").
//    The reference executor rounds the same way (reft/ir/quantized.py: quantize_activations); the
//    formats that round are those with QF<T>::AQ, rounds_activations() there.
template <typename QT> constexpr bool two_scales = std::is_same<QT, q6_k_t>::value;   // s0 != s1

// codes qx[t * K + i] and scales dx[t * NB + j] of x[T, K]; xs[t * NB + j] (if given) = sum of the
// block's rounded values; xh (if given) = the rounded activations as float32 (prompt path)
typedef int16_t i16xw __attribute__((vector_size(VW * 2)));   // VW activation codes
static void quantize_act(const float* x, int64_t T, int64_t K, int16_t* qx, float* dx, float* xs, float* xh) {
    const int64_t NB = K / 32;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < NB; j++) {
            const float* p = x + t * K + 32 * j;
            int16_t* q = qx + t * K + 32 * j;
            vf v[NQV], m = vzero();
            for (int i = 0; i < NQV; i++) {
                v[i] = vload(p + i * VW);
                m = vmax(m, vabs(v[i]));
            }
            const float amax = hmax(m);
            const float d = amax / 32767.f, id = d != 0.f ? 1.f / d : 0.f;
            vi sv = (vi){};
            for (int i = 0; i < NQV; i++) {
                const vi c = vround(v[i] * id);   // |c| <= 32767
                vst(q + i * VW, __builtin_convertvector(c, i16xw));
                sv += c;
            }
            int sum = 0;
            for (int i = 0; i < VW; i++) sum += sv[i];
            dx[t * NB + j] = d;
            if (xs) xs[t * NB + j] = d * (float)sum;
            if (xh)
                for (int i = 0; i < 32; i++) xh[t * K + 32 * j + i] = (float)q[i] * d;
        }
}

// scale of the pair sums of sub-vector i: pair lanes 0-7 are values 0-15 (s0), the rest s1
static inline vf pair_scales(int i, float s0, float s1) {
    vf r;
    for (int l = 0; l < VW; l++) r[l] = i * VW + l < 8 ? s0 : s1;
    return r;
}
// y[t, row - r0] (ldy) = xq[t] . W[row] for rows [r0, r1), TB token rows of int16 activations
template <typename QT, int TB>
static void qgemv_aq(const int16_t* qx, const float* dx, const float* xs, int64_t K, const uint8_t* W, int64_t r0,
                     int64_t r1, float* y, int64_t ldy) {
    const int64_t RBY = QF<QT>::row_bytes(K), NB = K / 32, BPB = RBY / NB;   // bytes per block (about)
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
        vf acc[TB][2];     // even and odd blocks: two independent FMA chains per token
        float mo[TB][2];   // offsets' sums, even and odd blocks
        for (int t = 0; t < TB; t++) {
            acc[t][0] = acc[t][1] = vzero();
            mo[t][0] = mo[t][1] = 0.f;
        }
        // a = 0 or 1 as a constant: an accumulator picked at run time lives in memory
        auto step = [&](int64_t j, int a, float s0, float s1, float m) __attribute__((always_inline)) {
            if (GEMV_PREFETCH) __builtin_prefetch(wr + j * BPB + GEMV_PREFETCH, 0, 3);   // ~ a line per block
            Blk32 b;
            QF<QT>::codes(wr, j, b);
            const vf sv = two_scales<QT> && NSV == 1 ? pair_scales(0, s0, s1) : vset(s0);   // per lane of a pair sum
            for (int t = 0; t < TB; t++) {
                const int16_t* xq = qx + t * K + 32 * j;
                const float d = dx[t * NB + j];
                // pair sums: lane l of sub-vector i holds values 2 (i VW + l) and the next one.
                // Sub-vectors of one scale add up in int32 (|sum| < 2^27) before one conversion
                if constexpr (!two_scales<QT> || NSV == 1) {
                    vi p = vmadd16(b.q[0], vld<vs>(xq));
                    for (int i = 1; i < NSV; i++) p += vmadd16(b.q[i], vld<vs>(xq + i * 2 * VW));
                    acc[t][a] = vfma(__builtin_convertvector(p, vf), sv * d, acc[t][a]);
                } else {
                    vi p0 = vmadd16(b.q[0], vld<vs>(xq)), p1 = vmadd16(b.q[NSV / 2], vld<vs>(xq + NSV / 2 * 2 * VW));
                    for (int i = 1; i < NSV / 2; i++) {
                        p0 += vmadd16(b.q[i], vld<vs>(xq + i * 2 * VW));
                        p1 += vmadd16(b.q[NSV / 2 + i], vld<vs>(xq + (NSV / 2 + i) * 2 * VW));
                    }
                    acc[t][a] = vfma(__builtin_convertvector(p0, vf), vset(s0 * d), acc[t][a]);
                    acc[t][a] = vfma(__builtin_convertvector(p1, vf), vset(s1 * d), acc[t][a]);
                }
                if constexpr (QF<QT>::MIN) mo[t][a] += m * xs[t * NB + j];
            }
        };
        // the header of each group of SUB blocks once, then its blocks (two groups at a time when SUB = 1)
        constexpr int SUB = QF<QT>::SUB;
        auto group = [&](int64_t g, int a0) __attribute__((always_inline)) {
            float s0[SUB], s1[SUB], m[SUB];
            QF<QT>::scales(wr, g, s0, s1, m);
#pragma GCC unroll 8
            for (int k = 0; k < SUB; k++) step(g * SUB + k, (a0 + k) & 1, s0[k], s1[k], m[k]);
        };
        int64_t g = 0;
        const int64_t NG = NB / SUB;
        if constexpr (SUB == 1)
            for (; g + 1 < NG; g += 2) { group(g, 0); group(g + 1, 1); }
        for (; g < NG; g++) group(g, 0);
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = hsum(acc[t][0] + acc[t][1]) + (mo[t][0] + mo[t][1]);
    }
}

// out[0:K] = row of W as float32
template <typename QT>
static void qrow_f32(const uint8_t* wr, int64_t K, float* out) {
    for (int64_t j = 0; j < K / 32; j++) {
        Blk32 b;
        qblock<QT>(wr, j, b);
        float* o = out + 32 * j;
        vf w[NQV];
        for (int i = 0; i < NSV; i++) vwiden16(b.q[i], w[2 * i], w[2 * i + 1]);
        for (int i = 0; i < NQV; i++) vstore(o + i * VW, vfma(w[i], vset(i * VW < 16 ? b.s0 : b.s1), vset(b.m)));
    }
}

// rows [0, n) of W for tokens t0 .. t0 + TB - 1, by the kernel the format multiplies with
template <typename QT, int TB>
static inline void qgemv_tokens(const float* x, const int16_t* qx, const float* dx, const float* xs, int64_t t0,
                                int64_t K, const uint8_t* W, int64_t n, float* y, int64_t ldy) {
    const int64_t NB = K / 32;
    if constexpr (QF<QT>::AQ) qgemv_aq<QT, TB>(qx + t0 * K, dx + t0 * NB, xs + t0 * NB, K, W, 0, n, y, ldy);
    else qgemv<QT, TB>(x + t0 * K, xs + t0 * NB, K, W, 0, n, y, ldy);
}

// Up to this many tokens, decoding each block once per 4 tokens costs less than dequantizing the
// rows to float32 for the sgemm (batched decode in the server: 16 sequences on SmolLM2 Q4_1:
// 167 -> 186 output tokens/s at concurrency 16).

// y[:, 0 : r1 - r0] = x . W[r0:r1]^T: GEMV for decode batches, dequantized chunks + sgemm otherwise.
// scratch holds the GEMV's activation codes, scales and block sums (T * (K / 2 + K / 16) floats),
// or the GEMM's rounded activations (lower.py: _act_scratch) and GEMM_CHUNK * K floats.
template <typename QT>
static void qmatmul_rows(const float* x, int64_t T, int64_t K, const QT* Wq, int64_t r0, int64_t r1, float* y,
                         int64_t ldy, float* scratch) {
    const uint8_t* W = (const uint8_t*)Wq;
    const int64_t NB = K / 32, RBY = QF<QT>::row_bytes(K);
    if (T <= QGEMV_MAX_T) {   // decode batches (the target's QGEMV_MAX_T): GEMV over groups of up to 4 tokens
        // per call: int16 activations (llama.cpp's types) and per-block sums of x (formats with offsets)
        float *dx = scratch, *xs = dx + T * NB;
        int16_t* qx = (int16_t*)(xs + T * NB);
        if constexpr (QF<QT>::AQ) quantize_act(x, T, K, qx, dx, QF<QT>::MIN ? xs : nullptr, nullptr);
        else if constexpr (QF<QT>::MIN) block_sums(x, T, K, xs);
        // 16 rows at a time for every token group: the rows' bytes come from memory once
        for (int64_t c = r0; c < r1; c += 16) {
            const int64_t n = r1 - c < 16 ? r1 - c : 16;
            const uint8_t* Wc = W + c * RBY;
            float* yc = y + (c - r0);
            for (int64_t t0 = 0; t0 < T; t0 += 4)
                switch (T - t0 < 4 ? T - t0 : 4) {
                    case 1: qgemv_tokens<QT, 1>(x, qx, dx, xs, t0, K, Wc, n, yc + t0 * ldy, ldy); break;
                    case 2: qgemv_tokens<QT, 2>(x, qx, dx, xs, t0, K, Wc, n, yc + t0 * ldy, ldy); break;
                    case 3: qgemv_tokens<QT, 3>(x, qx, dx, xs, t0, K, Wc, n, yc + t0 * ldy, ldy); break;
                    default: qgemv_tokens<QT, 4>(x, qx, dx, xs, t0, K, Wc, n, yc + t0 * ldy, ldy); break;
                }
        }
        return;
    }
    float* wbuf = scratch;
    if constexpr (QF<QT>::AQ) {   // the same rounded activations as decode, through the sgemm
        float *xh = scratch, *dx = xh + T * K;
        int16_t* qx = (int16_t*)(dx + T * NB);
        quantize_act(x, T, K, qx, dx, nullptr, xh);
        x = xh;
        wbuf = xh + T * K + T * NB + T * K / 2;
    }
    for (int64_t c = r0; c < r1; c += GEMM_CHUNK) {
        int64_t n = r1 - c < GEMM_CHUNK ? r1 - c : GEMM_CHUNK;
        for (int64_t i = 0; i < n; i++) qrow_f32<QT>(W + (c + i) * RBY, K, wbuf + i * K);
        gemm_f32(x, T, K, wbuf, n, y + (c - r0), ldy);
    }
}

// embedding rows of a quantized table
template <typename QT, typename OT>
static void qembedding_row(const QT* table, int64_t v, int64_t D, OT* out) {
    std::vector<float> row(D);   // not a variable-length array: see k_rope in rows.h
    float* buf = row.data();
    qrow_f32<QT>((const uint8_t*)table + v * QF<QT>::row_bytes(D), D, buf);
    for (int64_t i = 0; i < D; i++) out[i] = st<OT>(buf[i]);
}
