// CPU kernel of sparsekern.ops.fused_conv2d for channels-last (NHWC) float32 tensors:
//
//   y[m, o] = act(bias[o] + sum_k A[m, k] W[k, o] (+ residual[m, o]))
//
// with m = (b, oh, ow) the output pixel, k = (kh, kw, c) the tap and input channel, A[m, k] the input value that
// tap reads (zero in the padding) and W[k, o] = weight[o, c, kh, kw]. It is a GEMM whose rows are output pixels
// taken across rows and samples, so small maps (4x4, 8x8) fill a register tile as well as large ones do.
// Kernels that tile along one output row (oneDNN's direct convolutions) hold as many pixels as the row is wide,
// and on narrow layers that leaves too few independent accumulators to keep the FMA units busy.
//
// Vectors run along output channels: a tile is MR pixels x NV vectors of output channels, MR * NV accumulators
// (AVX-512: 24 x 1, 12 x 2, 8 x 3, 6 x 4; AVX2: 12 x 1, 6 x 2, 4 x 3, 3 x 4). For each k, NV weight vectors
// are loaded once and each pixel's input value is broadcast into them.
//
// A is never formed. In NHWC, the input a pixel's tap reads is a contiguous run of C_in values at a fixed
// offset from the pixel's first tap, once the input has a zero border: padded convolutions copy the input once
// into a zero-bordered buffer (one pass over it, against C_out FMAs per value), unpadded ones read it in place.
// A tile then needs one pointer per pixel (an indirection buffer, Dukhan, "The indirect convolution algorithm",
// 2019, with one entry per pixel instead of per (pixel, tap)). The micro-kernel walks a pixel's K values in
// contiguous segments (a kernel row's taps when they are adjacent), CU at a time: CU x NV weight vectors in
// registers, then per pixel CU broadcasts. The weights are packed once per layer (conv2d_nhwc_pack_cpu): W as
// (K, Np), the output channels padded with zero columns to whole vectors.
//
// Narrow layers (at most 1.5 kL output channels) use channel groups instead where they need fewer FMAs
// (channel_groups): lanes hold (output, input channel mod G) pairs, so a narrow layer still fills its vectors, and
// where every lane is live the epilogue sums the groups of several pixels into one full vector.
//
// Epilogue in registers: bias, the residual (same NHWC layout as y) and ReLU, then masked stores of the last
// partial vector. Tiles are split in contiguous ranges over torch's intra-op threads, so batch 1 uses them too.
// The register blocking is the BLIS scheme (Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication", ACM TOMS 2008).
#include "cpu/common.h"
#include "cpu/gate.h"
#include "ops.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

namespace sparsekern {
namespace cpu {
namespace {

constexpr int kMaxNV = 4;  // vectors of output channels per tile

// Tile rows (pixels) for a tile of nv vectors and input channels per step: about 24 accumulators and 4 weight
// vectors with AVX-512 (32 registers), 12 and 2 with AVX2 (16).
#if SPARSEKERN_SIMD == 512
constexpr int kAccumulators = 24, kWeightRegs = 4;
#else
constexpr int kAccumulators = 12, kWeightRegs = 2;
#endif
constexpr int rows_for(int nv) { return kAccumulators / nv; }
constexpr int channels_for(int nv) { return kWeightRegs / nv > 0 ? kWeightRegs / nv : 1; }

// Channel groups, for narrow layers, where one vector per pixel would leave lanes idle or load one input value per
// FMA: lane o * G + g (over at most kMaxGroupedNV vectors) accumulates output o over the input channels
// c = g (mod G). One broadcast loads G consecutive input channels of a pixel (contiguous in NHWC) into
// every group of G lanes, for every vector of the tile, and the epilogue sums each group. In a padded convolution,
// whose input is copied anyway, the input channels are taken as Cp = C_in rounded up to a multiple of G: zero
// channels (zero weights; zero inputs, written by the copy) complete the last group, where they add at most a
// quarter to C_in (a 3-channel image stays ungrouped: the copy per pixel and the group sums would cost more than
// the FMAs saved). Otherwise Cp = C_in, and G divides it.
// Columns of the packed weight: C_out padded to whole vectors, times G with channel groups.
int64_t packed_columns(int64_t c_out, int G) { return (std::max<int64_t>(c_out, 1) * G + kL - 1) / kL * kL; }

struct Grouping {
  int G;       // input channels per channel group (1: none)
  int64_t Cp;  // input channels the kernel reads per pixel
};

// The grouping with the fewest FMAs per pixel and K value, (Cp / G) * vectors, among G = 1, 2, 4 with at most
// kMaxGroupedNV vectors of lanes; ties go to more groups (each loaded value then feeds more FMAs). Three vectors
// let 9-12 outputs (AVX-512; 5-6 with AVX2) take four groups and 17-24 (9-12) take two: up to a quarter fewer FMAs
// than whole vectors of outputs, which leave up to a third of their lanes idle (a 30%-pruned 16- or 32-channel
// layer), for a tile of fewer pixels (rows_for(3)).
constexpr int kMaxGroupedNV = 3;
Grouping channel_groups(int64_t c_out, int64_t c_in, bool padded) {
  auto vectors = [&](int G) { return packed_columns(c_out, G) / kL; };
  Grouping best{1, c_in};
  int64_t best_fmas = c_in * vectors(1);
  for (const int G : {2, 4}) {
    const int64_t cp = (c_in + G - 1) / G * G, fmas = cp / G * vectors(G);
    const bool zeros_ok = cp == c_in || (padded && 4 * (cp - c_in) <= c_in);
    if (vectors(G) <= kMaxGroupedNV && zeros_ok && fmas <= best_fmas) best = {G, cp}, best_fmas = fmas;
  }
  return best;
}

// [p[0], ..., p[G - 1]] repeated over the vector
template <int G>
inline Vec broadcast_group(const float* p) {
#if SPARSEKERN_SIMD == 512
  if constexpr (G == 2) {
    double d;
    std::memcpy(&d, p, sizeof(d));
    return {_mm512_castpd_ps(_mm512_set1_pd(d))};
  } else {
    return {_mm512_broadcast_f32x4(_mm_loadu_ps(p))};
  }
#elif SPARSEKERN_SIMD == 256
  if constexpr (G == 2) {
    double d;
    std::memcpy(&d, p, sizeof(d));
    return {_mm256_castpd_ps(_mm256_set1_pd(d))};
  } else {
    return {_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p))};
  }
#else
  Vec a;
  for (int l = 0; l < kL; ++l) a.v[l] = p[l % G];
  return a;
#endif
}

// [a0 + a1, a2 + a3, ..., b0 + b1, b2 + b3, ...]: the sums of adjacent lanes of a, then of b
inline Vec pair_sums(Vec a, Vec b) {
#if SPARSEKERN_SIMD == 512
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return {_mm512_add_ps(_mm512_permutex2var_ps(a.v, even, b.v), _mm512_permutex2var_ps(a.v, odd, b.v))};
#elif SPARSEKERN_SIMD == 256
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(a.v, b.v)), 0xD8))};
#else
  Vec r;
  for (int l = 0; l < kL; ++l) {
    const Vec& s = l < kL / 2 ? a : b;
    const int j = 2 * (l % (kL / 2));
    r.v[l] = s.v[j] + s.v[j + 1];
  }
  return r;
