// zhtune's elementwise CPU kernels for bf16 training (AVX-512 with bf16), each one pass in fp32
// rounded once, where PyTorch's eager ops write and read intermediates and torch.compile costs
// Dynamo's tracing in every process:
//
// * cross_entropy_columns_: a chunk of transposed bf16 logits' loss and (scaled) gradient in
//   place (zhtune.train.loss);
// * rms_norm / rms_norm_backward: LLaMA's RMSNorm of bf16 rows with a bf16 weight (add_rms_norm:
//   the residual add before it in the same pass), and
//   narrow_rms_norm / narrow_rms_norm_backward: of fp32 rows handing bf16 on (zhtune.train.fused);
// * swiglu / swiglu_backward: silu(gate) * up of LoRA's stacked gate|up rows and its gradient as
//   one stacked tensor (zhtune.train.fused.StackedSwiGLU);
// * rotary / rotary_backward: LLaMA's rotary embedding of bf16 queries or keys
//   (zhtune.train.rope);
// * transpose: a bf16 matrix transposed, for a weight gradient's matmul (zhtune.train.fused).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"
#include "vnni.h"

namespace {

using at::BFloat16;

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

inline __m512 load(const BFloat16* x, __mmask16 m) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, x));
}

// The cross-entropy of logits laid out (vocab, cols): column j < n holds a labelled
// position's logits, columns from n on are padding. The output layer's product is ~2x faster
// computed as W h^T than as h W^T (oneDNN need not repack the 56 MB weight into its blocked
// layout for every chunk: SmolLM2's 256 x 49k logits 5.2 against 10.1 ms).
//
// Column j is overwritten with its gradient times its sum of exponentials s_j, s_j (softmax -
// one_hot) = exp(x - max) with s_j subtracted at the target (rounded to bf16 once, from fp64),
// and 1/s_j is returned for the caller to scale the small products of the gradient with (the
// hidden rows' gradient, (cols, h)). Scaled in place, the gradient would need the sum before a
// second pass of exponentials: one exponential per logit here, where that took two (3.4 against
// ~2 ms for 256 x 49k). Subtracting s_j at the target keeps the one-hot inside the product's
// fp32 accumulation, so a confident token's small gradient (p_t close to 1) is not the
// difference of two rounded numbers.
//
// Each thread takes a contiguous range of vocabulary rows (memory read in order: threads walking
// columns down the rows were ~2.5x slower): a pass for each column's maximum over its rows, the
// threads' maxima combined, then a pass writing exp(x - max) and summing it (fp32 over a block
// of rows, then fp64: one column's sum takes ~25k terms a thread, one at a time; fp32 throughout
// drifted ~2e-6 from the fp64 loss, 10x the error of the row-layout kernel this replaced). Where
// PyTorch's ops would write and read fp32 copies of the whole chunk (log-softmax, exp, the
// one-hot subtraction, the cast to bf16), two passes over the bf16 logits.
constexpr int64_t kColumnBlock = 32;  // vocabulary rows a block: 16 KB of 256 columns, in L1

