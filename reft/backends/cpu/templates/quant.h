// ---- quant.h: matmuls and embedding lookups on block-quantized weights ------------------------
// A quantized weight [N, K] is N rows of raw blocks, exactly as reft/ir/quantized.py describes
// (GGUF's bytes for llama.cpp types). Every format is read 32 values at a time: QF<T>::block()
// decodes sub-block j of a row into a Blk32 (32 int8 codes, a scale per 16 values, one offset),
// w[i] = s[i / 16] * q[i] + m. Decode streams the bytes once and multiplies each block with up to 4
// token rows of x: llama.cpp's types as integer dot products with x rounded to int16 (quantize_act),
// reft's weight-only int8/int4 with the codes widened to float32 (sum of m * x comes from per-block
// sums of x computed once per call). Prompt batches dequantize chunks of rows to float32 for the
// sgemm.
#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

struct Blk32 {
#if defined(__AVX2__)
    __m256i q;          // 32 signed codes
#else
    int8_t q[32];
#endif
    float s0, s1, m;    // scale of values 0-15, of values 16-31; offset of all 32
};

static inline float h2f(const uint8_t* p) { f16 h; memcpy(&h, p, 2); return (float)h; }

// -- code unpacking: 16 bytes of nibbles -> 32 codes (low nibbles are values 0-15, high 16-31);
//    `bits` = a 32-bit mask whose bit i is 16 added to code i; `sub` is subtracted from every code
#if defined(__AVX2__)
static inline __m256i nib32(const uint8_t* p) {
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    __m256i b = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}
// byte i = 0x10 where bit i of `bits` is set
static inline __m256i bit16x32(uint32_t bits) {
    const __m256i sel = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), sel);
    const __m256i m = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, m), m), _mm256_set1_epi8(0x10));
}
#endif

static inline void codes_nib(Blk32& b, const uint8_t* p, uint32_t bits, int sub) {
#if defined(__AVX2__)
    __m256i q = nib32(p);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    q = _mm256_mask_add_epi8(q, (__mmask32)bits, q, _mm256_set1_epi8(0x10));   // bit i -> +16 on code i (bit 4 is clear)
#else
    if (bits) q = _mm256_or_si256(q, bit16x32(bits));
#endif
    b.q = _mm256_sub_epi8(q, _mm256_set1_epi8((char)sub));
#else
    for (int i = 0; i < 16; i++) {
        b.q[i] = (int8_t)(((p[i] & 15) | (((bits >> i) & 1) << 4)) - sub);
        b.q[i + 16] = (int8_t)(((p[i] >> 4) | (((bits >> (i + 16)) & 1) << 4)) - sub);
    }
#endif
}

static inline void codes_i8(Blk32& b, const uint8_t* p) {
#if defined(__AVX2__)
    b.q = _mm256_loadu_si256((const __m256i*)p);
#else
    memcpy(b.q, p, 32);
#endif
}

static inline uint32_t u32_at(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

// -- the formats: row_bytes(K), block(row, j, out) for the j-th 32 values of a row, and MIN
//    (whether blocks have offsets: only then are sums of x needed) ----------
template <typename QT> struct QF;

template <> struct QF<q8_0_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = false;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 32 * 34; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 34;
        b.s0 = b.s1 = h2f(p); b.m = 0.f;
        codes_i8(b, p + 2);
    }
};
template <> struct QF<q4_0_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = false;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 32 * 18; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 18;
        b.s0 = b.s1 = h2f(p); b.m = 0.f;
        codes_nib(b, p + 2, 0, 8);
    }
};
template <> struct QF<q4_1_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = true;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 32 * 20; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 20;
        b.s0 = b.s1 = h2f(p); b.m = h2f(p + 2);
        codes_nib(b, p + 4, 0, 0);
    }
};
template <> struct QF<q5_0_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = false;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 32 * 22; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 22;
        b.s0 = b.s1 = h2f(p); b.m = 0.f;
        codes_nib(b, p + 6, u32_at(p + 2), 16);
    }
};
template <> struct QF<q5_1_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = true;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 32 * 24; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + j * 24;
        b.s0 = b.s1 = h2f(p); b.m = h2f(p + 2);
        codes_nib(b, p + 8, u32_at(p + 4), 0);
    }
};

