// CPU kernels of sparsekern.ops.sru_recurrence (float32): the elementwise SRU recurrence (Lei et al., "Simple
// Recurrent Units for Highly Parallelizable Recurrence", EMNLP 2018, eqs. 3-7), forward and backward.
//
//   f_t = sigmoid(uf_t + v_f c_{t-1} + b_f)        r_t = sigmoid(ur_t + v_r c_{t-1} + b_r)
//   c_t = f_t c_{t-1} + (1 - f_t) w_t              h_t = r_t c_t + (1 - r_t) x_t,      c_0 = 0
//
// with u (B, T, 3d) = [w | uf | ur] along its last axis and x, h (B, T, d), all contiguous. Every (batch row,
// channel) is independent: the work is split into tasks of one batch row and kBlock channels, spread over
// torch's intra-op threads. A thread steps groups of kGroup of its tasks through time together (t outer, tasks
// inner, each task's c in a small buffer): consecutive steps of one task are 12 d bytes apart in u, a page or
// more, where the hardware prefetchers stop, so one task alone waits on memory at every step, while a group
// issues the loads of many tasks at once (8x faster at d = 1024 than one task at a time). Each step computes the
// gate pre-activations with Vec FMAs, the sigmoids over the block in one plain loop (sigmoid_block:
// branch-free, the compiler vectorises it for the target), and the state and output with Vec FMAs; a partial
// last block is loaded and stored through lane masks.
//
// Backward: a group first recomputes c_1..c_T of its channels into a (T + 1) x kBlock buffer per task (one more
// forward sweep, cheaper than storing c in the forward pass), then runs back through time carrying dL/dc:
//   gc    = carry + gh r                      gr~ = gh (c_t - x_t) r (1 - r)      gx = gh (1 - r)
//   gf~   = gc (c_{t-1} - w_t) f (1 - f)      gw  = gc (1 - f)
//   carry = gc f + gf~ v_f + gr~ v_r
// gu_t = [gw | gf~ | gr~]; the parameter gradients (sums over t of gf~ c_{t-1}, gr~ c_{t-1}, gf~, gr~) are
// written per batch row into gparams (4, B, d); the op sums them over B.
#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using sparsekern::cpu::kL;
using sparsekern::cpu::parallel;
using sparsekern::cpu::Vec;
using sparsekern::cpu::vadd;
using sparsekern::cpu::vfma;
using sparsekern::cpu::vload;
using sparsekern::cpu::vload_mask;
using sparsekern::cpu::vset1;
using sparsekern::cpu::vstore;
using sparsekern::cpu::vstore_mask;
using sparsekern::cpu::vzero;

constexpr int kVecs = 4;              // vectors per task
constexpr int kBlock = kVecs * kL;    // channels per task: 64 (AVX-512), 32 (AVX2), 16 (plain C++)
constexpr uint32_t kAll = (1u << kL) - 1u;
constexpr int64_t kGroup = 16;        // tasks a thread steps through time together (their loads overlap)

using sparsekern::cpu::vmul;
inline Vec vsub(Vec a, Vec b) { return vfma(b, vset1(-1.f), a); }  // a - b

// exp(x) to ~1 ulp for x in [-87.3, 88.3] (clamped outside; NaN stays NaN): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by the Cephes polynomial, 2^n through the exponent bits. Plain arithmetic, so the loop that calls it
// vectorises with whatever the build targets.
inline float exp_lane(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln2), exact for |x| < 2^22
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   // x - n ln2 in two parts (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.f) + 127) << 23;  // NaN: e is NaN already
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// z[i] = sigmoid(z[i]) for the kBlock lanes of a task. With AVX-512: e = exp(-|z|) (never overflows), then
// sigmoid = 1 / (1 + e) for z >= 0 and e / (1 + e) below, NaN passed through; otherwise a plain loop the
// compiler vectorises.
inline void sigmoid_block(float* __restrict z) {
#if SPARSEKERN_SIMD == 512
  const __m512 one = _mm512_set1_ps(1.f);
  for (int i = 0; i < kBlock; i += kL) {
    const __m512 v = _mm512_loadu_ps(z + i);
    const __m512 e = sparsekern::cpu::vexp_shifted({_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v))},
                                                   sparsekern::cpu::vzero()).v;
    const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
    const __m512 den = _mm512_add_ps(one, e);  // in [1, 2]: 1 / den by rcp14 and one Newton step (~1 ulp)
    const __m512 r0 = _mm512_rcp14_ps(den);
    const __m512 inv = _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, _mm512_set1_ps(2.f)));
    const __m512 s = _mm512_mul_ps(num, inv);
    _mm512_storeu_ps(z + i, _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v));
  }
