// ---- quant.h: matmuls and embedding lookups on block-quantized weights ------------------------
// A quantized weight [N, K] is N rows of raw blocks, exactly as reft/ir/quantized.py describes
// (GGUF's bytes for llama.cpp types). Codes are read as Blk32s (32 codes in int16 vectors, a scale
// per 16 values, one offset: w[i] = s[i / 16] * q[i] + m): one block at a time for formats with a
// header per block, a super-block at a time for K-quants (QF<T>::header, QF<T>::codes_part). Decode
// streams the bytes once and multiplies each block with up to 4 token rows of x: llama.cpp's types
// as integer dot products with x rounded to int16 (quantize_act), reft's weight-only int8/int4 with
// the codes widened to float32 (sum of m * x comes from per-block sums of x computed once per
// call). Prompt batches on llama.cpp's types take an integer GEMM on AVX2 (qigemm, below); other
// targets and formats dequantize chunks of rows to float32 for the sgemm.

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
//    super-block, else 1); MIN (whether blocks have offsets: only then are sums of x needed);
//    AQ (int16 activations). SUB = 1: scales(row, j, s0, s1, m) and codes(row, j, out) of block j;
//    SUB = 8: see the K-quants below. ----------
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

// K-quants: super-blocks of 256 values, 8 blocks of 32 under one header. QF<T>::header decodes
// it into vectors over the 8 blocks (s0, s1: scales of values 0-15 and 16-31 of each block, m its
// offset; the 6-bit fields of q4_k/q5_k unpacked four at a time in 32-bit words), and
// QF<T>::codes_part(p, q, b) the PART blocks from q on that share their bytes (q4_k/q5_k: low and
// high nibbles of 32 bytes; q6_k: a 128-value half), each byte loaded once.
// q4_k / q5_k header: d, dmin, then 12 bytes of 6-bit scales and mins (see reft/quant/kquants.py):
// block b < 4: scale = s[b] & 63, min = s[b + 4] & 63; b >= 4: the low 4 bits from s[b + 4] (scale:
// its low nibble, min: its high one) and the top 2 from bits 6-7 of s[b - 4] (scale) or s[b] (min)
static inline void kq_header(const uint8_t* p, f32x8& s, f32x8& m) {
    const uint32_t a = u32_at(p + 4), b = u32_at(p + 8), c = u32_at(p + 12);
    const uint32_t w[4] = {a & 0x3f3f3f3f, (c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030),    // scales 0-3, 4-7
                           b & 0x3f3f3f3f, ((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030)};   // mins
    uint8_t bytes[16];
    memcpy(bytes, w, 16);
    s = vbytes_f32x8(bytes) * h2f(p);
    m = vbytes_f32x8(bytes + 8) * -h2f(p + 2);
}

// codes of the two blocks in the low (even block) and high (odd block) nibbles of the 32 bytes at q;
// qh (q5_k): bit `bit` of qh[i] adds 16 to code i of the even block, bit `bit + 1` of the odd one
static inline void codes_pair(const uint8_t* q, const uint8_t* qh, int bit, Blk32* b) {
    i16x16 lo[2], hi[2];
    for (int h = 0; h < 2; h++) {
        const i16x16 z = vzext16(q + 16 * h);
        lo[h] = z & 15;
        hi[h] = z >> 4;
        if (qh) {
            const i16x16 zh = vzext16(qh + 16 * h) >> bit;
            lo[h] |= (zh & 1) << 4;
            hi[h] |= (zh & 2) << 3;
        }
    }
    pack16(lo[0], lo[1], b[0].q);
    pack16(hi[0], hi[1], b[1].q);
}

template <> struct QF<q4_k_t> {
    static constexpr bool AQ = true, MIN = true;
    static constexpr int SUB = 8, PART = 2, BYTES = 144;
    static int64_t row_bytes(int64_t K) { return K / 256 * BYTES; }
    static inline void header(const uint8_t* p, f32x8& s0, f32x8& s1, f32x8& m) { kq_header(p, s0, m); s1 = s0; }
    static inline void codes_part(const uint8_t* p, int q, Blk32* b) { codes_pair(p + 16 + 16 * q, nullptr, 0, b); }
};
template <> struct QF<q5_k_t> {
    static constexpr bool AQ = true, MIN = true;
    static constexpr int SUB = 8, PART = 2, BYTES = 176;
    static int64_t row_bytes(int64_t K) { return K / 256 * BYTES; }
    static inline void header(const uint8_t* p, f32x8& s0, f32x8& s1, f32x8& m) { kq_header(p, s0, m); s1 = s0; }
    static inline void codes_part(const uint8_t* p, int q, Blk32* b) { codes_pair(p + 48 + 16 * q, p + 16, q, b); }
};
template <> struct QF<q6_k_t> {
    static constexpr bool AQ = true, MIN = false;
    static constexpr int SUB = 8, PART = 4, BYTES = 210;
    static int64_t row_bytes(int64_t K) { return K / 256 * BYTES; }
    // 16 int8 scales, one per 16 values, and d at the end
    static inline void header(const uint8_t* p, f32x8& s0, f32x8& s1, f32x8& m) {
        const float d = h2f(p + 208);
        const f32x8 a = vbytes_f32x8((const int8_t*)(p + 192)) * d, b = vbytes_f32x8((const int8_t*)(p + 200)) * d;
        s0 = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
        s1 = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
        m = (f32x8){};
    }
    // blocks q .. q + 3 (one half of 128 values): low nibbles of ql[0:32], ql[32:64], then their high
    // nibbles; 2-bit high parts in bits (0, 1), (2, 3), (4, 5), (6, 7) of qh; codes - 32
    static inline void codes_part(const uint8_t* p, int q, Blk32* b) {
        const uint8_t *ql = p + 64 * (q >> 2), *qh = p + 128 + 32 * (q >> 2);
        i16x16 c[4][2];
        for (int k = 0; k < 2; k++) {
            const i16x16 l0 = vzext16(ql + 16 * k), l1 = vzext16(ql + 32 + 16 * k), h = vzext16(qh + 16 * k);
            c[0][k] = ((l0 & 15) | ((h & 3) << 4)) - 32;
            c[1][k] = ((l1 & 15) | ((h & 12) << 2)) - 32;
            c[2][k] = ((l0 >> 4) | (h & 48)) - 32;
            c[3][k] = ((l1 >> 4) | ((h >> 2) & 48)) - 32;
        }
        for (int i = 0; i < 4; i++) pack16(c[i][0], c[i][1], b[i].q);
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

// block j of a row, header and codes (kernels that visit blocks one by one; formats with SUB = 1)
template <typename QT>
static inline void qblock(const uint8_t* r, int64_t j, Blk32& b) {
    static_assert(QF<QT>::SUB == 1, "K-quants decode a super-block at a time");
    QF<QT>::scales(r, j, &b.s0, &b.s1, &b.m);
    QF<QT>::codes(r, j, b);
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
// acc + the dot product of block b's codes with 32 activation codes xq, scaled by w0 (values 0-15)
// and w1 (values 16-31; TWO = they differ): w = block scale x activation scale. Pair lane l of
// sub-vector i holds values 2 (i VW + l) and the next one; sub-vectors of one scale add up in int32
// (|sum| < 2^27) before one conversion
template <bool TWO>
static inline vf block_dot(const Blk32& b, const int16_t* xq, float w0, float w1, vf acc) {
    if constexpr (!TWO || NSV == 1) {
        vi p = vmadd16(b.q[0], vld<vs>(xq));
        for (int i = 1; i < NSV; i++) p += vmadd16(b.q[i], vld<vs>(xq + i * 2 * VW));
        return vfma(__builtin_convertvector(p, vf), TWO ? pair_scales(0, w0, w1) : vset(w0), acc);
    } else {
        vi p0 = vmadd16(b.q[0], vld<vs>(xq)), p1 = vmadd16(b.q[NSV / 2], vld<vs>(xq + NSV / 2 * 2 * VW));
        for (int i = 1; i < NSV / 2; i++) {
            p0 += vmadd16(b.q[i], vld<vs>(xq + i * 2 * VW));
            p1 += vmadd16(b.q[NSV / 2 + i], vld<vs>(xq + (NSV / 2 + i) * 2 * VW));
        }
        acc = vfma(__builtin_convertvector(p0, vf), vset(w0), acc);
        return vfma(__builtin_convertvector(p1, vf), vset(w1), acc);
    }
}

// y[t, row - r0] (ldy) = xq[t] . W[row] for rows [r0, r1), TB token rows of int16 activations
// (formats with a header per block)
template <typename QT, int TB>
static void qgemv_aq(const int16_t* qx, const float* dx, const float* xs, int64_t K, const uint8_t* W, int64_t r0,
                     int64_t r1, float* y, int64_t ldy) {
    const int64_t RBY = QF<QT>::row_bytes(K), NB = K / 32, BPB = RBY / NB;   // bytes per block
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
        vf acc[TB][2];     // even and odd blocks: two independent FMA chains per token
        float mo[TB][2];   // offsets' sums, even and odd blocks
        for (int t = 0; t < TB; t++) {
            acc[t][0] = acc[t][1] = vzero();
            mo[t][0] = mo[t][1] = 0.f;
        }
        // a = 0 or 1 as a constant: an accumulator picked at run time lives in memory
        auto step = [&](int64_t j, int a) __attribute__((always_inline)) {
            if (GEMV_PREFETCH) __builtin_prefetch(wr + j * BPB + GEMV_PREFETCH, 0, 3);   // ~ a line per block
            Blk32 b;
            qblock<QT>(wr, j, b);
            for (int t = 0; t < TB; t++) {
                const float d = dx[t * NB + j];
                acc[t][a] = block_dot<false>(b, qx + t * K + 32 * j, b.s0 * d, 0.f, acc[t][a]);
                if constexpr (QF<QT>::MIN) mo[t][a] += b.m * xs[t * NB + j];
            }
        };
        int64_t j = 0;
        for (; j + 1 < NB; j += 2) { step(j, 0); step(j + 1, 1); }
        if (j < NB) step(j, 0);
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = hsum(acc[t][0] + acc[t][1]) + (mo[t][0] + mo[t][1]);
    }
}

// the same for K-quants: per super-block, the header's 8 block scales times each token's 8
// activation scales in one vector product, the offsets' sums as one vector FMA, then the codes
// decoded PART blocks at a time (SmolLM2 -> llama-1b Q4_K_M: the scalar header decode had been
// about a third of the step)
template <typename QT, int TB>
static void qgemv_k(const int16_t* qx, const float* dx, const float* xs, int64_t K, const uint8_t* W, int64_t r0,
                    int64_t r1, float* y, int64_t ldy) {
    using F = QF<QT>;
    constexpr bool TWO = two_scales<QT>;
    const int64_t RBY = F::row_bytes(K), NB = K / 32;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
        vf acc[TB][2];     // even and odd blocks: two independent FMA chains per token
        f32x8 mo[TB];      // offsets' sums, per block of a super-block
        for (int t = 0; t < TB; t++) {
            acc[t][0] = acc[t][1] = vzero();
            mo[t] = (f32x8){};
        }
        for (int64_t g = 0; g < NB / 8; g++) {
            const uint8_t* p = wr + g * F::BYTES;
            if (GEMV_PREFETCH)
                for (int o = 0; o < F::BYTES; o += 64) __builtin_prefetch(p + GEMV_PREFETCH + o, 0, 3);
            f32x8 s0, s1, m;
            F::header(p, s0, s1, m);
            float w[TB][2][8];   // block scale x activation scale, values 0-15 and 16-31 of each block
            for (int t = 0; t < TB; t++) {
                const f32x8 d = vld<f32x8>(dx + t * NB + 8 * g);
                vst(w[t][0], s0 * d);
                if constexpr (TWO) vst(w[t][1], s1 * d);
                if constexpr (F::MIN) mo[t] += m * vld<f32x8>(xs + t * NB + 8 * g);
            }
#pragma GCC unroll 8
            for (int q = 0; q < 8; q += F::PART) {
                Blk32 b[F::PART];
                F::codes_part(p, q, b);
#pragma GCC unroll 4
                for (int k = 0; k < F::PART; k++)
                    for (int t = 0; t < TB; t++) {
                        const int j = q + k;
                        acc[t][j & 1] = block_dot<TWO>(b[k], qx + t * K + 32 * (8 * g + j), w[t][0][j],
                                                       TWO ? w[t][1][j] : 0.f, acc[t][j & 1]);
                    }
            }
        }
        for (int t = 0; t < TB; t++) {
            float r = hsum(acc[t][0] + acc[t][1]);
            if constexpr (F::MIN) r += hsum(mo[t]);
            y[t * ldy + row - r0] = r;
        }
    }
}

// out[0:32] = block b as float32
static inline void blk_f32(const Blk32& b, float* out) {
    vf w[NQV];
    for (int i = 0; i < NSV; i++) vwiden16(b.q[i], w[2 * i], w[2 * i + 1]);
    for (int i = 0; i < NQV; i++) vstore(out + i * VW, vfma(w[i], vset(i * VW < 16 ? b.s0 : b.s1), vset(b.m)));
}
// f(j, b) for every 32-value block j of a row, decoded with its scales and offset
template <typename QT, typename Fn>
static inline void row_blocks(const uint8_t* wr, int64_t K, Fn f) {
    using F = QF<QT>;
    if constexpr (F::SUB == 8) {
        for (int64_t g = 0; g < K / 256; g++) {
            const uint8_t* p = wr + g * F::BYTES;
            f32x8 s0, s1, m;
            F::header(p, s0, s1, m);
            for (int q = 0; q < 8; q += F::PART) {
                Blk32 b[F::PART];
                F::codes_part(p, q, b);
                for (int k = 0; k < F::PART; k++) {
                    b[k].s0 = s0[q + k];
                    b[k].s1 = s1[q + k];
                    b[k].m = m[q + k];
                    f(8 * g + q + k, b[k]);
                }
            }
        }
    } else {
        for (int64_t j = 0; j < K / 32; j++) {
            Blk32 b;
            qblock<QT>(wr, j, b);
            f(j, b);
        }
    }
}
// out[0:K] = row of W as float32
template <typename QT>
static void qrow_f32(const uint8_t* wr, int64_t K, float* out) {
    row_blocks<QT>(wr, K, [&](int64_t j, const Blk32& b) { blk_f32(b, out + 32 * j); });
}

// -- integer prompt GEMM (x86-64-v3: vpmaddwd) -------------------------------------------------------
// Prompt batches on llama.cpp's types (QF<T>::AQ) multiply the same int16 activation codes as
// decode (quantize_act) with the weights' int16 codes: pair products summed in int32 over a block
// (over 16 values for two-scale formats), then one float32 scaling per block, block scale x
// activation scale, and the offsets' sums as in qgemv_aq. vpmaddwd takes 2 VW multiply-adds per
// instruction where a float32 FMA takes VW, so this beats dequantizing to float32 for the sgemm
// (llama-1b Q4_K_M, 512-token prompt: see docs/benchmarks.md). Products are exact and the block
// sums cannot overflow (|code| <= 128, |activation code| <= 32767, 32 values: < 2^28), so only the float
// additions of the block sums round. AVX2 only: on AVX-512 the sgemm's 512-bit FMA does as many
// multiply-adds per cycle as vpmaddwd + vpaddd, which share its two ports (llama-1b Q4_K_M 512-token
// prompt 12% slower there; VNNI's fused vpdpwssd would change that, but x86-64-v4 lacks it), and
// NEON and generic have no 16-bit pair multiply-add; they keep the float32 path.
#if defined(__AVX2__) && VW == 8
#define QIGEMM 1
#else
#define QIGEMM 0
#endif
#define PR (2 * VW)   // weight rows of a panel: two vectors of int32 sums
#define QTT 4         // token rows of a tile

// rows [0, n) of W as panels of PR rows (the last one padded with zero rows): pw[(panel * K / 2 +
// pair) * PR + r] = the codes of values 2 pair and 2 pair + 1 of the panel's row r as one int32;
// s0, s1, m [(panel * NB + block) * PR + r] = the block's scales (values 0-15, 16-31) and offset
template <typename QT>
static void qpanels(const uint8_t* W, int64_t K, int64_t n, int32_t* pw, float* s0, float* s1, float* m) {
    const int64_t NB = K / 32, RBY = QF<QT>::row_bytes(K), NP = (n + PR - 1) / PR;
    for (int64_t row = 0; row < NP * PR; row++) {
        const int64_t pn = row / PR, r = row % PR;
        int32_t* dst = pw + pn * (K / 2) * PR + r;
        const int64_t at = pn * NB * PR + r;   // block j's scales and offset at at + j * PR
        if (row >= n) {
            for (int64_t i = 0; i < K / 2; i++) dst[i * PR] = 0;
            for (int64_t j = 0; j < NB; j++) s0[at + j * PR] = s1[at + j * PR] = m[at + j * PR] = 0.f;
            continue;
        }
        row_blocks<QT>(W + row * RBY, K, [&](int64_t j, const Blk32& b) {
            int32_t words[16];   // the block's 32 int16 codes as 16 pairs
            memcpy(words, b.q, sizeof(words));
            for (int p = 0; p < 16; p++) dst[(16 * j + p) * PR] = words[p];
            s0[at + j * PR] = b.s0;
            s1[at + j * PR] = b.s1;
            m[at + j * PR] = b.m;
        });
    }
}

// c[t][0:PR] = activation rows t < TT (pairs xp[t * K / 2 + pair], scales dx[t * NB + j], offset sums
// xs) . the PR rows of one panel
template <typename QT, int TT>
static void qigemm_tile(const int32_t* xp, const float* dx, const float* xs, int64_t K, const int32_t* pw,
                        const float* s0, const float* s1, const float* m, float (&c)[QTT][PR]) {
    constexpr bool TWO = two_scales<QT>;
    constexpr int HP = TWO ? 8 : 16;   // pairs per scale
    const int64_t NB = K / 32, KP = K / 2;
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < PR; r++) c[t][r] = 0.f;
    for (int64_t j = 0; j < NB; j++)
        for (int h = 0; h < (TWO ? 2 : 1); h++) {
            vi acc[TT][2];
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = (vi){};
            const int64_t p0 = 16 * j + HP * h;
            const int32_t* w = pw + p0 * PR;
#pragma GCC unroll 4
            for (int p = 0; p < HP; p++, w += PR) {
                const vs w0 = vld<vs>(w), w1 = vld<vs>(w + VW);
#pragma GCC unroll 4
                for (int t = 0; t < TT; t++) {
                    const vs xv = (vs)((vi){} + xp[t * KP + p0 + p]);
                    acc[t][0] += vmadd16(w0, xv);
                    acc[t][1] += vmadd16(w1, xv);
                }
            }
            const float* sc = (h ? s1 : s0) + j * PR;
            const vf sa = vload(sc), sb = vload(sc + VW);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const float d = dx[t * NB + j];
                vstore(c[t], vfma(__builtin_convertvector(acc[t][0], vf), sa * d, vload(c[t])));
                vstore(c[t] + VW, vfma(__builtin_convertvector(acc[t][1], vf), sb * d, vload(c[t] + VW)));
            }
        }
    if constexpr (QF<QT>::MIN)
        for (int64_t j = 0; j < NB; j++) {
            const vf ma = vload(m + j * PR), mb = vload(m + j * PR + VW);
            for (int t = 0; t < TT; t++) {
                const float sx = xs[t * NB + j];
                vstore(c[t], vfma(ma, vset(sx), vload(c[t])));
                vstore(c[t] + VW, vfma(mb, vset(sx), vload(c[t] + VW)));
            }
        }
}