inline __m256 half(__m512 v, int i) {
  return i == 0 ? _mm512_castps512_ps256(v) : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_columns_(at::Tensor& logits, const at::Tensor& targets, int64_t n) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kBFloat16 && logits.is_contiguous(),
              "logits must be contiguous bf16 (vocab, cols)");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) >= n && n <= logits.size(1),
              "targets must be int64 with a target for each of the first n columns");
  const int64_t vocab = logits.size(0), cols = logits.size(1);
  auto t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(tp[j] >= 0 && tp[j] < vocab, "target ", tp[j], " out of the vocabulary");
  BFloat16* x = logits.data_ptr<BFloat16>();
  const int vecs = static_cast<int>((cols + 15) / 16);
  const int64_t width = 16 * vecs;
  std::vector<__mmask16> lanes(vecs), labelled(vecs);
  for (int k = 0; k < vecs; ++k) {
    lanes[k] = tail_mask(cols - 16 * k);
    labelled[k] = 16 * k < n ? static_cast<__mmask16>(lanes[k] & tail_mask(n - 16 * k)) : 0;
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (vocab + kColumnBlock - 1) / kColumnBlock));
  const int64_t rows = (vocab + parts - 1) / parts;
  // Each part's rows, in blocks, groups of four column vectors a block: body(v0, v1, k0, nk).
  auto blocks = [&](int64_t p, auto&& body) {
    const int64_t end = std::min(vocab, (p + 1) * rows);
    for (int64_t v0 = p * rows; v0 < end; v0 += kColumnBlock)
      for (int k0 = 0; k0 < vecs; k0 += 4) body(v0, std::min(end, v0 + kColumnBlock), k0, std::min(4, vecs - k0));
  };
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> mx(parts * width, ninf), top(width, ninf);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      blocks(p, [&](int64_t v0, int64_t v1, int k0, int nk) {
        float* m = mx.data() + p * width + 16 * k0;
        __m512 acc[4];
        for (int k = 0; k < nk; ++k) acc[k] = _mm512_loadu_ps(m + 16 * k);
        for (int64_t v = v0; v < v1; ++v)
          for (int k = 0; k < nk; ++k)
            acc[k] = _mm512_mask_max_ps(acc[k], lanes[k0 + k], acc[k], load(x + v * cols + 16 * (k0 + k), lanes[k0 + k]));
        for (int k = 0; k < nk; ++k) _mm512_storeu_ps(m + 16 * k, acc[k]);
      });
  });
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t j = 0; j < cols; ++j) top[j] = std::max(top[j], mx[p * width + j]);
  std::vector<float> target_logit(n);
  for (int64_t j = 0; j < n; ++j) target_logit[j] = static_cast<float>(x[tp[j] * cols + j]);
  std::vector<double> sums(parts * width, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      blocks(p, [&](int64_t v0, int64_t v1, int k0, int nk) {
        __m512 acc[4], m[4];
        for (int k = 0; k < nk; ++k) acc[k] = _mm512_setzero_ps(), m[k] = _mm512_loadu_ps(top.data() + 16 * (k0 + k));
        for (int64_t v = v0; v < v1; ++v)
          for (int k = 0; k < nk; ++k) {
            BFloat16* q = x + v * cols + 16 * (k0 + k);
            const __m512 e = _mm512_maskz_mov_ps(labelled[k0 + k], zhtune_vec::exp(_mm512_sub_ps(load(q, lanes[k0 + k]), m[k])));
            _mm256_mask_storeu_epi16(q, lanes[k0 + k], (__m256i)_mm512_cvtneps_pbh(e));
            acc[k] = _mm512_add_ps(acc[k], e);
          }
        for (int k = 0; k < nk; ++k)
          for (int i = 0; i < 2; ++i) {
            double* s = sums.data() + p * width + 16 * (k0 + k) + 8 * i;
            _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s), _mm512_cvtps_pd(half(acc[k], i))));
          }
      });
  });
  auto inv_sum = at::empty({cols}, logits.options().dtype(at::kFloat));
  float* inv = inv_sum.data_ptr<float>();
  double loss = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0.0;
    for (int64_t p = 0; p < parts; ++p) s += sums[p * width + j];
    if (j >= n) {  // (padding: its column was written as zeros)
      inv[j] = 0.f;
      continue;
    }
    inv[j] = static_cast<float>(1.0 / s);
    loss += top[j] + std::log(s) - target_logit[j];
    x[tp[j] * cols + j] = static_cast<BFloat16>(static_cast<float>(std::exp(static_cast<double>(target_logit[j]) - top[j]) - s));
  }
  return {at::scalar_tensor(loss, logits.options().dtype(at::kFloat)), inv_sum};
}

// ---- RMSNorm: y = w * bf16(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), per row of h values.

inline void store16(BFloat16* dst, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(v)); }

inline float row_rstd(const BFloat16* x, int64_t h, double eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < h; c += 16) {
    const __m512 v = load(x + c, tail_mask(h - c));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(h) + static_cast<float>(eps));
}

