// Channel-skipping convolution: a per-sample implicit GEMM over only the active channels (CUDA).
//
// For sample b with active input channels I_b and active output channels O_b (in increasing order):
//   y[b, o, p] = act(bias[o] + sum_{i in I_b, r, s} w[o, i, r, s] * x[b, i, oh*sh - ph + r*dh, ow*sw - pw + s*dw])
// for o in O_b, and y[b, o, p] = 0 for every other o (bias included); pixels outside the image read as 0.
// Masked-off input channels are never read, masked-off outputs never computed. Same algorithm as
// sparsekern/kernels/triton/channel_skip_conv2d.py.
//
// Index lists (one int32 row per sample, built on the device by build_channel_lists_kernel, no host sync):
//   row b = [in_perm (C_in) | out_perm (C_out) | n_in | n_out], where a *_perm holds the active channels in
//   increasing order followed by the inactive ones, and n_* counts the active ones.
//
// Conv kernel: grid (tiles_m * tiles_n, B), 256 threads, block tile 128 pixels x 64 output channels, K step =
// (block of kBK active input channels, one tap (r, s)); steps = ceil(n_in / kBK) * kh * kw. Output column n of a
// tile is channel out_perm[n], so columns n < n_out are the active channels packed densely; a tile with
// n0 >= n_out only writes zeros and returns (the grid is sized for the worst case, every channel active).
// Tiles are gathered from global memory into registers (one element per load: gathers of 2-byte elements
// cannot use cp.async), stored to double-buffered shared memory, and multiplied with WMMA tensor-core
// fragments (fp16/bf16, sm_80+) or a register-tiled FMA loop (fp32, or fp16/bf16 below sm_80), accumulating in
// fp32. The loads of step t + 1 are issued before the multiply of step t. Pixel-fastest input loads coalesce
// for NCHW inputs; any strides are accepted. The output is a contiguous NCHW tensor written exactly once.
//
// Depends only on the CUDA headers, so plain nvcc compiles it; `-DSPARSEKERN_COMPILE_CHECK` adds explicit
// instantiations for float, __half and __nv_bfloat16 (the CI compile check).
#ifndef SPARSEKERN_CUDA_CHANNEL_SKIP_CONV2D_CUH_
#define SPARSEKERN_CUDA_CHANNEL_SKIP_CONV2D_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

// Tensor cores through WMMA on sm_80+ (bf16 fragments need it); a host emulation of the thread model
// (tests/csrc) predefines this to run the WMMA path on the CPU.
#ifndef SPARSEKERN_CSK_WMMA
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SPARSEKERN_CSK_WMMA 1
#else
#define SPARSEKERN_CSK_WMMA 0
#endif
#endif

