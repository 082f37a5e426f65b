// CPU kernel of the torch operator sparsekern::_gate_guard (schema and reference in sparsekern/ops/gate_guard.py):
// the gate of a calibrated gated layer in the hybrid compile (sparsekern/hybrid.py), in one call.
//
//   logits (B, n) = w2 relu(w1 mean_hw(x) + b1) + b2          (a pooled-MLP gate, SANP's SPM)
//   mask (B, C)   = logits > 0, group g covering channels [g G, min((g + 1) G, C))
//   outside       = any over (b, g) of group_fixed[g] and (logits[b, g] > 0) != group_always[g]
//   scale (B, K, 1, 1) = mask[:, computed] as x's dtype
//
// One task per sample (torch's intra-op threads, common.h's parallel): the pooled input (sums over pixels in
// Vec registers, along channels for NHWC and along pixels for NCHW), the two small matrix-vector products (Vec
// dot products) and the decisions, with no operator call inside: at batch 1 the whole gate costs about what one
// dispatch would.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "common.h"

namespace sparsekern {
namespace cpu {
namespace {

// out[c] = sum over the pixels of one sample's channel c: NHWC (pixels x channels) or NCHW (channels x pixels).
// Up to kChains vectors are summed side by side: one accumulator would wait on each add's latency.
constexpr int kChains = 4;

void pool(const float* x, int64_t channels, int64_t pixels, bool nhwc, float* out) {
  if (nhwc) {
    for (int64_t c = 0; c < channels; c += kChains * kL) {
      Vec acc[kChains];
      uint32_t lanes[kChains];
      for (int j = 0; j < kChains; ++j) {
        const int64_t n = std::clamp<int64_t>(channels - c - j * kL, 0, kL);
        lanes[j] = n == kL ? ~0u : (1u << n) - 1u;
        acc[j] = vzero();
      }
      for (int64_t p = 0; p < pixels; ++p) {
        const float* px = x + p * channels + c;
        for (int j = 0; j < kChains; ++j) acc[j] = vadd(acc[j], vload_mask(px + j * kL, lanes[j]));
      }
      for (int j = 0; j < kChains; ++j) vstore_mask(out + c + j * kL, acc[j], lanes[j]);
    }
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const float* row = x + c * pixels;
    Vec acc[kChains] = {vzero(), vzero(), vzero(), vzero()};
    int64_t p = 0;
    for (; p + kChains * kL <= pixels; p += kChains * kL) {
      for (int j = 0; j < kChains; ++j) acc[j] = vadd(acc[j], vload(row + p + j * kL));
    }
    for (; p + kL <= pixels; p += kL) acc[0] = vadd(acc[0], vload(row + p));
    float sum = hsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
    for (; p < pixels; ++p) sum += row[p];
    out[c] = sum;
  }
}

// sum of a[i] * b[i] for i < n, in Vec registers (a plain loop would stay scalar: float sums are not reassociated)
float dot(const float* a, const float* b, int64_t n) {
  Vec acc = vzero();
  int64_t i = 0;
  for (; i + kL <= n; i += kL) acc = vfma(vload(a + i), vload(b + i), acc);
  if (i < n) {
    const uint32_t lanes = (1u << (n - i)) - 1u;
    acc = vfma(vload_mask(a + i, lanes), vload_mask(b + i, lanes), acc);
  }
  return hsum(acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_guard_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& group_always, const at::Tensor& group_fixed, const at::Tensor& computed, int64_t granularity,
    int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "_gate_guard: x must be a float32 (B, C, H, W) tensor");
  TORCH_CHECK(granularity >= 1 && out_channels >= 1, "_gate_guard: granularity and out_channels must be >= 1");
  const int64_t groups = (out_channels + granularity - 1) / granularity;
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == groups, "_gate_guard: w2 must have ceil(out_channels / granularity) = ",
              groups, " rows, got ", w2.sizes());
  TORCH_CHECK(group_always.scalar_type() == at::kBool && group_fixed.scalar_type() == at::kBool &&
                  group_always.numel() == groups && group_fixed.numel() == groups,
              "_gate_guard: group_always and group_fixed must be bool tensors of ", groups, " groups");
  TORCH_CHECK(computed.scalar_type() == at::kLong && computed.dim() == 1, "_gate_guard: computed must be 1-D int64");
  const at::Tensor xc = x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  const bool nhwc = !xc.is_contiguous();  // NHWC-contiguous and not also NCHW-contiguous
  const at::Tensor w1c = w1.contiguous(), b1c = b1.contiguous(), w2c = w2.contiguous(), b2c = b2.contiguous();
  const at::Tensor always = group_always.contiguous(), fixed = group_fixed.contiguous(), index = computed.contiguous();
  const int64_t batch = x.size(0), c_in = x.size(1), pixels = x.size(2) * x.size(3), hidden = w1c.size(0);
  const int64_t kept = index.numel();
  TORCH_CHECK(w1c.dim() == 2 && w1c.size(1) == c_in && b1c.numel() == hidden && w2c.size(1) == hidden &&
                  b2c.numel() == groups,
              "_gate_guard: w1 (h, C_in), b1 (h,), w2 (n, h), b2 (n,) do not fit x's ", c_in, " channels");
  TORCH_CHECK(w1c.scalar_type() == at::kFloat && b1c.scalar_type() == at::kFloat && w2c.scalar_type() == at::kFloat &&
                  b2c.scalar_type() == at::kFloat,
              "_gate_guard: the gate's weights must be float32");
  at::Tensor mask = at::empty({batch, out_channels}, x.options().dtype(at::kBool));
  at::Tensor scale = at::empty({batch, kept, 1, 1}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float *p1 = w1c.data_ptr<float>(), *q1 = b1c.data_ptr<float>(), *p2 = w2c.data_ptr<float>(),
              *q2 = b2c.data_ptr<float>();
  const bool* a = always.data_ptr<bool>();
  const bool* f = fixed.data_ptr<bool>();
  const int64_t* idx = index.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
  float* s = scale.data_ptr<float>();
  for (int64_t k = 0; k < kept; ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < out_channels, "_gate_guard: computed channel ", idx[k], " out of range");
  }
  std::vector<char> flagged(batch, 0);
  const float inv = pixels > 0 ? 1.0f / static_cast<float>(pixels) : 0.0f;
  parallel(batch, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(c_in), h(hidden);
    for (int64_t b = begin; b < end; ++b) {
      pool(xp + b * c_in * pixels, c_in, pixels, nhwc, pooled.data());
      for (int64_t j = 0; j < hidden; ++j) h[j] = std::max(dot(p1 + j * c_in, pooled.data(), c_in) * inv + q1[j], 0.0f);
      bool* row = m + b * out_channels;
      for (int64_t g = 0; g < groups; ++g) {
        const bool on = dot(p2 + g * hidden, h.data(), hidden) + q2[g] > 0.0f;
        flagged[b] |= f[g] && on != a[g];
        std::fill(row + g * granularity, row + std::min((g + 1) * granularity, out_channels), on);
      }
      for (int64_t k = 0; k < kept; ++k) s[b * kept + k] = row[idx[k]] ? 1.0f : 0.0f;
    }
  }, "_gate_guard");
  const bool outside = std::any_of(flagged.begin(), flagged.end(), [](char v) { return v != 0; });
  return {mask, scale, at::scalar_tensor(outside, x.options().dtype(at::kBool))};
}

}  // namespace cpu
}  // namespace sparsekern
