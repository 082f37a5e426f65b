// CPU kernel of sparsekern.ops.channel_skip_conv2d: a float32 convolution (groups=1) that, per sample,
// reads only the active input channels and computes only the active output channels.
//
//   y[b, o] = act(bias[o] + sum_{c in in(b), (kh, kw)} w[o, c, kh, kw] * x[b, c, oh*s + kh*d - p, ...])  o in out(b)
//   y[b, o] = 0                                                                                        otherwise
//
// Algorithm: per sample, a GEMM over that sample's active channels, C[m, q] = sum_k A[m, k] B[k, q], with
// m = active output channel, k = (active input channel, tap), q = output position. Vectors run along q
// (16 floats with AVX-512), so every output channel is a row of broadcast weights:
//
//   A  is read in place from the weight rows of the active outputs (column c * T + tap): no per-sample packing.
//   B  is never packed either: each active input channel is copied once into zero-padded polyphase planes
//      (stride s -> s*s phases), after which every tap's q-vector is one contiguous load at a fixed offset.
//      q runs over a grid of width Wph = W_out + (kw - 1) * dw / sw; the extra columns are computed and dropped
//      ("direct convolution" without im2col). 1x1 stride-1 unpadded NCHW inputs are read in place.
//
// A register-blocked micro-kernel (6 rows x 4 vectors of accumulators with AVX-512) does the FMAs; bias and
// ReLU are applied in registers and the vectors are stored straight into the output runs they cover (masked
// stores at the dropped columns). Work is split into units, tiles of 4 vectors of output positions of one
// sample, whose cost is proportional to the sample's active FLOPs; the unit list is cut into equal-cost
// contiguous ranges, one per thread of torch's intra-op pool, so batch 1 and uneven masks balance too, and a
// thread prepares a sample once for all its units of it.
//
// The micro-kernel follows the BLIS register-blocking scheme (Goto & van de Geijn, "Anatomy of high-performance
// matrix multiplication", ACM TOMS 2008) and the padded direct convolution that of Georganas et al. ("Anatomy of
// high-performance deep learning convolutions on SIMD architectures", SC 2018); the per-sample channel skipping
// is what SANP (Chen et al., ICONIP 2019) needs from its gated layers.
//
// Limits (measured against oneDNN, see sparsekern/bench/kernel_channel_skip_conv2d.py): the vector lanes of small
// maps are partly idle (7x7 output: 49 of 64 lanes; 4x4: 16 of 32) and padded taps are multiplied by zeros
// (oneDNN skips them: 18% of a 3x3 conv's MACs at 7x7). The transposed orientation (vectors along the active
// output channels) fills the lanes of small maps but must repack the weights of every sample; measured, it was
// slower on every ResNet-18 / VGG-16 / ResNet-56 shape, so it is not used.
//
// Layout: any input strides. The output has x's suggested memory format (NCHW for contiguous inputs,
// channels-last for channels-last inputs, as F.conv2d does). The fast path is NCHW: inactive input channels
// are whole planes that are skipped, and output rows are contiguous runs. Channels-last inputs work but
// gather their active channels element by element and scatter the outputs.
//
// Threads and SIMD vectors: csrc/cpu/common.h.

#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace sparsekern {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------------------ SIMD
// kL floats per vector; a tile is kMR rows x kV vectors, kMR * kV accumulators + kV operands + 1 broadcast
// within the register file (32 zmm with AVX-512, 16 ymm with AVX2).
#if SPARSEKERN_SIMD == 512
constexpr int kMR = 6, kV = 4;
#elif SPARSEKERN_SIMD == 256
constexpr int kMR = 4, kV = 3;
#else
constexpr int kMR = 4, kV = 2;
#endif
constexpr int kTile = kV * kL;           // output positions per tile
constexpr uint32_t kAllLanes = (1u << kL) - 1;
constexpr int kMaxSeg = 4;               // output runs one vector may store to (more: the scalar epilogue)

inline float relu1(float v) { return v < 0.f ? 0.f : v; }

// Where each vector of a tile goes in the output: vector v stores lanes seg.lanes[v][s] at row + offset[v][s].
struct StoreSegments {
  int64_t offset[kV][kMaxSeg];
  uint32_t lanes[kV][kMaxSeg];
  int n[kV];
};