// K-quants: super-blocks of 256 values; sub-block j % 8 of super-block j / 8
// 6-bit scale and min of sub-block s from the 12 packed bytes (see reft/quant/kquants.py)
static inline void kq_scale_min(const uint8_t* s, int sb, int* sc, int* mn) {
    if (sb < 4) { *sc = s[sb] & 63; *mn = s[sb + 4] & 63; }
    else { *sc = (s[sb + 4] & 15) | ((s[sb - 4] >> 6) << 4); *mn = (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4); }
}

// 32 codes: the low (hi = 0) or high (hi = 1) nibbles of 32 bytes, plus 16 where bit `bit` of qh[i] is set
static inline void codes_k(Blk32& b, const uint8_t* q, int hi, const uint8_t* qh, int bit) {
#if defined(__AVX2__)
    __m256i v = _mm256_loadu_si256((const __m256i*)q);
    if (hi) v = _mm256_srli_epi16(v, 4);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    if (qh) {
        const __m256i m = _mm256_set1_epi8((char)(1 << bit));
        __m256i h = _mm256_loadu_si256((const __m256i*)qh);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        v = _mm256_mask_add_epi8(v, _mm256_test_epi8_mask(h, m), v, _mm256_set1_epi8(0x10));
#else
        v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m), m), _mm256_set1_epi8(0x10)));
#endif
    }
    b.q = v;
#else
    for (int i = 0; i < 32; i++)
        b.q[i] = (int8_t)(((hi ? q[i] >> 4 : q[i]) & 15) | (qh ? ((qh[i] >> bit) & 1) << 4 : 0));
#endif
}

template <> struct QF<q4_k_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = true;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 256 * 144; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j >> 3) * 144;
        const int sb = (int)(j & 7);
        int sc, mn;
        kq_scale_min(p + 4, sb, &sc, &mn);
        b.s0 = b.s1 = h2f(p) * (float)sc; b.m = -(h2f(p + 2) * (float)mn);
        codes_k(b, p + 16 + 32 * (sb >> 1), sb & 1, 0, 0);
    }
};
template <> struct QF<q5_k_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = true;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 256 * 176; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j >> 3) * 176;
        const int sb = (int)(j & 7);
        int sc, mn;
        kq_scale_min(p + 4, sb, &sc, &mn);
        b.s0 = b.s1 = h2f(p) * (float)sc; b.m = -(h2f(p + 2) * (float)mn);
        codes_k(b, p + 48 + 32 * (sb >> 1), sb & 1, p + 16, sb);
    }
};
template <> struct QF<q6_k_t> {
    static constexpr bool AQ = true;    // int16 activations (quantize_act)
    static constexpr bool MIN = false;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K / 256 * 210; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j >> 3) * 210;
        const int h = (int)((j >> 2) & 1), i = (int)(j & 3);       // half of 128 values, quarter of it
        const uint8_t* ql = p + 64 * h + 32 * (i & 1);              // low nibbles (i < 2) or high (i >= 2)
        const uint8_t* qh = p + 128 + 32 * h;                       // 2-bit high parts at bits 2i, 2i + 1
        const float d = h2f(p + 208);
        const int8_t* sc = (const int8_t*)(p + 192 + 8 * h + 2 * i);
        b.s0 = d * (float)sc[0]; b.s1 = d * (float)sc[1]; b.m = 0.f;