#endif
}

// The group sums of G vectors of lanes o * G + g, outputs consecutive from r[0] to r[G - 1]: lane j of the result
// is output j (all kL lanes live when every lane of r is). Fewer than G live vectors go first, followed by any
// vectors; their outputs are then lanes 0 .. (live vectors) kL / G - 1.
template <int G>
inline Vec group_sums(const Vec (&r)[G]) {
  static_assert(G == 2 || G == 4, "two or four channel groups");
  if constexpr (G == 2) return pair_sums(r[0], r[1]);
  else return pair_sums(pair_sums(r[0], r[1]), pair_sums(r[2], r[3]));
}

struct Geometry {
  int64_t B, H, W, C_in, Ho, Wo, C_out, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t xsb, xsh, xsw;  // x's strides in floats (its channel stride is 1)
  int64_t Np;             // columns of the packed weight (packed_columns)
  int G;                  // input channels per channel group (1: none)
  int64_t Cp;             // input channels per pixel of what the tiles read (channel_groups)
  bool copied;            // the tiles read a copy of x with a zero border (padding), not x
  // With channel groups that fill every lane (C_out * G == Np) over a number of vectors that divides G, the outputs
  // of kL / C_out consecutive pixels fill one vector: the epilogue reduces and stores them together, adding
  // bias_rep (kL values: bias tiled, or null).
  bool pixels_packed;
  const float* bias_rep;
  bool relu;
  // The K values of a pixel, in segments of seg_len values contiguous in the source: a kernel row's taps
  // (kw * Cp values) when they are adjacent (dilation 1 along W), else one tap (Cp). seg_off: where each of
  // the nseg segments starts, from the pixel's first tap (the first 64 here, all in seg_list).
  int64_t nseg, seg_len, seg_off[64];
  const int64_t* seg_list;
};

// Strides in floats of what the tiles read: x, or a chunk of it with a zero border.
struct Source {
  const float* p;
  int64_t sb, sh, sw;
};

// base[i]: where pixel m0 + i (counted from the source's first sample) reads its first tap (pixel m0's, for
// i >= rows).
void pixel_bases(const Geometry& g, const Source& src, int64_t m0, int rows, int MR, const float** base) {
  int64_t b = m0 / (g.Ho * g.Wo), r = m0 % (g.Ho * g.Wo), oh = r / g.Wo, ow = r % g.Wo;
  const int64_t step = g.sw * src.sw, row_step = g.sh * src.sh;
  const float* row = src.p + b * src.sb + oh * row_step;
  const float* p = row + ow * step;
  for (int i = 0; i < rows; ++i) {
    base[i] = p;
    p += step;
    if (++ow == g.Wo) {
      ow = 0, row += row_step;
      if (++oh == g.Ho) oh = 0, row = src.p + ++b * src.sb;
      p = row;
    }
  }
  for (int i = rows; i < MR; ++i) base[i] = base[0];
}

// A thread's copy of samples b0 .. b1 - 1 of x with a zero border of (ph, pw) and zero channels from C_in to Cp,
// NHWC-contiguous: (b1 - b0, H + 2 ph, W + 2 pw, Cp), of which only input rows ih0 .. ih1 - 1 of each sample are
// copied (the rows the caller's tiles read). The zeros are written once for a geometry; the copies of later
// chunks of the same geometry write only the C_in channels of the interior.
class BorderedCopy {
 public:
  const float* fill(const Geometry& g, const float* x, int64_t b0, int64_t b1, int64_t per_chunk, int64_t ih0,
                    int64_t ih1) {
    const int64_t hp = g.H + 2 * g.ph, wp = g.W + 2 * g.pw, cp = g.Cp;
    const size_t n = static_cast<size_t>(per_chunk * hp * wp * cp);
    float* dst = buf_.get(n);
    const std::array<int64_t, 7> key{per_chunk, g.H, g.W, g.C_in, cp, g.ph, g.pw};
    const int64_t row = wp * cp, run = g.W * cp;
    const bool stale = key != key_ || dst != zeroed_;
    if (stale && cp != g.C_in) {  // zero channels inside every pixel: all of it
      std::memset(dst, 0, n * sizeof(float));
    } else if (stale) {  // the border
      for (int64_t r = 0; r < per_chunk * hp; ++r) {
        float* out = dst + r * row;
        const int64_t ih = r % hp - g.ph;
        if (ih < 0 || ih >= g.H) {
          std::memset(out, 0, row * sizeof(float));
        } else {
          std::memset(out, 0, g.pw * cp * sizeof(float));
          std::memset(out + g.pw * cp + run, 0, g.pw * cp * sizeof(float));
        }
      }
    }
    key_ = key, zeroed_ = dst;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        float* out = dst + ((b - b0) * hp + ih + g.ph) * row + g.pw * cp;
        const float* in = x + b * g.xsb + ih * g.xsh;
        if (g.xsw == cp) {
          std::memcpy(out, in, run * sizeof(float));
        } else if (cp <= kL) {  // a pixel's C_in values and zeros up to cp in one vector
          const uint32_t live = (1u << g.C_in) - 1u, lanes = (1u << cp) - 1u;
          for (int64_t iw = 0; iw < g.W; ++iw) vstore_mask(out + iw * cp, vload_mask(in + iw * g.xsw, live), lanes);
        } else {
          for (int64_t iw = 0; iw < g.W; ++iw)
            for (int64_t c = 0; c < g.C_in; ++c) out[iw * cp + c] = in[iw * g.xsw + c];
        }
      }
    return dst;
  }

 private:
  Buffer<float> buf_;
  std::array<int64_t, 7> key_{};
  const float* zeroed_ = nullptr;
};

int64_t segment_offset(const Geometry& g, int64_t s) { return s < 64 ? g.seg_off[s] : g.seg_list[s]; }

