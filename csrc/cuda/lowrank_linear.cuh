// Fused low-rank linear layer y = x Q^T P^T + bias, the rank-r intermediate h = x Q^T kept in shared memory.
//
//   x (T, in), Q (r, in), P (out, r), bias (out,) or null, y (T, out) with unit column stride.
//   h[t, j] = sum_k x[t, k] Q[j, k]            (phase 1, fp32 accumulation)
//   y[t, n] = bias[n] + sum_j h[t, j] P[n, j]   (phase 2, h rounded once to T, fp32 accumulation)
//
// A block owns kBlockM = 64 tokens and one contiguous range of output columns (the "split": several blocks
// share a token tile when there are too few token tiles to fill the GPU; each recomputes phase 1). Phase 1
// streams x and Q through a two-stage shared-memory pipeline (cp.async when rows are 16-byte aligned, plain
// loads otherwise) and accumulates the 64 x RT tile of h (RT = r rounded up to 16..256) in registers; the
// tile is then written to shared memory in T and phase 2 streams 64-column tiles of P through the same
// two-stage pipeline, multiplying h by each and adding the bias before the one store of y.
//
// Math units: __half / __nv_bfloat16 use tensor cores through WMMA (16x16x16, fp32 accumulators; 4 warps,
// each owns 16 token rows); float uses plain fp32 FMA (exact, the correctness path: the dispatch prefers
// Triton for fp32). Every edge is bounds-checked: any T, in, out >= 1 and 1 <= r <= 256.
//
// Only CUDA headers: CI compiles this file alone with -DSPARSEKERN_COMPILE_CHECK (explicit instantiations at
// the end); csrc/cuda/lowrank_linear.cu registers it as sparsekern::lowrank_linear_native for CUDA tensors.
#ifndef SPARSEKERN_CUDA_LOWRANK_LINEAR_CUH
#define SPARSEKERN_CUDA_LOWRANK_LINEAR_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace sparsekern {
namespace lowrank {

constexpr int kBlockM = 64;     // tokens per block
constexpr int kBlockN = 64;     // output columns per phase-2 tile
constexpr int kBlockK = 32;     // reduction chunk of phase 1
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPad = 8;         // elements of padding per shared-memory row (bank spread, 16-byte rows)
constexpr int kMaxRank = 256;
constexpr int kMaxSplit = 8;    // most blocks sharing one token tile
constexpr int kScratchLd = 20;  // row stride of the per-warp fp32 staging tile (16 x 16 fragment)

// Everything a launch needs; strides in elements.
struct Params {
  const void* x;
  const void* q;
  const void* p;
  const void* bias;  // null: no bias
  void* y;
  int64_t tokens;
  int in, out, rank;
  int64_t sx_t, sx_k, sq_r, sq_k, sp_n, sp_r, sy_t;
  int split;   // blocks per token tile (set by the launcher)
  bool vec;    // 16-byte cp.async loads are legal (set by the launcher)
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  uint4 v = make_uint4(0, 0, 0, 0);
  if (pred) v = *reinterpret_cast<const uint4*>(gmem);
  *reinterpret_cast<uint4*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// smem[i][c] = g[(r0 + i) * s_row + (c0 + c) * s_col] for i < ROWS, c < COLS, zero where r0 + i >= rows or
// c0 + c >= cols. Rows of smem are LDS elements apart. With vec, s_col == 1, the row starts are 16-byte
// aligned and cols is a multiple of 16 / sizeof(T), so each 16-byte chunk is entirely inside or outside.
template <typename T, int ROWS, int COLS, int LDS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t s_row, int64_t s_col, int64_t r0, int64_t rows,
                                          int c0, int cols, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kChunks = ROWS * COLS / kVec;
    for (int idx = threadIdx.x; idx < kChunks; idx += kThreads) {
      const int i = idx / (COLS / kVec);
      const int c = (idx % (COLS / kVec)) * kVec;
      const bool ok = r0 + i < rows && c0 + c < cols;
      const T* src = ok ? g + (r0 + i) * s_row + (c0 + c) : g;
      cp_async16(smem + i * LDS + c, src, ok);
    }
  } else {
    const T zero = from_float<T>(0.0f);
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
      const int i = idx / COLS;
      const int c = idx % COLS;
      const bool ok = r0 + i < rows && c0 + c < cols;
      smem[i * LDS + c] = ok ? g[(r0 + i) * s_row + static_cast<int64_t>(c0 + c) * s_col] : zero;
    }
  }
}

