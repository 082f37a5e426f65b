// CPU kernel of sparsekern.ops.attention (float32): o = softmax(scale q k^T [+ causal mask]) v, one pass over the
// keys with the running softmax of FlashAttention (Dao et al., NeurIPS 2022), so the T_q x T_k score matrix is
// never stored, and with a causal mask the key tiles above the diagonal are never computed.
//
// Work: one task per (batch, head), split over torch's threads. A task packs its k into panels of kPanel keys,
// Kp[tile][e][w] = k[tile * kPanel + w][e] (zero for keys >= T_k), and its v into rows padded to whole panels,
// Vp[j][c] (zero for c >= E_v), then runs its queries in blocks of kRows:
//   for each step of kKeys keys the block may see (all of them when T_k <= kKeys): S = scale * Q_blk K_step^T
//   (kRows x kKeys, one register tile per panel, stored; in log2 units, scale times log2 e), masked; per row,
//   m_new = max(m, max S), P = 2^(S - m_new), l = l 2^(m - m_new) + sum P, O = O 2^(m - m_new); then
//   O += P V_step (register tiles of kRows x kPanel columns of O). Steps of many panels make the per-row
//   bookkeeping (maxima, sums, rescaling of O) rare, and the products run long inner loops; a step's scores
//   stay in L1 (kRows x kKeys floats).
// and finally o = O / l. A causal query i sees keys 0..i (torch's is_causal, top-left aligned).
#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

using sparsekern::cpu::hmax;
using sparsekern::cpu::hsum;
using sparsekern::cpu::kL;
using sparsekern::cpu::parallel;
using sparsekern::cpu::Vec;
using sparsekern::cpu::vadd;
using sparsekern::cpu::vexp2_shifted;
using sparsekern::cpu::vload;
using sparsekern::cpu::vmax;
using sparsekern::cpu::vmul;
using sparsekern::cpu::vset1;
using sparsekern::cpu::vstore;
using sparsekern::cpu::vzero;

using sparsekern::cpu::Tile;