// acc[i][:] += sum_{u < CU} base[i][off + u] * wt[u * ldw + v * kL + :]: CU consecutive input channels
template <int MR, int NV, int CU>
__attribute__((always_inline)) inline void step(const float* const* base, int64_t off, const float* wt, int64_t ldw,
                                                Vec (&acc)[MR][NV]) {
  Vec wv[CU][NV];
#pragma GCC unroll 4
  for (int u = 0; u < CU; ++u)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[u][v] = vload(wt + u * ldw + v * kL);
#pragma GCC unroll 24
  for (int i = 0; i < MR; ++i) {
    const float* pi = base[i] + off;
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      const Vec a = vset1(pi[u]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(a, wv[u][v], acc[i][v]);
    }
  }
}

// y[m, n : n + live] = act(r (+ bias[n :]) (+ residual[m, n :])) for the live lanes of r
inline void finish(const Geometry& g, Vec r, const float* bias, const float* residual, float* y, int64_t m, int64_t n) {
  const int64_t at = m * g.C_out + n, live = std::min<int64_t>(kL, g.C_out - n);
  const uint32_t lanes = live == kL ? ~0u : (1u << live) - 1u;
  if (bias != nullptr) r = vadd(r, live == kL ? vload(bias + n) : vload_mask(bias + n, lanes));
  if (residual != nullptr) r = vadd(r, live == kL ? vload(residual + at) : vload_mask(residual + at, lanes));
  if (g.relu) r = vrelu(r);
  if (live == kL) {
    vstore(y + at, r);
  } else {
    vstore_mask(y + at, r, lanes);
  }
}

// y[m .. m + pixels - 1, :] = act(r + bias_rep (+ residual)): r holds the outputs of pixels consecutive pixels
// (g.pixels_packed)
inline void finish_pixels(const Geometry& g, Vec r, const float* residual, float* y, int64_t m, int pixels) {
  const int64_t at = m * g.C_out;
  const bool full = pixels * g.C_out == kL;
  const uint32_t lanes = full ? ~0u : (1u << (pixels * g.C_out)) - 1u;
  if (g.bias_rep != nullptr) r = vadd(r, vload(g.bias_rep));
  if (residual != nullptr) r = vadd(r, full ? vload(residual + at) : vload_mask(residual + at, lanes));
  if (g.relu) r = vrelu(r);
  if (full) {
    vstore(y + at, r);
  } else {
    vstore_mask(y + at, r, lanes);
  }
}

// One MR x NV tile: output pixels m0 .. m0 + rows - 1, channels n0 .. n0 + NV * kL - 1.
template <int MR, int NV>
void tile(const Geometry& g, const float* const* base, const float* __restrict w, const float* bias,
          const float* residual, float* y, int64_t m0, int rows, int64_t n0) {
  constexpr int CU = channels_for(NV);
  Vec acc[MR][NV];
#pragma GCC unroll 24
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
  const int64_t ldw = g.Np, c_main = g.seg_len / CU * CU;
  for (int64_t s = 0; s < g.nseg; ++s) {
    const int64_t off = segment_offset(g, s);
    const float* wt = w + s * g.seg_len * ldw + n0;
    for (int64_t c = 0; c < c_main; c += CU) step<MR, NV, CU>(base, off + c, wt + c * ldw, ldw, acc);
    for (int64_t c = c_main; c < g.seg_len; ++c) step<MR, NV, 1>(base, off + c, wt + c * ldw, ldw, acc);
  }
  auto row = [&](int i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV && n0 + v * kL < g.C_out; ++v) finish(g, acc[i][v], bias, residual, y, m0 + i, n0 + v * kL);
  };
  if (rows == MR) {
#pragma GCC unroll 24
    for (int i = 0; i < MR; ++i) row(i);
  } else {
    for (int i = 0; i < rows; ++i) row(i);
  }
}

// One MR-pixel tile of a channel-grouped layer (NV vectors holding every output channel, see channel_groups).
template <int MR, int G, int NV>
void tile_grouped(const Geometry& g, const float* const* base, const float* __restrict w, const float* bias,
                  const float* residual, float* y, int64_t m0, int rows) {
  constexpr int CU = channels_for(NV);
  Vec acc[MR][NV];
#pragma GCC unroll 24
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
  const int64_t blocks = g.seg_len / G, b_main = blocks / CU * CU;
  for (int64_t s = 0; s < g.nseg; ++s) {
    const int64_t off = segment_offset(g, s);
    const float* wt = w + s * blocks * NV * kL;
    auto step_grouped = [&](int64_t cb, auto cu) {
      constexpr int U = decltype(cu)::value;
      Vec wv[U][NV];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[u][v] = vload(wt + ((cb + u) * NV + v) * kL);
#pragma GCC unroll 24
      for (int i = 0; i < MR; ++i) {
        const float* pi = base[i] + off + cb * G;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const Vec a = broadcast_group<G>(pi + u * G);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][v] = vfma(a, wv[u][v], acc[i][v]);
        }
      }
    };
    for (int64_t cb = 0; cb < b_main; cb += CU) step_grouped(cb, std::integral_constant<int, CU>{});
    for (int64_t cb = b_main; cb < blocks; ++cb) step_grouped(cb, std::integral_constant<int, 1>{});
  }
  if constexpr (G % NV == 0) {
    if (g.pixels_packed) {
      constexpr int P = G / NV;  // pixels per output vector
      static_assert(MR % P == 0, "whole output vectors per tile");
#pragma GCC unroll 12
      for (int i = 0; i < MR; i += P) {
        if (i >= rows) break;
        Vec r[G];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) r[p * NV + v] = acc[i + p][v];
        finish_pixels(g, group_sums<G>(r), residual, y, m0 + i, std::min(P, rows - i));
      }
      return;
    }
  }
  // pixel i's outputs: output vector j sums the groups of vectors j G .. j G + G - 1 (past NV: copies of a live one)
  auto pixel = [&](int i) {
#pragma GCC unroll 2
    for (int j = 0; j * G < NV; ++j) {
      Vec r[G];
#pragma GCC unroll 4
      for (int k = 0; k < G; ++k) r[k] = acc[i][j * G + k < NV ? j * G + k : j * G];
      finish(g, group_sums<G>(r), bias, residual, y, m0 + i, j * kL);
    }
  };
  if (rows == MR) {
#pragma GCC unroll 24
    for (int i = 0; i < MR; ++i) pixel(i);
  } else {
    for (int i = 0; i < rows; ++i) pixel(i);
  }
}