#if defined(__AVX2__)
        __m256i lo = _mm256_loadu_si256((const __m256i*)ql);
        if (i >= 2) lo = _mm256_srli_epi16(lo, 4);
        lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
        __m256i hi = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i*)qh), _mm_cvtsi32_si128(2 * i));
        hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
        b.q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
#else
        for (int l = 0; l < 32; l++)
            b.q[l] = (int8_t)((((i >= 2 ? ql[l] >> 4 : ql[l]) & 15) | (((qh[l] >> (2 * i)) & 3) << 4)) - 32);
#endif
    }
};

// reft's formats: int8 rows are [float32 scale][K int8]; int4 groups of G are [f16 scale][f16 min][G/2 nibbles]
// (a row's last group holds K % G values where G does not divide K)
template <> struct QF<int8_t_> {
    static constexpr bool AQ = false;   // weight-only: float activations
    static constexpr bool MIN = false;   // offsets m != 0
    static int64_t row_bytes(int64_t K) { return K + 4; }
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        float s; memcpy(&s, r, 4);
        b.s0 = b.s1 = s; b.m = 0.f;
        codes_i8(b, r + 4 + 32 * j);
    }
};
template <int G> struct QF<int4_t_<G>> {
    static constexpr bool AQ = false;   // weight-only: float activations
    static constexpr bool MIN = true;
    static int64_t row_bytes(int64_t K) { return K / G * (4 + G / 2) + (K % G ? 4 + K % G / 2 : 0); }   // short last group
    static inline void block(const uint8_t* r, int64_t j, Blk32& b) {
        const uint8_t* p = r + (j / (G / 32)) * (4 + G / 2);
        b.s0 = b.s1 = h2f(p); b.m = h2f(p + 2);
        codes_nib(b, p + 4 + 16 * (j % (G / 32)), 0, 0);
    }
};

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

#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// y[t, row - r0] (ldy) = x[t] . W[row] for rows [r0, r1), TB token rows
template <typename QT, int TB>
static void qgemv(const float* x, const float* xs, int64_t K, const uint8_t* W, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
    const int64_t RBY = QF<QT>::row_bytes(K), NB = K / 32;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        // 16 values per register; the codes are scaled once and FMA'd with every token row. Four
        // accumulators per token (two halves x even/odd blocks) keep the FMA chains independent:
        // with one, decode waits on FMA latency rather than on the weight stream.
        __m512 acc[TB][4];
        float mo[TB][2];   // offsets' sums, even and odd blocks
        for (int t = 0; t < TB; t++) {
            for (int a = 0; a < 4; a++) acc[t][a] = _mm512_setzero_ps();
            mo[t][0] = mo[t][1] = 0.f;
        }
        auto step = [&](int64_t j, int a) __attribute__((always_inline)) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b.q))),
                                            _mm512_set1_ps(b.s0));
            const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b.q, 1))),
                                            _mm512_set1_ps(b.s1));
            for (int t = 0; t < TB; t++) {
                const float* xp = x + t * K + 32 * j;
                acc[t][a] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[t][a]);
                acc[t][a + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[t][a + 1]);
                if constexpr (QF<QT>::MIN) mo[t][a >> 1] += b.m * xs[t * NB + j];
            }
        };
        int64_t j = 0;
        for (; j + 1 < NB; j += 2) { step(j, 0); step(j + 1, 2); }
        if (j < NB) step(j, 0);
        for (int t = 0; t < TB; t++)
            y[t * ldy + row - r0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                                                       _mm512_add_ps(acc[t][2], acc[t][3])))
                                    + (mo[t][0] + mo[t][1]);
