// The SRU recurrence (Lei, Zhang, Wang, Dai and Artzi, EMNLP 2018, eqs. 3-7), forward and backward, as the
// paper's CUDA kernel: one thread per (batch row, channel), walking through time.
//
//   u (B, T, 3d) = [W x | W_f x | W_r x], x and h (B, T, d), v_f, v_r, b_f, b_r (d,); all contiguous.
//   f = sigmoid(W_f x_t + v_f c + b_f), r = sigmoid(W_r x_t + v_r c + b_r) with c = c_{t-1} (c_0 = 0),
//   c_t = W x_t + f (c - W x_t), h_t = x_t + r (c_t - x_t).
//
// The backward recomputes c_1..c_T into a float32 scratch buffer (B, T, d), then walks back through time carrying
// dL/dc_t (the formulas of sparsekern.ops.sru_recurrence.sru_recurrence_backward_reference), writing grad_u,
// grad_x and each batch row's gradients of v_f, v_r, b_f, b_r into grad_params (4, B, d) float32 (the op sums
// them over B). Consecutive threads own consecutive channels, so every load and store of a step is coalesced.
// Any dtype (float / __half / __nv_bfloat16) is computed in float.
//
// Only CUDA headers: CI compiles this file alone with -DSPARSEKERN_COMPILE_CHECK (explicit instantiations at
// the end); csrc/cuda/sru_recurrence.cu launches it for sparsekern.ops.sru_recurrence's cuda backends.
#ifndef SPARSEKERN_CUDA_SRU_RECURRENCE_CUH
#define SPARSEKERN_CUDA_SRU_RECURRENCE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekern {
namespace sru {

constexpr int kThreads = 128;

struct Params {
  const void* u;
  const void* x;
  const void* grad_h;  // backward only
  const void* v_f;
  const void* v_r;
  const void* b_f;
  const void* b_r;
  void* h;             // forward: h; backward: grad_x
  void* grad_u;        // backward only
  float* c;            // backward only: scratch (B, T, d)
  float* grad_params;  // backward only: (4, B, d)
  int64_t B, T, d;
};

template <typename T>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}
template <>
__device__ __forceinline__ float load<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ void store(void* p, int64_t i, float v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);
}
template <>
__device__ __forceinline__ void store<__half>(void* p, int64_t i, float v) {
  static_cast<__half*>(p)[i] = __float2half(v);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(void* p, int64_t i, float v) {
  static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p) {
  const int64_t row = blockIdx.y, j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= p.d) return;
  const float vf = load<T>(p.v_f, j), vr = load<T>(p.v_r, j), bf = load<T>(p.b_f, j), br = load<T>(p.b_r, j);
  float c = 0.0f;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t ut = (row * p.T + t) * 3 * p.d + j, xt = (row * p.T + t) * p.d + j;
    const float w = load<T>(p.u, ut), fp = load<T>(p.u, ut + p.d), rp = load<T>(p.u, ut + 2 * p.d);
    const float x = load<T>(p.x, xt);
    const float f = sigmoid(fp + vf * c + bf), r = sigmoid(rp + vr * c + br);
    c = w + f * (c - w);
    store<T>(p.h, xt, x + r * (c - x));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Params p) {
  const int64_t row = blockIdx.y, j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= p.d) return;
  const float vf = load<T>(p.v_f, j), vr = load<T>(p.v_r, j), bf = load<T>(p.b_f, j), br = load<T>(p.b_r, j);
  float c = 0.0f;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t ut = (row * p.T + t) * 3 * p.d + j;
    const float w = load<T>(p.u, ut), f = sigmoid(load<T>(p.u, ut + p.d) + vf * c + bf);
    c = w + f * (c - w);
    p.c[(row * p.T + t) * p.d + j] = c;
  }
  float carry = 0.0f, g_vf = 0.0f, g_vr = 0.0f, g_bf = 0.0f, g_br = 0.0f;
  for (int64_t t = p.T - 1; t >= 0; --t) {
    const int64_t ut = (row * p.T + t) * 3 * p.d + j, xt = (row * p.T + t) * p.d + j;
    const float w = load<T>(p.u, ut), fp = load<T>(p.u, ut + p.d), rp = load<T>(p.u, ut + 2 * p.d);
    const float x = load<T>(p.x, xt), gh = load<T>(p.grad_h, xt);
    const float c_now = p.c[xt], c_prev = t > 0 ? p.c[xt - p.d] : 0.0f;
    const float f = sigmoid(fp + vf * c_prev + bf), r = sigmoid(rp + vr * c_prev + br);
    const float grr = gh * (c_now - x) * r * (1.0f - r);
    const float gc = carry + gh * r;
    const float gff = gc * (c_prev - w) * f * (1.0f - f);
    carry = gc * f + gff * vf + grr * vr;
    store<T>(p.grad_u, ut, gc * (1.0f - f));
    store<T>(p.grad_u, ut + p.d, gff);
    store<T>(p.grad_u, ut + 2 * p.d, grr);
    store<T>(p.h, xt, gh * (1.0f - r));
    g_vf += gff * c_prev;
    g_vr += grr * c_prev;
    g_bf += gff;
    g_br += grr;
  }
  const int64_t at = row * p.d + j, plane = p.B * p.d;
  p.grad_params[at] = g_vf;
  p.grad_params[plane + at] = g_vr;
  p.grad_params[2 * plane + at] = g_bf;
  p.grad_params[3 * plane + at] = g_br;
}

template <typename T>
cudaError_t launch_forward(Params p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.d + kThreads - 1) / kThreads), static_cast<unsigned>(p.B));
  forward_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(Params p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.d + kThreads - 1) / kThreads), static_cast<unsigned>(p.B));
  backward_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sru
}  // namespace sparsekern

#ifdef SPARSEKERN_COMPILE_CHECK
template cudaError_t sparsekern::sru::launch_forward<float>(sparsekern::sru::Params, cudaStream_t);
template cudaError_t sparsekern::sru::launch_forward<__half>(sparsekern::sru::Params, cudaStream_t);
template cudaError_t sparsekern::sru::launch_forward<__nv_bfloat16>(sparsekern::sru::Params, cudaStream_t);
template cudaError_t sparsekern::sru::launch_backward<float>(sparsekern::sru::Params, cudaStream_t);
template cudaError_t sparsekern::sru::launch_backward<__half>(sparsekern::sru::Params, cudaStream_t);
template cudaError_t sparsekern::sru::launch_backward<__nv_bfloat16>(sparsekern::sru::Params, cudaStream_t);
#endif

#endif  // SPARSEKERN_CUDA_SRU_RECURRENCE_CUH