// ------------------------------------------------------------------------------------------------ micro-kernel
// acc[i, :] = sum_{k < K} arow[i][kf[k]] * (bk[k] + boff)[0 : V * kL] for i < MR; then act(acc[i, :] + bias[i]
// (+ the residual at the same place of rrow[i])) goes through the store segments to yrow[i], or, without yrow,
// acc is stored raw to C (row stride kTile).
struct KernelArgs {
  int64_t K;
  const float* const* arow;  // MR weight rows (output channels)
  const int32_t* kf;         // K columns of those rows (active input channel * T + tap)
  const float* const* bk;    // K pointers into the padded planes
  int64_t boff;              // the tile's first grid position
  float* C;
  float* const* yrow;        // MR output rows, or nullptr
  const float* const* rrow;  // MR residual rows (laid out as yrow), or nullptr
  const float* bias;         // MR values
  const StoreSegments* seg;
  bool relu;
};

template <int MR, int V>
void micro_kernel(const KernelArgs& a) {
  Vec acc[MR][V];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = vzero();
  const float* rows[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) rows[i] = a.arow[i];
  for (int64_t k = 0; k < a.K; ++k) {
    const float* b = a.bk[k] + a.boff;
    const int64_t col = a.kf[k];
    Vec bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = vload(b + v * kL);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec av = vset1(rows[i][col]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = vfma(av, bv[v], acc[i][v]);
    }
  }
  if (a.yrow == nullptr) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) vstore(a.C + i * kTile + v * kL, acc[i][v]);
    return;
  }
  const StoreSegments& seg = *a.seg;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const Vec bias = vset1(a.bias[i]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const Vec r = vadd(acc[i][v], bias);
      for (int s = 0; s < seg.n[v]; ++s) {
        const int64_t off = seg.offset[v][s];
        const uint32_t lanes = seg.lanes[v][s];
        Vec out = a.rrow == nullptr ? r : vadd(r, lanes == kAllLanes ? vload(a.rrow[i] + off)
                                                                      : vload_mask(a.rrow[i] + off, lanes));
        if (a.relu) out = vrelu(out);
        if (lanes == kAllLanes) {
          vstore(a.yrow[i] + off, out);
        } else {
          vstore_mask(a.yrow[i] + off, out, lanes);
        }
      }
    }
  }
}

using KernelFn = void (*)(const KernelArgs&);

// micro_kernel<mr, v> for every 1 <= mr <= kMR, 1 <= v <= kV (row blocks and tiles at the edges are thinner).
struct KernelTable {
  KernelFn fn[kMR][kV];
  KernelTable() { fill(std::make_integer_sequence<int, kMR * kV>{}); }
  template <int... I>
  void fill(std::integer_sequence<int, I...>) {
    ((fn[I / kV][I % kV] = &micro_kernel<I / kV + 1, I % kV + 1>), ...);
  }
};

KernelFn kernel_for(int mr, int v) {
  static const KernelTable table;
  return table.fn[mr - 1][v - 1];
}

