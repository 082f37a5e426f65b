// sparsekern::lowrank_linear_native for CUDA tensors: checks, output allocation and the launch of the fused
// kernel in lowrank_linear.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "lowrank_linear.cuh"

namespace {

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && q.is_cuda() && p.is_cuda(), "lowrank_linear (cuda): x, Q and P must be CUDA tensors");
  TORCH_CHECK(q.dim() == 2 && p.dim() == 2 && x.dim() >= 1 && x.size(-1) == q.size(1) && p.size(1) == q.size(0),
              "lowrank_linear (cuda): need x (..., in), Q (r, in), P (out, r); got x ", x.sizes(), ", Q ", q.sizes(),
              ", P ", p.sizes());
  const int64_t rank = q.size(0), in = q.size(1), out = p.size(0);
  TORCH_CHECK(rank >= 1 && rank <= sparsekern::lowrank::kMaxRank, "lowrank_linear (cuda): rank ", rank,
              " outside 1..", sparsekern::lowrank::kMaxRank, "; use the two-GEMM backend");
  TORCH_CHECK(in < (int64_t{1} << 31) && out < (int64_t{1} << 31), "lowrank_linear (cuda): in/out too large");
  TORCH_CHECK(q.scalar_type() == x.scalar_type() && p.scalar_type() == x.scalar_type(),
              "lowrank_linear (cuda): x, Q and P must share a dtype");
  TORCH_CHECK(q.device() == x.device() && p.device() == x.device(), "lowrank_linear (cuda): x, Q, P on one device");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "lowrank_linear (cuda): bias must be (", out, ",) in x's dtype on x's device, got ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, in});  // a view when the leading dims allow one; any strides work
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t tokens = x2.size(0);
  at::Tensor y = at::empty({tokens, out}, x.options());

  sparsekern::lowrank::Params prm{};
  prm.x = x2.data_ptr();
  prm.q = q.data_ptr();
  prm.p = p.data_ptr();
  prm.bias = has_bias ? b.data_ptr() : nullptr;
  prm.y = y.data_ptr();
  prm.tokens = tokens;
  prm.in = static_cast<int>(in);
  prm.out = static_cast<int>(out);
  prm.rank = static_cast<int>(rank);
  prm.sx_t = x2.stride(0);
  prm.sx_k = x2.stride(1);
  prm.sq_r = q.stride(0);
  prm.sq_k = q.stride(1);
  prm.sp_n = p.stride(0);
  prm.sp_r = p.stride(1);
  prm.sy_t = y.stride(0);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (x.scalar_type()) {
    case at::kFloat:
      err = sparsekern::lowrank::launch_lowrank_linear<float>(prm, stream);
      break;
    case at::kHalf:
      err = sparsekern::lowrank::launch_lowrank_linear<__half>(prm, stream);
      break;
    case at::kBFloat16:
      err = sparsekern::lowrank::launch_lowrank_linear<__nv_bfloat16>(prm, stream);
      break;
    default:
      TORCH_CHECK(false, "lowrank_linear (cuda): dtype ", x.scalar_type(), " not supported (float32/float16/bfloat16)");
  }
  TORCH_CHECK(err == cudaSuccess, "lowrank_linear (cuda): launch failed: ", cudaGetErrorString(err));
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("lowrank_linear_native", &lowrank_linear_cuda); }