#elif defined(__AVX2__)
        float ms[TB];
        for (int t = 0; t < TB; t++) ms[t] = 0.f;
        __m256 acc[TB];
        for (int t = 0; t < TB; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t j = 0; j < NB; j++) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            __m128i lo = _mm256_castsi256_si128(b.q), hi = _mm256_extracti128_si256(b.q, 1);
            __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            const __m256 s0 = _mm256_set1_ps(b.s0), s1 = _mm256_set1_ps(b.s1);
            for (int t = 0; t < TB; t++) {
                const float* xp = x + t * K + 32 * j;
                __m256 a = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp + 8), _mm256_mul_ps(q0, _mm256_loadu_ps(xp)));
                __m256 c = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp + 24), _mm256_mul_ps(q2, _mm256_loadu_ps(xp + 16)));
                acc[t] = _mm256_fmadd_ps(c, s1, _mm256_fmadd_ps(a, s0, acc[t]));
                if constexpr (QF<QT>::MIN) ms[t] += b.m * xs[t * NB + j];
            }
        }
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = hsum8(acc[t]) + ms[t];
#else
        float ms[TB], acc[TB];
        for (int t = 0; t < TB; t++) ms[t] = acc[t] = 0.f;
        for (int64_t j = 0; j < NB; j++) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            for (int t = 0; t < TB; t++) {
                const float* xp = x + t * K + 32 * j;
                float a = 0.f, c = 0.f;
                for (int i = 0; i < 16; i++) { a += (float)b.q[i] * xp[i]; c += (float)b.q[i + 16] * xp[i + 16]; }
                acc[t] += a * b.s0 + c * b.s1;
                if constexpr (QF<QT>::MIN) ms[t] += b.m * xs[t * NB + j];
            }
        }
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = acc[t] + ms[t];
#endif
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
static void quantize_act(const float* x, int64_t T, int64_t K, int16_t* qx, float* dx, float* xs, float* xh) {
    const int64_t NB = K / 32;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < NB; j++) {
            const float* p = x + t * K + 32 * j;
            int16_t* q = qx + t * K + 32 * j;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const float d = amax / 32767.f, id = d != 0.f ? 1.f / d : 0.f;
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));   // nearest even
            const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
            _mm256_storeu_si256((__m256i*)q, _mm512_cvtsepi32_epi16(qa));
            _mm256_storeu_si256((__m256i*)(q + 16), _mm512_cvtsepi32_epi16(qb));
            const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(p[i]));
            const float d = amax / 32767.f, id = d != 0.f ? 1.f / d : 0.f;
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                float r = nearbyintf(p[i] * id);
                q[i] = (int16_t)(r > 32767.f ? 32767 : r < -32768.f ? -32768 : (int)r);
                sum += q[i];
            }
#endif
            dx[t * NB + j] = d;
            if (xs) xs[t * NB + j] = d * (float)sum;
            if (xh)
                for (int i = 0; i < 32; i++) xh[t * K + 32 * j + i] = (float)q[i] * d;
        }
}