// Tensor-core math (__half, __nv_bfloat16): warp w owns token rows [16 w, 16 w + 16) of the block.
template <typename T, int RT>
struct MmaMath {
  static constexpr int kFrags = RT / 16;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> h[kFrags];

  __device__ void init() {
#pragma unroll
    for (int j = 0; j < kFrags; ++j) nvcuda::wmma::fill_fragment(h[j], 0.0f);
  }

  // h += xs (kBlockM x kBlockK, ld LDX) @ qs^T (qs: RT x kBlockK, ld LDX); only the first `rank` columns.
  template <int LDX>
  __device__ void phase1(const T* xs, const T* qs, int rank) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + warp * 16 * LDX + kk, LDX);
#pragma unroll
      for (int j = 0; j < kFrags; ++j) {
        if (j * 16 < rank) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // b(k, n) = qs[n][k]
          wmma::load_matrix_sync(b, qs + j * 16 * LDX + kk, LDX);
          wmma::mma_sync(h[j], a, b, h[j]);
        }
      }
    }
  }

  // hs[row][col] = T(h) for this warp's rows, through the warp's fp32 staging tile.
  template <int LDH>
  __device__ void store_h(T* hs, float* scratch) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* mine = scratch + warp * 16 * kScratchLd;
#pragma unroll
    for (int j = 0; j < kFrags; ++j) {
      nvcuda::wmma::store_matrix_sync(mine, h[j], kScratchLd, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        hs[(warp * 16 + e / 16) * LDH + j * 16 + e % 16] = from_float<T>(mine[(e / 16) * kScratchLd + e % 16]);
      }
      __syncwarp();
    }
  }

  // y[t0 + row][n0 + col] = bias + hs @ ps^T for the warp's 16 rows and kBlockN columns (ps: kBlockN x RT).
  template <int LDH, int LDP>
  __device__ void phase2(const T* hs, const T* ps, float* scratch, const Params& prm, int64_t t0, int n0,
                         int n_end) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBlockN / 16];
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
    for (int kk = 0; kk < prm.rank; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, hs + warp * 16 * LDH + kk, LDH);
#pragma unroll
      for (int j = 0; j < kBlockN / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // b(k, n) = ps[n][k]
        wmma::load_matrix_sync(b, ps + j * 16 * LDP + kk, LDP);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    const T* bias = static_cast<const T*>(prm.bias);
    T* y = static_cast<T*>(prm.y);
    float* mine = scratch + warp * 16 * kScratchLd;
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) {
      wmma::store_matrix_sync(mine, acc[j], kScratchLd, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t t = t0 + warp * 16 + e / 16;
        const int n = n0 + j * 16 + e % 16;
        if (t < prm.tokens && n < n_end) {
          float v = mine[(e / 16) * kScratchLd + e % 16];
          if (bias != nullptr) v += to_float<T>(bias[n]);
          y[t * prm.sy_t + n] = from_float<T>(v);
        }
      }
      __syncwarp();
    }
  }
};

// fp32 FMA math: thread i owns elements i, i + kThreads, ... of each tile (row-major over the tile).
template <int RT>
struct SimtMath {
  static constexpr int kPer = kBlockM * RT / kThreads;
  float h[kPer];

  __device__ void init() {
#pragma unroll
    for (int i = 0; i < kPer; ++i) h[i] = 0.0f;
  }