// ------------------------------------------------------------------------------------------------ scratch
struct Scratch {
  Buffer<float> planes;     // padded polyphase planes of a sample's active input channels
  Buffer<const float*> bk;  // per k: where its B rows start in the planes
  Buffer<int32_t> kf;       // per k: its column in a weight row
  alignas(64) float tile[kMR * kTile];
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// ------------------------------------------------------------------------------------------------ geometry
struct Geometry {
  int64_t B, Cin, H, W, Cout, KH, KW, T, SH, SW, PH, PW, DH, DW, Ho, Wo, P;
  int64_t xsB, xsC, xsH, xsW;  // input strides (elements)
  // Polyphase planes: phase (py, px) holds x[r * SH + py - PH][c * SW + px - PW] at row r, column c (zero
  // outside the input). Tap (kh, kw) of output (oh, ow) reads phase (kh*DH % SH, kw*DW % SW) at row
  // oh + kh*DH / SH, column ow + kw*DW / SW, i.e. at flat offset q + tap_off with q = oh * Wph + ow.
  int64_t Hph, Wph;            // rows and columns of a phase plane; Wph is also the grid width
  int64_t plane;               // floats from one plane to the next (Hph * Wph rounded up to 64 bytes)
  int64_t slack;               // floats after the last plane: tiles and dropped columns read up to there
  int nphase;
  std::vector<std::pair<int64_t, int64_t>> phases;  // (py, px) of the phases the taps use
  std::vector<int32_t> tap_phase;                   // phase of each tap
  std::vector<int64_t> tap_off;                     // offset of each tap within its phase plane
  int64_t G;                   // grid positions, Ho * Wph
  bool inplace;                // 1x1, stride 1, no padding, NCHW planes: read x directly
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g;
  g.B = x.size(0), g.Cin = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.Cout = w.size(0), g.KH = w.size(2), g.KW = w.size(3), g.T = g.KH * g.KW;
  g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1], g.DH = dilation[0], g.DW = dilation[1];
  g.Ho = y.size(2), g.Wo = y.size(3);
  g.P = g.Ho * g.Wo;
  g.xsB = x.stride(0), g.xsC = x.stride(1), g.xsH = x.stride(2), g.xsW = x.stride(3);
  const int64_t dy_max = (g.KH - 1) * g.DH / g.SH, dx_max = (g.KW - 1) * g.DW / g.SW;
  g.Hph = g.Ho + dy_max;
  g.Wph = g.Wo + dx_max;
  g.G = g.Ho * g.Wph;
  std::vector<int32_t> phase_id(g.SH * g.SW, -1);
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t py = kh * g.DH % g.SH, px = kw * g.DW % g.SW;
      int32_t& id = phase_id[py * g.SW + px];
      if (id < 0) {
        id = static_cast<int32_t>(g.phases.size());
        g.phases.emplace_back(py, px);
      }
      g.tap_phase.push_back(id);
      g.tap_off.push_back((kh * g.DH / g.SH) * g.Wph + kw * g.DW / g.SW);
    }
  }
  g.nphase = static_cast<int>(g.phases.size());
  // A valid lane never leaves its plane; the dropped lanes of a tile read on into the next plane (whatever is
  // there is thrown away) and, after the last plane, into the slack.
  g.plane = (g.Hph * g.Wph + 15) / 16 * 16;
  g.slack = g.Wph + kTile + dx_max + 2 * kL;
  g.inplace = g.T == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0 && g.xsW == 1 && g.xsH == g.W &&
              g.P % kL == 0;
  return g;
}

// Per-sample active channel lists.
struct Masks {
  std::vector<int32_t> ci, co;        // concatenated active indices
  std::vector<int64_t> ci_at, co_at;  // sample b's lists start at ci_at[b] / co_at[b]
  int64_t ka(int64_t b) const { return ci_at[b + 1] - ci_at[b]; }
  int64_t na(int64_t b) const { return co_at[b + 1] - co_at[b]; }
  const int32_t* cin(int64_t b) const { return ci.data() + ci_at[b]; }
  const int32_t* cout(int64_t b) const { return co.data() + co_at[b]; }
};

void active_lists(const std::optional<at::Tensor>& mask, int64_t B, int64_t C, std::vector<int32_t>& idx,
                  std::vector<int64_t>& at) {
  at.assign(B + 1, 0);
  idx.clear();
  idx.reserve(B * C);
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c)
      if (m == nullptr || m[b * C + c]) idx.push_back(static_cast<int32_t>(c));
    at[b + 1] = static_cast<int64_t>(idx.size());
  }
}

struct Problem {
  Geometry g;
  Masks m;
  const float* x;
  const float* w;     // (Cout, Cin * T), contiguous
  const float* bias;  // (Cout,) or nullptr
  const float* res;   // residual added before the ReLU, y's shape and strides, or nullptr
  bool relu;
  float* y;
  int64_t ysB, ysC, ysP;  // output strides: sample, channel, flat position
};

// ------------------------------------------------------------------------------------------------ per sample
// dst[j] = src[j * step] for j < n; may also write zeros to dst[n .. n + kL) (the caller's slack).
void copy_strided(float* dst, const float* src, int64_t n, int64_t step) {
  if (step == 1) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  int64_t j = 0;
#if defined(__AVX512F__)
  if (step == 2) {  // the even lanes of two vectors; masked loads never touch anything past src[2 (n - 1)]
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (; j < n; j += kL) {
      const int64_t need = std::min<int64_t>(2 * (n - j) - 1, 2 * kL), keep = std::min<int64_t>(n - j, kL);
      const __mmask16 lo = static_cast<__mmask16>(need >= kL ? 0xFFFF : (1u << need) - 1);
      const __mmask16 hi = static_cast<__mmask16>(need >= 2 * kL ? 0xFFFF : need > kL ? (1u << (need - kL)) - 1 : 0);
      const __mmask16 out = static_cast<__mmask16>(keep >= kL ? 0xFFFF : (1u << keep) - 1);
      _mm512_storeu_ps(dst + j, _mm512_maskz_permutex2var_ps(out, _mm512_maskz_loadu_ps(lo, src + 2 * j), even,
                                                             _mm512_maskz_loadu_ps(hi, src + 2 * j + kL)));
    }
    return;
  }
#endif
  for (; j < n; ++j) dst[j] = src[j * step];
}