// y[t, row - r0] (ldy) = xq[t] . W[row] for rows [r0, r1), TB token rows of int16 activations
template <typename QT, int TB>
static void qgemv_aq(const int16_t* qx, const float* dx, const float* xs, int64_t K, const uint8_t* W, int64_t r0,
                     int64_t r1, float* y, int64_t ldy) {
    const int64_t RBY = QF<QT>::row_bytes(K), NB = K / 32;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t* wr = W + row * RBY;
        float mo[TB];   // offsets' sums
        for (int t = 0; t < TB; t++) mo[t] = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 acc[TB][2];   // even and odd blocks: two independent FMA chains
        for (int t = 0; t < TB; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        auto step = [&](int64_t j, int a) __attribute__((always_inline)) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            const __m512i w = _mm512_cvtepi8_epi16(b.q);   // lanes 0-7 of the pair sums: values 0-15
            __m512 s;
            if constexpr (two_scales<QT>)
                s = _mm512_insertf32x8(_mm512_set1_ps(b.s0), _mm256_set1_ps(b.s1), 1);
            else
                s = _mm512_set1_ps(b.s0);
            for (int t = 0; t < TB; t++) {
                const __m512i p = _mm512_madd_epi16(w, _mm512_loadu_si512(qx + t * K + 32 * j));
                const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(dx[t * NB + j]));
                acc[t][a] = _mm512_fmadd_ps(f, s, acc[t][a]);
                if constexpr (QF<QT>::MIN) mo[t] += b.m * xs[t * NB + j];
            }
        };
        int64_t j = 0;
        for (; j + 1 < NB; j += 2) { step(j, 0); step(j + 1, 1); }
        if (j < NB) step(j, 0);
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) + mo[t];
#elif defined(__AVX2__)
        __m256 acc[TB];
        for (int t = 0; t < TB; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t j = 0; j < NB; j++) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b.q));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b.q, 1));
            for (int t = 0; t < TB; t++) {
                const int16_t* xq = qx + t * K + 32 * j;
                const __m256 p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)xq)));
                const __m256 p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xq + 16))));
                const __m256 f = _mm256_fmadd_ps(p1, _mm256_set1_ps(b.s1), _mm256_mul_ps(p0, _mm256_set1_ps(b.s0)));
                acc[t] = _mm256_fmadd_ps(f, _mm256_set1_ps(dx[t * NB + j]), acc[t]);
                if constexpr (QF<QT>::MIN) mo[t] += b.m * xs[t * NB + j];
            }
        }
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = hsum8(acc[t]) + mo[t];
#else
        float acc[TB];
        for (int t = 0; t < TB; t++) acc[t] = 0.f;
        for (int64_t j = 0; j < NB; j++) {
            Blk32 b;
            QF<QT>::block(wr, j, b);
            for (int t = 0; t < TB; t++) {
                const int16_t* xq = qx + t * K + 32 * j;
                int32_t a = 0, c = 0;
                for (int i = 0; i < 16; i++) { a += (int32_t)b.q[i] * xq[i]; c += (int32_t)b.q[i + 16] * xq[i + 16]; }
                acc[t] += ((float)a * b.s0 + (float)c * b.s1) * dx[t * NB + j];
                if constexpr (QF<QT>::MIN) mo[t] += b.m * xs[t * NB + j];
            }
        }
        for (int t = 0; t < TB; t++) y[t * ldy + row - r0] = acc[t] + mo[t];
#endif
    }
}

// out[0:K] = row of W as float32
template <typename QT>
static void qrow_f32(const uint8_t* wr, int64_t K, float* out) {
    for (int64_t j = 0; j < K / 32; j++) {
        Blk32 b;
        QF<QT>::block(wr, j, b);
        float* o = out + 32 * j;
#if defined(__AVX2__)
        __m128i lo = _mm256_castsi256_si128(b.q), hi = _mm256_extracti128_si256(b.q, 1);
        const __m256 s0 = _mm256_set1_ps(b.s0), s1 = _mm256_set1_ps(b.s1), m = _mm256_set1_ps(b.m);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s0, m));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), s0, m));
        _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s1, m));
        _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), s1, m));
#else
        for (int i = 0; i < 32; i++) o[i] = (float)b.q[i] * (i < 16 ? b.s0 : b.s1) + b.m;
#endif
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
#define QGEMV_MAX_T 16

// y[:, 0 : r1 - r0] = x . W[r0:r1]^T: GEMV for decode batches, dequantized chunks + sgemm otherwise.
// scratch holds the GEMV's activation codes, scales and block sums (T * (K / 2 + K / 16) floats),
// or the GEMM's rounded activations (lower.py: _act_scratch) and GEMM_CHUNK * K floats.
template <typename QT>
static void qmatmul_rows(const float* x, int64_t T, int64_t K, const QT* Wq, int64_t r0, int64_t r1, float* y,
                         int64_t ldy, float* scratch) {
    const uint8_t* W = (const uint8_t*)Wq;
    const int64_t NB = K / 32, RBY = QF<QT>::row_bytes(K);
    if (T <= QGEMV_MAX_T) {   // decode batches: GEMV over groups of up to 4 tokens
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