// The grouped tile of MR rows (NV = 1 to kMaxGroupedNV vectors, whichever MR was sized for).
template <int MR, int G>
void run_tile_grouped(const Geometry& g, const float* const* base, const float* w, const float* bias,
                      const float* residual, float* y, int64_t m0, int rows) {
  static_assert(kMaxGroupedNV == 3, "a grouped tile per vector count");
  if constexpr (MR == rows_for(1)) return tile_grouped<MR, G, 1>(g, base, w, bias, residual, y, m0, rows);
  if constexpr (MR == rows_for(2)) return tile_grouped<MR, G, 2>(g, base, w, bias, residual, y, m0, rows);
  if constexpr (MR == rows_for(3)) return tile_grouped<MR, G, 3>(g, base, w, bias, residual, y, m0, rows);
  TORCH_CHECK(false, "fused_conv2d (CPU, NHWC): internal: no ", MR, "-row grouped tile");
}

template <int MR>
void run_tile(int nv, const Geometry& g, const float* const* base, const float* w, const float* bias,
              const float* residual, float* y, int64_t m0, int rows, int64_t n0) {
  switch (nv) {
    case 1: return tile<MR, 1>(g, base, w, bias, residual, y, m0, rows, n0);
    case 2: if constexpr (MR * 2 <= kAccumulators) return tile<MR, 2>(g, base, w, bias, residual, y, m0, rows, n0);
            break;
    case 3: if constexpr (MR * 3 <= kAccumulators) return tile<MR, 3>(g, base, w, bias, residual, y, m0, rows, n0);
            break;
    case 4: if constexpr (MR * 4 <= kAccumulators) return tile<MR, 4>(g, base, w, bias, residual, y, m0, rows, n0);
            break;
  }
  TORCH_CHECK(false, "fused_conv2d (CPU, NHWC): internal: no ", MR, "-row tile of ", nv, " vectors");
}

// How run() splits the work: chunks of per_chunk samples, each cut in parts (several where there are fewer
// chunks than twice the threads: batch 1), the chunks * parts items taken in contiguous ranges by the threads.
struct Split {
  int64_t per_chunk, chunks, parts;
};

constexpr int64_t kChunkBytes = 256 << 10;  // a chunk's zero-bordered copy, kept in the thread's L2

// The smallest chunks (a chunk's copy is read while it is in L1) whose busiest thread runs at most 1/16 more
// MR-pixel tiles than the best split's (a chunk's last tile may be partial, and torch's threads take
// ceil(items / threads) items each), among chunks whose copy is at most kChunkBytes (or one sample). Where the
// tiles read x in place (not g.copied): one chunk.
Split split_work(const Geometry& g, int MR, int64_t threads) {
  auto split = [&](int64_t k) {
    const int64_t chunks = (g.B + k - 1) / k;
    return Split{k, chunks, std::max<int64_t>(1, (2 * threads + chunks - 1) / chunks)};
  };
  if (!g.copied) return split(g.B);
  const int64_t hw = g.Ho * g.Wo, sample_bytes = (g.H + 2 * g.ph) * (g.W + 2 * g.pw) * g.Cp * 4;
  const int64_t k_max = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(sample_bytes, 1), 1, g.B);
  std::vector<int64_t> busiest(static_cast<size_t>(k_max + 1));
  for (int64_t k = 1; k <= k_max; ++k) {
    const Split s = split(k);
    const int64_t tiles = (k * hw + MR - 1) / MR;
    busiest[k] = (s.chunks * s.parts + threads - 1) / threads * ((tiles + s.parts - 1) / s.parts);
  }
  const int64_t best = *std::min_element(busiest.begin() + 1, busiest.end());
  int64_t k = 1;
  while (busiest[k] * 16 > best * 17) ++k;
  return split(k);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// A gate of a chain: the pooled-MLP gate of each sample of an NHWC value, writing the samples' scales (B, kept)
// when scale is not null and raising *outside for a sample that leaves the calibration classes. Work items are
// (sample, pixel part) pairs (gate.h's kPoolParts): each pools its part, and the item that completes a sample's
// parts decides the gate for it and marks the sample ready (state[b] == kDecided). No item allocates or throws.
struct GateStep {
  static constexpr int kDecided = kPoolParts + 1;
  PooledMlpGate gate{};
  const float* x = nullptr;  // (B, pixels, C_in)
  int64_t B = 0, pixels = 0;
  float* scale = nullptr;
  std::atomic<bool>* outside = nullptr;
  float* parts = nullptr;             // (B, kPoolParts, C_in)
  float* scratch = nullptr;           // (B, gate_scratch(gate))
  std::atomic<int>* state = nullptr;  // (B,): parts pooled so far, then kDecided

  int64_t items() const { return B * kPoolParts; }
  void run(int64_t u0, int64_t u1) const {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / kPoolParts;
      const int part = static_cast<int>(u % kPoolParts);
      float* sums = parts + b * kPoolParts * gate.c_in;
      gate_pool_part(x + b * pixels * gate.c_in, gate.c_in, pixels, true, part, sums + part * gate.c_in);
      if (state[b].fetch_add(1, std::memory_order_acq_rel) != kPoolParts - 1) continue;
      if (gate_decide(gate, sums, pixels, scratch + b * gate_scratch(gate), nullptr,
                      scale == nullptr ? nullptr : scale + b * gate.kept))
        outside->store(true, std::memory_order_relaxed);
      state[b].store(kDecided, std::memory_order_release);
    }
  }
  // Waits until samples b0 .. b1 - 1 are decided (their items taken by running threads: see run_chain).
  void wait(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b)
      while (state[b].load(std::memory_order_acquire) != kDecided) cpu_relax();
  }
};

// One convolution ready to run: its geometry, where it reads and writes, and how its work is split. Geometry
// points into the layer (segments, bias_rep): a Layer is prepared in place and not moved after.
struct Layer {
  Geometry g{};
  std::vector<int64_t> segments;
  float bias_rep[kL];
  Split work{};
  const float *x = nullptr, *w = nullptr, *bias = nullptr, *residual = nullptr;
  const GateStep* scale_gate = nullptr;  // whose scale (B, C_out) multiplies the output last (per sample), or null
  float* y = nullptr;
  void (*run)(const Layer&, int64_t, int64_t) = nullptr;  // work items [u0, u1)
  int64_t items() const { return work.chunks * work.parts; }
};

