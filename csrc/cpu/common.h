// Shared pieces of sparsekern's C++ CPU kernels: a float SIMD vector and torch's intra-op thread pool.
//
// Vec: kL floats (AVX-512: 16, AVX2 + FMA: 8, otherwise 4 in plain C++); the masked load and store touch only
// the lanes set in `lanes` (bit i = lane i), chosen by the compiler flags the
// extension is built with (-march=native). SPARSEKERN_SIMD names the choice (512, 256 or 0) for kernels that
// size their register tiles by it.
//
// parallel(n, f): f(begin, end) over [0, n) on torch's intra-op threads. at::parallel_for is a header template
// whose OpenMP body only exists when the extension is compiled with -fopenmp (it is not: a second OpenMP runtime
// would compete with torch's), so this calls the copy compiled into libtorch, exported as torch_parallel_for
// since torch 2.10, and runs serially on older torch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#include <torch/csrc/stable/c/shim.h>
#define SPARSEKERN_HAVE_TORCH_PARALLEL_FOR 1
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace sparsekern {
namespace cpu {

// 2^f for |f| <= 1/2 by a degree-5 polynomial fitted to the relative error (highest coefficient first): relative
// error < 2.4e-7 evaluated in float32 with FMAs, the same as the degree-6 Taylor polynomial's
constexpr int kExp2Degree = 5;
constexpr float kExp2Poly[kExp2Degree + 1] = {1.32764783e-3f, 9.67554189e-3f, 5.55071309e-2f,
                                              2.40221202e-1f, 6.93146944e-1f, 1.00000012f};

#if defined(__AVX512F__)
#define SPARSEKERN_SIMD 512
constexpr int kL = 16;
struct Vec {
  __m512 v;
};
inline Vec vzero() { return {_mm512_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vset1(float a) { return {_mm512_set1_ps(a)}; }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline void vstore_mask(float* p, Vec a, uint32_t lanes) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>(lanes), a.v); }
inline Vec vload_mask(const float* p, uint32_t lanes) { return {_mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), p)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec vrelu(Vec a) { return {_mm512_max_ps(_mm512_setzero_ps(), a.v)}; }  // NaN stays NaN, as torch.relu
inline Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float hmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline float hsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
// exp(a - m) for a <= m (softmax): exact 0 below exp's float range, a degree-6 polynomial on the reduced
// argument otherwise (relative error ~2 ulp, the Cephes expf coefficients)
inline Vec vexp_shifted(Vec a, Vec m) {
  const __m512 x = _mm512_sub_ps(a.v, m.v);
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return {_mm512_maskz_scalef_ps(live, p, n)};  // dead lanes never compute: an underflow costs a microcode assist
}
// 2^(a - m) for a <= m (a may be -inf: 0), the softmax of scores kept in log2 units: 2^n 2^f with n = round(a - m),
// |f| <= 1/2, 2^f by kExp2Poly; exact 0 below 2^-125, through a lane mask rather than an underflow (an
// underflowing lane costs a microcode assist)
inline Vec vexp2_shifted(Vec a, Vec m) {
  const __m512 d = _mm512_sub_ps(a.v, m.v);
  const __mmask16 live = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);  // dead lanes may be NaN
  const __m512 n = _mm512_roundscale_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(d, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 5
  for (int i = 1; i <= kExp2Degree; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[i]));
  return {_mm512_maskz_scalef_ps(live, p, n)};
}
#elif defined(__AVX2__) && defined(__FMA__)
#define SPARSEKERN_SIMD 256
constexpr int kL = 8;
struct Vec {
  __m256 v;
};
inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vset1(float a) { return {_mm256_set1_ps(a)}; }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline __m256i lane_mask(uint32_t lanes) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit), bit);
}
inline void vstore_mask(float* p, Vec a, uint32_t lanes) { _mm256_maskstore_ps(p, lane_mask(lanes), a.v); }
inline Vec vload_mask(const float* p, uint32_t lanes) { return {_mm256_maskload_ps(p, lane_mask(lanes))}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec vrelu(Vec a) { return {_mm256_max_ps(_mm256_setzero_ps(), a.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float hmax(Vec a) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
inline float hsum(Vec a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline Vec vexp_shifted(Vec a, Vec m) {  // as the AVX-512 version; 2^n built in the exponent bits
  const __m256 x = _mm256_sub_ps(a.v, m.v);
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  return {_mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))};
}
inline Vec vexp2_shifted(Vec a, Vec m) {  // as the AVX-512 version; 2^-127 and below built as exponent bits 0: 0
  const __m256 x = _mm256_max_ps(_mm256_sub_ps(a.v, m.v), _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 5
  for (int i = 1; i <= kExp2Degree; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
}
#else
#define SPARSEKERN_SIMD 0
constexpr int kL = 4;
struct Vec {
  float v[4];
};
inline Vec vzero() { return {{0.f, 0.f, 0.f, 0.f}}; }
inline Vec vload(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline Vec vset1(float a) { return {{a, a, a, a}}; }
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline void vstore_mask(float* p, Vec a, uint32_t lanes) {
  for (int i = 0; i < 4; ++i)
    if (lanes >> i & 1u) p[i] = a.v[i];
}
inline Vec vload_mask(const float* p, uint32_t lanes) {
  Vec a = vzero();
  for (int i = 0; i < 4; ++i)
    if (lanes >> i & 1u) a.v[i] = p[i];
  return a;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline Vec vadd(Vec a, Vec b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
inline Vec vrelu(Vec a) {
  for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] < 0.f ? 0.f : a.v[i];
  return a;
}
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i];
  return a;
}
inline Vec vmax(Vec a, Vec b) {
  for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] < b.v[i] ? b.v[i] : a.v[i];
  return a;
}
inline float hmax(Vec a) { return std::max(std::max(a.v[0], a.v[1]), std::max(a.v[2], a.v[3])); }
inline float hsum(Vec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
inline Vec vexp_shifted(Vec a, Vec m) {
  for (int i = 0; i < 4; ++i) a.v[i] = std::exp(a.v[i] - m.v[i]);
  return a;
}
inline Vec vexp2_shifted(Vec a, Vec m) {
  for (int i = 0; i < 4; ++i) a.v[i] = std::exp2(a.v[i] - m.v[i]);
  return a;
}
#endif

// The register-tile micro-kernel of the GEMM-like kernels (lowrank_linear, attention): kTileRows rows x two
// vectors of accumulators fill most of the register file.
#if SPARSEKERN_SIMD == 512
constexpr int kTileRows = 12;
#elif SPARSEKERN_SIMD == 256
constexpr int kTileRows = 6;
#else
constexpr int kTileRows = 4;
#endif
constexpr int kTileCols = 2 * kL;
using Tile = Vec[kTileRows][2];

// acc[i][v] += sum_{k < K} a[i * lda + k] * b[k * ldb + v * kL : (v + 1) * kL], for i < kTileRows and v < NV (the
// tile's columns: NV = 2, kTileCols; NV = 1, its first vector).
template <int NV = 2>
__attribute__((always_inline)) inline void micro_tile(int64_t K, const float* __restrict a, int64_t lda,
                                                      const float* __restrict b, int64_t ldb, Tile& acc) {
  static_assert(NV == 1 || NV == 2, "micro_tile: one or two vectors of columns");
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * kL);
#pragma GCC unroll 12
    for (int i = 0; i < kTileRows; ++i) {
      const Vec ai = vset1(a[i * lda + k]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(ai, bv[v], acc[i][v]);
    }
  }
}

// A grow-only, 64-byte aligned scratch buffer; kernels keep one set per thread (thread_local: torch's pool
// threads live as long as the process).
template <typename T>
class Buffer {
 public:
  T* get(size_t n) {
    n = std::max<size_t>(n, 1);
    if (n > cap_) {
      const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
      ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(ptr_ != nullptr, "sparsekern (CPU): out of memory for a ", bytes, "-byte scratch buffer");
      cap_ = n;
    }
    return ptr_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
  size_t cap_ = 0;
};

template <typename F>
void parallel(int64_t n, const F& f, const char* op) {
  if (n <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
#ifdef SPARSEKERN_HAVE_TORCH_PARALLEL_FOR
  auto call = [](int64_t begin, int64_t end, void* ctx) { (*static_cast<const F*>(ctx))(begin, end); };
  const AOTITorchError err = torch_parallel_for(0, n, 1, call, const_cast<void*>(static_cast<const void*>(&f)));
  TORCH_CHECK(err == AOTI_TORCH_SUCCESS, op, " (CPU): the parallel region failed");
#else
  at::parallel_for(0, n, 1, f);
#endif
}

}  // namespace cpu
}  // namespace sparsekern
