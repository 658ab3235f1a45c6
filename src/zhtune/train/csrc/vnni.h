// 32-bit transposes and VNNI row interleaves (AVX-512), shared by zhtune's kernels: the packing of
// brgemm's bf16 B operands in cpu_attention.cpp (element (k, n) of a K x N operand at ((k / 2) *
// ld + n) * 2 + k % 2: pairs of rows interleaved) and the bf16 transpose in cpu_ops.cpp (pairs of
// rows interleaved, then transposed as 32-bit elements, is the bf16 transpose).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace zhtune_vnni {

using at::BFloat16;

// The 16 x 16 transpose of 32-bit elements held in r[0..15] (row i in r[i]), in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r2i[0], r2i+1[0], r2i[1], r2i+1[1]), (.. [2], .. [3])
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: column 4L + j of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // column 4L + j, lane L': lane L of r[4L' + j] (a 4 x 4 transpose of lanes)
    __m512i lo01 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), hi01 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    __m512i lo23 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44), hi23 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// out[c * out_ld + r] = in[r * in_ld + c] for c < cols, r < rows (32-bit elements), reading rows
// at or after `valid` as zeros. rows: a multiple of 16.
inline void transpose32(const uint32_t* in, int64_t in_ld, int64_t valid, int64_t rows, int64_t cols, uint32_t* out,
                 int64_t out_ld) {
  __m512i r[16];
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, cols - c0);
    const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      for (int i = 0; i < 16; ++i)
        r[i] = r0 + i < valid ? _mm512_maskz_loadu_epi32(cm, in + (r0 + i) * in_ld + c0) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t i = 0; i < nc; ++i) _mm512_storeu_si512(out + (c0 + i) * out_ld + r0, r[i]);
    }
  }
}

// Rows r and r + 1 of x (bf16, ld elements apart, d columns) interleaved: out ((rows / 2), d, 2),
// rows at or after `valid` read as zeros (the VNNI layout of x as a B operand, pairs along rows).
// d: a multiple of 16; rows: even.
inline void interleave_rows(const BFloat16* x, int64_t ld, int64_t valid, int64_t rows, int64_t d, BFloat16* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t r = 0; r < rows; r += 2) {
    for (int64_t c = 0; c < d; c += 32) {
      const __mmask32 m = d - c >= 32 ? ~0u : (1u << (d - c)) - 1;  // (d - c: 32, or 16 at a tail)
      __m512i a = r < valid ? _mm512_maskz_loadu_epi16(m, x + r * ld + c) : _mm512_setzero_si512();
      __m512i b = r + 1 < valid ? _mm512_maskz_loadu_epi16(m, x + (r + 1) * ld + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + (r * d + 2 * c), _mm512_permutex2var_epi16(a, lo, b));
      if (d - c > 16) _mm512_storeu_si512(out + (r * d + 2 * c + 32), _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

}  // namespace zhtune_vnni