  template <int LDX>
  __device__ void phase1(const float* xs, const float* qs, int /*rank*/) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const float* xr = xs + (e / RT) * LDX;
      const float* qr = qs + (e % RT) * LDX;
      float acc = h[i];
#pragma unroll 8
      for (int c = 0; c < kBlockK; ++c) acc = fmaf(xr[c], qr[c], acc);
      h[i] = acc;
    }
  }

  template <int LDH>
  __device__ void store_h(float* hs, float* /*scratch*/) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      hs[(e / RT) * LDH + e % RT] = h[i];
    }
  }

  template <int LDH, int LDP>
  __device__ void phase2(const float* hs, const float* ps, float* /*scratch*/, const Params& prm, int64_t t0, int n0,
                         int n_end) {
    const float* bias = static_cast<const float*>(prm.bias);
    float* y = static_cast<float*>(prm.y);
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int row = e / kBlockN, col = e % kBlockN;
      const float* hr = hs + row * LDH;
      const float* pr = ps + col * LDP;
      float acc = 0.0f;
      for (int j = 0; j < prm.rank; ++j) acc = fmaf(hr[j], pr[j], acc);
      const int64_t t = t0 + row;
      const int n = n0 + col;
      if (t < prm.tokens && n < n_end) y[t * prm.sy_t + n] = acc + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
};

template <typename T, int RT>
using Math = typename std::conditional<std::is_same<T, float>::value, SimtMath<RT>, MmaMath<T, RT>>::type;