#else
  for (int i = 0; i < kBlock; ++i) z[i] = 1.f / (1.f + exp_lane(-z[i]));
#endif
}

// The tensors of one call and the geometry of its tasks.
struct Sru {
  const float* u;
  const float* x;
  const float* vf;
  const float* vr;
  const float* bf;
  const float* br;
  int64_t B, T, d;
  int64_t blocks;  // ceil(d / kBlock)
};

// The lanes of vector k in the block starting at channel j0 that are inside [0, d).
inline uint32_t lanes_of(const Sru& s, int64_t j0, int k) {
  const int64_t left = s.d - j0 - static_cast<int64_t>(k) * kL;
  return left >= kL ? kAll : (left <= 0 ? 0u : (1u << left) - 1u);
}

// The gate pre-activations of step t (pointers at the task's first channel): zf = uf + b_f + v_f c, zr likewise.
inline void gate_inputs(const Sru& s, const float* ut, int64_t j0, const float* c, float* zf, float* zr) {
  for (int k = 0; k < kVecs; ++k) {
    const uint32_t m = lanes_of(s, j0, k);
    const int64_t o = static_cast<int64_t>(k) * kL;
    const Vec ck = vload(c + o);
    const Vec f = vfma(vload_mask(s.vf + j0 + o, m), ck,
                       vadd(vload_mask(ut + s.d + o, m), vload_mask(s.bf + j0 + o, m)));
    const Vec r = vfma(vload_mask(s.vr + j0 + o, m), ck,
                       vadd(vload_mask(ut + 2 * s.d + o, m), vload_mask(s.br + j0 + o, m)));
    vstore(zf + o, f);
    vstore(zr + o, r);
  }
}

// Step t of one task (batch row b, channels [j0, j0 + kBlock) ∩ [0, d)): c (kBlock floats) from c_{t-1} to c_t;
// writes h_t if h is given.
inline void forward_step(const Sru& s, int64_t b, int64_t j0, int64_t t, float* c, float* h) {
  alignas(64) float zf[kBlock];
  alignas(64) float zr[kBlock];
  const int64_t row = b * s.T + t;
  const float* ut = s.u + row * 3 * s.d + j0;
  gate_inputs(s, ut, j0, c, zf, zr);
  sigmoid_block(zf);
  sigmoid_block(zr);
  for (int k = 0; k < kVecs; ++k) {
    const uint32_t m = lanes_of(s, j0, k);
    const int64_t o = static_cast<int64_t>(k) * kL;
    const Vec w = vload_mask(ut + o, m);
    const Vec cn = vfma(vload(zf + o), vsub(vload(c + o), w), w);  // w + f (c - w)
    vstore(c + o, cn);
    if (h != nullptr) {
      const Vec xk = vload_mask(s.x + row * s.d + j0 + o, m);
      vstore_mask(h + row * s.d + j0 + o, vfma(vload(zr + o), vsub(cn, xk), xk), m);  // x + r (c - x)
    }
  }
}

struct Grads {
  const float* gh;
  float* gu;
  float* gx;
  float* gp;  // (4, B, d): v_f, v_r, b_f, b_r
};

// What a backward task carries through time: dL/dc and the parameter gradients' running sums, kBlock floats each.
struct Carry {
  float* dc;
  float* gvf;
  float* gvr;
  float* gbf;
  float* gbr;
};

inline Carry carry_of(float* base) {
  return {base, base + kBlock, base + 2 * kBlock, base + 3 * kBlock, base + 4 * kBlock};
}