// One row: y = w * bf16(x * rstd), each product rounded once; returns rstd.
inline float normalize_row(const BFloat16* xr, const BFloat16* wp, int64_t h, double eps, BFloat16* yr) {
  const float s = row_rstd(xr, h, eps);
  for (int64_t c = 0; c < h; c += 16) {
    const __mmask16 m = tail_mask(h - c);
    const __m512 normed = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_mul_ps(load(xr + c, m), _mm512_set1_ps(s))));
    store16(yr + c, _mm512_mul_ps(normed, load(wp + c, m)), m);
  }
  return s;
}

// The norm's outputs for rows x (..., h): y (..., h + extra) bf16 and rstd (n) fp32.
std::pair<at::Tensor, at::Tensor> norm_outputs(const at::Tensor& x, int64_t extra) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() += extra;
  return {at::empty(shape, x.options()), at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat))};
}

// `extra` > 0: y is allocated `extra` columns wider, (..., h + extra), its first h columns written
// and the rest left for the caller (zhtune.train.lora.StackedLora writes the LoRA input
// projection x A^T there: the widened input [y, y A^T] of its one product without a copy).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps, int64_t extra) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && w_.scalar_type() == at::kBFloat16 && w_.dim() == 1 &&
                  x_.size(-1) == w_.size(0), "rms_norm: bf16 rows and a bf16 weight of their width");
  TORCH_CHECK(extra >= 0, "rms_norm: extra columns must be >= 0");
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  const int64_t h = x.size(-1), n = x.numel() / h, ld = h + extra;
  auto [y, rstd] = norm_outputs(x, extra);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const BFloat16* wp = w.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rp[r] = normalize_row(xp + r * h, wp, h, eps, yp + r * ld);
  });
  return {y, rstd};
}

// The residual stream's add and the norm after it in one pass (zhtune.train.residual.ResidualRMSNorm):
// h = bf16(x + delta), as PyTorch's bf16 add rounds it, then rms_norm of h (the row just written,
// read back from the core's cache), y extra columns wider as there. Returns (h, y, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_, const at::Tensor& delta_,
                                                            const at::Tensor& w_, double eps, int64_t extra) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && delta_.scalar_type() == at::kBFloat16 && w_.scalar_type() == at::kBFloat16 &&
                  x_.sizes() == delta_.sizes() && w_.dim() == 1 && x_.size(-1) == w_.size(0) && extra >= 0,
              "add_rms_norm: two bf16 tensors of one shape, a bf16 weight of their width");
  auto x = x_.contiguous();
  auto delta = delta_.contiguous();
  auto w = w_.contiguous();
  const int64_t h = x.size(-1), n = x.numel() / h, ld = h + extra;
  auto sum = at::empty_like(x);
  auto [y, rstd] = norm_outputs(x, extra);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const BFloat16* dp = delta.data_ptr<BFloat16>();
  const BFloat16* wp = w.data_ptr<BFloat16>();
  BFloat16* hp = sum.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < h; c += 16) {
        const __mmask16 m = tail_mask(h - c);
        store16(hp + r * h + c, _mm512_add_ps(load(xp + r * h + c, m), load(dp + r * h + c, m)), m);
      }
      rp[r] = normalize_row(hp + r * h, wp, h, eps, yp + r * ld);
    }
  });
  return {sum, y, rstd};
}

