// The native kernels of sparsekern's ops, as the Python extension module exposes them (csrc/ops.cpp).
//
// They are backends, not ops: each writes into an output ``y`` that the Python op allocated with the shape and
// memory format its one shape function computed (sparsekern/ops/), after validating every input once. The
// checks here only guard against being called some other way.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace sparsekern {
namespace cpu {

// The direct convolution of sparsekern.ops.channel_skip_conv2d (masks) and sparsekern.ops.conv2d (residual):
// y = act(conv(x, weight) + bias (+ residual)), y (B, C_out, H_out, W_out) NCHW- or NHWC-contiguous, float32;
// a residual has y's shape and strides and excludes out_mask.
void channel_skip_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, at::Tensor& y);

// sparsekern.ops.fused_conv2d on channels-last tensors: the weight packed once by conv2d_nhwc_pack_cpu (for a
// convolution with padding or without: the packing differs), then
// y = act(conv(x, weight) + bias (+ residual)) by conv2d_nhwc_prepacked, also the CPU kernel of the torch operator
// sparsekern::_conv2d_nhwc_prepacked (schema in sparsekern/ops/fused_conv2d.py) so that graphs calling it run
// without Python. x float32 (B, C_in, H, W) with any strides; y is returned channels-last; a residual is added
// before the ReLU.
at::Tensor conv2d_nhwc_pack_cpu(const at::Tensor& weight, bool padded);
at::Tensor conv2d_nhwc_prepacked(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t out_channels, bool relu);

// The CPU kernel of sparsekern::_conv2d_nhwc_chain (schema in sparsekern/ops/fused_conv2d.py): convolutions of
// conv2d_nhwc_prepacked and pooled-MLP gates (as _gate_guard's) run one after another in one parallel region.
// Values are the inputs (channels-last float32), then each layer's output; layer l's kChainSpec spec values are
// (input value, residual value or -1, kh, kw, sh, sw, ph, pw, dh, dw, out_channels, relu, gate or -1), and it may
// read only the inputs and earlier layers' outputs; an empty bias is none. Gate k's kGateSpec values are (input
// value, granularity, out_channels, the layer it runs with (n: after the last)) and its kGateTensors tensors
// (w1, b1, w2, b2, group_always, group_fixed, computed); a layer naming gate k (the one it runs with or a later
// one) multiplies its output by the gate's per-sample mask of the computed channels after its epilogue. Returns the values named by outputs
// (distinct layers' outputs), each a channels-last tensor of its own (the other layers' outputs live in one
// scratch buffer), then, with gates, whether some sample left a gate's calibration classes (a 0-d bool).
constexpr int64_t kChainSpec = 13, kGateSpec = 4, kGateTensors = 7;
std::vector<at::Tensor> conv2d_nhwc_chain(at::TensorList inputs, at::TensorList packed, at::TensorList bias,
                                          at::IntArrayRef spec, at::IntArrayRef outputs, at::TensorList gates,
                                          at::IntArrayRef gate_spec);

// The CPU kernel of the torch operator sparsekern::_gate_guard (schema and reference in
// sparsekern/ops/gate_guard.py): a pooled-MLP gate's channel mask, whether the batch leaves the calibration classes,
// and the mask of the computed channels as a scale; returns (mask (B, C) bool, scale (B, K, 1, 1), outside () bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_guard_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& group_always, const at::Tensor& group_fixed, const at::Tensor& computed, int64_t granularity,
    int64_t out_channels);

// The CPU kernel of the torch operator sparsekern::_layer_norm_fold (schema and reference in
// sparsekern/ops/layer_norm_fold.py): t = LayerNorm(x) A^T + c from z = x W^T (W = A diag(gamma)), weight W (r, d),
// row_sum W 1 and shift c (r,); x (..., d) and z (..., r) float32; returns t (..., r) contiguous.
at::Tensor layer_norm_fold_cpu(const at::Tensor& z, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& row_sum, const at::Tensor& shift, double eps, double max_offset);

// y (T, out) contiguous, float32, T = prod(x.shape[:-1]): sparsekern.ops.lowrank_linear.
void lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p,
                        const std::optional<at::Tensor>& bias, at::Tensor& y);

// sparsekern.ops.sru_recurrence: u (B, T, 3d) = [W x | W_f x | W_r x], x and h (B, T, d), v_f, v_r, b_f, b_r (d,);
// all contiguous float32. h_t = r_t c_t + (1 - r_t) x_t with c_0 = 0 (Lei et al. 2018, eqs. 3-7).
void sru_recurrence_cpu(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                        const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor& h);

// Its gradients given grad_h (B, T, d): grad_u (B, T, 3d), grad_x (B, T, d), and grad_params (4, B, d) holding per
// batch row the gradients of v_f, v_r, b_f, b_r (the op sums them over B). c is recomputed, not saved.
void sru_recurrence_backward_cpu(const at::Tensor& grad_h, const at::Tensor& u, const at::Tensor& x,
                                 const at::Tensor& v_f, const at::Tensor& v_r, const at::Tensor& b_f,
                                 const at::Tensor& b_r, at::Tensor& grad_u, at::Tensor& grad_x,
                                 at::Tensor& grad_params);

// sparsekern.ops.attention: o = softmax(scale q k^T, causal: query i sees keys 0..i) v with q (B, H, T_q, E),
// k (B, H, T_k, E), v (B, H, T_k, E_v) and o (B, H, T_q, E_v), float32, any strides with unit stride along the last
// dimension.
void attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                   at::Tensor& o);

// The CPU kernel of the torch operator sparsekern::_attention (schema in sparsekern/ops/attention.py), what the
// attention pass inserts: attention_cpu into a new output stored (B, T_q, H, E_v); float32 inputs.
at::Tensor attention_op_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double scale);

}  // namespace cpu

#ifdef SPARSEKERN_WITH_CUDA
namespace cuda {

// y (B, C_out, H_out, W_out) contiguous, float32/float16/bfloat16.
void channel_skip_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                              at::Tensor& y);

// y (T, out) contiguous, 1 <= r <= 256.
void lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p,
                         const std::optional<at::Tensor>& bias, at::Tensor& y);

// As sru_recurrence_cpu and sru_recurrence_backward_cpu, float32/float16/bfloat16 (grad_params float32).
void sru_recurrence_cuda(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                         const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor& h);
void sru_recurrence_backward_cuda(const at::Tensor& grad_h, const at::Tensor& u, const at::Tensor& x,
                                  const at::Tensor& v_f, const at::Tensor& v_r, const at::Tensor& b_f,
                                  const at::Tensor& b_r, at::Tensor& grad_u, at::Tensor& grad_x,
                                  at::Tensor& grad_params);

}  // namespace cuda
#endif

}  // namespace sparsekern
