// torch registration of the CUDA channel-skipping convolution (kernel bodies: channel_skip_conv2d.cuh).
//
// sparsekern::channel_skip_conv2d_native for CUDA tensors: checks the inputs, builds the per-sample index lists
// on the device (one launch, no host synchronisation), then launches the implicit-GEMM kernel, both on the
// current stream. Returns a new contiguous (B, C_out, H_out, W_out) tensor, every element written by the kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "channel_skip_conv2d.cuh"

namespace {

namespace cs = sparsekern::channel_skip;

int64_t extent(const at::Tensor& t, std::initializer_list<int64_t> dims) {
  int64_t e = 0;
  for (int64_t d : dims) e += (t.size(d) - 1) * std::abs(t.stride(d));
  return e;
}

template <typename T, typename Torch>
at::Tensor launch(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lists, at::Tensor y, at::IntArrayRef stride, at::IntArrayRef padding,
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
  return y;
}

at::Tensor channel_skip_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_mask,
                                    const std::optional<at::Tensor>& out_mask, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  constexpr const char* kName = "channel_skip_conv2d (cuda)";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, kName, ": x must be a 4-D CUDA tensor (B, C_in, H, W), got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), kName,
              ": weight must be (C_out, C_in, kh, kw) with groups=1, got ", weight.sizes(), " for x ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kName, ": dtype ", dtype,
              " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK(weight.scalar_type() == dtype && (!bias || bias->scalar_type() == dtype), kName,
              ": x, weight and bias must share one dtype, got ", dtype, " and ", weight.scalar_type());
  const int64_t batch = x.size(0), c_in = x.size(1), c_out = weight.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == c_out), kName, ": bias must be (", c_out, ",)");
  for (const auto* mask : {&in_mask, &out_mask}) {
    if (!mask->has_value()) continue;
    const int64_t channels = mask == &in_mask ? c_in : c_out;
    TORCH_CHECK((*mask)->scalar_type() == at::kBool && (*mask)->dim() == 2 && (*mask)->size(0) == batch &&
                    (*mask)->size(1) == channels,
                kName, ": ", mask == &in_mask ? "in_mask" : "out_mask", " must be bool (", batch, ", ", channels,
                "), got ", (*mask)->scalar_type(), " ", (*mask)->sizes());
  }
  for (const at::Tensor* t : {&weight, bias ? &*bias : nullptr, in_mask ? &*in_mask : nullptr,
                              out_mask ? &*out_mask : nullptr}) {
    TORCH_CHECK(t == nullptr || t->device() == x.device(), kName, ": every tensor must be on ", x.device());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                  stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              kName, ": bad stride ", stride, " / padding ", padding, " / dilation ", dilation);
  const int64_t h_out = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t w_out = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(h_out >= 1 && w_out >= 1, kName, ": input ", x.sizes(), " is smaller than the kernel ",
              weight.sizes().slice(2));
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(extent(x, {1, 2, 3}) <= kInt32Max && extent(weight, {0, 1, 2, 3}) <= kInt32Max &&
                  c_out * h_out * w_out <= kInt32Max && batch <= 65535,
              kName, ": a sample of x ", x.sizes(), ", the weight or an output sample spans more than 2^31 elements, "
              "or the batch exceeds 65535; split the layer or the batch");

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y = at::empty({batch, c_out, h_out, w_out}, x.options());
  if (y.numel() == 0) return y;

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
      return launch<__half, at::Half>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
    case at::kBFloat16:
      return launch<__nv_bfloat16, at::BFloat16>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
    default:  // float32 (checked above)
      return launch<float, float>(x, weight, bias, lists, y, stride, padding, dilation, relu, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("channel_skip_conv2d_native", &channel_skip_conv2d_cuda); }
