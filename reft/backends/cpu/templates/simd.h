// ---- simd.h: the portable SIMD layer every kernel is written over ------------------------------
// GCC/Clang vector extensions: `vf` holds VW float32 lanes, as wide as the target's registers
// (16 with AVX-512, 8 with AVX2, 4 with NEON and on the generic target), and kernels are written
// once with +, *, loads and the helpers below; the compiler emits the target's instructions.
// Per-ISA intrinsics stay in this header, only where no portable form exists: fused multiply-add
// (so every target fuses the same way, not at the compiler's discretion), half-precision
// conversion, and the int16 multiply-add of pairs (pmaddwd, smull + addp); and for widening
// integer loads, whose portable form (__builtin_convertvector) GCC 12 splits into halves or,
// for int8 -> float32, turns into one scalar conversion per lane.
// Horizontal sums fold halves (lane i + lane i + n/2, then again): one fixed order per width, so a
// value never depends on which kernel or tile computed it.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 4
#endif

typedef float vf __attribute__((vector_size(VW * 4)));           // VW float32
typedef int32_t vi __attribute__((vector_size(VW * 4)));         // VW int32
typedef int16_t vs __attribute__((vector_size(VW * 4)));         // 2 VW int16
typedef uint16_t vh __attribute__((vector_size(VW * 2)));        // VW 16-bit floats as bits
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

template <typename V, typename P> static inline V vld(const P* p) { V v; memcpy(&v, p, sizeof v); return v; }
template <typename V, typename P> static inline void vst(P* p, V v) { memcpy(p, &v, sizeof v); }
static inline vf vzero() { return (vf){}; }
static inline vf vset(float s) { return vzero() + s; }
static inline vf vload(const float* p) { return vld<vf>(p); }
static inline void vstore(float* p, vf v) { vst(p, v); }
// the first n < VW lanes of p, the rest zero
static inline vf vload_part(const float* p, int64_t n) { vf v = vzero(); memcpy(&v, p, n * sizeof(float)); return v; }
template <typename V> static inline V vmax(V a, V b) { return a > b ? a : b; }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

// a * b + c, rounded once
static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#elif defined(__aarch64__)
    return vfmaq_f32(c, a, b);
#else
    vf r;
    for (int i = 0; i < VW; i++) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
#endif
}

// VW consecutive weights of any float dtype as float32
static inline vf vload_w(const float* p) { return vload(p); }
static inline vf vload_w(const bf16* p) {   // bfloat16: the top half of a float32
#if defined(__AVX512F__)
    return (vf)((vi)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)) << 16);
#elif defined(__AVX2__)
    return (vf)((vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)) << 16);
#elif defined(__aarch64__)
    return (vf)((vi)vmovl_u16(vld1_u16((const uint16_t*)p)) << 16);
#else
    return (vf)(__builtin_convertvector(vld<vh>(p), vi) << 16);
#endif
}
static inline vf vload_w(const f16* p) {
#if defined(__AVX512F__)
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__F16C__) && VW == 8
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#elif defined(__aarch64__)
    return vcvt_f32_f16(vld1_f16((const float16_t*)p));
#else
    vf r;
    for (int i = 0; i < VW; i++) r[i] = (float)p[i];
    return r;
#endif
}

