// CPU kernel of the torch operator sparsekern::_layer_norm_fold (schema, reference and the pass that uses it:
// sparsekern/ops/layer_norm_fold.py): the end of a LayerNorm folded into the linear map that follows it.
//
// A LayerNorm over the last dimension (d) followed by a linear map A (r x d) gives, per row x,
//
//   LN(x) A^T = rstd (x - mu) W^T + A beta,   W = A diag(gamma),  mu = mean(x),  rstd = 1 / sqrt(var(x) + eps)
//             = rstd (x W^T - mu W 1) + A beta.
//
// The caller computes z = x W^T on the raw rows (a prepacked matmul, no normalised copy of x written and read);
// this kernel computes each row's mu and rstd in two passes over the row (kept in L1) and finishes
// t = rstd (z - mu s) + c with s = W 1 and c = A beta (+ a bias). Subtracting mu s after the product loses
// accuracy in proportion to |mu| rstd (the rounding of x W^T scales with |mu| + sigma rather than sigma): a row
// with |mu| rstd > max_offset is computed from its centred values instead, (x - mu) W^T, so the result stays
// within a bounded factor of the unfused computation's rounding for every input.
#include "cpu/common.h"
#include "ops.h"

#include <algorithm>
#include <cmath>

namespace sparsekern {
namespace cpu {
namespace {

// Mean and 1 / sqrt(biased variance + eps) of the d values at x (the statistics torch's layer_norm uses), by the
// corrected two-pass algorithm (Chan, Golub and LeVeque, 1983): a first mean m, then the sums of x - m and of
// (x - m)^2, so that neither the mean nor the variance loses digits to a large offset of the row.
inline void row_moments(const float* x, int64_t d, float eps, float& mean, float& rstd) {
  const int64_t full = d / kL * kL;
  Vec acc = vzero();
  for (int64_t c = 0; c < full; c += kL) acc = vadd(acc, vload(x + c));
  float sum = hsum(acc);
  for (int64_t c = full; c < d; ++c) sum += x[c];
  const float m = sum / static_cast<float>(d);
  const Vec neg_m = vset1(-m);
  Vec dev = vzero(), sq = vzero();
  for (int64_t c = 0; c < full; c += kL) {
    const Vec diff = vadd(vload(x + c), neg_m);
    dev = vadd(dev, diff);
    sq = vfma(diff, diff, sq);
  }
  float dev_sum = hsum(dev), sq_sum = hsum(sq);
  for (int64_t c = full; c < d; ++c) {
    dev_sum += x[c] - m;
    sq_sum += (x[c] - m) * (x[c] - m);
  }
  const float n = static_cast<float>(d);
  mean = m + dev_sum / n;
  rstd = 1.0f / std::sqrt(std::max(sq_sum - dev_sum * dev_sum / n, 0.0f) / n + eps);
}

}  // namespace

at::Tensor layer_norm_fold_cpu(const at::Tensor& z, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& row_sum, const at::Tensor& shift, double eps, double max_offset) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  row_sum.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat,
              "_layer_norm_fold (cpu): float32 tensors expected, got z ", z.scalar_type(), ", x ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && z.dim() == x.dim() && x.size(-1) == weight.size(1) &&
                  z.size(-1) == weight.size(0) && row_sum.numel() == weight.size(0) &&
                  shift.numel() == weight.size(0),
              "_layer_norm_fold (cpu): x (..., d), z (..., r), weight (r, d), row_sum and shift (r,) expected, got x ",
              x.sizes(), ", z ", z.sizes(), ", weight ", weight.sizes(), ", row_sum ", row_sum.sizes(), ", shift ",
              shift.sizes());
  TORCH_CHECK(z.sizes().slice(0, z.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "_layer_norm_fold (cpu): z and x must have the same leading shape, got z ", z.sizes(), " and x ",
              x.sizes());
  const int64_t d = weight.size(1), r = weight.size(0);
  TORCH_CHECK(d > 0, "_layer_norm_fold (cpu): a LayerNorm over 0 features has no statistics");
  const int64_t rows = x.numel() / d;
  const at::Tensor xc = x.contiguous(), zc = z.contiguous(), wc = weight.contiguous(), sc = row_sum.contiguous(),
                   cc = shift.contiguous();
  at::Tensor t = at::empty(z.sizes(), z.options());
  const float *xd = xc.data_ptr<float>(), *zd = zc.data_ptr<float>(), *wd = wc.data_ptr<float>(),
              *sd = sc.data_ptr<float>(), *cd = cc.data_ptr<float>();
  float* td = t.data_ptr<float>();
  const float epsf = static_cast<float>(eps), limit = static_cast<float>(max_offset);
  const int64_t r_full = r / kL * kL;
  const uint32_t tail = static_cast<uint32_t>((1u << (r - r_full)) - 1u);
  parallel(rows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = xd + row * d;
      const float* zr = zd + row * r;
      float* tr = td + row * r;
      float mean, rstd;
      row_moments(xr, d, epsf, mean, rstd);
      if (std::fabs(mean) * rstd <= limit) {  // t = rstd z + (c - mu rstd s)
        const Vec a = vset1(rstd), b = vset1(-mean * rstd);
        for (int64_t j = 0; j < r_full; j += kL)
          vstore(tr + j, vfma(a, vload(zr + j), vfma(b, vload(sd + j), vload(cd + j))));
        if (tail)
          vstore_mask(tr + r_full, vfma(a, vload_mask(zr + r_full, tail),
                                        vfma(b, vload_mask(sd + r_full, tail), vload_mask(cd + r_full, tail))),
                      tail);
      } else {  // a large offset: the product of the centred row, not z
        for (int64_t j = 0; j < r; ++j) {
          const float* wj = wd + j * d;
          float dot = 0.0f;
          for (int64_t c = 0; c < d; ++c) dot += (xr[c] - mean) * wj[c];
          tr[j] = rstd * dot + cd[j];
        }
      }
    }
  }, "_layer_norm_fold");
  return t;
}

}  // namespace cpu
}  // namespace sparsekern