// y[m, :] *= scale[m / hw, :] for pixels m0 .. m1 - 1 of a chunk (y and scale from its first sample): the
// per-sample channel mask of a gated layer, as a multiply (so -0 and NaN come out as torch's in-place multiply
// gives them); samples whose row is all ones are left as they are. A sample's pixels are one run of floats whose
// scale repeats every C: it is walked in whole vectors against the scale repeated over C vectors.
void scale_pixels(float* y, int64_t m0, int64_t m1, int64_t hw, int64_t C, const float* scale) {
  thread_local Buffer<float> repeated;
  float* rep = repeated.get(static_cast<size_t>(C * kL));
  for (int64_t m = m0; m < m1;) {
    const int64_t b = m / hw, end = std::min(m1, (b + 1) * hw);
    const float* s = scale + b * C;
    if (!std::all_of(s, s + C, [](float v) { return v == 1.0f; })) {
      for (int64_t r = 0; r < kL; ++r) std::copy_n(s, C, rep + r * C);
      float* p = y + m * C;
      const int64_t n = (end - m) * C;
      int64_t i = 0, j = 0;  // j = i mod C kL
      for (; i + kL <= n; i += kL, j = j + kL == C * kL ? 0 : j + kL) vstore(p + i, vmul(vload(p + i), vload(rep + j)));
      if (i < n) {
        const uint32_t lanes = (1u << (n - i)) - 1u;
        vstore_mask(p + i, vmul(vload_mask(p + i, lanes), vload_mask(rep + j, lanes)), lanes);
      }
    }
    m = end;
  }
}

// Work items u0 .. u1 - 1 of L: tiles of MR pixels, in chunks of samples (split_work). Where the tiles read a
// copy of x (g.copied), each chunk is copied into the thread's buffer (BorderedCopy, kept in cache for the tiles
// that read it), and each part of a chunk copies the chunk it reads.
template <int MR>
void run_items(const Layer& L, int64_t u0, int64_t u1) {
  const Geometry& g = L.g;
  const int64_t hw = g.Ho * g.Wo, per_chunk = L.work.per_chunk, parts = L.work.parts;
  const int64_t hp = g.H + 2 * g.ph, wp = g.W + 2 * g.pw;
  thread_local BorderedCopy border;
  const float* base[MR];
  const float* copy = nullptr;
  int64_t copied = -1;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t chunk = u / parts, part = u % parts;
    const int64_t b0 = chunk * per_chunk, b1 = std::min(g.B, b0 + per_chunk);
    const int64_t pixels = (b1 - b0) * hw, tiles = (pixels + MR - 1) / MR;
    Source src{L.x + b0 * g.xsb, g.xsb, g.xsh, g.xsw};
    if (g.copied) {
      if (copied != chunk) {
        // a chunk of one sample cut in parts: only the input rows of this thread's parts of it
        int64_t ih0 = 0, ih1 = g.H;
        if (b1 - b0 == 1 && parts > 1) {
          const int64_t last = std::min(parts, u1 - chunk * parts) - 1;
          const int64_t m_lo = tiles * part / parts * MR, m_hi = std::min(pixels, tiles * (last + 1) / parts * MR);
          const int64_t oh_lo = m_lo / g.Wo, oh_hi = (m_hi - 1) / g.Wo;
          ih0 = std::max<int64_t>(0, oh_lo * g.sh - g.ph);
          ih1 = std::min(g.H, oh_hi * g.sh + (g.kh - 1) * g.dh + 1 - g.ph);
        }
        copy = border.fill(g, L.x, b0, b1, per_chunk, ih0, ih1);
      }
      copied = chunk;
      src = Source{copy, hp * wp * g.Cp, wp * g.Cp, g.Cp};
    }
    float* yc = L.y + b0 * hw * g.C_out;
    const float* rc = L.residual == nullptr ? nullptr : L.residual + b0 * hw * g.C_out;
    for (int64_t t = tiles * part / parts; t < tiles * (part + 1) / parts; ++t) {
      const int64_t m0 = t * MR;
      const int rows = static_cast<int>(std::min<int64_t>(MR, pixels - m0));
      pixel_bases(g, src, m0, rows, MR, base);
      if (g.G == 2) {
        run_tile_grouped<MR, 2>(g, base, L.w, L.bias, rc, yc, m0, rows);
      } else if (g.G == 4) {
        run_tile_grouped<MR, 4>(g, base, L.w, L.bias, rc, yc, m0, rows);
      } else {
        for (int64_t n0 = 0; n0 < g.Np; n0 += kMaxNV * kL) {
          const int nv = static_cast<int>(std::min<int64_t>(kMaxNV, (g.Np - n0) / kL));
          run_tile<MR>(nv, g, base, L.w, L.bias, rc, yc, m0, rows, n0);
        }
      }
    }
    if (L.scale_gate != nullptr) {
      const int64_t m_lo = tiles * part / parts * MR, m_hi = std::min(pixels, tiles * (part + 1) / parts * MR);
      if (m_lo < m_hi) {
        L.scale_gate->wait(b0 + m_lo / hw, b0 + (m_hi - 1) / hw + 1);
        scale_pixels(yc, m_lo, m_hi, hw, g.C_out, L.scale_gate->scale + b0 * g.C_out);
      }
    }
  }
}

// The shapes of a convolution's input and output, and its input's strides in floats (channel stride 1); the
// output is channels-last contiguous.
struct ConvShapes {
  int64_t B, C_in, H, W, xsb, xsh, xsw, C_out, Ho, Wo;
};

// L prepared in place for y = act(conv(x) + bias (+ residual)), the arguments checked by the caller except the
// packed weight's shape (checked here); bias, residual: null or contiguous.
void prepare(Layer& L, const ConvShapes& s, const float* x, const at::Tensor& packed, const float* bias,
             const float* residual, float* y, at::IntArrayRef kernel_size, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, int64_t threads) {
  Geometry& g = L.g;
  g.B = s.B, g.C_in = s.C_in, g.H = s.H, g.W = s.W, g.xsb = s.xsb, g.xsh = s.xsh, g.xsw = s.xsw;
  g.C_out = s.C_out, g.Ho = s.Ho, g.Wo = s.Wo;
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.copied = g.ph > 0 || g.pw > 0;
  const Grouping grouping = channel_groups(g.C_out, g.C_in, g.copied);
  g.Np = packed.size(1), g.G = grouping.G, g.Cp = grouping.Cp, g.relu = relu;
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == g.kh * g.kw * g.Cp / g.G &&
                  g.Np == packed_columns(g.C_out, g.G),
              "fused_conv2d (CPU, NHWC): the packed weight is ", packed.sizes(), ", not the packing of a ", g.C_out,
              " x ", g.C_in, " x ", g.kh, " x ", g.kw, " weight (conv2d_nhwc_pack_cpu, padded = ", g.copied, ")");
  g.pixels_packed = g.G > 1 && g.C_out * g.G == g.Np && g.G % (g.Np / kL) == 0;
  g.bias_rep = nullptr;
  if (g.pixels_packed && bias != nullptr) {
    for (int l = 0; l < kL; ++l) L.bias_rep[l] = bias[l % g.C_out];
    g.bias_rep = L.bias_rep;
  }
  const int64_t src_sh = g.copied ? (g.W + 2 * g.pw) * g.Cp : g.xsh;
  const int64_t src_sw = g.copied ? g.Cp : g.xsw;
  const bool row_runs = g.dw * src_sw == g.Cp;
  g.nseg = row_runs ? g.kh : g.kh * g.kw, g.seg_len = row_runs ? g.kw * g.Cp : g.Cp;
  L.segments.resize(static_cast<size_t>(g.nseg));
  for (int64_t i = 0; i < g.nseg; ++i)
    L.segments[i] = row_runs ? i * g.dh * src_sh : (i / g.kw) * g.dh * src_sh + (i % g.kw) * g.dw * src_sw;
  std::copy_n(L.segments.begin(), std::min<size_t>(L.segments.size(), 64), g.seg_off);
  g.seg_list = L.segments.data();
  L.x = x, L.w = packed.data_ptr<float>(), L.bias = bias, L.residual = residual, L.y = y;
  int MR = 0;
  switch (std::min<int64_t>(g.Np / kL, kMaxNV)) {
    case 1: L.run = &run_items<rows_for(1)>, MR = rows_for(1); break;
    case 2: L.run = &run_items<rows_for(2)>, MR = rows_for(2); break;
    case 3: L.run = &run_items<rows_for(3)>, MR = rows_for(3); break;
    default: L.run = &run_items<rows_for(4)>, MR = rows_for(4); break;
  }
  L.work = g.B * g.Ho * g.Wo == 0 || g.C_out == 0 ? Split{1, 0, 1} : split_work(g, MR, threads);
}

