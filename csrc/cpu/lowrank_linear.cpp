// CPU kernel of sparsekern.ops.lowrank_linear (float32): y = x Q^T P^T + bias with h = x Q^T kept in
// cache, in one pass over x and one over y.
//
// Why not two BLAS GEMMs: the first GEMM, x (T x in) times Q^T (in x r), has a narrow output (r columns), so a
// BLAS packs every row of x into its panel layout and then uses each packed element only r times; the second
// one, h (T x r) times P^T (r x out), re-packs h. Here x is read in place (its rows broadcast into the
// micro-kernel), only the weights are packed (r (in + out) elements per call, amortised over T tokens), and h
// never leaves the thread's cache. Few tokens do not amortise the weight packing and large ranks leave BLAS near
// peak: sparsekern/ops/lowrank_linear.py dispatches by the thresholds sparsekern/bench/kernel_lowrank_linear.py
// measured.
//
// Layout. Q is packed into panels of kPanel = 2 vectors of its rows, Qp[jp][k][w] = Q[jp*kPanel + w][k] (zero
// for rows >= r), and P likewise, Pp[np][j][w] = P[np*kPanel + w][j] (zero for rows >= out). Tokens are split
// over threads in micro-rows of kRows; each thread runs its rows in blocks of kBlockRows:
//   phase 1, for each kKc-long slice of in and each Q panel, every micro-row block accumulates its
//            kRows x kPanel tile of h (registers, then the thread's h buffer between slices);
//   phase 2, for each P panel, every micro-row block computes its kRows x kPanel tile of y from h (bias first)
//            and stores it, masked to the last valid column.
// The micro-kernel holds kRows x 2 vector accumulators: 12 x 2 zmm with AVX-512, 6 x 2 ymm with AVX2 + FMA,
// and plain loops otherwise.
#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

using sparsekern::cpu::kL;
using sparsekern::cpu::parallel;
using sparsekern::cpu::Vec;
using sparsekern::cpu::vfma;
using sparsekern::cpu::vload;
using sparsekern::cpu::vset1;
using sparsekern::cpu::vstore;
using sparsekern::cpu::vzero;

using sparsekern::cpu::Tile;

constexpr int kRows = sparsekern::cpu::kTileRows;
constexpr int kLanes = kL;
constexpr int kPanel = sparsekern::cpu::kTileCols;  // columns of one packed panel (two vectors)
constexpr int kBlockRows = 8 * kRows;     // tokens a thread runs through one pass over the packed weights
constexpr int64_t kKc = 256;              // slice of `in` whose packed Q panel stays in L1/L2

// acc[i][:] += sum_{k < K} a[i * lda + k] * b[k * kPanel + :]
__attribute__((always_inline)) inline void micro(int64_t K, const float* __restrict a, int64_t lda,
                                                 const float* __restrict b, Tile& acc) {
  sparsekern::cpu::micro_tile(K, a, lda, b, kPanel, acc);
}

// dst[panel][k][w] = src[(panel * kPanel + w) * s_row + k * s_col], zero for rows >= rows; panels in [p0, p1).
void pack_panels(float* dst, const float* src, int64_t rows, int64_t cols, int64_t s_row, int64_t s_col,
                 int64_t p0, int64_t p1) {
  for (int64_t panel = p0; panel < p1; ++panel) {
    float* out = dst + panel * cols * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, rows - panel * kPanel);
    if (s_col == 1) {  // rows of src are contiguous: read along them, kChunk columns at a time so that the
                       // kChunk x kPanel block of out being written stays in L1
      constexpr int64_t kChunk = 64;
      for (int64_t k0 = 0; k0 < cols; k0 += kChunk) {
        const int64_t k1 = std::min(cols, k0 + kChunk);
        for (int64_t w = 0; w < valid; ++w) {
          const float* row = src + (panel * kPanel + w) * s_row;
          for (int64_t k = k0; k < k1; ++k) out[k * kPanel + w] = row[k];
        }
      }
    } else {  // read along the panel's rows for each column
      for (int64_t k = 0; k < cols; ++k) {
        const float* col = src + k * s_col + panel * kPanel * s_row;
        for (int64_t w = 0; w < valid; ++w) out[k * kPanel + w] = col[w * s_row];
      }
    }
    if (valid < kPanel) {
      for (int64_t k = 0; k < cols; ++k) std::fill(out + k * kPanel + valid, out + (k + 1) * kPanel, 0.0f);
    }
  }
}

struct Problem {
  const float* x;
  int64_t ldx;
  int64_t tokens, in, out, rank;
  const float* qp;    // packed Q: r_panels x in x kPanel
  const float* pp;    // packed P: out_panels x rank x kPanel
  const float* bias;  // padded to out_panels * kPanel (zeros beyond out)
  float* y;           // tokens x out, contiguous
  int64_t r_panels, out_panels;
};