// dst[0 .. n) = 0 in whole vectors: may write zeros up to dst[n + kL - 1].
inline void zero_vectors(float* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += kL) vstore(dst + j, vzero());
}

// Copies sample b's active input channels into zero-padded polyphase planes (in place for 1x1 stride-1 NCHW
// inputs) and fills bk[k] (where k = c * T + tap starts in them) and kf[k] (its weight column).
void prepare_sample(const Problem& pr, int64_t b, Scratch& s, const float* const** bk_out, const int32_t** kf_out) {
  const Geometry& g = pr.g;
  const int64_t ka = pr.m.ka(b);
  const int32_t* ci = pr.m.cin(b);
  const float** bk = s.bk.get(ka * g.T);
  int32_t* kf = s.kf.get(ka * g.T);
  *bk_out = bk;
  *kf_out = kf;
  for (int64_t c = 0; c < ka; ++c)
    for (int64_t t = 0; t < g.T; ++t) kf[c * g.T + t] = static_cast<int32_t>(ci[c] * g.T + t);
  const float* xb = pr.x + b * g.xsB;
  if (g.inplace) {
    for (int64_t c = 0; c < ka; ++c) bk[c] = xb + ci[c] * g.xsC;
    return;
  }
  // Planes are written in increasing address order, each row zeroed in whole vectors and then filled; the
  // zeros a row writes past its end land where later rows, planes or the final slack are written next.
  const int64_t nplanes = ka * g.nphase;
  float* planes = s.planes.get(nplanes * g.plane + g.slack);
  for (int64_t c = 0; c < ka; ++c) {
    const float* xc = xb + ci[c] * g.xsC;
    for (int ph = 0; ph < g.nphase; ++ph) {
      const int64_t py = g.phases[ph].first, px = g.phases[ph].second;
      float* dst = planes + (c * g.nphase + ph) * g.plane;
      // plane columns j with 0 <= j * SW + px - PW < W
      const int64_t j_lo = std::min(g.Wph, (g.PW - px + g.SW - 1) / g.SW);
      const int64_t last = g.W - 1 + g.PW - px;  // < 0: the phase starts right of the input
      const int64_t j_hi = last < 0 ? j_lo : std::max(j_lo, std::min(g.Wph, last / g.SW + 1));
      for (int64_t r = 0; r < g.Hph; ++r) {
        float* row = dst + r * g.Wph;
        const int64_t ih = r * g.SH + py - g.PH;
        zero_vectors(row, g.Wph);
        if (ih >= 0 && ih < g.H && j_hi > j_lo)
          copy_strided(row + j_lo, xc + ih * g.xsH + (j_lo * g.SW + px - g.PW) * g.xsW, j_hi - j_lo, g.SW * g.xsW);
      }
      zero_vectors(dst + g.Hph * g.Wph, g.plane - g.Hph * g.Wph);
    }
    for (int64_t t = 0; t < g.T; ++t)
      bk[c * g.T + t] = planes + (c * g.nphase + g.tap_phase[t]) * g.plane + g.tap_off[t];
  }
  zero_vectors(planes + nplanes * g.plane, g.slack - kL);
}

// Zeroes sample b's inactive output channels, which no tile writes (so no race with the tiles of other threads).
void zero_inactive(const Problem& pr, int64_t b) {
  const Geometry& g = pr.g;
  const int64_t na = pr.m.na(b);
  if (na == g.Cout) return;
  float* y = pr.y + b * pr.ysB;
  if (na == 0) {  // a sample's block of the output is contiguous in both layouts
    std::memset(y, 0, sizeof(float) * g.Cout * g.P);
    return;
  }
  const int32_t* co = pr.m.cout(b);
  for (int64_t p0 = 0; p0 < (pr.ysP == 1 ? 1 : g.P); ++p0) {  // NCHW: whole planes; NHWC: pixel by pixel
    for (int64_t o = 0, j = 0; o < g.Cout; ++o) {
      if (j < na && co[j] == o) {
        ++j;
      } else if (pr.ysP == 1) {
        std::memset(y + o * pr.ysC, 0, sizeof(float) * g.P);
      } else {
        y[p0 * pr.ysP + o] = 0.f;
      }
    }
  }
}

