// A pooled-MLP gate (SANP's saliency module) evaluated on one sample, shared by the CPU kernels of
// sparsekern::_gate_guard (gate_guard.cpp) and of the gate steps of sparsekern::_conv2d_nhwc_chain
// (conv2d_nhwc.cpp).
//
//   logits (n,) = w2 relu(w1 mean_hw(x) + b1) + b2         x: one sample (C_in, H, W), NHWC or NCHW
//   on[g]       = logits[g] > 0, group g covering channels [g G, min((g + 1) G, C))
//   flagged     = any over g of fixed[g] and on[g] != always[g]
//   scale[k]    = on[group of computed[k]] ? 1 : 0
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsekern {
namespace cpu {

struct PooledMlpGate {
  const float *w1, *b1, *w2, *b2;  // (hidden, C_in), (hidden,), (groups, hidden), (groups,): contiguous
  const bool *always, *fixed;      // (groups,) calibration classes per group
  const int64_t* computed;         // (kept,) output channels whose mask is the scale, each in [0, out_channels)
  int64_t c_in, hidden, groups, granularity, out_channels, kept;
};

// A sample's pixels are pooled in kPoolParts contiguous ranges (part i: pixels [P i / kPoolParts,
// P (i + 1) / kPoolParts)), each summed on its own, the sums then added in order: threads may pool the parts of one
// sample, and the result does not depend on which or how many.
constexpr int kPoolParts = 4;

// Scratch floats gate_decide needs: the pooled input, the hidden features and the groups' decisions.
inline int64_t gate_scratch(const PooledMlpGate& g) { return g.c_in + g.hidden + g.groups; }

// out (channels,) = sums over part `part` of the pixels of one sample x (channels x pixels, NHWC when nhwc, else
// NCHW).
void gate_pool_part(const float* x, int64_t channels, int64_t pixels, bool nhwc, int part, float* out);

// From a sample's part sums (kPoolParts x C_in) over `pixels` pixels: writes mask (out_channels,) and scale
// (kept,) where not null; returns whether the sample leaves the classes (flagged above). scratch:
// gate_scratch(g) floats.
bool gate_decide(const PooledMlpGate& g, const float* parts, int64_t pixels, float* scratch, bool* mask,
                 float* scale);

// A gate's tensors as an operator receives them: w1, b1, w2, b2 (float32), group_always, group_fixed (bool,
// per group) and computed (int64 channel indices).
struct GateTensors {
  at::Tensor w1, b1, w2, b2, always, fixed, computed;
};

// The gate of t for an input of c_in channels, its shapes and dtypes checked (op names the operator in the
// errors); t's tensors are made contiguous in place and must outlive the result.
PooledMlpGate checked_gate(const char* op, int64_t c_in, GateTensors& t, int64_t granularity, int64_t out_channels);

}  // namespace cpu
}  // namespace sparsekern
