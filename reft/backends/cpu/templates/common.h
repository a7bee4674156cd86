// ---- common.h: dtypes, scalar conversions, work partitioning ------------------------------------
#include <stdint.h>
#include <string.h>
#include <vector>
#include <type_traits>
#include <math.h>
#include <omp.h>

#if defined(__aarch64__) && !defined(__clang__)
typedef __fp16 f16;     // GCC's C++ has no _Float16 on aarch64; __fp16 converts the same way
#else
typedef _Float16 f16;
#endif
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
                         int64_t ldy, float* scratch, bool ready);
template <typename QT, typename OT> static void qembedding_row(const QT* table, int64_t v, int64_t D, OT* out);

// [lo, hi) of `n` items for thread ith of nth, in multiples of `quantum` items
static inline void split_range(int64_t n, int ith, int nth, int64_t quantum, int64_t* lo, int64_t* hi) {
    int64_t blocks = (n + quantum - 1) / quantum;
    int64_t b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    *lo = b0 * quantum < n ? b0 * quantum : n;
    *hi = b1 * quantum < n ? b1 * quantum : n;
}