// One tile (kTile grid positions) of sample b: all its active output channels, kMR at a time.
void compute_tile(const Problem& pr, int64_t b, const float* const* bk, const int32_t* kf, int64_t tile, Scratch& s) {
  const Geometry& g = pr.g;
  const int64_t na = pr.m.na(b), K = pr.m.ka(b) * g.T;
  const int32_t* co = pr.m.cout(b);
  const int64_t q0 = tile * kTile, nq = std::min<int64_t>(kTile, g.G - q0);
  const int v = static_cast<int>((nq + kL - 1) / kL);
  // The tile's runs of kept positions: (offset in the tile, output position, length); a run ends at a dropped
  // grid column unless there are none.
  std::array<std::array<int64_t, 3>, kTile> runs;
  int nruns = 0;
  for (int64_t q = q0; q < q0 + nq;) {
    const int64_t oh = q / g.Wph, ow = q % g.Wph;
    const int64_t row_end = std::min(q0 + nq, (oh + 1) * g.Wph);
    if (ow < g.Wo) {
      const int64_t len = std::min(row_end, oh * g.Wph + g.Wo) - q;
      if (nruns > 0 && runs[nruns - 1][0] + runs[nruns - 1][2] == q - q0 &&
          runs[nruns - 1][1] + runs[nruns - 1][2] == oh * g.Wo + ow) {
        runs[nruns - 1][2] += len;
      } else {
        runs[nruns++] = {q - q0, oh * g.Wo + ow, len};
      }
    }
    q = row_end;
  }
  // NCHW output: each vector is stored by the kernel to the runs it covers, unless it covers more than
  // kMaxSeg (grids narrower than about kL / kMaxSeg); NHWC output and those: via the tile buffer.
  StoreSegments seg;
  bool direct = pr.ysP == 1;
  for (int i = 0; i < v; ++i) seg.n[i] = 0;
  for (int r = 0; r < nruns && direct; ++r) {
    for (int64_t t = runs[r][0]; t < runs[r][0] + runs[r][2];) {
      const int i = static_cast<int>(t / kL);
      const int64_t end = std::min(runs[r][0] + runs[r][2], (i + 1) * static_cast<int64_t>(kL));
      if (seg.n[i] == kMaxSeg) {
        direct = false;
        break;
      }
      seg.offset[i][seg.n[i]] = runs[r][1] - runs[r][0] + i * kL;
      seg.lanes[i][seg.n[i]++] = ((1u << (end - i * kL)) - 1) & ~((1u << (t - i * kL)) - 1);
      t = end;
    }
  }
  float* y = pr.y + b * pr.ysB;
  const float* res = pr.res == nullptr ? nullptr : pr.res + b * pr.ysB;
  const float* arow[kMR];
  float* yrow[kMR];
  const float* rrow[kMR];
  float bias[kMR];
  const KernelArgs args{K, arow, kf, bk, q0, s.tile, direct ? yrow : nullptr, res ? rrow : nullptr, bias, &seg,
                        pr.relu};
  const int64_t ldw = g.Cin * g.T;
  // Balanced row blocks (32 rows as 6+6+5+5+5+5, not 6*5+2): a thin block reloads B for few FMAs.
  const int64_t nblk = (na + kMR - 1) / kMR;
  for (int64_t blk = 0, m0 = 0; blk < nblk; ++blk) {
    const int mr = static_cast<int>(na / nblk + (blk < na % nblk ? 1 : 0));
    for (int i = 0; i < mr; ++i) {
      const int64_t o = co[m0 + i];
      arow[i] = pr.w + o * ldw;
      yrow[i] = y + o * pr.ysC;
      rrow[i] = res == nullptr ? nullptr : res + o * pr.ysC;
      bias[i] = pr.bias ? pr.bias[o] : 0.f;
    }
    kernel_for(mr, v)(args);
    for (int i = 0; i < mr && !direct; ++i) {
      const float* src = s.tile + i * kTile;
      for (int r = 0; r < nruns; ++r) {
        float* dst = yrow[i] + runs[r][1] * pr.ysP;
        const float* add = res == nullptr ? nullptr : rrow[i] + runs[r][1] * pr.ysP;
        for (int64_t j = 0; j < runs[r][2]; ++j) {
          const float val = src[runs[r][0] + j] + bias[i] + (add == nullptr ? 0.f : add[j * pr.ysP]);
          dst[j * pr.ysP] = pr.relu ? relu1(val) : val;
        }
      }
    }
    m0 += mr;
  }
}