// Backward step t of one task (see the file comment); cs holds c_0..c_T of the task's channels, kBlock floats each.
inline void backward_step(const Sru& s, const Grads& g, int64_t b, int64_t j0, int64_t t, const float* cs,
                          const Carry& a) {
  alignas(64) float f[kBlock];
  alignas(64) float r[kBlock];
  const Vec one = vset1(1.f);
  const int64_t row = b * s.T + t;
  const float* ut = s.u + row * 3 * s.d + j0;
  const float* cp = cs + t * kBlock;
  gate_inputs(s, ut, j0, cp, f, r);
  sigmoid_block(f);
  sigmoid_block(r);
  float* gut = g.gu + row * 3 * s.d + j0;
  for (int k = 0; k < kVecs; ++k) {
    const uint32_t m = lanes_of(s, j0, k);
    const int64_t o = static_cast<int64_t>(k) * kL;
    const Vec fk = vload(f + o), rk = vload(r + o), c0 = vload(cp + o), c1 = vload(cp + kBlock + o);
    const Vec w = vload_mask(ut + o, m), xk = vload_mask(s.x + row * s.d + j0 + o, m);
    const Vec gh = vload_mask(g.gh + row * s.d + j0 + o, m);
    const Vec gc = vfma(gh, rk, vload(a.dc + o));
    const Vec grr = vmul(vmul(gh, vsub(c1, xk)), vmul(rk, vsub(one, rk)));
    const Vec gff = vmul(vmul(gc, vsub(c0, w)), vmul(fk, vsub(one, fk)));
    vstore_mask(g.gx + row * s.d + j0 + o, vmul(gh, vsub(one, rk)), m);
    vstore_mask(gut + o, vmul(gc, vsub(one, fk)), m);
    vstore_mask(gut + s.d + o, gff, m);
    vstore_mask(gut + 2 * s.d + o, grr, m);
    vstore(a.dc + o, vfma(grr, vload_mask(s.vr + j0 + o, m), vfma(gff, vload_mask(s.vf + j0 + o, m), vmul(gc, fk))));
    vstore(a.gvf + o, vfma(gff, c0, vload(a.gvf + o)));
    vstore(a.gvr + o, vfma(grr, c0, vload(a.gvr + o)));
    vstore(a.gbf + o, vadd(vload(a.gbf + o), gff));
    vstore(a.gbr + o, vadd(vload(a.gbr + o), grr));
  }
}

// The parameter gradients of one task into gp (4, B, d).
void store_param_grads(const Sru& s, const Grads& g, int64_t b, int64_t j0, const Carry& a) {
  const int64_t plane = s.B * s.d;
  for (int k = 0; k < kVecs; ++k) {
    const uint32_t m = lanes_of(s, j0, k);
    const int64_t o = static_cast<int64_t>(k) * kL;
    float* at = g.gp + b * s.d + j0 + o;
    vstore_mask(at, vload(a.gvf + o), m);
    vstore_mask(at + plane, vload(a.gvr + o), m);
    vstore_mask(at + 2 * plane, vload(a.gbf + o), m);
    vstore_mask(at + 3 * plane, vload(a.gbr + o), m);
  }
}

void check_f32_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "sru_recurrence (CPU): ",
              name, " must be a contiguous CPU float32 tensor");
}

Sru make_sru(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
             const at::Tensor& b_f, const at::Tensor& b_r) {
  check_f32_contiguous(u, "u");
  check_f32_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 3 && u.dim() == 3, "sru_recurrence (CPU): u and x must be 3-D");
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
  TORCH_CHECK(u.size(0) == B && u.size(1) == T && u.size(2) == 3 * d, "sru_recurrence (CPU): u must be (B, T, 3d)");
  const char* names[] = {"v_f", "v_r", "b_f", "b_r"};
  const at::Tensor* params[] = {&v_f, &v_r, &b_f, &b_r};
  for (int i = 0; i < 4; ++i) {
    check_f32_contiguous(*params[i], names[i]);
    TORCH_CHECK(params[i]->numel() == d, "sru_recurrence (CPU): ", names[i], " must have d elements");
  }
  return {u.data_ptr<float>(), x.data_ptr<float>(), v_f.data_ptr<float>(), v_r.data_ptr<float>(),
          b_f.data_ptr<float>(), b_r.data_ptr<float>(), B, T, d, (d + kBlock - 1) / kBlock};
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_f32_contiguous(t, name);
  TORCH_CHECK(t.sizes() == like.sizes(), "sru_recurrence (CPU): ", name, " has the wrong shape");
}

}  // namespace

