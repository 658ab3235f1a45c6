// The cross-entropy of a chunk of bf16 logits and its gradient, in place, for zhtune.train.loss.
//
// For each row r < n of logits (rows, vocab): lse = log(sum(exp(x))), the loss adds lse - x[t],
// and the row is overwritten with its gradient softmax(x) - one_hot(t), computed in fp32 and
// rounded to bf16 once; rows from n on (a chunk's padding) become zeros. Three passes over a row
// in the core's cache (max, sum of exponentials, gradient) where the PyTorch ops wrote and read
// fp32 copies of the whole chunk (log-softmax, exp, the one-hot subtraction, the cast to bf16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

inline __m512 load(const BFloat16* x, __mmask16 m) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, x));
}

// The row's loss lse - x[target]; the row becomes softmax - one_hot in bf16.
float row_cross_entropy(BFloat16* x, int64_t vocab, int64_t target) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < vocab; c += 16) {
    const __mmask16 m = tail_mask(vocab - c);
    mx = _mm512_mask_max_ps(mx, m, mx, load(x + c, m));
  }
  const float top = _mm512_reduce_max_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(top);
  for (int64_t c = 0; c < vocab; c += 16) {
    const __mmask16 m = tail_mask(vocab - c);
    const __m512 e = static_cast<__m512>(Vec(_mm512_sub_ps(load(x + c, m), shift)).exp_u20());
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  const float lse = top + std::log(_mm512_reduce_add_ps(sum));
  const float loss = lse - static_cast<float>(x[target]);
  const float p_target = std::exp(static_cast<float>(x[target]) - lse);
  const __m512 vlse = _mm512_set1_ps(lse);
  for (int64_t c = 0; c < vocab; c += 16) {
    const __mmask16 m = tail_mask(vocab - c);
    const __m512 p = static_cast<__m512>(Vec(_mm512_sub_ps(load(x + c, m), vlse)).exp_u20());
    _mm256_mask_storeu_epi16(x + c, m, (__m256i)_mm512_cvtneps_pbh(p));
  }
  x[target] = static_cast<BFloat16>(p_target - 1.f);
  return loss;
}

at::Tensor cross_entropy_(at::Tensor& logits, const at::Tensor& targets, int64_t n) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kBFloat16 && logits.is_contiguous(),
              "logits must be contiguous bf16 (rows, vocab)");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) >= n && n <= logits.size(0),
              "targets must be int64 with a target for each of the first n rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(tp[r] >= 0 && tp[r] < vocab, "target ", tp[r], " out of the vocabulary");
  BFloat16* x = logits.data_ptr<BFloat16>();
  std::vector<float> losses(rows, 0.f);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r < n) {
        losses[r] = row_cross_entropy(x + r * vocab, vocab, tp[r]);
      } else {
        std::fill(x + r * vocab, x + (r + 1) * vocab, BFloat16(0.f));
      }
    }
  });
  double total = 0.0;
  for (int64_t r = 0; r < n; ++r) total += losses[r];
  return at::scalar_tensor(total, logits.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(zhtune_cpu_loss, m) {
  m.def("cross_entropy_(Tensor(a!) logits, Tensor targets, int n) -> Tensor", &cross_entropy_);
}