// Tokens [m0, m1) (whole micro-rows; m1 may pass `tokens` only in the last block).
void run_block(const Problem& pr, int64_t m0, int64_t m1, float* h, float* tail) {
  const int64_t r_pad = pr.r_panels * kPanel;
  const int64_t subs = (m1 - m0) / kRows;
  // Rows past the last token read a zero-padded copy of the last partial micro-row instead of x.
  const int64_t full_rows = std::min(m1, pr.tokens) - m0;
  const int64_t tail_sub = full_rows / kRows;  // first micro-row that is partial (== subs when none)
  if (full_rows % kRows != 0) {
    const int64_t first = m0 + tail_sub * kRows;
    std::fill(tail, tail + kRows * pr.in, 0.0f);
    for (int64_t i = 0; first + i < pr.tokens; ++i) {
      std::memcpy(tail + i * pr.in, pr.x + (first + i) * pr.ldx, pr.in * sizeof(float));
    }
  }
  auto x_rows = [&](int64_t s) -> std::pair<const float*, int64_t> {
    if (s == tail_sub && full_rows % kRows != 0) return {tail, pr.in};
    return {pr.x + (m0 + s * kRows) * pr.ldx, pr.ldx};
  };

  // phase 1: h[s*kRows + i][jp*kPanel + w] = sum_k x[.][k] Q[jp*kPanel + w][k]
  for (int64_t k0 = 0; k0 < pr.in; k0 += kKc) {
    const int64_t kc = std::min(kKc, pr.in - k0);
    for (int64_t jp = 0; jp < pr.r_panels; ++jp) {
      const float* b = pr.qp + (jp * pr.in + k0) * kPanel;
      for (int64_t s = 0; s < subs; ++s) {
        float* hs = h + s * kRows * r_pad + jp * kPanel;
        Tile acc;
#pragma GCC unroll 12
        for (int i = 0; i < kRows; ++i) {
          acc[i][0] = k0 == 0 ? vzero() : vload(hs + i * r_pad);
          acc[i][1] = k0 == 0 ? vzero() : vload(hs + i * r_pad + kLanes);
        }
        const auto [a, lda] = x_rows(s);
        micro(kc, a + k0, lda, b, acc);
#pragma GCC unroll 12
        for (int i = 0; i < kRows; ++i) {
          vstore(hs + i * r_pad, acc[i][0]);
          vstore(hs + i * r_pad + kLanes, acc[i][1]);
        }
      }
    }
  }

  // phase 2: y[.][np*kPanel + w] = bias + sum_j h[.][j] P[np*kPanel + w][j]
  for (int64_t np = 0; np < pr.out_panels; ++np) {
    const int64_t n0 = np * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, pr.out - n0);
    const float* b = pr.pp + np * pr.rank * kPanel;
    const Vec bias0 = vload(pr.bias + n0), bias1 = vload(pr.bias + n0 + kLanes);
    for (int64_t s = 0; s < subs; ++s) {
      Tile acc;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        acc[i][0] = bias0;
        acc[i][1] = bias1;
      }
      micro(pr.rank, h + s * kRows * r_pad, r_pad, b, acc);
      const int64_t t0 = m0 + s * kRows;
      const int64_t rows = std::min<int64_t>(kRows, pr.tokens - t0);
      float* dst = pr.y + t0 * pr.out + n0;
      // Accumulators are only ever indexed by constants, so they stay in registers; a partial tile goes
      // through a buffer.
      if (rows == kRows && valid == kPanel) {
#pragma GCC unroll 12
        for (int i = 0; i < kRows; ++i) {
          vstore(dst + i * pr.out, acc[i][0]);
          vstore(dst + i * pr.out + kLanes, acc[i][1]);
        }
      } else {
        alignas(64) float buf[kRows][kPanel];
#pragma GCC unroll 12
        for (int i = 0; i < kRows; ++i) {
          vstore(buf[i], acc[i][0]);
          vstore(buf[i] + kLanes, acc[i][1]);
        }
        for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * pr.out, buf[i], valid * sizeof(float));
      }
    }
  }
}

}  // namespace

namespace sparsekern {
namespace cpu {

void lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p,
                        const std::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat && p.scalar_type() == at::kFloat &&
                  y.scalar_type() == at::kFloat && q.dim() == 2 && p.dim() == 2 && y.dim() == 2 && y.is_contiguous(),
              "lowrank_linear (cpu): internal: float32 x, Q (r, in), P (out, r) and a contiguous (T, out) y expected; "
              "call sparsekern.ops.lowrank_linear, which validates its inputs");
  const int64_t rank = q.size(0), in = q.size(1), out = p.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor x2 = x.reshape({-1, in});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t tokens = x2.size(0);
  if (tokens == 0 || out == 0) return;

  const int64_t r_panels = (rank + kPanel - 1) / kPanel, out_panels = (out + kPanel - 1) / kPanel;
  std::unique_ptr<float[]> qp(new float[r_panels * in * kPanel]);
  std::unique_ptr<float[]> pp(new float[out_panels * rank * kPanel]);
  std::unique_ptr<float[]> bias_pad(new float[out_panels * kPanel]());
  if (has_bias) {
    const at::Tensor b = bias->contiguous();
    std::memcpy(bias_pad.get(), b.data_ptr<float>(), out * sizeof(float));
  }
  parallel(r_panels + out_panels, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < r_panels) {
        pack_panels(qp.get(), q.data_ptr<float>(), rank, in, q.stride(0), q.stride(1), i, i + 1);
      } else {
        pack_panels(pp.get(), p.data_ptr<float>(), out, rank, p.stride(0), p.stride(1), i - r_panels, i - r_panels + 1);
      }
    }
  }, "lowrank_linear");

  Problem pr{x2.data_ptr<float>(), x2.stride(0), tokens, in, out, rank, qp.get(), pp.get(), bias_pad.get(),
             y.data_ptr<float>(), r_panels, out_panels};
  const int64_t micro_rows = (tokens + kRows - 1) / kRows;
  parallel(micro_rows, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> h(new float[kBlockRows * r_panels * kPanel]);
    std::unique_ptr<float[]> tail(new float[kRows * in]);
    for (int64_t s = b; s < e; s += kBlockRows / kRows) {
      const int64_t s1 = std::min(e, s + kBlockRows / kRows);
      run_block(pr, s * kRows, s1 * kRows, h.get(), tail.get());
    }
  }, "lowrank_linear");
}

}  // namespace cpu
}  // namespace sparsekern