namespace sparsekern {
namespace channel_skip {

// Element offsets within one sample, the weight and one output sample fit in int32 (the host checks).
template <typename T>
struct ConvParams {
  const T* __restrict__ x;              // (B, C_in, H, W), strides below
  const T* __restrict__ weight;         // (C_out, C_in, kh, kw), strides below
  const T* __restrict__ bias;           // (C_out,) or nullptr
  const int32_t* __restrict__ lists;    // (B, lists_stride), see the header comment
  T* __restrict__ y;                    // (B, C_out, H_out, W_out), contiguous
  int batch, c_in, c_out, h, w, h_out, w_out, kh, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t x_sb;
  int x_sc, x_sh, x_sw;
  int w_so, w_sc, w_sh, w_sw;
  int64_t lists_stride;
  bool relu;
};

struct ListParams {
  const uint8_t* in_mask;   // (B, C_in) bool as bytes, or nullptr = all active
  const uint8_t* out_mask;  // (B, C_out) or nullptr
  int64_t in_sb, in_sc, out_sb, out_sc;
  int32_t* lists;           // (B, lists_stride)
  int64_t lists_stride;
  int batch, c_in, c_out;
};

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128;  // pixels per tile
constexpr int kBN = 64;   // output channels per tile

template <typename T>
struct Tile {
  static constexpr int kBK = sizeof(T) == 4 ? 16 : 32;   // input channels per K step (fits 48 KB of smem)
  static constexpr int kLdA = kBM + 8;                    // As[k][m]: column-major A for WMMA, padded
  static constexpr int kLdB = kBK + 8;                    // Bs[n][k]: column-major B for WMMA, padded
  static constexpr int kLdC = kBM + 4;                    // Cs[n][m] (float)
  static constexpr int kAElems = kBK * kLdA;
  static constexpr int kBElems = kBN * kLdB;
  static constexpr int kAPerThread = kBM / 32 * (kBK / kWarps);  // m = lane + 32 i, k = warp + kWarps j
  static constexpr int kBPerThread = kBK * kBN / kThreads;        // k = tid % kBK, n = tid / kBK + (kThreads/kBK) q
  static constexpr int kOperandBytes = 2 * (kAElems + kBElems) * int(sizeof(T));
  static constexpr int kEpilogueBytes = kBN * kLdC * int(sizeof(float));
  static constexpr int kSmemBytes = kOperandBytes > kEpilogueBytes ? kOperandBytes : kEpilogueBytes;
  static_assert(kBK % kWarps == 0 && (kBK * kBN) % kThreads == 0 && kThreads % kBK == 0, "tile mapping");
  static_assert((kAElems * sizeof(T)) % 32 == 0 && (kBElems * sizeof(T)) % 32 == 0, "WMMA needs 32-byte alignment");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ----------------------------------------------------------------------------- index lists
// One block per (sample, mask): grid (B, 2). Pass 1 counts the active channels, pass 2 scatters each channel
// to its place with a block-wide prefix sum (warp ballots + per-warp totals).
static __global__ void __launch_bounds__(kThreads) build_channel_lists_kernel(ListParams p) {
  const int b = blockIdx.x;
  const bool inputs = blockIdx.y == 0;
  const int channels = inputs ? p.c_in : p.c_out;
  const uint8_t* mask = inputs ? p.in_mask : p.out_mask;
  const int64_t sc = inputs ? p.in_sc : p.out_sc;
  if (mask != nullptr) mask += b * (inputs ? p.in_sb : p.out_sb);
  int32_t* row = p.lists + b * p.lists_stride;
  int32_t* perm = row + (inputs ? 0 : p.c_in);
  int32_t* count = row + p.c_in + p.c_out + (inputs ? 0 : 1);

  int active = 0;
  for (int c0 = 0; c0 < channels; c0 += kThreads) {
    const int c = c0 + threadIdx.x;
    active += __syncthreads_count(c < channels && (mask == nullptr || mask[c * sc] != 0));
  }
  __shared__ int warp_totals[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int before = 0;  // active channels in earlier chunks
  for (int c0 = 0; c0 < channels; c0 += kThreads) {
    const int c = c0 + threadIdx.x;
    const bool on = c < channels && (mask == nullptr || mask[c * sc] != 0);
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int earlier_warps = 0, chunk_total = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      earlier_warps += i < warp ? warp_totals[i] : 0;
      chunk_total += warp_totals[i];
    }
    const int active_before = before + earlier_warps + __popc(ballot & ((1u << lane) - 1u));
    if (c < channels) perm[on ? active_before : active + (c - active_before)] = c;
    before += chunk_total;
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
  if (threadIdx.x == 0) *count = active;
}

// ----------------------------------------------------------------------------- the convolution
template <typename T>
struct Fetch {  // one K step's tile elements held in registers between the global load and the smem store
  T a[Tile<T>::kAPerThread];
  T b[Tile<T>::kBPerThread];
};

// Per-thread constants of one block: the pixels this thread loads and the weight rows of its output channels.
template <typename T>
struct ThreadGeometry {
  int ih0[kBM / 32], iw0[kBM / 32];
  bool m_ok[kBM / 32];
  int w_row[Tile<T>::kBPerThread];
  bool n_ok[Tile<T>::kBPerThread];
};

template <typename T>
__device__ __forceinline__ void fetch_step(const ConvParams<T>& p, const T* __restrict__ x_b,
                                           const int32_t* __restrict__ in_perm, int n_in, int step,
                                           const ThreadGeometry<T>& g, Fetch<T>& f) {
  using Cfg = Tile<T>;
  const int taps = p.kh * p.kw;
  const int cb = step / taps;
  const int tap = step - cb * taps;
  const int r = tap / p.kw;
  const int s = tap - r * p.kw;
  const int warp = threadIdx.x >> 5;
  const T zero = from_float<T>(0.0f);
#pragma unroll
  for (int j = 0; j < Cfg::kBK / kWarps; ++j) {
    const int k = cb * Cfg::kBK + warp + kWarps * j;
    const bool k_ok = k < n_in;
    const int c_off = k_ok ? in_perm[k] * p.x_sc : 0;
#pragma unroll
    for (int i = 0; i < kBM / 32; ++i) {
      const int ih = g.ih0[i] + r * p.dil_h;
      const int iw = g.iw0[i] + s * p.dil_w;
      const bool ok = k_ok && g.m_ok[i] && unsigned(ih) < unsigned(p.h) && unsigned(iw) < unsigned(p.w);
      f.a[j * (kBM / 32) + i] = ok ? x_b[c_off + ih * p.x_sh + iw * p.x_sw] : zero;
    }
  }
  const int k = cb * Cfg::kBK + threadIdx.x % Cfg::kBK;
  const bool k_ok = k < n_in;
  const int k_off = k_ok ? in_perm[k] * p.w_sc + r * p.w_sh + s * p.w_sw : 0;
#pragma unroll
  for (int q = 0; q < Cfg::kBPerThread; ++q) {
    f.b[q] = k_ok && g.n_ok[q] ? p.weight[g.w_row[q] + k_off] : zero;
  }
}

template <typename T>
__device__ __forceinline__ void store_step(const Fetch<T>& f, T* __restrict__ As, T* __restrict__ Bs) {
  using Cfg = Tile<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < Cfg::kBK / kWarps; ++j) {
#pragma unroll
    for (int i = 0; i < kBM / 32; ++i) As[(warp + kWarps * j) * Cfg::kLdA + lane + 32 * i] = f.a[j * (kBM / 32) + i];
  }
  const int k = threadIdx.x % Cfg::kBK;
#pragma unroll
  for (int q = 0; q < Cfg::kBPerThread; ++q) {
    Bs[(threadIdx.x / Cfg::kBK + (kThreads / Cfg::kBK) * q) * Cfg::kLdB + k] = f.b[q];
  }
}

// Register-tiled FMA: thread (lane, warp) owns pixels lane + 32 i (i < 4) and channels warp + 8 j (j < 8).
template <typename T>
struct SimtAccumulator {
  float acc[kBM / 32][kBN / kWarps];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kBM / 32; ++i)
#pragma unroll
      for (int j = 0; j < kBN / kWarps; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void multiply(const T* __restrict__ As, const T* __restrict__ Bs) {
    using Cfg = Tile<T>;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll 4
    for (int k = 0; k < Cfg::kBK; ++k) {
      float a[kBM / 32];
#pragma unroll
      for (int i = 0; i < kBM / 32; ++i) a[i] = to_float(As[k * Cfg::kLdA + lane + 32 * i]);
#pragma unroll
      for (int j = 0; j < kBN / kWarps; ++j) {
        const float bv = to_float(Bs[(warp + kWarps * j) * Cfg::kLdB + k]);
#pragma unroll
        for (int i = 0; i < kBM / 32; ++i) acc[i][j] = fmaf(a[i], bv, acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* __restrict__ Cs) const {
    using Cfg = Tile<T>;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < kBM / 32; ++i)
#pragma unroll
      for (int j = 0; j < kBN / kWarps; ++j) Cs[(warp + kWarps * j) * Cfg::kLdC + lane + 32 * i] = acc[i][j];
  }
};

#if SPARSEKERN_CSK_WMMA
// WMMA 16x16x16: the 8 warps form a 4 (pixels) x 2 (channels) grid, each warp owns a 32 x 32 block = 2 x 2 fragments.
template <typename T>
struct WmmaAccumulator {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void multiply(const T* __restrict__ As, const T* __restrict__ Bs) {
    using namespace nvcuda;
    using Cfg = Tile<T>;
    const int warp = threadIdx.x >> 5;
    const int m0 = (warp % 4) * 32;
    const int n0 = (warp / 4) * 32;
#pragma unroll
    for (int kk = 0; kk < Cfg::kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + kk * Cfg::kLdA + m0 + 16 * i, Cfg::kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (n0 + 16 * j) * Cfg::kLdB + kk, Cfg::kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* __restrict__ Cs) const {
    using namespace nvcuda;
    using Cfg = Tile<T>;
    const int warp = threadIdx.x >> 5;
    const int m0 = (warp % 4) * 32;
    const int n0 = (warp / 4) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (n0 + 16 * j) * Cfg::kLdC + m0 + 16 * i, acc[i][j], Cfg::kLdC,
                                wmma::mem_col_major);
  }
};
template <typename T>
using Accumulator = typename std::conditional<std::is_same<T, float>::value, SimtAccumulator<T>,
                                              WmmaAccumulator<T>>::type;
#else
template <typename T>
using Accumulator = SimtAccumulator<T>;
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) channel_skip_conv2d_kernel(ConvParams<T> p) {
  using Cfg = Tile<T>;
  const int m_total = p.h_out * p.w_out;
  const int tiles_m = (m_total + kBM - 1) / kBM;
  const int tile_m = blockIdx.x % tiles_m;
  const int tile_n = blockIdx.x / tiles_m;
  const int b = blockIdx.y;
  const int m_base = tile_m * kBM;
  const int n_base = tile_n * kBN;
  const int32_t* row = p.lists + b * p.lists_stride;
  const int32_t* in_perm = row;
  const int32_t* out_perm = row + p.c_in;
  const int n_in = row[p.c_in + p.c_out];
  const int n_out = row[p.c_in + p.c_out + 1];
  T* y_b = p.y + int64_t(b) * p.c_out * m_total;

  if (n_base >= n_out) {  // no active output channel in this tile: zeros, nothing read
    const T zero = from_float<T>(0.0f);
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int m = m_base + e % kBM;
      const int n = n_base + e / kBM;
      if (m < m_total && n < p.c_out) y_b[out_perm[n] * m_total + m] = zero;
    }
    return;
  }

  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + 2 * Cfg::kAElems;
  float* Cs = reinterpret_cast<float*>(smem);

  ThreadGeometry<T> g;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kBM / 32; ++i) {
    const int m = m_base + lane + 32 * i;
    const int oh = m / p.w_out;
    const int ow = m - oh * p.w_out;
    g.m_ok[i] = m < m_total;
    g.ih0[i] = oh * p.stride_h - p.pad_h;
    g.iw0[i] = ow * p.stride_w - p.pad_w;
  }
#pragma unroll
  for (int q = 0; q < Cfg::kBPerThread; ++q) {
    const int n = n_base + threadIdx.x / Cfg::kBK + (kThreads / Cfg::kBK) * q;
    g.n_ok[q] = n < n_out;
    g.w_row[q] = n < n_out ? out_perm[n] * p.w_so : 0;
  }

