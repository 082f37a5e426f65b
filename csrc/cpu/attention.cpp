// CPU kernel of sparsekern.ops.attention (float32): o = softmax(scale q k^T [+ causal mask]) v, one pass over the
// keys with the running softmax of FlashAttention (Dao et al., NeurIPS 2022), so the T_q x T_k score matrix is
// never stored, and with a causal mask the key tiles above the diagonal are never computed.
//
// Work: one task per (batch, head), split over torch's threads. A task packs its k into panels of kPanel keys,
// Kp[tile][e][w] = k[tile * kPanel + w][e] (zero for keys >= T_k), and its v into rows padded to whole panels,
// Vp[j][c] (zero for c >= E_v), then runs its queries in blocks of kRows:
//   for each step of kKeys keys (two panels) the block may see: S = scale * Q_blk K_step^T (kRows x kKeys, one
//   register tile per panel), masked; per row, m_new = max(m, max S), P = exp(S - m_new),
//   l = l exp(m - m_new) + sum P, O = O exp(m - m_new); O += P V_step (register tiles of kRows x kPanel columns
//   of O, kept in the thread's buffer between steps). Two panels per step halve the per-row bookkeeping (the
//   maxima, the sums, the rescaling of O) per FLOP.
// and finally o = O / l. A causal query i sees keys 0..i (torch's is_causal, top-left aligned).
#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

using sparsekern::cpu::hmax;
using sparsekern::cpu::hsum;
using sparsekern::cpu::kL;
using sparsekern::cpu::parallel;
using sparsekern::cpu::Vec;
using sparsekern::cpu::vadd;
using sparsekern::cpu::vexp_shifted;
using sparsekern::cpu::vload;
using sparsekern::cpu::vmax;
using sparsekern::cpu::vmul;
using sparsekern::cpu::vset1;
using sparsekern::cpu::vstore;
using sparsekern::cpu::vzero;

using sparsekern::cpu::Tile;

constexpr int kRows = sparsekern::cpu::kTileRows;
constexpr int kPanel = sparsekern::cpu::kTileCols;  // keys per packed panel, and columns of O per register tile
constexpr int kKeys = 2 * kPanel;                    // keys per step of the running softmax
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__attribute__((always_inline)) inline void micro(int64_t K, const float* __restrict a, int64_t lda,
                                                 const float* __restrict b, int64_t ldb, Tile& acc) {
  sparsekern::cpu::micro_tile(K, a, lda, b, ldb, acc);
}

struct Head {
  const float* q;  // rows of E, row stride ldq
  int64_t ldq;
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
  float* o;  // rows of E_v, row stride ldo
  int64_t ldo;
};

struct Shape {
  int64_t t_q, t_k, e, e_v, e_v_pad, tiles;
  float scale;
  bool causal;
};

// Per-thread buffers: packed k and v of one head, a query block, its scores and output accumulators.
struct Scratch {
  std::vector<float> kp, vp, q, s, o;
  std::vector<float> m, l;
  explicit Scratch(const Shape& sh)
      : kp(sh.tiles * sh.e * kPanel), vp(sh.tiles * kPanel * sh.e_v_pad), q(kRows * sh.e), s(kRows * kKeys),
        o(kRows * sh.e_v_pad), m(kRows), l(kRows) {}
};

void pack_head(const Head& h, const Shape& sh, Scratch& w) {
  std::fill(w.kp.begin(), w.kp.end(), 0.0f);
  std::fill(w.vp.begin(), w.vp.end(), 0.0f);
  for (int64_t j = 0; j < sh.t_k; ++j) {
    float* dst = w.kp.data() + (j / kPanel) * sh.e * kPanel + j % kPanel;
    const float* row = h.k + j * h.ldk;
    for (int64_t e = 0; e < sh.e; ++e) dst[e * kPanel] = row[e];
    std::memcpy(w.vp.data() + j * sh.e_v_pad, h.v + j * h.ldv, sh.e_v * sizeof(float));
  }
}

