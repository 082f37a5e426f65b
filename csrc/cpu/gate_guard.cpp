// CPU kernel of the torch operator sparsekern::_gate_guard (schema and reference in sparsekern/ops/gate_guard.py):
// the gate of a calibrated gated layer in the hybrid compile (sparsekern/hybrid.py), in one call.
//
//   logits (B, n) = w2 relu(w1 mean_hw(x) + b1) + b2          (a pooled-MLP gate, SANP's SPM)
//   mask (B, C)   = logits > 0, group g covering channels [g G, min((g + 1) G, C))
//   outside       = any over (b, g) of group_fixed[g] and (logits[b, g] > 0) != group_always[g]
//   scale (B, K, 1, 1) = mask[:, computed] as x's dtype
//
// One task per sample (torch's intra-op threads, common.h's parallel): the pooled input (sums over pixels in
// Vec registers, along channels for NHWC and along pixels for NCHW, in the kPoolParts pixel ranges of gate.h), the
// two small matrix-vector products (Vec dot products) and the decisions, with no operator call inside: at batch 1
// the whole gate costs about what one dispatch would.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "common.h"
#include "gate.h"

namespace sparsekern {
namespace cpu {
namespace {

// Sums of a pixel range of NHWC rows, for up to kChains * kL channels starting at x: NV vectors of channels, each
// summed in kChains / NV accumulators over interleaved pixels (one accumulator would wait on each add's latency),
// combined in order at the end.
constexpr int kChains = 4;

template <int NV>
void pool_nhwc(const float* x, int64_t stride, int64_t p0, int64_t p1, const uint32_t (&lanes)[kChains], float* out) {
  constexpr int Q = kChains / NV;
  Vec acc[Q][NV];
  for (int i = 0; i < Q; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vzero();
  int64_t p = p0;
  for (; p + Q <= p1; p += Q)
#pragma GCC unroll 4
    for (int i = 0; i < Q; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = vadd(acc[i][j], vload_mask(x + (p + i) * stride + j * kL, lanes[j]));
  for (; p < p1; ++p)
    for (int j = 0; j < NV; ++j) acc[0][j] = vadd(acc[0][j], vload_mask(x + p * stride + j * kL, lanes[j]));
  for (int j = 0; j < NV; ++j) {
    Vec r = acc[0][j];
    for (int i = 1; i < Q; ++i) r = vadd(r, acc[i][j]);
    vstore_mask(out + j * kL, r, lanes[j]);
  }
}

}  // namespace

void gate_pool_part(const float* x, int64_t channels, int64_t pixels, bool nhwc, int part, float* out) {
  const int64_t p0 = pixels * part / kPoolParts, p1 = pixels * (part + 1) / kPoolParts;
  if (nhwc) {
    for (int64_t c = 0; c < channels; c += kChains * kL) {
      uint32_t lanes[kChains];
      int nv = 0;
      for (int j = 0; j < kChains; ++j) {
        const int64_t n = std::clamp<int64_t>(channels - c - j * kL, 0, kL);
        lanes[j] = n == kL ? ~0u : (1u << n) - 1u;
        nv += n > 0;
      }
      switch (nv) {
        case 1: pool_nhwc<1>(x + c, channels, p0, p1, lanes, out + c); break;
        case 2: pool_nhwc<2>(x + c, channels, p0, p1, lanes, out + c); break;
        case 3: pool_nhwc<3>(x + c, channels, p0, p1, lanes, out + c); break;
        default: pool_nhwc<4>(x + c, channels, p0, p1, lanes, out + c); break;
      }
    }
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const float* row = x + c * pixels;
    Vec acc[kChains] = {vzero(), vzero(), vzero(), vzero()};
    int64_t p = p0;
    for (; p + kChains * kL <= p1; p += kChains * kL) {
      for (int j = 0; j < kChains; ++j) acc[j] = vadd(acc[j], vload(row + p + j * kL));
    }
    for (; p + kL <= p1; p += kL) acc[0] = vadd(acc[0], vload(row + p));
    float sum = hsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
    for (; p < p1; ++p) sum += row[p];
    out[c] = sum;
  }
}

namespace {

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

bool gate_decide(const PooledMlpGate& g, const float* parts, int64_t pixels, float* scratch, bool* mask,
                 float* scale) {
  float *pooled = scratch, *h = scratch + g.c_in, *decided = h + g.hidden;
  std::copy_n(parts, g.c_in, pooled);
  for (int part = 1; part < kPoolParts; ++part)
    for (int64_t c = 0; c < g.c_in; ++c) pooled[c] += parts[part * g.c_in + c];
  const float inv = pixels > 0 ? 1.0f / static_cast<float>(pixels) : 0.0f;
  for (int64_t j = 0; j < g.hidden; ++j) h[j] = std::max(dot(g.w1 + j * g.c_in, pooled, g.c_in) * inv + g.b1[j], 0.0f);
  bool flagged = false;
  for (int64_t group = 0; group < g.groups; ++group) {
    const bool on = dot(g.w2 + group * g.hidden, h, g.hidden) + g.b2[group] > 0.0f;
    decided[group] = on ? 1.0f : 0.0f;
    flagged |= g.fixed[group] && on != g.always[group];
    if (mask != nullptr)
      std::fill(mask + group * g.granularity, mask + std::min((group + 1) * g.granularity, g.out_channels), on);
  }
  if (scale != nullptr)
    for (int64_t k = 0; k < g.kept; ++k) scale[k] = decided[g.computed[k] / g.granularity];
  return flagged;
}

PooledMlpGate checked_gate(const char* op, int64_t c_in, GateTensors& t, int64_t granularity, int64_t out_channels) {
  TORCH_CHECK(granularity >= 1 && out_channels >= 1, op, ": a gate's granularity and out_channels must be >= 1, got ",
              granularity, " and ", out_channels);
  const int64_t groups = (out_channels + granularity - 1) / granularity;
  for (at::Tensor* p : {&t.w1, &t.b1, &t.w2, &t.b2}) {
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->device().is_cpu(), op,
                ": the gate's weights must be float32 CPU tensors, got ", p->scalar_type());
    *p = p->contiguous();
  }
  const int64_t hidden = t.w1.dim() == 2 ? t.w1.size(0) : -1;
  TORCH_CHECK(t.w1.dim() == 2 && t.w1.size(1) == c_in && t.b1.numel() == hidden && t.w2.dim() == 2 &&
                  t.w2.size(0) == groups && t.w2.size(1) == hidden && t.b2.numel() == groups,
              op, ": a gate's w1 (h, C_in), b1 (h,), w2 (n, h), b2 (n,) with n = ceil(out_channels / granularity) = ",
              groups, " do not fit its input's ", c_in, " channels: got ", t.w1.sizes(), ", ", t.b1.sizes(), ", ",
              t.w2.sizes(), ", ", t.b2.sizes());
  TORCH_CHECK(t.always.scalar_type() == at::kBool && t.fixed.scalar_type() == at::kBool &&
                  t.always.numel() == groups && t.fixed.numel() == groups,
              op, ": group_always and group_fixed must be bool tensors of ", groups, " groups");
  TORCH_CHECK(t.computed.scalar_type() == at::kLong && t.computed.dim() == 1, op, ": computed must be 1-D int64");
  t.always = t.always.contiguous(), t.fixed = t.fixed.contiguous(), t.computed = t.computed.contiguous();
  const int64_t* idx = t.computed.data_ptr<int64_t>();
  for (int64_t k = 0; k < t.computed.numel(); ++k)
    TORCH_CHECK(idx[k] >= 0 && idx[k] < out_channels, op, ": computed channel ", idx[k], " is not one of the ",
                out_channels, " output channels");
  return {t.w1.data_ptr<float>(), t.b1.data_ptr<float>(), t.w2.data_ptr<float>(), t.b2.data_ptr<float>(),
          t.always.data_ptr<bool>(), t.fixed.data_ptr<bool>(), idx, c_in, hidden, groups, granularity, out_channels,
          t.computed.numel()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_guard_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& group_always, const at::Tensor& group_fixed, const at::Tensor& computed, int64_t granularity,
    int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "_gate_guard: x must be a float32 (B, C, H, W) tensor");
  const at::Tensor xc = x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  const bool nhwc = !xc.is_contiguous();  // NHWC-contiguous and not also NCHW-contiguous
  const int64_t batch = x.size(0), c_in = x.size(1), pixels = x.size(2) * x.size(3);
  GateTensors t{w1, b1, w2, b2, group_always, group_fixed, computed};
  const PooledMlpGate gate = checked_gate("_gate_guard", c_in, t, granularity, out_channels);
  at::Tensor mask = at::empty({batch, out_channels}, x.options().dtype(at::kBool));
  at::Tensor scale = at::empty({batch, gate.kept, 1, 1}, x.options());
  const float* xp = xc.data_ptr<float>();
  bool* m = mask.data_ptr<bool>();
  float* s = scale.data_ptr<float>();
  std::vector<char> flagged(batch, 0);
  parallel(batch, [&](int64_t begin, int64_t end) {
    std::vector<float> parts(kPoolParts * c_in), scratch(gate_scratch(gate));
    for (int64_t b = begin; b < end; ++b) {
      for (int part = 0; part < kPoolParts; ++part)
        gate_pool_part(xp + b * c_in * pixels, c_in, pixels, nhwc, part, parts.data() + part * c_in);
      flagged[b] = gate_decide(gate, parts.data(), pixels, scratch.data(), m + b * gate.out_channels,
                               s + b * gate.kept);
    }
  }, "_gate_guard");
  const bool outside = std::any_of(flagged.begin(), flagged.end(), [](char v) { return v != 0; });
  return {mask, scale, at::scalar_tensor(outside, x.options().dtype(at::kBool))};
}

}  // namespace cpu
}  // namespace sparsekern