inline __m512 load_any(const BFloat16* p, __mmask16 m) { return load(p, m); }
inline __m512 load_any(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store_any(BFloat16* p, __m512 v, __mmask16 m) { store16(p, v, m); }
inline void store_any(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// RMSNorm's closed-form backward over n rows of h, on ATen's threads: dx = rstd * (g - xhat *
// mean(g * xhat)), g = grad * w, where xhat(r, c, m) is row r's normalised input (fp32) at columns
// c..c+15; and, when weight_grad, the weight's gradient: the sum over rows of grad * bf16(xhat)
// (fp32, h; per-thread partial sums added at the end), else an undefined tensor.
// The gradient's rows lie gld apart (h, or a wider buffer's row: see bf16_rows). rg (rows rld
// apart), when not null: a second gradient of x (from the residual connection that also reads
// it), added to the norm's as autograd would add the two: dx = bf16(bf16(dx_norm) + rg).
template <typename W, typename D, typename XHat>
at::Tensor rms_norm_rows_backward(int64_t n, int64_t h, const BFloat16* gp, int64_t gld, const W* wp, const float* rp,
                                  D* dp, bool weight_grad, const at::TensorOptions& options, const XHat& xhat,
                                  const BFloat16* rg = nullptr, int64_t rld = 0) {
  auto partial = at::zeros({weight_grad ? at::get_num_threads() : 0, h}, options.dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    float* dw = weight_grad ? pp + at::get_thread_num() * h : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const BFloat16* gr = gp + r * gld;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < h; c += 16) {
        const __mmask16 m = tail_mask(h - c);
        acc = _mm512_fmadd_ps(_mm512_mul_ps(load(gr + c, m), load_any(wp + c, m)), xhat(r, c, m), acc);
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(h));
      const __m512 s = _mm512_set1_ps(rp[r]);
      for (int64_t c = 0; c < h; c += 16) {
        const __mmask16 m = tail_mask(h - c);
        const __m512 xh = xhat(r, c, m), gv = load(gr + c, m);
        __m512 dx = _mm512_mul_ps(s, _mm512_fnmadd_ps(xh, mean, _mm512_mul_ps(gv, load_any(wp + c, m))));
        if (rg) dx = _mm512_add_ps(_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(dx)), load(rg + r * rld + c, m));
        store_any(dp + r * h + c, dx, m);
        if (dw) {
          const __m512 rounded = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(xh));
          _mm512_mask_storeu_ps(dw + c, m, _mm512_fmadd_ps(gv, rounded, _mm512_maskz_loadu_ps(m, dw + c)));
        }
      }
    }
  });
  return weight_grad ? partial.sum(0) : at::Tensor();
}

// t (..., h) in bf16 as rows of h values ld apart: t itself where its rows are evenly spaced with
// unit column stride, as a view of the first h columns of a wider buffer is (the input gradient
// that zhtune.train.lora.StackedLora computes in one product with its low-rank part), else a
// contiguous copy.
std::pair<at::Tensor, int64_t> bf16_rows(const at::Tensor& t) {
  auto x = t.to(at::kBFloat16);
  const int64_t d = x.dim(), h = x.size(-1);
  bool even = d >= 2 && x.stride(d - 1) == 1 && x.stride(d - 2) >= h;
  for (int64_t i = 0; even && i + 2 < d; ++i) even = x.stride(i) == x.stride(i + 1) * x.size(i + 1);
  if (!even) x = x.contiguous();
  return {x, even ? x.stride(d - 2) : h};
}

// The bf16 norm's backward: xhat = x * rstd in fp32, dx bf16, dw in the weight's dtype.
// residual: x's gradient from its other reader (zhtune.train.residual.ResidualRMSNorm), added in.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_, const at::Tensor& x_,
                                                     const at::Tensor& rstd, const at::Tensor& w_, bool weight_grad,
                                                     const c10::optional<at::Tensor>& residual_) {
  auto [grad, gld] = bf16_rows(grad_);
  at::Tensor residual;
  int64_t rld = 0;
  if (residual_.has_value() && residual_->defined()) {
    TORCH_CHECK(residual_->sizes() == x_.sizes(), "rms_norm_backward: the residual gradient must be x's shape");
    std::tie(residual, rld) = bf16_rows(*residual_);
  }
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  const int64_t h = x.size(-1), n = x.numel() / h;
  auto dx = at::empty_like(x);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const float* rp = rstd.data_ptr<float>();
  auto dw = rms_norm_rows_backward(
      n, h, grad.data_ptr<BFloat16>(), gld, w.data_ptr<BFloat16>(), rp, dx.data_ptr<BFloat16>(), weight_grad, x.options(),
      [&](int64_t r, int64_t c, __mmask16 m) { return _mm512_mul_ps(load(xp + r * h + c, m), _mm512_set1_ps(rp[r])); },
      residual.defined() ? residual.data_ptr<BFloat16>() : nullptr, rld);
  return {dx, weight_grad ? dw.to(w.scalar_type()) : dw};
}

