// ---- common.h: dtypes, conversions, work partitioning, vector dot products ----------------
#include <stdint.h>
#include <string.h>
#include <vector>
#include <type_traits>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef _Float16 f16;
struct bf16 { uint16_t bits; };

static inline float ld(float v) { return v; }
static inline float ld(f16 v) { return (float)v; }
static inline float ld(bf16 v) { uint32_t u = (uint32_t)v.bits << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float ld(int32_t v) { return (float)v; }
static inline float ld(int64_t v) { return (float)v; }

template <typename T> static inline T st(float f);
template <> inline float st<float>(float f) { return f; }
template <> inline f16 st<f16>(float f) { return (f16)f; }
template <> inline bf16 st<bf16>(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (uint16_t)((u >> 16) | 0x40); return r; }  // NaN stays NaN
    r.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                             // round to nearest even
    return r;
}
template <> inline int32_t st<int32_t>(float f) { return (int32_t)f; }
template <> inline int64_t st<int64_t>(float f) { return (int64_t)f; }

// Quantized weight formats are tag types (quant.h) read by their own kernels
template <typename T> struct is_quant { static constexpr bool value = false; };
template <typename QT>
static void qmatmul_rows(const float* x, int64_t T, int64_t K, const QT* W, int64_t r0, int64_t r1, float* y,
                         int64_t ldy, float* scratch);
template <typename QT, typename OT> static void qembedding_row(const QT* table, int64_t v, int64_t D, OT* out);

// [lo, hi) of `n` items for thread ith of nth, in multiples of `quantum` items
static inline void split_range(int64_t n, int ith, int nth, int64_t quantum, int64_t* lo, int64_t* hi) {
    int64_t blocks = (n + quantum - 1) / quantum;
    int64_t b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    *lo = b0 * quantum < n ? b0 * quantum : n;
    *hi = b1 * quantum < n ? b1 * quantum : n;
}

#if defined(__AVX512F__)
// 16 consecutive values of a weight row as float32 (mask for the tail)
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const f16* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const void*)p));
}
static inline __m512 load16(const bf16* p, __mmask16 m) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const void*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 load16(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); }
#endif

// sum_k a[k] * b[k], a float32, b any weight dtype
template <typename WT>
static inline float dot(const float* a, const WT* b, int64_t K) {
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), load16(b + k), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), load16(b + k + 16), s1);
    }
    for (; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : tail_mask(K - k);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), load16(b + k, m), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    float s = 0.f;
    for (int64_t k = 0; k < K; k++) s += a[k] * ld(b[k]);
    return s;
#endif
}
