// Vector math shared by zhtune's kernels (AVX-512).
#pragma once

#include <immintrin.h>

namespace zhtune_vec {

// exp(x) of 16 floats: 2^n 2^f for x log2(e) = n + f, n an integer, |f| <= 1/2, 2^f by its Taylor
// polynomial of degree 6 (relative error ~1e-7, like ATen's exp_u20, in half its instructions),
// 2^n by scalef (0 below fp32's range, inf above it).
inline __m512 exp(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);  // (ln 2)^k / k!, k = 6 .. 0
  for (float c : {1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f, 6.9314718e-1f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// exp(x) of 16 floats to a relative error of 2.7e-6: as exp above with 2^f by a degree-4 minimax
// polynomial, two multiply-adds fewer. For values rounded to bf16 next (8 bits) and sums of them:
// attention's probabilities, whose row sums and log-sum-exp it moves by ~2e-6.
inline __m512 exp_bf16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.57010128e-3f);  // minimax on [-1/2, 1/2] for relative error
  for (float c : {5.59178591e-2f, 2.40247443e-1f, 6.93121791e-1f, 9.99999285e-1f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace zhtune_vec
