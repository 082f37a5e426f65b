// The Python module of sparsekern's native kernels (loaded by sparsekern/ops/_ext.py). Each function is one
// backend of a public op in sparsekern/ops/; the op validates the inputs, allocates the output and calls it.
// Five kernels are also the CPU implementations of private torch operators whose schemas sparsekern defines
// (sparsekern::_conv2d_nhwc_prepacked, sparsekern::_conv2d_nhwc_chain, sparsekern::_gate_guard,
// sparsekern::_layer_norm_fold, sparsekern::_attention), for graphs that run without Python.
// CUDA kernels are included when the extension is built with its CUDA sources (SPARSEKERN_WITH_CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "ops.h"

namespace {

using IntList = std::vector<int64_t>;

auto direct_conv_binding() {
  return [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
            const std::optional<at::Tensor>& residual, const IntList& stride, const IntList& padding,
            const IntList& dilation, bool relu, at::Tensor y) {
    pybind11::gil_scoped_release no_gil;
    sparsekern::cpu::channel_skip_conv2d_cpu(x, weight, bias, in_mask, out_mask, residual, stride, padding, dilation,
                                             relu, y);
  };
}

template <typename Kernel>
auto conv_binding(Kernel kernel) {
  return [kernel](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
                  const IntList& stride, const IntList& padding, const IntList& dilation, bool relu, at::Tensor y) {
    pybind11::gil_scoped_release no_gil;
    kernel(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu, y);
  };
}

template <typename Kernel>
auto lowrank_binding(Kernel kernel) {
  return [kernel](const at::Tensor& x, const at::Tensor& q, const at::Tensor& p, const std::optional<at::Tensor>& bias,
                  at::Tensor y) {
    pybind11::gil_scoped_release no_gil;
    kernel(x, q, p, bias, y);
  };
}

template <typename Kernel>
auto sru_binding(Kernel kernel) {
  return [kernel](const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                  const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor h) {
    pybind11::gil_scoped_release no_gil;
    kernel(u, x, v_f, v_r, b_f, b_r, h);
  };
}

template <typename Kernel>
auto sru_backward_binding(Kernel kernel) {
  return [kernel](const at::Tensor& grad_h, const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f,
                  const at::Tensor& v_r, const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor grad_u,
                  at::Tensor grad_x, at::Tensor grad_params) {
    pybind11::gil_scoped_release no_gil;
    kernel(grad_h, u, x, v_f, v_r, b_f, b_r, grad_u, grad_x, grad_params);
  };
}

auto attention_binding() {
  return [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale, at::Tensor o) {
    pybind11::gil_scoped_release no_gil;
    sparsekern::cpu::attention_cpu(q, k, v, causal, scale, o);
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern's native kernels; call them through sparsekern.ops";
  m.def("channel_skip_conv2d_cpu", direct_conv_binding());
  m.def("conv2d_nhwc_pack_cpu", &sparsekern::cpu::conv2d_nhwc_pack_cpu);
  m.def("lowrank_linear_cpu", lowrank_binding(&sparsekern::cpu::lowrank_linear_cpu));
  m.def("sru_recurrence_cpu", sru_binding(&sparsekern::cpu::sru_recurrence_cpu));
  m.def("sru_recurrence_backward_cpu", sru_backward_binding(&sparsekern::cpu::sru_recurrence_backward_cpu));
  m.def("attention_cpu", attention_binding());
#ifdef SPARSEKERN_WITH_CUDA
  m.def("channel_skip_conv2d_cuda", conv_binding(&sparsekern::cuda::channel_skip_conv2d_cuda));
  m.def("lowrank_linear_cuda", lowrank_binding(&sparsekern::cuda::lowrank_linear_cuda));
  m.def("sru_recurrence_cuda", sru_binding(&sparsekern::cuda::sru_recurrence_cuda));
  m.def("sru_recurrence_backward_cuda", sru_backward_binding(&sparsekern::cuda::sru_recurrence_backward_cuda));
#endif
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_conv2d_nhwc_prepacked", &sparsekern::cpu::conv2d_nhwc_prepacked);
  m.impl("_conv2d_nhwc_chain", &sparsekern::cpu::conv2d_nhwc_chain);
  m.impl("_gate_guard", &sparsekern::cpu::gate_guard_cpu);
  m.impl("_layer_norm_fold", &sparsekern::cpu::layer_norm_fold_cpu);
  m.impl("_attention", &sparsekern::cpu::attention_op_cpu);
}