// y[t, 0:n] (ldy) = activations . rows [0, n) of W for all T tokens, through panels in buf (GEMM_CHUNK
// rows at most: GEMM_CHUNK * (K / 2 + 3 * K / 32) floats)
template <typename QT>
static void qigemm(const int16_t* qx, const float* dx, const float* xs, int64_t T, int64_t K, const uint8_t* W,
                   int64_t n, float* y, int64_t ldy, float* buf) {
    const int64_t NB = K / 32, NP = (n + PR - 1) / PR, CH = NP * PR;
    int32_t* pw = (int32_t*)buf;
    float *s0 = buf + CH * K / 2, *s1 = s0 + CH * NB, *m = s1 + CH * NB;
    qpanels<QT>(W, K, n, pw, s0, s1, m);
    const int32_t* xp = (const int32_t*)qx;
    float c[QTT][PR];
    for (int64_t pn = 0; pn < NP; pn++) {
        const int64_t rows = n - pn * PR < PR ? n - pn * PR : PR;
        const int32_t* pwp = pw + pn * (K / 2) * PR;
        const float *a = s0 + pn * NB * PR, *b = s1 + pn * NB * PR, *mm = m + pn * NB * PR;
        for (int64_t t0 = 0; t0 < T; t0 += QTT) {
            const int tt = T - t0 < QTT ? (int)(T - t0) : QTT;
            const int32_t* xt = xp + t0 * (K / 2);
            const float *dt = dx + t0 * NB, *st_ = xs + t0 * NB;
            switch (tt) {
                case 1: qigemm_tile<QT, 1>(xt, dt, st_, K, pwp, a, b, mm, c); break;
                case 2: qigemm_tile<QT, 2>(xt, dt, st_, K, pwp, a, b, mm, c); break;
                case 3: qigemm_tile<QT, 3>(xt, dt, st_, K, pwp, a, b, mm, c); break;
                default: qigemm_tile<QT, 4>(xt, dt, st_, K, pwp, a, b, mm, c); break;
            }
            for (int t = 0; t < tt; t++) memcpy(y + (t0 + t) * ldy + pn * PR, c[t], rows * sizeof(float));
        }
    }
}