// ---- RMSNorm of wide (fp32) rows handing bf16 on (full fine-tuning's residual stream under bf16
// autocast): y = bf16(w * x * rstd), xhat = bf16(x * rstd), rstd fp32; backward from xhat:
// dx = rstd (g w - xhat mean(g w xhat)) in fp32, dw = sum over rows of g xhat.

std::tuple<at::Tensor, at::Tensor, at::Tensor> narrow_rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat && x_.dim() == 2 && x_.size(1) == w_.size(0),
              "narrow_rms_norm: fp32 rows (n, h) and an fp32 weight (h,)");
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  const int64_t n = x.size(0), h = x.size(1);
  auto y = at::empty({n, h}, x.options().dtype(at::kBFloat16));
  auto xhat = at::empty({n, h}, x.options().dtype(at::kBFloat16));
  auto rstd = at::empty({n, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  BFloat16* hp = xhat.data_ptr<BFloat16>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * h;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < h; c += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(h - c), xr + c);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float s = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(h) + static_cast<float>(eps));
      rp[r] = s;
      for (int64_t c = 0; c < h; c += 16) {
        const __mmask16 m = tail_mask(h - c);
        const __m512 normed = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), _mm512_set1_ps(s));
        store16(hp + r * h + c, normed, m);
        store16(yp + r * h + c, _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(m, wp + c)), m);
      }
    }
  });
  return {y, xhat, rstd};
}

// The narrow norm's backward: xhat the saved bf16 one (so its rounding for dw is exact), dx and dw fp32.
std::tuple<at::Tensor, at::Tensor> narrow_rms_norm_backward(const at::Tensor& grad_, const at::Tensor& xhat_,
                                                            const at::Tensor& rstd_, const at::Tensor& w_, bool weight_grad) {
  auto grad = grad_.to(at::kBFloat16).contiguous();
  auto xhat = xhat_.contiguous();
  auto rstd = rstd_.contiguous();
  auto w = w_.contiguous();
  const int64_t n = xhat.size(0), h = xhat.size(1);
  auto dx = at::empty({n, h}, w.options());
  const BFloat16* hp = xhat.data_ptr<BFloat16>();
  auto dw = rms_norm_rows_backward(
      n, h, grad.data_ptr<BFloat16>(), h, w.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<float>(), weight_grad,
      w.options(), [&](int64_t r, int64_t c, __mmask16 m) { return load(hp + r * h + c, m); });
  return {dx, dw};
}

// ---- SwiGLU of stacked rows gate|up (n, 2 inter): silu(gate) * up, and its stacked gradient.

inline __m512 sigmoid(__m512 g) {
  const __m512 e = zhtune_vec::exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

at::Tensor swiglu(const at::Tensor& gate_up_) {
  TORCH_CHECK(gate_up_.scalar_type() == at::kBFloat16 && gate_up_.size(-1) % 2 == 0, "swiglu: bf16 gate|up rows");
  auto gu = gate_up_.contiguous();
  const int64_t inter = gu.size(-1) / 2, n = gu.numel() / (2 * inter);
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = inter;
  auto out = at::empty(shape, gu.options());
  const BFloat16* gp = gu.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < inter; c += 16) {
        const __mmask16 m = tail_mask(inter - c);
        const __m512 g = load(gp + r * 2 * inter + c, m), u = load(gp + r * 2 * inter + inter + c, m);
        store16(op + r * inter + c, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u), m);
      }
  });
  return out;
}

// d gate = grad * up * s (1 + gate (1 - s)), d up = grad * gate * s, s = sigmoid(gate); side by side.
at::Tensor swiglu_backward(const at::Tensor& grad_, const at::Tensor& gate_up_) {
  auto gu = gate_up_.contiguous();
  auto grad = grad_.to(at::kBFloat16).contiguous();
  const int64_t inter = gu.size(-1) / 2, n = gu.numel() / (2 * inter);
  auto out = at::empty_like(gu);
  const BFloat16* gp = gu.data_ptr<BFloat16>();
  const BFloat16* dp = grad.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < inter; c += 16) {
        const __mmask16 m = tail_mask(inter - c);
        const __m512 g = load(gp + r * 2 * inter + c, m), u = load(gp + r * 2 * inter + inter + c, m);
        const __m512 d = load(dp + r * inter + c, m), s = sigmoid(g);
        const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
        store16(op + r * 2 * inter + c, _mm512_mul_ps(_mm512_mul_ps(d, u), dsilu), m);
        store16(op + r * 2 * inter + inter + c, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), m);
      }
  });
  return out;
}