constexpr int kRows = sparsekern::cpu::kTileRows;
constexpr int kPanel = sparsekern::cpu::kTileCols;  // keys per packed panel, and columns of O per register tile
constexpr int kKeys = 16 * kPanel;  // keys per step of the running softmax (scores of a block: 24 KiB with AVX-512)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <int NV = 2>
__attribute__((always_inline)) inline void micro(int64_t K, const float* __restrict a, int64_t lda,
                                                 const float* __restrict b, int64_t ldb, Tile& acc) {
  sparsekern::cpu::micro_tile<NV>(K, a, lda, b, ldb, acc);
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

// Per-thread buffers (kept between calls): packed k and v of one head, a query block, its scores and output
// accumulators.
struct Scratch {
  float *kp, *vp, *q, *s, *o, *m, *l;
  explicit Scratch(const Shape& sh) {
    static thread_local sparsekern::cpu::Buffer<float> buf;
    int64_t sizes[] = {sh.tiles * sh.e * kPanel, sh.tiles * kPanel * sh.e_v_pad, kRows * sh.e, kRows * kKeys,
                       kRows * sh.e_v_pad, kRows, kRows};
    int64_t total = 0;
    for (int64_t& n : sizes) total += n = (n + kL - 1) / kL * kL;  // each part starts on a whole vector
    float* p = buf.get(total);
    float** parts[] = {&kp, &vp, &q, &s, &o, &m, &l};
    for (int i = 0; i < 7; p += sizes[i++]) *parts[i] = p;
  }
};

// dst[e * ld_dst + w] = src[w * ld_src + e] for w < nw, e < ne (both <= kL); zero for nw <= w < kL.
inline void transpose_block(const float* src, int64_t ld_src, int nw, int ne, float* dst, int64_t ld_dst) {
#if SPARSEKERN_SIMD == 512
  const __mmask16 lanes = static_cast<__mmask16>((1u << ne) - 1u);
  __m512 r[16];
  for (int w = 0; w < 16; ++w) r[w] = w < nw ? _mm512_maskz_loadu_ps(lanes, src + w * ld_src) : _mm512_setzero_ps();
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of single floats
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // now r[4q + j], 128-bit lane L, holds rows 4q .. 4q + 3 of column 4L + j; gather the lanes of each column
  __m512 u[16];
  for (int j = 0; j < 4; ++j) {
    u[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);        // lanes 0, 2 of r[j], then 0, 2 of r[4 + j]
    u[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);    // lanes 1, 3
    u[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    u[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 c0 = _mm512_shuffle_f32x4(u[j], u[8 + j], 0x88);      // column j
    const __m512 c2 = _mm512_shuffle_f32x4(u[j], u[8 + j], 0xDD);      // column 8 + j
    const __m512 c1 = _mm512_shuffle_f32x4(u[4 + j], u[12 + j], 0x88);  // column 4 + j
    const __m512 c3 = _mm512_shuffle_f32x4(u[4 + j], u[12 + j], 0xDD);  // column 12 + j
    if (j < ne) _mm512_storeu_ps(dst + j * ld_dst, c0);
    if (4 + j < ne) _mm512_storeu_ps(dst + (4 + j) * ld_dst, c1);
    if (8 + j < ne) _mm512_storeu_ps(dst + (8 + j) * ld_dst, c2);
    if (12 + j < ne) _mm512_storeu_ps(dst + (12 + j) * ld_dst, c3);
  }
#else
  for (int e = 0; e < ne; ++e)
    for (int w = 0; w < kL; ++w) dst[e * ld_dst + w] = w < nw ? src[w * ld_src + e] : 0.0f;
#endif
}

void pack_head(const Head& h, const Shape& sh, Scratch& w) {
  for (int64_t j0 = 0; j0 < sh.tiles * kPanel; j0 += kL) {
    const int nw = static_cast<int>(std::clamp<int64_t>(sh.t_k - j0, 0, kL));
    float* panel = w.kp + (j0 / kPanel) * sh.e * kPanel + j0 % kPanel;
    for (int64_t e0 = 0; e0 < sh.e; e0 += kL)
      transpose_block(h.k + j0 * h.ldk + e0, h.ldk, nw, static_cast<int>(std::min<int64_t>(kL, sh.e - e0)),
                      panel + e0 * kPanel, kPanel);
  }
  for (int64_t j = 0; j < sh.tiles * kPanel; ++j) {
    float* row = w.vp + j * sh.e_v_pad;
    const int64_t copied = j < sh.t_k ? sh.e_v : 0;
    if (copied) std::memcpy(row, h.v + j * h.ldv, copied * sizeof(float));
    std::fill(row + copied, row + sh.e_v_pad, 0.0f);
  }
}

// Queries [i0, i0 + rows) of one head.
void run_block(const Head& h, const Shape& sh, Scratch& w, int64_t i0, int64_t rows) {
  std::fill(w.q, w.q + kRows * sh.e, 0.0f);  // rows past the last query compute on zeros and are not stored
  for (int64_t i = 0; i < rows; ++i) std::memcpy(w.q + i * sh.e, h.q + (i0 + i) * h.ldq, sh.e * sizeof(float));
  std::fill(w.o, w.o + kRows * sh.e_v_pad, 0.0f);
  std::fill(w.m, w.m + kRows, kNegInf);
  std::fill(w.l, w.l + kRows, 0.0f);
  const int64_t keys = sh.causal ? std::min(sh.t_k, i0 + rows) : sh.t_k;
  const Vec scale = vset1(sh.scale * 1.44269504088896341f);  // scores in log2 units: softmax by 2^x
  for (int64_t j0 = 0; j0 < keys; j0 += kKeys) {
    const int64_t n = std::min<int64_t>(kKeys, keys - j0);          // keys some row of the block sees
    const int64_t width = (n + kL - 1) / kL * kL;  // columns of S computed (whole vectors)
    for (int64_t c0 = 0; c0 < width; c0 += kPanel) {
      const bool half = width - c0 < kPanel;  // the step's last kL keys: half a panel
      Tile acc;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vzero();
      if (half)
        micro<1>(sh.e, w.q, sh.e, w.kp + (j0 + c0) * sh.e, kPanel, acc);
      else
        micro<2>(sh.e, w.q, sh.e, w.kp + (j0 + c0) * sh.e, kPanel, acc);
      float* s = w.s + c0;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        vstore(s + i * kKeys, vmul(acc[i][0], scale));
        if (!half) vstore(s + i * kKeys + kL, vmul(acc[i][1], scale));
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      float* s = w.s + i * kKeys;
      const int64_t visible = std::min(sh.t_k, sh.causal ? i0 + i + 1 : sh.t_k) - j0;  // keys of this step row i sees
      for (int64_t c = std::max<int64_t>(visible, 0); c < width; ++c) s[c] = kNegInf;
      Vec mx = vload(s);
      for (int64_t c = kL; c < width; c += kL) mx = vmax(mx, vload(s + c));
      const float row_max = hmax(mx);
      if (row_max == kNegInf) {  // no key of this step is visible to row i: it adds nothing
        std::fill(s, s + width, 0.0f);
        continue;
      }
      const float m_new = std::max(w.m[i], row_max);
      const Vec mv = vset1(m_new);
      Vec sum0 = vzero(), sum1 = vzero();
      int64_t c = 0;
      for (; c + 2 * kL <= width; c += 2 * kL) {
        const Vec p0 = vexp2_shifted(vload(s + c), mv);
        const Vec p1 = vexp2_shifted(vload(s + c + kL), mv);
        vstore(s + c, p0);
        vstore(s + c + kL, p1);
        sum0 = vadd(sum0, p0);
        sum1 = vadd(sum1, p1);
      }
      if (c < width) {  // width is whole vectors
        const Vec p0 = vexp2_shifted(vload(s + c), mv);
        vstore(s + c, p0);
        sum0 = vadd(sum0, p0);
      }
      const float sum = hsum(vadd(sum0, sum1));
      if (w.m[i] == kNegInf) {
        w.l[i] = sum;
      } else {
        const float alpha = std::exp2(w.m[i] - m_new);
        w.l[i] = w.l[i] * alpha + sum;
        if (alpha != 1.0f) {
          const Vec av = vset1(alpha);
          float* o = w.o + i * sh.e_v_pad;
          for (int64_t c = 0; c < sh.e_v_pad; c += kL) vstore(o + c, vmul(vload(o + c), av));
        }
      }
      w.m[i] = m_new;
    }
    const float* vt = w.vp + j0 * sh.e_v_pad;
    for (int64_t c0 = 0; c0 < sh.e_v_pad; c0 += kPanel) {
      Tile out;
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        out[i][0] = vload(w.o + i * sh.e_v_pad + c0);
        out[i][1] = vload(w.o + i * sh.e_v_pad + c0 + kL);
      }
      micro(n, w.s, kKeys, vt + c0, sh.e_v_pad, out);
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        vstore(w.o + i * sh.e_v_pad + c0, out[i][0]);
        vstore(w.o + i * sh.e_v_pad + c0 + kL, out[i][1]);
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = w.l[i] > 0.0f ? 1.0f / w.l[i] : 0.0f;
    const float* src = w.o + i * sh.e_v_pad;
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

at::Tensor attention_op_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && v.size(0) == k.size(0) && v.size(1) == k.size(1) &&
                  v.size(2) == k.size(2),
              "_attention (cpu): q (B, H, T_q, E), k (B, H, T_k, E) and v (B, H, T_k, E_v) expected, got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  const auto unit = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  // stored (B, T_q, H, E_v), as sparsekern.ops.attention's output: the heads merge without a copy
  at::Tensor o = at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).transpose(1, 2);
  attention_cpu(unit(q), unit(k), unit(v), causal, scale, o);
  return o;
}

}  // namespace cpu
}  // namespace sparsekern