  const T* x_b = p.x + int64_t(b) * p.x_sb;
  const int steps = (n_in + Cfg::kBK - 1) / Cfg::kBK * (p.kh * p.kw);
  Accumulator<T> acc;
  acc.zero();
  if (steps > 0) {
    Fetch<T> f;
    fetch_step(p, x_b, in_perm, n_in, 0, g, f);
    store_step(f, As, Bs);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
      const int cur = step & 1;
      const bool more = step + 1 < steps;
      if (more) fetch_step(p, x_b, in_perm, n_in, step + 1, g, f);  // in flight during the multiply
      acc.multiply(As + cur * Cfg::kAElems, Bs + cur * Cfg::kBElems);
      if (more) store_step(f, As + (cur ^ 1) * Cfg::kAElems, Bs + (cur ^ 1) * Cfg::kBElems);
      __syncthreads();
    }
  }

  acc.store(Cs);  // the operand buffers are dead: every warp passed the loop's last barrier
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = m_base + e % kBM;
    const int n = n_base + e / kBM;
    if (m >= m_total || n >= p.c_out) continue;
    const int o = out_perm[n];
    float v = 0.0f;
    if (n < n_out) {
      v = Cs[(e / kBM) * Cfg::kLdC + e % kBM];
      if (p.bias != nullptr) v += to_float(p.bias[o]);
      if (p.relu) v = fmaxf(v, 0.0f);
    }
    y_b[o * m_total + m] = from_float<T>(v);
  }
}