// ---- Rotary embedding: x * cos + rotate_half(x) * sin over the head dim, per (row, head, token);
// backward: g * cos + rotate_half^T(g * sin). x (b, heads, t, d) in any strides with a contiguous
// d; cos, sin (b, t, d) bf16 or fp32. The result is laid out (b, t, heads, d) (the projections'
// layout), returned as the (b, heads, t, d) view; rotary_backward_into writes the gradient into
// given (b, t, heads, d) columns of a wider (b, t, width) tensor instead (the stacked q/k/v
// product's gradient, zhtune.train.rope.NativeQKVRotary: no concatenation of q's, k's and v's).

// 16 table values as fp32: a bf16 table's widened exactly (what .to(float) would give).
inline __m512 load_table(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_table(const BFloat16* p) { return load(p, 0xFFFF); }

// Token (bi, ti)'s head hi written at op + (bi t + ti) out_token + hi d.
template <bool Backward, typename T>
void rotary_rows(const at::Tensor& xb, const T* cp, const T* sp, BFloat16* op, int64_t out_token) {
  const int64_t b = xb.size(0), heads = xb.size(1), t = xb.size(2), d = xb.size(3), half = d / 2;
  const BFloat16* xp = xb.data_ptr<BFloat16>();
  const int64_t sb = xb.stride(0), sh = xb.stride(1), st = xb.stride(2);
  at::parallel_for(0, b * t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t bi = bt / t, ti = bt % t;
      const T* cr = cp + bt * d;
      const T* sr = sp + bt * d;
      for (int64_t hi = 0; hi < heads; ++hi) {
        const BFloat16* xr = xp + bi * sb + hi * sh + ti * st;
        BFloat16* orow = op + bt * out_token + hi * d;
        for (int64_t c = 0; c < half; c += 16) {
          const __m512 a = load(xr + c, 0xFFFF), z = load(xr + half + c, 0xFFFF);
          const __m512 ca = load_table(cr + c), cz = load_table(cr + half + c);
          const __m512 sa = load_table(sr + c), sz = load_table(sr + half + c);
          if constexpr (!Backward) {  // [a, z] -> [a cos - z sin, z cos + a sin]
            store16(orow + c, _mm512_fnmadd_ps(z, sa, _mm512_mul_ps(a, ca)), 0xFFFF);
            store16(orow + half + c, _mm512_fmadd_ps(a, sz, _mm512_mul_ps(z, cz)), 0xFFFF);
          } else {  // the transpose: [a cos + z sin, z cos - a sin]
            store16(orow + c, _mm512_fmadd_ps(z, sz, _mm512_mul_ps(a, ca)), 0xFFFF);
            store16(orow + half + c, _mm512_fnmadd_ps(a, sa, _mm512_mul_ps(z, cz)), 0xFFFF);
          }
        }
      }
    }
  });
}

// The tables are read in their own dtype (transformers hands bf16 ones to a bf16 model): a
// conversion to fp32 per call was 8 copies a layer, ~1% of a SmolLM2 LoRA step.
template <bool Backward>
void rotary_to(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_, BFloat16* op, int64_t out_token) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 32 == 0, "rotary: (b, heads, t, d), d a multiple of 32");
  TORCH_CHECK(cos_.dim() == 3 && cos_.size(0) == x.size(0) && cos_.size(1) == x.size(2) && cos_.size(2) == x.size(3),
              "rotary: cos and sin (b, t, d)");
  auto xb = x.to(at::kBFloat16);
  if (cos_.scalar_type() == at::kBFloat16 && sin_.scalar_type() == at::kBFloat16) {
    auto cos = cos_.contiguous(), sin = sin_.contiguous();
    rotary_rows<Backward>(xb, cos.data_ptr<BFloat16>(), sin.data_ptr<BFloat16>(), op, out_token);
  } else {
    auto cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
    rotary_rows<Backward>(xb, cos.data_ptr<float>(), sin.data_ptr<float>(), op, out_token);
  }
}

