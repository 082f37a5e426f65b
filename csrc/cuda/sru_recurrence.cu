// The CUDA backends of sparsekern.ops.sru_recurrence and its backward op: the launches of the kernels in
// sru_recurrence.cuh on the current stream, into the outputs the ops allocated.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "sru_recurrence.cuh"

namespace sparsekern {
namespace cuda {

namespace {

sparsekern::sru::Params params(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                               const at::Tensor& b_f, const at::Tensor& b_r) {
  TORCH_CHECK(u.is_cuda() && x.dim() == 3 && u.is_contiguous() && x.is_contiguous() && v_f.is_contiguous() &&
                  v_r.is_contiguous() && b_f.is_contiguous() && b_r.is_contiguous(),
              "sru_recurrence (cuda): internal: contiguous CUDA u (B, T, 3d), x (B, T, d) and (d,) parameters "
              "expected; call sparsekern.ops.sru_recurrence, which validates its inputs");
  sparsekern::sru::Params p{};
  p.u = u.data_ptr();
  p.x = x.data_ptr();
  p.v_f = v_f.data_ptr();
  p.v_r = v_r.data_ptr();
  p.b_f = b_f.data_ptr();
  p.b_r = b_r.data_ptr();
  p.B = x.size(0);
  p.T = x.size(1);
  p.d = x.size(2);
  return p;
}

template <typename Launch>
void dispatch(at::ScalarType dtype, const char* what, Launch launch) {
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      err = launch(float{});
      break;
    case at::kHalf:
      err = launch(__half{});
      break;
    case at::kBFloat16:
      err = launch(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK(false, what, " (cuda): dtype ", dtype, " not supported (float32/float16/bfloat16)");
  }
  TORCH_CHECK(err == cudaSuccess, what, " (cuda): launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void sru_recurrence_cuda(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                         const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor& h) {
  sparsekern::sru::Params p = params(u, x, v_f, v_r, b_f, b_r);
  if (p.B * p.d == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  p.h = h.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), "sru_recurrence", [&](auto tag) {
    return sparsekern::sru::launch_forward<decltype(tag)>(p, stream);
  });
}

void sru_recurrence_backward_cuda(const at::Tensor& grad_h, const at::Tensor& u, const at::Tensor& x,
                                  const at::Tensor& v_f, const at::Tensor& v_r, const at::Tensor& b_f,
                                  const at::Tensor& b_r, at::Tensor& grad_u, at::Tensor& grad_x,
                                  at::Tensor& grad_params) {
  sparsekern::sru::Params p = params(u, x, v_f, v_r, b_f, b_r);
  TORCH_CHECK(grad_h.is_contiguous() && grad_params.scalar_type() == at::kFloat && grad_params.is_contiguous(),
              "sru_recurrence_backward (cuda): internal: contiguous grad_h and float32 grad_params (4, B, d) "
              "expected");
  if (p.B * p.d == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor scratch = at::empty({p.B, p.T, p.d}, x.options().dtype(at::kFloat));
  p.grad_h = grad_h.data_ptr();
  p.h = grad_x.data_ptr();
  p.grad_u = grad_u.data_ptr();
  p.c = scratch.data_ptr<float>();
  p.grad_params = grad_params.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), "sru_recurrence_backward", [&](auto tag) {
    return sparsekern::sru::launch_backward<decltype(tag)>(p, stream);
  });
}

}  // namespace cuda
}  // namespace sparsekern