// Shared-memory layout of one block, in elements of T (each region starts 128-byte aligned).
template <typename T, int RT>
struct Smem {
  static constexpr int kLdx = kBlockK + kPad;  // x and Q tiles: [rows][kBlockK]
  static constexpr int kLdh = RT + kPad;       // h and P tiles: [rows][RT]
  static constexpr int kStageX = kBlockM * kLdx;
  static constexpr int kStageQ = RT * kLdx;
  static constexpr int kStageP = kBlockN * kLdh;
  static constexpr int kPhase1 = 2 * (kStageX + kStageQ);  // two stages of (x tile, Q tile)
  static constexpr int kPhase2 = 2 * kStageP;              // two stages of the P tile
  static constexpr int kAlign = 128 / sizeof(T);
  static constexpr int kPipe = ((kPhase1 > kPhase2 ? kPhase1 : kPhase2) + kAlign - 1) / kAlign * kAlign;
  static constexpr int kH = (kBlockM * kLdh + kAlign - 1) / kAlign * kAlign;
  static constexpr size_t kScratchBytes = sizeof(float) * kWarps * 16 * kScratchLd;
  static constexpr size_t kBytes = sizeof(T) * (kPipe + kH) + kScratchBytes;
};

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) lowrank_linear_kernel(const Params prm) {
  using S = Smem<T, RT>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* pipe = reinterpret_cast<T*>(smem_raw);
  T* hs = pipe + S::kPipe;
  float* scratch = reinterpret_cast<float*>(hs + S::kH);

  const T* x = static_cast<const T*>(prm.x);
  const T* q = static_cast<const T*>(prm.q);
  const T* p = static_cast<const T*>(prm.p);
  const int64_t tile_m = blockIdx.x / prm.split;
  const int part = blockIdx.x % prm.split;
  const int64_t t0 = tile_m * kBlockM;

  // ---- phase 1: h = x[t0 : t0 + 64] @ Q^T, two-stage pipeline over in
  Math<T, RT> math;
  math.init();
  const int k_tiles = (prm.in + kBlockK - 1) / kBlockK;
  auto issue_xq = [&](int stage, int k0) {
    T* xs = pipe + stage * (S::kStageX + S::kStageQ);
    T* qs = xs + S::kStageX;
    load_tile<T, kBlockM, kBlockK, S::kLdx>(xs, x, prm.sx_t, prm.sx_k, t0, prm.tokens, k0, prm.in, prm.vec);
    load_tile<T, RT, kBlockK, S::kLdx>(qs, q, prm.sq_r, prm.sq_k, 0, prm.rank, k0, prm.in, prm.vec);
    cp_async_commit();
  };
  issue_xq(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) {
      issue_xq((kt + 1) & 1, (kt + 1) * kBlockK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* xs = pipe + (kt & 1) * (S::kStageX + S::kStageQ);
    math.template phase1<S::kLdx>(xs, xs + S::kStageX, prm.rank);
    __syncthreads();  // the next issue overwrites this stage
  }
  math.template store_h<S::kLdh>(hs, scratch);

  // ---- phase 2: y[:, cols of this part] = h @ P^T + bias, two-stage pipeline over 64-column tiles
  const int n_tiles = (prm.out + kBlockN - 1) / kBlockN;
  const int per = (n_tiles + prm.split - 1) / prm.split;
  const int first = part * per;
  const int last = min(first + per, n_tiles);
  const int n_end = min(last * kBlockN, prm.out);
  auto issue_p = [&](int stage, int n0) {
    load_tile<T, kBlockN, RT, S::kLdh>(pipe + stage * S::kStageP, p, prm.sp_n, prm.sp_r, n0, n_end, 0, prm.rank,
                                       prm.vec);
    cp_async_commit();
  };
  if (first < last) issue_p(0, first * kBlockN);
  for (int it = first; it < last; ++it) {
    const int stage = (it - first) & 1;
    if (it + 1 < last) {
      issue_p(stage ^ 1, (it + 1) * kBlockN);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // the P tile (and, on the first pass, every warp's h rows) is visible
    math.template phase2<S::kLdh, S::kLdh>(hs, pipe + stage * S::kStageP, scratch, prm, t0, it * kBlockN, n_end);
    __syncthreads();
  }
}

template <typename T, int RT>
cudaError_t launch_rank(Params prm, cudaStream_t stream) {
  auto kernel = lowrank_linear_kernel<T, RT>;
  const size_t smem = Smem<T, RT>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int device = 0, sms = 1, per_sm = 1;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem)) != cudaSuccess) return err;
  const int64_t m_tiles = (prm.tokens + kBlockM - 1) / kBlockM;
  const int64_t n_tiles = (prm.out + kBlockN - 1) / kBlockN;
  const int64_t slots = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  int64_t split = (slots + m_tiles - 1) / m_tiles;
  split = split < 1 ? 1 : split;
  split = split > kMaxSplit ? kMaxSplit : split;
  split = split > n_tiles ? n_tiles : split;
  prm.split = static_cast<int>(split);
  if (m_tiles * split > 0x7fffffffLL) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(m_tiles * split), kThreads, smem, stream>>>(prm);
  return cudaGetLastError();
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Launch y = x Q^T P^T + bias on `stream`. prm.split and prm.vec are filled in here. Returns
// cudaErrorInvalidValue for a rank outside 1..256 and the CUDA error of the launch otherwise.
template <typename T>
cudaError_t launch_lowrank_linear(Params prm, cudaStream_t stream) {
  if (prm.rank < 1 || prm.rank > kMaxRank || prm.in < 1) return cudaErrorInvalidValue;
  if (prm.tokens == 0 || prm.out == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row_align = kVec;  // row strides in elements must keep 16-byte alignment
  prm.vec = prm.sx_k == 1 && prm.sq_k == 1 && prm.sp_r == 1 && prm.in % kVec == 0 && prm.rank % kVec == 0 &&
            prm.sx_t % row_align == 0 && prm.sq_r % row_align == 0 && prm.sp_n % row_align == 0 &&
            aligned16(prm.x) && aligned16(prm.q) && aligned16(prm.p);
  if (prm.rank <= 16) return launch_rank<T, 16>(prm, stream);
  if (prm.rank <= 32) return launch_rank<T, 32>(prm, stream);
  if (prm.rank <= 64) return launch_rank<T, 64>(prm, stream);
  if (prm.rank <= 128) return launch_rank<T, 128>(prm, stream);
  return launch_rank<T, 256>(prm, stream);
}

}  // namespace lowrank
}  // namespace sparsekern

#endif  // SPARSEKERN_CUDA_LOWRANK_LINEAR_CUH

#ifdef SPARSEKERN_COMPILE_CHECK
template cudaError_t sparsekern::lowrank::launch_lowrank_linear<float>(sparsekern::lowrank::Params, cudaStream_t);
template cudaError_t sparsekern::lowrank::launch_lowrank_linear<__half>(sparsekern::lowrank::Params, cudaStream_t);
template cudaError_t sparsekern::lowrank::launch_lowrank_linear<__nv_bfloat16>(sparsekern::lowrank::Params,
                                                                               cudaStream_t);
#endif
