// The CUDA backend of sparsekern.ops.lowrank_linear: the launch of the fused kernel in lowrank_linear.cuh on the
// current stream, into the contiguous (T, out) y the op allocated.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "lowrank_linear.cuh"
#include "ops.h"

namespace sparsekern {
namespace cuda {

void lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p,
                         const std::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && q.dim() == 2 && p.dim() == 2 && y.dim() == 2 && y.is_contiguous() &&
                  q.size(0) >= 1 && q.size(0) <= sparsekern::lowrank::kMaxRank,
              "lowrank_linear (cuda): internal: CUDA x, Q (r, in) with 1 <= r <= ", sparsekern::lowrank::kMaxRank,
              ", P (out, r) and a contiguous (T, out) y expected; call sparsekern.ops.lowrank_linear, which "
              "validates its inputs");
  const int64_t rank = q.size(0), in = q.size(1), out = p.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, in});  // a view when the leading dims allow one; any strides work
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t tokens = x2.size(0);
  if (tokens == 0 || out == 0) return;

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
}

}  // namespace cuda
}  // namespace sparsekern