// ----------------------------------------------------------------------------- host launchers (nvcc only)
#ifdef __CUDACC__
inline cudaError_t launch_build_channel_lists(const ListParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  build_channel_lists_kernel<<<dim3(p.batch, 2), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// p.lists must have been built (on the same stream) by launch_build_channel_lists.
template <typename T>
cudaError_t launch_channel_skip_conv2d(const ConvParams<T>& p, cudaStream_t stream) {
  const int m_total = p.h_out * p.w_out;
  if (p.batch == 0 || p.c_out == 0 || m_total == 0) return cudaSuccess;
  const int tiles = ((m_total + kBM - 1) / kBM) * ((p.c_out + kBN - 1) / kBN);
  channel_skip_conv2d_kernel<T><<<dim3(tiles, p.batch), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace channel_skip
}  // namespace sparsekern

#if defined(SPARSEKERN_COMPILE_CHECK) && defined(__CUDACC__)
template cudaError_t sparsekern::channel_skip::launch_channel_skip_conv2d<float>(
    const sparsekern::channel_skip::ConvParams<float>&, cudaStream_t);
template cudaError_t sparsekern::channel_skip::launch_channel_skip_conv2d<__half>(
    const sparsekern::channel_skip::ConvParams<__half>&, cudaStream_t);
template cudaError_t sparsekern::channel_skip::launch_channel_skip_conv2d<__nv_bfloat16>(
    const sparsekern::channel_skip::ConvParams<__nv_bfloat16>&, cudaStream_t);
cudaError_t sparsekern_channel_skip_compile_check_lists(const sparsekern::channel_skip::ListParams& p,
                                                       cudaStream_t stream) {
  return sparsekern::channel_skip::launch_build_channel_lists(p, stream);
}
#endif  // SPARSEKERN_COMPILE_CHECK

#endif  // SPARSEKERN_CUDA_CHANNEL_SKIP_CONV2D_CUH_