// sum of the lanes, folding halves
static inline float hsum(f32x4 v) {
    f32x4 h = v + __builtin_shufflevector(v, v, 2, 3, 2, 3);
    return h[0] + h[1];
}
static inline f32x4 fold(f32x8 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7); }
static inline f32x8 fold(f32x16 v) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline float hsum(f32x8 v) { return hsum(fold(v)); }
static inline float hsum(f32x16 v) { return hsum(fold(v)); }
// largest lane of v (no NaNs), folding halves: max is exact in any order, and fmaxf is a library
// call unless NaNs are ruled out
static inline float hmax(f32x4 v) {
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 2, 3));
    return v[0] > v[1] ? v[0] : v[1];
}
static inline float hmax(f32x8 v) { return hmax(vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7))); }
static inline float hmax(f32x16 v) {
    return hmax(vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}

// round to the nearest integer, ties to even (|v| < 2^22): adding and removing 1.5 * 2^23 leaves
// the integer part in the mantissa under the default rounding mode
static inline vi vround(vf v) { return __builtin_convertvector((v + 12582912.f) - 12582912.f, vi); }

// int16 pairs: r[i] = a[2i] * b[2i] + a[2i + 1] * b[2i + 1] in int32
static inline vi vmadd16(vs a, vs b) {
#if defined(__AVX512BW__)
    return (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif defined(__AVX2__) && VW == 8
    return (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#elif defined(__aarch64__)
    int32x4_t lo = vmull_s16(vget_low_s16((int16x8_t)a), vget_low_s16((int16x8_t)b));
    int32x4_t hi = vmull_high_s16((int16x8_t)a, (int16x8_t)b);
    return (vi)vpaddq_s32(lo, hi);
#else
    vi r;
    for (int i = 0; i < VW; i++) r[i] = (int32_t)a[2 * i] * b[2 * i] + (int32_t)a[2 * i + 1] * b[2 * i + 1];
    return r;
#endif
}
// 16 bytes widened to 16 int16 lanes (zero- or sign-extended)
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
static inline i16x16 vzext16(const uint8_t* p) {
#if defined(__AVX2__)
    return (i16x16)_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
#elif defined(__aarch64__)
    const uint8x16_t v = vld1q_u8(p);
    const i16x8 lo = (i16x8)vmovl_u8(vget_low_u8(v)), hi = (i16x8)vmovl_high_u8(v);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    typedef uint8_t u8x16_ __attribute__((vector_size(16)));
    return __builtin_convertvector(vld<u8x16_>(p), i16x16);
#endif
}
static inline i16x16 vsext16(const int8_t* p) {
#if defined(__AVX2__)
    return (i16x16)_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
#elif defined(__aarch64__)
    const int8x16_t v = vld1q_s8(p);
    const i16x8 lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    typedef int8_t i8x16_ __attribute__((vector_size(16)));
    return __builtin_convertvector(vld<i8x16_>(p), i16x16);
#endif
}
// 8 bytes (uint8_t or int8_t) as 8 float32 lanes: K-quant headers' 6- and 8-bit scales
template <typename B>
static inline f32x8 vbytes_f32x8(const B* p) {
    static_assert(sizeof(B) == 1, "bytes");
    constexpr bool S = std::is_signed<B>::value;
#if defined(__AVX2__)
    const __m128i v = _mm_loadl_epi64((const __m128i*)p);
    return (f32x8)_mm256_cvtepi32_ps(S ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
#elif defined(__aarch64__)
    const int16x8_t w = S ? vmovl_s8(vld1_s8((const int8_t*)p)) : vreinterpretq_s16_u16(vmovl_u8(vld1_u8((const uint8_t*)p)));
    const f32x4 lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), hi = vcvtq_f32_s32(vmovl_high_s16(w));
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
#else
    f32x8 r;
    for (int i = 0; i < 8; i++) r[i] = (float)p[i];
    return r;
#endif
}
// 2 VW int16 lanes as two float32 vectors (lanes 0 .. VW - 1, VW .. 2 VW - 1)
static inline void vwiden16(vs x, vf& lo, vf& hi) {
#if defined(__AVX512F__)
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256((__m512i)x)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64((__m512i)x, 1)));
#elif defined(__AVX2__)
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128((__m256i)x)));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256((__m256i)x, 1)));
#elif defined(__aarch64__)
    lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16((int16x8_t)x)));
    hi = vcvtq_f32_s32(vmovl_high_s16((int16x8_t)x));
#else
    for (int i = 0; i < VW; i++) { lo[i] = (float)x[i]; hi[i] = (float)x[VW + i]; }
#endif
}

// e^x per lane (relative error < 2e-7 on [-87, 88]; -inf and anything below -87.3 give 0): the
// exponent 2^n goes straight into the float's exponent bits, e^r by a degree-6 polynomial on
// |r| <= ln2 / 2 (Cody-Waite split of ln2 keeps r exact)
static inline vf vexp(vf x) {
    const vf lo = vset(-87.3f);
    const vi zero = x < lo;                              // lanes that underflow to 0
    x = vmax(x, lo);
    x = x < 88.f ? x : vset(88.f);
    const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;   // round(x / ln2)
    vf r = vfma(n, vset(-0.693145751953125f), x);
    r = vfma(n, vset(-1.428606765330187e-06f), r);
    vf p = vset(1.0f / 720);
    p = vfma(p, r, vset(1.0f / 120));
    p = vfma(p, r, vset(1.0f / 24));
    p = vfma(p, r, vset(1.0f / 6));
    p = vfma(p, r, vset(0.5f));
    p = vfma(p, r, vset(1.0f));
    p = vfma(p, r, vset(1.0f));
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)e) & ~zero);
}

// tanh per lane as 1 - 2 / (e^2z + 1) (absolute error ~1e-7; +-1 beyond |z| ~ 44)
static inline vf vtanh(vf z) { return 1.f - 2.f / (vexp(z + z) + 1.f); }

// y[0:n] = cap * tanh(y / cap) (logit soft-capping), VW values at a time with the last vector partial,
// so a value never depends on where in the row it falls
static inline void softcap_row(float* y, int64_t n, float cap) {
    for (int64_t j = 0; j < n; j += VW) {
        const int64_t m = n - j < VW ? n - j : VW;
        const vf r = vtanh(vload_part(y + j, m) / cap) * cap;
        memcpy(y + j, &r, m * sizeof(float));
    }
}