// ------------------------------------------------------------------------------------------------ driver
void run(const Problem& pr) {
  const Geometry& g = pr.g;
  const Masks& m = pr.m;
  // Units: the tiles of each sample (one unit for a sample without active outputs, which is only zeroed),
  // weighted by their multiply-adds plus a little for the epilogue and the sample's zeroing.
  const int64_t tiles = (g.G + kTile - 1) / kTile;
  std::vector<int64_t> first(g.B + 1, 0);
  std::vector<double> prefix(1, 0.0);
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t na = m.na(b), units = na == 0 ? 1 : tiles;
    const double cost = na == 0 ? g.Cout * g.P / 16.0 : static_cast<double>(na) * (m.ka(b) * g.T + 8) * kTile;
    first[b + 1] = first[b] + units;
    for (int64_t u = 0; u < units; ++u) prefix.push_back(prefix.back() + cost);
  }
  const int64_t total = first[g.B];
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<int64_t> cut(nthreads + 1, total);
  cut[0] = 0;
  for (int64_t t = 1; t < nthreads; ++t)
    cut[t] = std::lower_bound(prefix.begin(), prefix.end(), prefix[total] * t / nthreads) - prefix.begin();

  parallel(nthreads, [&](int64_t t_begin, int64_t t_end) {
    Scratch& s = scratch();
    for (int64_t t = t_begin; t < t_end; ++t) {
      for (int64_t u = cut[t]; u < cut[t + 1];) {
        const int64_t b = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
        const int64_t stop = std::min(cut[t + 1], first[b + 1]);
        if (u == first[b]) zero_inactive(pr, b);
        if (m.na(b) > 0) {
          const float* const* bk;
          const int32_t* kf;
          prepare_sample(pr, b, s, &bk, &kf);
          for (int64_t v = u; v < stop; ++v) compute_tile(pr, b, bk, kf, v - first[b], s);
        }
        u = stop;
      }
    }
  }, "channel_skip_conv2d");
}

}  // namespace

void channel_skip_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && y.dim() == 4 && x.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat,
              "channel_skip_conv2d (CPU): internal: 4-D float32 x, weight and y expected; call "
              "sparsekern.ops.channel_skip_conv2d, which validates its inputs");
  TORCH_CHECK(y.is_contiguous() || y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "channel_skip_conv2d (CPU): internal: y must be NCHW- or NHWC-contiguous");
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == y.sizes() && residual->strides() == y.strides() &&
                                        residual->scalar_type() == at::kFloat && !out_mask.has_value()),
              "channel_skip_conv2d (CPU): internal: a residual must have y's shape and strides, without out_mask");
  if (y.numel() == 0) return;
  const int64_t B = x.size(0), Cin = x.size(1), Cout = weight.size(0);
  Problem pr;
  pr.g = make_geometry(x, weight, y, stride, padding, dilation);
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  active_lists(in_mask.has_value() ? std::optional<at::Tensor>(in_mask->contiguous()) : std::nullopt, B, Cin,
               pr.m.ci, pr.m.ci_at);
  active_lists(out_mask.has_value() ? std::optional<at::Tensor>(out_mask->contiguous()) : std::nullopt, B, Cout,
               pr.m.co, pr.m.co_at);
  pr.x = x.data_ptr<float>();
  pr.w = w.data_ptr<float>();
  pr.bias = bc.has_value() ? bc->data_ptr<float>() : nullptr;
  pr.res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  pr.relu = relu;
  pr.y = y.data_ptr<float>();
  pr.ysB = y.stride(0), pr.ysC = y.stride(1), pr.ysP = y.stride(3);
  run(pr);
}

}  // namespace cpu
}  // namespace sparsekern