namespace sparsekern {
namespace cpu {

void sru_recurrence_cpu(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v_f, const at::Tensor& v_r,
                        const at::Tensor& b_f, const at::Tensor& b_r, at::Tensor& h) {
  const Sru s = make_sru(u, x, v_f, v_r, b_f, b_r);
  check_like(h, x, "h");
  float* hp = h.data_ptr<float>();
  parallel(s.B * s.blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> c(static_cast<size_t>(kGroup * kBlock));
    for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
      const int64_t g1 = std::min(end, g0 + kGroup);
      std::fill(c.begin(), c.end(), 0.f);
      for (int64_t t = 0; t < s.T; ++t) {
        for (int64_t task = g0; task < g1; ++task) {
          forward_step(s, task / s.blocks, (task % s.blocks) * kBlock, t, c.data() + (task - g0) * kBlock, hp);
        }
      }
    }
  }, "sru_recurrence");
}

void sru_recurrence_backward_cpu(const at::Tensor& grad_h, const at::Tensor& u, const at::Tensor& x,
                                 const at::Tensor& v_f, const at::Tensor& v_r, const at::Tensor& b_f,
                                 const at::Tensor& b_r, at::Tensor& grad_u, at::Tensor& grad_x,
                                 at::Tensor& grad_params) {
  const Sru s = make_sru(u, x, v_f, v_r, b_f, b_r);
  check_like(grad_h, x, "grad_h");
  check_like(grad_x, x, "grad_x");
  check_like(grad_u, u, "grad_u");
  check_f32_contiguous(grad_params, "grad_params");
  TORCH_CHECK(grad_params.numel() == 4 * s.B * s.d, "sru_recurrence (CPU): grad_params must be (4, B, d)");
  const Grads g{grad_h.data_ptr<float>(), grad_u.data_ptr<float>(), grad_x.data_ptr<float>(),
                grad_params.data_ptr<float>()};
  const int64_t per_task = (s.T + 1) * kBlock;  // c_0 = 0, then c_1..c_T
  parallel(s.B * s.blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(static_cast<size_t>(kGroup * per_task));
    std::vector<float> carry(static_cast<size_t>(kGroup * 5 * kBlock));
    for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
      const int64_t g1 = std::min(end, g0 + kGroup);
      std::fill(cs.begin(), cs.end(), 0.f);
      std::fill(carry.begin(), carry.end(), 0.f);
      for (int64_t t = 0; t < s.T; ++t) {  // recompute c: each step writes c_{t+1} from a copy of c_t
        for (int64_t task = g0; task < g1; ++task) {
          float* c = cs.data() + (task - g0) * per_task + (t + 1) * kBlock;
          std::memcpy(c, c - kBlock, kBlock * sizeof(float));
          forward_step(s, task / s.blocks, (task % s.blocks) * kBlock, t, c, nullptr);
        }
      }
      for (int64_t t = s.T - 1; t >= 0; --t) {
        for (int64_t task = g0; task < g1; ++task) {
          backward_step(s, g, task / s.blocks, (task % s.blocks) * kBlock, t, cs.data() + (task - g0) * per_task,
                        carry_of(carry.data() + (task - g0) * 5 * kBlock));
        }
      }
      for (int64_t task = g0; task < g1; ++task) {
        store_param_grads(s, g, task / s.blocks, (task % s.blocks) * kBlock,
                          carry_of(carry.data() + (task - g0) * 5 * kBlock));
      }
    }
  }, "sru_recurrence_backward");
}

}  // namespace cpu
}  // namespace sparsekern