// The convolution into y (channels-last contiguous), the arguments checked by conv2d_nhwc_prepacked: x float32
// with unit channel stride, packed float32 contiguous, bias contiguous (C_out,), a residual channels-last.
void conv2d_nhwc(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, at::Tensor& y) {
  const ConvShapes s{x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(2), x.stride(3),
                     y.size(1), y.size(2), y.size(3)};
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  const float* res = residual.has_value() && residual->defined() ? residual->data_ptr<float>() : nullptr;
  Layer L;
  prepare(L, s, x.data_ptr<float>(), packed, bp, res, y.data_ptr<float>(), kernel_size, stride, padding, dilation,
          relu, at::get_num_threads());
  parallel(L.items(), [&](int64_t u0, int64_t u1) { L.run(L, u0, u1); }, "fused_conv2d");
}

}  // namespace

at::Tensor conv2d_nhwc_pack_cpu(const at::Tensor& weight, bool padded) {
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat,
              "fused_conv2d (CPU, NHWC): internal: a float32 (C_out, C_in, kh, kw) weight expected");
  const int64_t c_out = weight.size(0), c_in = weight.size(1), taps = weight.size(2) * weight.size(3);
  const auto [G, cp] = channel_groups(c_out, c_in, padded);
  at::Tensor w = at::zeros({taps, cp, c_out}, weight.options());  // [t][c][o], channels from c_in to cp zero
  w.narrow(1, 0, c_in).copy_(weight.permute({2, 3, 1, 0}).reshape({taps, c_in, c_out}));
  const int64_t columns = packed_columns(c_out, G);
  if (G > 1) {  // rows (t, cb), column o * G + g
    at::Tensor packed = at::zeros({taps * (cp / G), columns / G, G}, weight.options());
    packed.narrow(1, 0, c_out).copy_(w.reshape({taps * (cp / G), G, c_out}).transpose(1, 2));
    return packed.reshape({taps * (cp / G), columns});
  }
  at::Tensor packed = at::zeros({taps * cp, columns}, weight.options());
  packed.narrow(1, 0, c_out).copy_(w.reshape({taps * cp, c_out}));
  return packed;
}

namespace {

// The checks of one convolution's arguments shared by the operators below (op: the operator's name); returns
// the output's height and width and makes *bias contiguous.
std::array<int64_t, 2> checked_output_size(const char* op, at::IntArrayRef x_sizes, const at::Tensor& packed,
                                           std::optional<at::Tensor>* bias, at::IntArrayRef kernel_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t out_channels) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation are pairs");
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel_size[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, op,
                ": kernel_size, stride and dilation must be >= 1 and padding >= 0, got ", kernel_size, ", ", stride,
                ", ", dilation, ", ", padding);
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.device().is_cpu(), op,
              ": packed must be the contiguous float32 CPU tensor of conv2d_nhwc_pack_cpu, got ",
              packed.scalar_type());
  if (bias->has_value() && (*bias)->defined()) {
    TORCH_CHECK((*bias)->dim() == 1 && (*bias)->numel() == out_channels && (*bias)->scalar_type() == at::kFloat &&
                    (*bias)->device().is_cpu(),
                op, ": bias must be float32 (", out_channels, ",) on the CPU, got ", (*bias)->sizes(), " ",
                (*bias)->scalar_type());
    **bias = (*bias)->contiguous();
  }
  std::array<int64_t, 2> out{};
  for (int d = 0; d < 2; ++d) {
    out[d] = (x_sizes[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) / stride[d] + 1;
    TORCH_CHECK(out[d] > 0, op, ": input ", x_sizes, " is too small for a ", kernel_size, " kernel with padding ",
                padding, " and dilation ", dilation);
  }
  return out;
}

// One unit of work of a chain: a convolution (work items: its Split) or a gate. A unit with `barrier` ends a
// step: no thread starts the next unit before every unit of the step is done.
struct Unit {
  const Layer* layer = nullptr;
  const GateStep* gate = nullptr;
  bool barrier = false;
  int64_t items() const { return layer != nullptr ? layer->items() : gate->items(); }
  void run(int64_t u0, int64_t u1) const {
    if (layer != nullptr) {
      layer->run(*layer, u0, u1);
    } else {
      gate->run(u0, u1);
    }
  }
};