// rows [0, n) of W for tokens t0 .. t0 + TB - 1, by the kernel the format multiplies with
template <typename QT, int TB>
static inline void qgemv_tokens(const float* x, const int16_t* qx, const float* dx, const float* xs, int64_t t0,
                                int64_t K, const uint8_t* W, int64_t n, float* y, int64_t ldy) {
    const int64_t NB = K / 32;
    if constexpr (QF<QT>::SUB == 8) qgemv_k<QT, TB>(qx + t0 * K, dx + t0 * NB, xs + t0 * NB, K, W, 0, n, y, ldy);
    else if constexpr (QF<QT>::AQ) qgemv_aq<QT, TB>(qx + t0 * K, dx + t0 * NB, xs + t0 * NB, K, W, 0, n, y, ldy);
    else qgemv<QT, TB>(x + t0 * K, xs + t0 * NB, K, W, 0, n, y, ldy);
}

// Up to this many tokens, decoding each block once per 4 tokens costs less than dequantizing the
// rows to float32 for the sgemm (batched decode in the server: 16 sequences on SmolLM2 Q4_1:
// 167 -> 186 output tokens/s at concurrency 16).

// y[:, 0 : r1 - r0] = x . W[r0:r1]^T: GEMV for decode batches, dequantized chunks + sgemm otherwise.
// scratch holds the GEMV's activation codes, scales and block sums (T * (K / 2 + K / 16) floats),
// or the GEMM's rounded activations (lower.py: _act_scratch) and GEMM_CHUNK * K floats; with
// `ready`, an earlier call (same x, same scratch) has prepared the activations there.
template <typename QT>
static void qmatmul_rows(const float* x, int64_t T, int64_t K, const QT* Wq, int64_t r0, int64_t r1, float* y,
                         int64_t ldy, float* scratch, bool ready) {
    const uint8_t* W = (const uint8_t*)Wq;
    const int64_t NB = K / 32, RBY = QF<QT>::row_bytes(K);
    if (T <= QGEMV_MAX_T || g_det) {   // decode batches (the target's QGEMV_MAX_T), or reproducible mode:
        // GEMV over groups of up to 4 tokens
        // per call: int16 activations (llama.cpp's types) and per-block sums of x (formats with offsets)
        float *dx = scratch, *xs = dx + T * NB;
        int16_t* qx = (int16_t*)(xs + T * NB);
        if (ready) {
        } else if constexpr (QF<QT>::AQ) quantize_act(x, T, K, qx, dx, QF<QT>::MIN ? xs : nullptr, nullptr);
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
    if constexpr (QF<QT>::AQ && QIGEMM) {   // the same int16 activations as decode, integer GEMM
        float *xs = scratch, *dx = xs + T * K;   // xs where the float path keeps its float32 copy
        int16_t* qx = (int16_t*)(dx + T * NB);
        if (!ready) quantize_act(x, T, K, qx, dx, QF<QT>::MIN ? xs : nullptr, nullptr);
        wbuf = scratch + T * K + T * NB + T * K / 2;
        static_assert(GEMM_CHUNK % PR == 0, "panels of a chunk must fit its float32 buffer");
        for (int64_t c = r0; c < r1; c += GEMM_CHUNK) {
            const int64_t n = r1 - c < GEMM_CHUNK ? r1 - c : GEMM_CHUNK;
            qigemm<QT>(qx, dx, xs, T, K, W + c * RBY, n, y + (c - r0), ldy, wbuf);
        }
        return;
    }
    if constexpr (QF<QT>::AQ) {   // the same rounded activations as decode, through the sgemm
        float *xh = scratch, *dx = xh + T * K;
        int16_t* qx = (int16_t*)(dx + T * NB);
        if (!ready) quantize_act(x, T, K, qx, dx, nullptr, xh);
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
