// The schemas of sparsekern's native ops: one TORCH_LIBRARY for the namespace. Each backend file
// (cpu/*.cpp, cuda/*.cu) registers its implementation with TORCH_LIBRARY_IMPL. The public ops
// (torch.ops.sparsekern.channel_skip_conv2d, ...) are defined in Python (sparsekern/ops/) and call these
// through their dispatch; see sparsekern/ops/_dispatch.py.
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  // y[b, o] = conv2d(x[b] * in_mask[b], weight)[o] + bias[o] (then ReLU if relu), for out_mask[b, o];
  // zero elsewhere. Masked-off input channels are never read, masked-off outputs never computed.
  m.def(
      "channel_skip_conv2d_native(Tensor x, Tensor weight, Tensor? bias, Tensor? in_mask, Tensor? out_mask, "
      "int[2] stride, int[2] padding, int[2] dilation, bool relu) -> Tensor");
  // y = x Q^T P^T + bias with the rank-r intermediate kept on chip.
  m.def("lowrank_linear_native(Tensor x, Tensor Q, Tensor P, Tensor? bias) -> Tensor");
}