// Runs units in order in one parallel region. Each unit's work items are cut into one share per thread (the
// contiguous ranges a parallel call of that unit would give the threads); a thread first takes its own share,
// then any share left, and goes on to the next unit, waiting at the end of each step until all of its units are
// done. A step is the gates that run with a layer, then the layer: the layer's items wait only for the
// decisions of the samples they scale, and every share of the step's gates has been taken, by a running thread,
// before any thread reaches the layer. So a thread waits only for shares another thread has taken, and the chain
// completes with however many threads the region gets, one included.
void run_chain(const std::vector<Unit>& units, int64_t threads) {
  const size_t n = units.size(), shares = static_cast<size_t>(std::max<int64_t>(threads, 1));
  std::unique_ptr<std::atomic<bool>[]> taken(new std::atomic<bool>[n * shares]);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[n]);
  for (size_t i = 0; i < n * shares; ++i) taken[i].store(false, std::memory_order_relaxed);
  for (size_t l = 0; l < n; ++l) done[l].store(0, std::memory_order_relaxed);
  std::atomic<bool> failed{false};
  auto worker = [&](size_t first) {
    try {
      size_t step_begin = 0;
      for (size_t l = 0; l < n; ++l) {
        const Unit& unit = units[l];
        const int64_t items = unit.items(), per_share = (items + shares - 1) / shares;
        for (size_t k = 0; k < shares; ++k) {
          const size_t share = (first + k) % shares;
          const int64_t u0 = static_cast<int64_t>(share) * per_share, u1 = std::min(items, u0 + per_share);
          if (u0 >= u1 || taken[l * shares + share].exchange(true, std::memory_order_relaxed)) continue;
          unit.run(u0, u1);
          done[l].fetch_add(u1 - u0, std::memory_order_release);
        }
        if (!unit.barrier) continue;
        for (size_t j = step_begin; j <= l; ++j)
          while (done[j].load(std::memory_order_acquire) < units[j].items()) {
            if (failed.load(std::memory_order_relaxed)) return;
            cpu_relax();
          }
        step_begin = l + 1;
      }
    } catch (...) {
      failed.store(true, std::memory_order_relaxed);
      throw;
    }
  };
  parallel(static_cast<int64_t>(shares), [&](int64_t begin, int64_t) { worker(static_cast<size_t>(begin)); },
           "fused_conv2d (chain)");
}

}  // namespace