// Queries [i0, i0 + rows) of one head.
void run_block(const Head& h, const Shape& sh, Scratch& w, int64_t i0, int64_t rows) {
  std::fill(w.q.begin(), w.q.end(), 0.0f);  // rows past the last query compute on zeros and are not stored
  for (int64_t i = 0; i < rows; ++i) std::memcpy(w.q.data() + i * sh.e, h.q + (i0 + i) * h.ldq, sh.e * sizeof(float));
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const int64_t keys = sh.causal ? std::min(sh.t_k, i0 + rows) : sh.t_k;
  const Vec scale = vset1(sh.scale);
  for (int64_t j0 = 0; j0 < keys; j0 += kKeys) {
    for (int part = 0; part < kKeys / kPanel; ++part) {  // the step's panels of keys (some may be past the last)
      const int64_t tile = j0 / kPanel + part;
      float* s = w.s.data() + part * kPanel;
      if (tile >= sh.tiles || tile * kPanel >= keys) {
        for (int i = 0; i < kRows; ++i) std::fill(s + i * kKeys, s + i * kKeys + kPanel, kNegInf);
        continue;
      }
      Tile acc;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vzero();
      micro(sh.e, w.q.data(), sh.e, w.kp.data() + tile * sh.e * kPanel, kPanel, acc);
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        vstore(s + i * kKeys, vmul(acc[i][0], scale));
        vstore(s + i * kKeys + kL, vmul(acc[i][1], scale));
      }
    }
    const bool edge = j0 + kKeys > sh.t_k || (sh.causal && j0 + kKeys - 1 > i0);
    if (edge) {
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t visible = std::min(sh.t_k, sh.causal ? i0 + i + 1 : sh.t_k) - j0;  // keys of this step row i sees
        for (int64_t c = std::max<int64_t>(visible, 0); c < kKeys; ++c) w.s[i * kKeys + c] = kNegInf;
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      float* s = w.s.data() + i * kKeys;
      Vec mx = vload(s);
#pragma GCC unroll 8
      for (int c = kL; c < kKeys; c += kL) mx = vmax(mx, vload(s + c));
      const float row_max = hmax(mx);
      if (row_max == kNegInf) {  // no key of this step is visible to row i: it adds nothing
        std::fill(s, s + kKeys, 0.0f);
        continue;
      }
      const float m_new = std::max(w.m[i], row_max);
      const Vec mv = vset1(m_new);
      Vec sum = vzero();
#pragma GCC unroll 8
      for (int c = 0; c < kKeys; c += kL) {
        const Vec p = vexp_shifted(vload(s + c), mv);
        vstore(s + c, p);
        sum = vadd(sum, p);
      }
      const float alpha = w.m[i] == kNegInf ? 0.0f : std::exp(w.m[i] - m_new);
      w.l[i] = w.l[i] * alpha + hsum(sum);
      w.m[i] = m_new;
      if (alpha != 1.0f) {
        const Vec av = vset1(alpha);
        float* o = w.o.data() + i * sh.e_v_pad;
        for (int64_t c = 0; c < sh.e_v_pad; c += kL) vstore(o + c, vmul(vload(o + c), av));
      }
    }
    const int64_t valid = std::min<int64_t>(kKeys, keys - j0);
    const float* vt = w.vp.data() + j0 * sh.e_v_pad;
    for (int64_t c0 = 0; c0 < sh.e_v_pad; c0 += kPanel) {
      Tile out;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        out[i][0] = vload(w.o.data() + i * sh.e_v_pad + c0);
        out[i][1] = vload(w.o.data() + i * sh.e_v_pad + c0 + kL);
      }
      micro(valid, w.s.data(), kKeys, vt + c0, sh.e_v_pad, out);
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        vstore(w.o.data() + i * sh.e_v_pad + c0, out[i][0]);
        vstore(w.o.data() + i * sh.e_v_pad + c0 + kL, out[i][1]);
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = w.l[i] > 0.0f ? 1.0f / w.l[i] : 0.0f;
    const float* src = w.o.data() + i * sh.e_v_pad;
    float* dst = h.o + (i0 + i) * h.ldo;
    for (int64_t c = 0; c < sh.e_v; ++c) dst[c] = src[c] * inv;
  }
}

}  // namespace

namespace sparsekern {
namespace cpu {

void attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                   at::Tensor& o) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  o.scalar_type() == at::kFloat && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && o.dim() == 4 &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && o.stride(3) == 1,
              "attention (cpu): internal: float32 (B, H, T, E) q, k, v, o with unit stride along E expected; call "
              "sparsekern.ops.attention, which validates its inputs");
  const int64_t batch = q.size(0), heads = q.size(1);
  Shape sh{q.size(2), k.size(2), q.size(3), v.size(3), 0, 0, static_cast<float>(scale), causal};
  sh.e_v_pad = (sh.e_v + kPanel - 1) / kPanel * kPanel;
  sh.tiles = (sh.t_k + kPanel - 1) / kPanel;
  if (batch == 0 || heads == 0 || sh.t_q == 0 || sh.e_v == 0) return;
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  float* od = o.data_ptr<float>();
  parallel(batch * heads, [&](int64_t begin, int64_t end) {
    Scratch w(sh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, hh = task % heads;
      const Head h{qd + b * q.stride(0) + hh * q.stride(1), q.stride(2),
                   kd + b * k.stride(0) + hh * k.stride(1), k.stride(2),
                   vd + b * v.stride(0) + hh * v.stride(1), v.stride(2),
                   od + b * o.stride(0) + hh * o.stride(1), o.stride(2)};
      if (sh.t_k == 0) {
        for (int64_t i = 0; i < sh.t_q; ++i) std::fill(h.o + i * h.ldo, h.o + i * h.ldo + sh.e_v, 0.0f);
        continue;
      }
      pack_head(h, sh, w);
      for (int64_t i0 = 0; i0 < sh.t_q; i0 += kRows) run_block(h, sh, w, i0, std::min<int64_t>(kRows, sh.t_q - i0));
    }
  }, "attention");
}

}  // namespace cpu
}  // namespace sparsekern
