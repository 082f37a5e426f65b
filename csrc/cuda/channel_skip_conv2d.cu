// The CUDA backend of sparsekern.ops.channel_skip_conv2d (kernel bodies: channel_skip_conv2d.cuh): builds the
// per-sample index lists on the device (one launch, no host synchronisation), then launches the implicit-GEMM
// kernel, both on the current stream, writing every element of the contiguous (B, C_out, H_out, W_out) y that
// the op allocated.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>

#include "channel_skip_conv2d.cuh"
#include "ops.h"

namespace {

namespace cs = sparsekern::channel_skip;

int64_t extent(const at::Tensor& t, std::initializer_list<int64_t> dims) {
  int64_t e = 0;
  for (int64_t d : dims) e += (t.size(d) - 1) * std::abs(t.stride(d));
  return e;
}

template <typename T, typename Torch>
void launch(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const at::Tensor& lists, const at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, bool relu, cudaStream_t stream) {
  cs::ConvParams<T> p{};
  p.x = reinterpret_cast<const T*>(x.data_ptr<Torch>());
  p.weight = reinterpret_cast<const T*>(weight.data_ptr<Torch>());
  p.bias = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr<Torch>()) : nullptr;
  p.lists = lists.data_ptr<int32_t>();
  p.y = reinterpret_cast<T*>(y.data_ptr<Torch>());
  p.batch = static_cast<int>(x.size(0));
  p.c_in = static_cast<int>(x.size(1));
  p.h = static_cast<int>(x.size(2));
  p.w = static_cast<int>(x.size(3));
  p.c_out = static_cast<int>(weight.size(0));
  p.kh = static_cast<int>(weight.size(2));
  p.kw = static_cast<int>(weight.size(3));
  p.h_out = static_cast<int>(y.size(2));
  p.w_out = static_cast<int>(y.size(3));
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.x_sb = x.stride(0);
  p.x_sc = static_cast<int>(x.stride(1));
  p.x_sh = static_cast<int>(x.stride(2));
  p.x_sw = static_cast<int>(x.stride(3));
  p.w_so = static_cast<int>(weight.stride(0));
  p.w_sc = static_cast<int>(weight.stride(1));
  p.w_sh = static_cast<int>(weight.stride(2));
  p.w_sw = static_cast<int>(weight.stride(3));
  p.lists_stride = lists.stride(0);
  p.relu = relu;
  C10_CUDA_CHECK(cs::launch_channel_skip_conv2d<T>(p, stream));
}

}  // namespace

namespace sparsekern {
namespace cuda {

void channel_skip_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                              at::Tensor& y) {
  constexpr const char* kName = "channel_skip_conv2d (cuda)";
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && weight.dim() == 4 && y.dim() == 4 && y.is_contiguous() &&
                  y.scalar_type() == dtype && weight.scalar_type() == dtype,
              kName, ": internal: 4-D CUDA x, weight and a contiguous y of one dtype expected; call "
              "sparsekern.ops.channel_skip_conv2d, which validates its inputs");
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(extent(x, {1, 2, 3}) <= kInt32Max && extent(weight, {0, 1, 2, 3}) <= kInt32Max &&
                  y.size(1) * y.size(2) * y.size(3) <= kInt32Max && x.size(0) <= 65535,
              kName, ": internal: an input beyond the kernel's 32-bit indexing or 65535-sample grid");
  const int64_t batch = x.size(0), c_in = x.size(1), c_out = weight.size(0);
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (y.numel() == 0) return;

  at::Tensor lists = at::empty({batch, c_in + c_out + 2}, x.options().dtype(at::kInt));
  cs::ListParams lp{};
  lp.in_mask = in_mask ? reinterpret_cast<const uint8_t*>(in_mask->data_ptr<bool>()) : nullptr;
  lp.out_mask = out_mask ? reinterpret_cast<const uint8_t*>(out_mask->data_ptr<bool>()) : nullptr;
  lp.in_sb = in_mask ? in_mask->stride(0) : 0;
  lp.in_sc = in_mask ? in_mask->stride(1) : 0;
  lp.out_sb = out_mask ? out_mask->stride(0) : 0;
  lp.out_sc = out_mask ? out_mask->stride(1) : 0;
  lp.lists = lists.data_ptr<int32_t>();
  lp.lists_stride = lists.stride(0);
  lp.batch = static_cast<int>(batch);
  lp.c_in = static_cast<int>(c_in);
  lp.c_out = static_cast<int>(c_out);
  C10_CUDA_CHECK(cs::launch_build_channel_lists(lp, stream));

  switch (dtype) {
    case at::kHalf:
      launch<__half, at::Half>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16, at::BFloat16>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
      break;
    case at::kFloat:
      launch<float, float>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
      break;
    default:
      TORCH_CHECK(false, kName, ": internal: dtype ", dtype, " (float32, float16, bfloat16 expected)");
  }
}

}  // namespace cuda
}  // namespace sparsekern