template <bool Backward>
at::Tensor rotary_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  auto out = at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options().dtype(at::kBFloat16));
  rotary_to<Backward>(x, cos, sin, out.data_ptr<BFloat16>(), x.size(1) * x.size(3));
  return out.transpose(1, 2);
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) { return rotary_impl<false>(x, cos, sin); }
at::Tensor rotary_backward(const at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin) { return rotary_impl<true>(g, cos, sin); }

// out: (b, t, heads, d) bf16 columns of a (b, t, width) tensor, d contiguous, tokens evenly spaced.
void rotary_backward_into(const at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 4 && g.dim() == 4 && out.size(0) == g.size(0) &&
                  out.size(1) == g.size(2) && out.size(2) == g.size(1) && out.size(3) == g.size(3) &&
                  out.stride(3) == 1 && out.stride(2) == out.size(3) && out.stride(0) == out.size(1) * out.stride(1),
              "rotary_backward_into: out must be bf16 (b, t, heads, d) columns of evenly spaced tokens");
  rotary_to<true>(g, cos, sin, out.data_ptr<BFloat16>(), out.stride(1));
}

// x (n, c) bf16 with contiguous rows -> x^T (c, n) contiguous; n a multiple of 32, c of 16. Each
// block of 32 rows is interleaved in pairs (16 rows of 32-bit pairs, in the thread's cache) and
// transposed as 32-bit elements: column j of the pairs is row j of x^T. PyTorch's strided copy
// (x.T.contiguous()) takes ~6 ms for SmolLM2's (2048, 3072) gradient; this ~0.8 ms.
at::Tensor transpose(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x must be 2-D bf16 with contiguous rows");
  const int64_t n = x.size(0), c = x.size(1), ld = x.stride(0);
  TORCH_CHECK(n % 32 == 0 && c % 16 == 0, "x's rows must be a multiple of 32 and its columns of 16");
  auto out = at::empty({c, n}, x.options());
  const BFloat16* xp = x.data_ptr<BFloat16>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<BFloat16>());
  at::parallel_for(0, n / 32, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<BFloat16> pairs;
    pairs.resize(32 * c);
    for (int64_t b = begin; b < end; ++b) {
      zhtune_vnni::interleave_rows(xp + b * 32 * ld, ld, 32, 32, c, pairs.data());
      zhtune_vnni::transpose32(reinterpret_cast<const uint32_t*>(pairs.data()), c, 16, 16, c, op + b * 16, n / 2);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(zhtune_cpu_ops, m) {
  m.def("cross_entropy_columns_(Tensor(a!) logits, Tensor targets, int n) -> (Tensor, Tensor)", &cross_entropy_columns_);
  m.def("rms_norm(Tensor x, Tensor weight, float eps, int extra=0) -> (Tensor, Tensor)", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, int extra=0) -> (Tensor, Tensor, Tensor)", &add_rms_norm);
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor rstd, Tensor weight, bool weight_grad, Tensor? residual=None) -> (Tensor, Tensor)",
        &rms_norm_backward);
  m.def("narrow_rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)", &narrow_rms_norm);
  m.def("narrow_rms_norm_backward(Tensor grad, Tensor xhat, Tensor rstd, Tensor weight, bool weight_grad) -> (Tensor, Tensor)",
        &narrow_rms_norm_backward);
  m.def("swiglu(Tensor gate_up) -> Tensor", &swiglu);
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor", &swiglu_backward);
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rotary);
  m.def("rotary_backward(Tensor grad, Tensor cos, Tensor sin) -> Tensor", &rotary_backward);
  m.def("rotary_backward_into(Tensor grad, Tensor cos, Tensor sin, Tensor(a!) out) -> ()", &rotary_backward_into);
  m.def("transpose(Tensor x) -> Tensor", &transpose);
}