at::Tensor conv2d_nhwc_prepacked(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t out_channels, bool relu) {
  constexpr const char* op = "sparsekern::_conv2d_nhwc_prepacked";
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": x must be a float32 (B, C_in, H, W) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  std::optional<at::Tensor> b = bias;
  const auto out = checked_output_size(op, x.sizes(), packed, &b, kernel_size, stride, padding, dilation,
                                       out_channels);
  at::Tensor y = at::empty({x.size(0), out_channels, out[0], out[1]},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<at::Tensor> res = residual;
  if (res.has_value() && res->defined()) {
    TORCH_CHECK(res->sizes() == y.sizes() && res->scalar_type() == at::kFloat, op, ": the residual must be float32 ",
                y.sizes(), ", got ", res->sizes());
    if (!res->is_contiguous(at::MemoryFormat::ChannelsLast)) res = res->contiguous(at::MemoryFormat::ChannelsLast);
  }
  conv2d_nhwc(xs, packed, b, res, kernel_size, stride, padding, dilation, relu, y);
  return y;
}

std::vector<at::Tensor> conv2d_nhwc_chain(at::TensorList inputs, at::TensorList packed, at::TensorList bias,
                                          at::IntArrayRef spec, at::IntArrayRef outputs, at::TensorList gates,
                                          at::IntArrayRef gate_spec) {
  constexpr const char* op = "sparsekern::_conv2d_nhwc_chain";
  const int64_t n_in = static_cast<int64_t>(inputs.size()), n = static_cast<int64_t>(packed.size());
  const int64_t n_gates = static_cast<int64_t>(gate_spec.size()) / kGateSpec;
  TORCH_CHECK(n_in >= 1 && n >= 1 && static_cast<int64_t>(bias.size()) == n &&
                  static_cast<int64_t>(spec.size()) == n * kChainSpec,
              op, ": expected at least one input and one layer, a bias (empty: none) per layer and ", kChainSpec,
              " spec values per layer; got ", n_in, " inputs, ", n, " packed weights, ", bias.size(), " biases and ",
              spec.size(), " spec values");
  TORCH_CHECK(static_cast<int64_t>(gate_spec.size()) == n_gates * kGateSpec &&
                  static_cast<int64_t>(gates.size()) == n_gates * kGateTensors,
              op, ": expected ", kGateSpec, " gate_spec values and ", kGateTensors, " tensors per gate; got ",
              gate_spec.size(), " gate_spec values and ", gates.size(), " gate tensors");
  // values: the inputs, then each layer's output (NHWC-contiguous)
  struct Value {
    int64_t B, C, H, W, last_use, offset;
    const float* p;
  };
  std::vector<Value> values(static_cast<size_t>(n_in + n));
  for (int64_t i = 0; i < n_in; ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
                    t.is_contiguous(at::MemoryFormat::ChannelsLast),
                op, ": input ", i, " must be a channels-last contiguous float32 (B, C, H, W) CPU tensor, got ",
                t.sizes(), " ", t.scalar_type(), " with strides ", t.strides());
    values[i] = {t.size(0), t.size(1), t.size(2), t.size(3), -1, 0, t.data_ptr<float>()};
  }
  std::vector<std::optional<at::Tensor>> biases(static_cast<size_t>(n));
  for (int64_t l = 0; l < n; ++l) {
    const int64_t* s = spec.data() + l * kChainSpec;
    const int64_t src = s[0], res = s[1], c_out = s[10], scaled_by = s[12];
    TORCH_CHECK(src >= 0 && src < n_in + l && res >= -1 && res < n_in + l && c_out >= 1, op, ": layer ", l,
                " reads value ", src, " with residual ", res, " and writes ", c_out, " channels; it may read only "
                "the inputs and earlier layers' outputs (values 0 to ", n_in + l - 1, ")");
    TORCH_CHECK(scaled_by >= -1 && scaled_by < n_gates && (scaled_by < 0 || gate_spec[scaled_by * kGateSpec + 3] <= l),
                op, ": layer ", l, " is scaled by gate ", scaled_by, ", which is not one of the ", n_gates,
                " gates or runs after it");
    const Value& in = values[src];
    if (bias[l].numel() > 0) biases[l] = bias[l];
    const auto hw = checked_output_size(op, {in.B, in.C, in.H, in.W}, packed[l], &biases[l], {s[2], s[3]},
                                        {s[4], s[5]}, {s[6], s[7]}, {s[8], s[9]}, c_out);
    values[n_in + l] = {in.B, c_out, hw[0], hw[1], l, 0, nullptr};
    values[src].last_use = l;
    if (res >= 0) {
      const Value& r = values[res];
      TORCH_CHECK(r.B == in.B && r.C == c_out && r.H == hw[0] && r.W == hw[1], op, ": layer ", l, "'s residual (",
                  "value ", res, ") is ", r.B, " x ", r.C, " x ", r.H, " x ", r.W, ", not its output's ", in.B,
                  " x ", c_out, " x ", hw[0], " x ", hw[1]);
      values[res].last_use = l;
    }
  }
  // the gates: each reads a value while the layer at its position runs (its block stays live until then)
  std::vector<GateTensors> gate_tensors(static_cast<size_t>(n_gates));
  std::vector<GateStep> gate_steps(static_cast<size_t>(n_gates));
  std::vector<int64_t> scale_at(static_cast<size_t>(n_gates), -1);  // where each gate's scales start, in scales
  std::atomic<bool> outside{false};
  for (int64_t k = 0; k < n_gates; ++k) {
    const int64_t* s = gate_spec.data() + k * kGateSpec;
    const int64_t src = s[0], at_layer = s[3];
    TORCH_CHECK(at_layer >= 0 && at_layer <= n && src >= 0 && src < n_in + at_layer, op, ": gate ", k,
                " runs with layer ", at_layer, " and reads value ", src, "; it may read only the inputs and the "
                "outputs of the layers before it (values 0 to ", n_in + at_layer - 1, ")");
    const at::Tensor* t = gates.data() + k * kGateTensors;
    gate_tensors[k] = {t[0], t[1], t[2], t[3], t[4], t[5], t[6]};
    Value& in = values[src];
    GateStep& step = gate_steps[k];
    step.gate = checked_gate(op, in.C, gate_tensors[k], s[1], s[2]);
    step.B = in.B, step.pixels = in.H * in.W, step.outside = &outside;
    in.last_use = std::max(in.last_use, std::min(at_layer, n - 1));  // n - 1: no layer runs with or after it
  }
  int64_t scale_floats = 0;
  for (int64_t l = 0; l < n; ++l) {
    const int64_t k = spec[l * kChainSpec + 12];
    if (k < 0) continue;
    const Value& out = values[n_in + l];
    TORCH_CHECK(gate_steps[k].gate.kept == out.C && gate_steps[k].B == out.B, op, ": layer ", l, " writes ", out.C,
                " channels (batch ", out.B, "), but gate ", k, " scales ", gate_steps[k].gate.kept, " channels (batch ",
                gate_steps[k].B, ")");
    if (scale_at[k] < 0) scale_at[k] = scale_floats, scale_floats += out.B * out.C;
  }
  std::vector<float> scales(static_cast<size_t>(scale_floats));
  for (const int64_t o : outputs) {
    TORCH_CHECK(o >= n_in && o < n_in + n && values[o].last_use < n, op, ": output ", o,
                " is not a layer's output (values ", n_in, " to ", n_in + n - 1, ") or is named twice");
    values[o].last_use = n;
  }
  // The outputs get tensors of their own. Each other layer's output takes the smallest free block of one arena
  // that holds it (free: its last reader ran before this layer), or a new block: the arena holds the values live
  // at once, not every layer's output.
  std::vector<at::Tensor> result;
  result.reserve(outputs.size());
  for (const int64_t o : outputs) {
    Value& v = values[o];
    const auto options = inputs[0].options().memory_format(at::MemoryFormat::ChannelsLast);
    result.push_back(at::empty({v.B, v.C, v.H, v.W}, options));
    v.p = result.back().data_ptr<float>();
  }
  struct Block {
    int64_t offset, size, busy_until;
  };
  std::vector<Block> blocks;
  int64_t total = 0;
  for (int64_t l = 0; l < n; ++l) {
    Value& v = values[n_in + l];
    if (v.last_use == n) continue;  // an output: a tensor of its own
    const int64_t need = (v.B * v.C * v.H * v.W + 15) / 16 * 16;
    Block* fit = nullptr;
    for (Block& b : blocks)
      if (b.busy_until < l && b.size >= need && (fit == nullptr || b.size < fit->size)) fit = &b;
    if (fit == nullptr) {
      blocks.push_back({total, need, 0});
      total += need;
      fit = &blocks.back();
    }
    fit->busy_until = v.last_use;
    v.offset = fit->offset;
  }
  at::Tensor arena = at::empty({total}, inputs[0].options());
  float* base = arena.data_ptr<float>();
  for (int64_t l = 0; l < n; ++l)
    if (values[n_in + l].last_use < n) values[n_in + l].p = base + values[n_in + l].offset;
  std::vector<Layer> layers(static_cast<size_t>(n));  // prepared in place, never moved
  const int64_t threads = at::get_num_threads();
  for (int64_t l = 0; l < n; ++l) {
    const int64_t* s = spec.data() + l * kChainSpec;
    const Value &in = values[s[0]], &out = values[n_in + l];
    const ConvShapes shapes{in.B, in.C, in.H, in.W, in.H * in.W * in.C, in.W * in.C, in.C, out.C, out.H, out.W};
    const float* b = biases[l].has_value() && biases[l]->defined() ? biases[l]->data_ptr<float>() : nullptr;
    prepare(layers[l], shapes, in.p, packed[l], b, s[1] >= 0 ? values[s[1]].p : nullptr, const_cast<float*>(out.p),
            {s[2], s[3]}, {s[4], s[5]}, {s[6], s[7]}, {s[8], s[9]}, s[11] != 0, threads);
    if (s[12] >= 0) layers[l].scale_gate = &gate_steps[s[12]];
  }
  // the gates' part sums and scratch, and their samples' states, in one allocation each
  auto gate_floats_of = [](const GateStep& g) { return g.B * (kPoolParts * g.gate.c_in + gate_scratch(g.gate)); };
  int64_t gate_floats = 0, samples = 0;
  for (const GateStep& g : gate_steps) gate_floats += gate_floats_of(g), samples += g.B;
  std::vector<float> gate_work(static_cast<size_t>(gate_floats));
  std::unique_ptr<std::atomic<int>[]> state(new std::atomic<int>[std::max<int64_t>(samples, 1)]);
  for (int64_t i = 0; i < samples; ++i) state[i].store(0, std::memory_order_relaxed);
  gate_floats = 0, samples = 0;
  for (int64_t k = 0; k < n_gates; ++k) {
    GateStep& g = gate_steps[k];
    g.x = values[gate_spec[k * kGateSpec]].p;
    if (scale_at[k] >= 0) g.scale = scales.data() + scale_at[k];
    g.parts = gate_work.data() + gate_floats, g.scratch = g.parts + g.B * kPoolParts * g.gate.c_in;
    g.state = state.get() + samples;
    gate_floats += gate_floats_of(g), samples += g.B;
  }
  // each layer after the gates that run with it, in the order given
  std::vector<Unit> units;
  for (int64_t l = 0; l <= n; ++l) {
    for (int64_t k = 0; k < n_gates; ++k)
      if (gate_spec[k * kGateSpec + 3] == l) units.push_back({nullptr, &gate_steps[k], l == n});
    if (l < n) units.push_back({&layers[l], nullptr, true});
  }
  run_chain(units, threads);
  if (n_gates > 0) result.push_back(at::scalar_tensor(outside.load(), inputs[0].options().dtype(at::kBool)));
  return result;
}

}  // namespace cpu
}  // namespace sparsekern
