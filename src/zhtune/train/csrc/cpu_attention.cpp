// Attention forward and backward for training on a CPU with AMX (bf16), for zhtune.train.attention.
//
// softmax(scale q k^T + mask) v where every query's allowed keys are one interval [start, end]
// (causal rows, the block-diagonal mask of packed rows, padding): the kernels compute, for each
// block of BQ queries, only the keys from the block's first allowed key to its last (in whole
// blocks of KB keys), so a packed row's documents cost what they would cost apart. Each block's
// products run as oneDNN brgemm micro-kernels (ATen's cpublas::brgemm: bf16 in, fp32 out, AMX
// tiles), the softmax and its gradient between them in fp32 in the thread's cache:
//
// The g query heads that share a key/value head are stacked as the rows of one product: a
// block's Q (and dO) rows, head after head, g BQ rows against the block's keys. (Against one
// head's 64 queries at a time, with 64-key granularity: 10% slower forward and backward on
// SmolLM2's packed rows, whose blocks also computed 27% more scores than the mask allows, 13%
// at 32.)
//
// forward, per (row, key/value head, query block):
//   S = Q K^T over the key range (one product; rows are at most max_len long, so no online
//   rescaling), P = exp(scale S - max) inside each query's interval, O = P V / sum, lse.
// backward, per (row, key/value head), over its query blocks:
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse), dS = P (dP - delta) scale;
//   dV^T += dO^T P, dK^T += Q^T dS (fp32, the whole unit's keys; the reduction over the g
//   heads' queries at once), dQ = dS K.
//
// brgemm reads its B operand in VNNI layout: element (k, n) of a K x N matrix at
// ((k / 2) * ld + n) * 2 + k % 2. K^T and V^T in that layout are K and V read as pairs of bf16
// (int32) and transposed; K and V (the reduction over keys) are pairs of rows interleaved; P and
// dS are written interleaved as they are rounded to bf16.
//
// Inputs are bf16 with a contiguous last dimension; q (b, h, t, d), k and v (b, kv, t, d) in any
// other strides (transformers hands views of (b, t, heads, d)); start and end int32 (b or 1, t).
// Outputs: out (b, t, h, d) bf16 (the layout transformers reshapes to (b, t, h d)), lse (b, h, t)
// fp32; gradients in q's, k's and v's logical shapes, laid out (b, t, heads, d).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "vec_math.h"
#include "vnni.h"

namespace {

using at::BFloat16;
using zhtune_vnni::interleave_rows;
using zhtune_vnni::transpose32;
using Vec = at::vec::Vectorized<float>;
namespace cpublas = at::native::cpublas;

constexpr int64_t BQ = 32;  // queries per block (of each query head; even)
constexpr int64_t KB = 32;  // key ranges start and end on multiples of KB

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The mask: query i of row b attends keys start..end (inclusive); a (1, t) mask is shared.
struct Intervals {
  const int32_t* start;
  const int32_t* end;
  int64_t row_stride;  // 0 when shared by every row
  int64_t lo(int64_t b, int64_t i) const { return start[b * row_stride + i]; }
  int64_t hi(int64_t b, int64_t i) const { return end[b * row_stride + i]; }
};

Intervals intervals(const at::Tensor& start, const at::Tensor& end) {
  return {start.data_ptr<int32_t>(), end.data_ptr<int32_t>(), start.size(0) == 1 ? 0 : start.stride(0)};
}

// The key range [n0, n1) (multiples of KB, n1 <= padded) that queries i0..i0+rows-1 of row b need.
std::pair<int64_t, int64_t> key_range(const Intervals& m, int64_t b, int64_t i0, int64_t rows, int64_t padded) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  for (int64_t r = 0; r < rows; ++r) {
    lo = std::min(lo, m.lo(b, i0 + r));
    hi = std::max(hi, m.hi(b, i0 + r));
  }
  return {lo / KB * KB, std::min(padded, (hi / KB + 1) * KB)};
}

// x (t rows of d bf16, ld apart) -> (d / 2, padded) int32: the VNNI layout of x^T as a B operand
// (pairs along d), zeros after row t.
inline void pack_transposed(const BFloat16* x, int64_t ld, int64_t t, int64_t padded, int64_t d, BFloat16* out) {
  transpose32(reinterpret_cast<const uint32_t*>(x), ld / 2, t, padded, d / 2, reinterpret_cast<uint32_t*>(out), padded);
}

// x (t rows of d bf16, ld apart) -> x^T (d, padded) bf16 row-major, zeros after column t: rows
// interleaved in pairs, then their 32-bit pairs transposed. scratch: padded * d.
inline void transpose_bf16(const BFloat16* x, int64_t ld, int64_t t, int64_t padded, int64_t d, BFloat16* scratch,
                           BFloat16* out) {
  interleave_rows(x, ld, t, padded, d, scratch);
  transpose32(reinterpret_cast<const uint32_t*>(scratch), d, padded / 2, padded / 2, d, reinterpret_cast<uint32_t*>(out), padded / 2);
}

// Run work(unit) for units 0..n-1 over ATen's threads, largest cost first, each thread taking
// the next unit when it finishes one (rows of different documents cost different amounts).
template <typename F>
void run_units(const std::vector<int64_t>& cost, const F& work) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(order.size()));
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t u = next++; u < static_cast<int64_t>(order.size()); u = next++) work(order[u]);
    cpublas::brgemm_release();
  });
}

// bf16 of 16 floats.
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// A row of n floats as bf16 (n a multiple of 16).
inline void store_bf16(const float* a, int64_t n, BFloat16* out) {
  for (int64_t c = 0; c < n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), to_bf16(_mm512_loadu_ps(a + c)));
}

// Lanes c..c+15 inside [lo, hi).
inline __mmask16 lanes_in(int64_t c, int64_t lo, int64_t hi) {
  const int64_t a = std::clamp<int64_t>(lo - c, 0, 16), b = std::clamp<int64_t>(hi - c, 0, 16);
  return static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}

// exp(x * scale - shift), to 2.7e-6 (the probabilities are rounded to bf16 next).
inline __m512 exp_scaled(__m512 x, float scale, float shift) {
  return zhtune_vec::exp_bf16(_mm512_fmsub_ps(x, _mm512_set1_ps(scale), _mm512_set1_ps(shift)));
}

// The columns [c0, c1) of a row of n (multiples of 16) that hold its interval [lo, hi): whole
// vectors, the first and last of them only partly inside.
inline std::pair<int64_t, int64_t> vectors_of(int64_t lo, int64_t hi) { return {lo / 16 * 16, (hi + 15) / 16 * 16}; }

// e, zeroed in the lanes of columns c..c+15 outside [lo, hi) (only the edge vectors have any).
inline __m512 inside(__m512 e, int64_t c, int64_t lo, int64_t hi) {
  return c < lo || c + 16 > hi ? _mm512_maskz_mov_ps(lanes_in(c, lo, hi), e) : e;
}

// Rows r and r + 1 of the query block at i0 (r even; rows from `rows` on are a tail block's
// missing queries, whose interval is empty): each row's interval [lo, hi) relative to the
// block's first key n0, and the whole vectors [c0, c1) either interval touches (c0 = c1 = 0
// when neither row has one). Zeros go on both sides of [c0, c1).
struct RowPair {
  int64_t lo[2] = {0, 0}, hi[2] = {0, 0}, c0 = 0, c1 = 0;
  bool valid(int64_t e) const { return hi[e] > lo[e]; }
};

inline RowPair row_pair(const Intervals& mask, int64_t b, int64_t i0, int64_t r, int64_t rows, int64_t n0, int64_t n) {
  RowPair p;
  int64_t c0 = n, c1 = 0;
  for (int64_t e = 0; e < 2 && r + e < rows; ++e) {
    p.lo[e] = mask.lo(b, i0 + r + e) - n0;
    p.hi[e] = mask.hi(b, i0 + r + e) - n0 + 1;
    c0 = std::min(c0, vectors_of(p.lo[e], p.hi[e]).first);
    c1 = std::max(c1, vectors_of(p.lo[e], p.hi[e]).second);
  }
  p.c0 = std::min(c0, c1);
  p.c1 = c1;
  return p;
}

inline float max_interval(const float* x, int64_t lo, int64_t hi) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = lo;
  for (; c + 16 <= hi; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + c));
  if (c < hi) m = _mm512_mask_max_ps(m, (__mmask16)((1u << (hi - c)) - 1), m, _mm512_maskz_loadu_ps((__mmask16)((1u << (hi - c)) - 1), x + c));
  return _mm512_reduce_max_ps(m);
}

// sum(a * b) of two bf16 rows of n (a multiple of 16) values, in fp32.
inline float dot_bf16(const BFloat16* a, const BFloat16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    __m512 x = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c)));
    __m512 y = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c)));
    acc = _mm512_fmadd_ps(x, y, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& start,
                  const at::Tensor& end) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (b, heads, t, d)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, "q, k, v must be bf16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                  k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0, "q, k, v shapes do not match");
  TORCH_CHECK(q.size(3) % 16 == 0, "head dim must be a multiple of 16");
  TORCH_CHECK(start.scalar_type() == at::kInt && end.scalar_type() == at::kInt && start.is_contiguous() &&
                  end.is_contiguous() && start.sizes() == end.sizes() && start.size(1) == q.size(2),
              "start and end must be contiguous int32 (b or 1, t)");
}

// Rows i0..i0+rows-1 of g query heads (head j's row r at x + j * head_ld + r * ld, d values)
// stacked head by head: out row j * BQ + r, g * BQ rows of d, rows r >= rows zero.
inline void stack_heads(const BFloat16* x, int64_t head_ld, int64_t ld, int64_t g, int64_t rows, int64_t d,
                        BFloat16* out) {
  for (int64_t j = 0; j < g; ++j)
    for (int64_t r = 0; r < BQ; ++r) {
      BFloat16* dst = out + (j * BQ + r) * d;
      if (r < rows)
        std::memcpy(dst, x + j * head_ld + r * ld, d * sizeof(BFloat16));
      else
        std::memset(dst, 0, d * sizeof(BFloat16));
    }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& start, const at::Tensor& end, double scale_) {
  check_inputs(q, k, v, start, end);
  const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3), kv = k.size(1), g = h / kv;
  const int64_t padded = round_up(t, KB), blocks = (t + BQ - 1) / BQ, m = g * BQ;
  const float scale = static_cast<float>(scale_);
  auto kt = at::empty({b, kv, d / 2, padded * 2}, q.options());  // K^T, VNNI (pairs along d)
  auto vr = at::empty({b, kv, padded / 2, d * 2}, q.options());    // V, VNNI (pairs along keys)
  at::parallel_for(0, b * kv, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t u = begin; u < stop; ++u) {
      const int64_t bi = u / kv, hk = u % kv;
      pack_transposed(k.data_ptr<BFloat16>() + bi * k.stride(0) + hk * k.stride(1), k.stride(2), t, padded, d, kt[bi][hk].data_ptr<BFloat16>());
      interleave_rows(v.data_ptr<BFloat16>() + bi * v.stride(0) + hk * v.stride(1), v.stride(2), t, padded, d, vr[bi][hk].data_ptr<BFloat16>());
    }
  });
  auto out = at::empty({b, t, h, d}, q.options());
  auto lse = at::empty({b, h, t}, q.options().dtype(at::kFloat));
  const Intervals mask = intervals(start, end);
  const BFloat16* qp = q.data_ptr<BFloat16>();
  const BFloat16* ktp = kt.data_ptr<BFloat16>();
  const BFloat16* vrp = vr.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  float* lp = lse.data_ptr<float>();

  // A unit: one query block of one (row, key/value head), its g query heads stacked as the rows
  // of one product (m = g BQ rows against the block's keys).
  std::vector<int64_t> cost(b * kv * blocks);
  for (int64_t u = 0; u < static_cast<int64_t>(cost.size()); ++u) {
    int64_t bi = u / (kv * blocks), i0 = (u % blocks) * BQ;
    auto [n0, n1] = key_range(mask, bi, i0, std::min(BQ, t - i0), padded);
    cost[u] = n1 - n0;
  }
  run_units(cost, [&](int64_t u) {
    const int64_t bi = u / (kv * blocks), hk = u / blocks % kv, i0 = u % blocks * BQ;
    const int64_t rows = std::min(BQ, t - i0);
    auto [n0, n1] = key_range(mask, bi, i0, rows, padded);
    const int64_t n = n1 - n0;
    thread_local std::vector<float> s_buf, o_buf, maxes, sums;
    thread_local std::vector<BFloat16> p_buf, qs;
    s_buf.resize(m * n);
    o_buf.resize(m * d);
    maxes.resize(m);
    sums.resize(m);
    p_buf.resize(m * n);
    qs.resize(m * d);
    float* s = s_buf.data();
    stack_heads(qp + bi * q.stride(0) + hk * g * q.stride(1) + i0 * q.stride(2), q.stride(1), q.stride(2), g, rows, d, qs.data());
    cpublas::brgemm(m, n, d, d, padded, n, false, qs.data(), ktp + ((bi * kv + hk) * (d / 2) * padded + n0) * 2, s);
    for (int64_t row = 0; row < m; row += 2) {  // two rows at a time (of one head: BQ is even)
      const RowPair pr = row_pair(mask, bi, i0, row % BQ, rows, n0, n);
      float mx[2] = {0.f, 0.f};  // (a tail block's missing queries: zero weights)
      for (int64_t e = 0; e < 2; ++e)
        if (pr.valid(e)) mx[e] = max_interval(s + (row + e) * n, pr.lo[e], pr.hi[e]) * scale;
      __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t e = 0; e < 2; ++e) {
        std::memset(p_buf.data() + (row + e) * n, 0, pr.c0 * sizeof(BFloat16));
        std::memset(p_buf.data() + (row + e) * n + pr.c1, 0, (n - pr.c1) * sizeof(BFloat16));
      }
      for (int64_t c = pr.c0; c < pr.c1; c += 16) {
        for (int64_t e = 0; e < 2; ++e) {
          const __m512 v = inside(exp_scaled(_mm512_loadu_ps(s + (row + e) * n + c), scale, mx[e]), c, pr.lo[e], pr.hi[e]);
          acc[e] = _mm512_add_ps(acc[e], v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p_buf.data() + (row + e) * n + c), to_bf16(v));
        }
      }
      for (int64_t e = 0; e < 2; ++e) {
        maxes[row + e] = mx[e];
        sums[row + e] = pr.valid(e) ? _mm512_reduce_add_ps(acc[e]) : 1.f;
      }
    }
    for (int64_t row = 0; row < m; row += 16) {  // lse = max + log(sum), 16 rows at a time
      const Vec l = Vec::loadu(maxes.data() + row) + Vec::loadu(sums.data() + row).log();
      const int64_t j = row / BQ, r = row % BQ;  // (16 rows of one head: BQ is a multiple of 16)
      l.store(lp + (bi * h + hk * g + j) * t + i0 + r, static_cast<int>(std::clamp<int64_t>(rows - r, 0, 16)));
    }
    cpublas::brgemm(m, d, n, n, d, d, false, p_buf.data(), vrp + ((bi * kv + hk) * (padded / 2) * d + n0 / 2 * d) * 2, o_buf.data());
    for (int64_t row = 0; row < m; ++row) {
      const int64_t j = row / BQ, r = row % BQ;
      if (r >= rows) continue;
      const Vec inv(1.f / sums[row]);
      BFloat16* dst = op + ((bi * t + i0 + r) * h + hk * g + j) * d;
      for (int64_t c = 0; c < d; c += Vec::size()) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), to_bf16(Vec::loadu(o_buf.data() + row * d + c) * inv));
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out_, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out_, const at::Tensor& lse_,
                                                        const at::Tensor& start, const at::Tensor& end,
                                                        double scale_) {
  check_inputs(q, k, v, start, end);
  const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3), kv = k.size(1), g = h / kv;
  const int64_t padded = round_up(t, KB), m = g * BQ;
  const float scale = static_cast<float>(scale_);
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({b, t, h, d}) && out_.sizes() == grad_out_.sizes(),
              "grad_out and out must be (b, t, h, d)");
  auto grad_out = grad_out_.to(at::kBFloat16).contiguous();
  auto out = out_.contiguous();
  auto lse = lse_.contiguous();
  auto dq = at::empty({b, t, h, d}, q.options());
  auto dk = at::empty({b, t, kv, d}, q.options());
  auto dv = at::empty({b, t, kv, d}, q.options());
  const Intervals mask = intervals(start, end);
  const BFloat16* gop = grad_out.data_ptr<BFloat16>();
  const BFloat16* outp = out.data_ptr<BFloat16>();
  const float* lp = lse.data_ptr<float>();
  BFloat16* dqp = dq.data_ptr<BFloat16>();

  std::vector<int64_t> cost(b * kv, 0);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t i0 = 0; i0 < t; i0 += BQ) {
      auto [n0, n1] = key_range(mask, bi, i0, std::min(BQ, t - i0), padded);
      for (int64_t hk = 0; hk < kv; ++hk) cost[bi * kv + hk] += n1 - n0;
    }
  run_units(cost, [&](int64_t u) {
    const int64_t bi = u / kv, hk = u % kv;
    // This (row, kv head)'s operands laid out for brgemm in the thread's cache: K^T and V^T
    // (S = Q K^T, dP = dO V^T) and K (dQ = dS K) once; per query block, the g query heads' Q and
    // dO rows stacked (the A operands of S and dP) and transposed (of dK^T += Q^T dS, dV^T +=
    // dO^T P, whose reduction then runs over all g heads' queries at once).
    thread_local std::vector<BFloat16> kt, vt, kr, qs, dos, qtb, dotb, scratch, p_vnni, ds_vnni, ds_rows;
    thread_local std::vector<float> s_buf, dp_buf, dq_buf, dkt, dvt, rows_buf, deltas;
    deltas.resize(g * t);
    for (auto* buf : {&kt, &vt, &kr}) buf->resize(d * padded);
    for (auto* buf : {&qs, &dos, &qtb, &dotb, &scratch}) buf->resize(m * d);
    for (auto* buf : {&p_vnni, &ds_vnni, &ds_rows}) buf->resize(m * padded);
    for (auto* buf : {&s_buf, &dp_buf}) buf->resize(m * padded);
    rows_buf.resize(d * padded);
    dq_buf.resize(m * d);
    dkt.assign(d * padded, 0.f);  // dK^T, dV^T of this (row, kv head), summed over its query heads
    dvt.assign(d * padded, 0.f);
    const BFloat16* kb = k.data_ptr<BFloat16>() + bi * k.stride(0) + hk * k.stride(1);
    const BFloat16* vb = v.data_ptr<BFloat16>() + bi * v.stride(0) + hk * v.stride(1);
    pack_transposed(kb, k.stride(2), t, padded, d, kt.data());
    pack_transposed(vb, v.stride(2), t, padded, d, vt.data());
    interleave_rows(kb, k.stride(2), t, padded, d, kr.data());
    const BFloat16* qb = q.data_ptr<BFloat16>() + bi * q.stride(0) + hk * g * q.stride(1);
    const BFloat16* gob = gop + (bi * t * h + hk * g) * d;  // (t, h, d): head j's row i at gob + (i h + j) d
    for (int64_t j = 0; j < g; ++j)  // delta = rowsum(dO * O), in one pass over the rows (streams well)
      for (int64_t i = 0; i < t; ++i)
        deltas[j * t + i] = dot_bf16(gob + (i * h + j) * d, outp + ((bi * t + i) * h + hk * g + j) * d, d);
    float* s = s_buf.data();
    float* dp = dp_buf.data();
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                           22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t i0 = 0; i0 < t; i0 += BQ) {
      const int64_t rows = std::min(BQ, t - i0);
      auto [n0, n1] = key_range(mask, bi, i0, rows, padded);
      const int64_t n = n1 - n0;
      stack_heads(qb + i0 * q.stride(2), q.stride(1), q.stride(2), g, rows, d, qs.data());
      stack_heads(gob + i0 * h * d, d, h * d, g, rows, d, dos.data());
      transpose_bf16(qs.data(), d, m, m, d, scratch.data(), qtb.data());  // (d, m)
      transpose_bf16(dos.data(), d, m, m, d, scratch.data(), dotb.data());
      cpublas::brgemm(m, n, d, d, padded, n, false, qs.data(), kt.data() + n0 * 2, s);
      cpublas::brgemm(m, n, d, d, padded, n, false, dos.data(), vt.data() + n0 * 2, dp);
      // P = exp(scale S - lse) inside each query's interval, dS = P (dP - delta) scale, rounded
      // to bf16 once and written as brgemm reads them: P and dS in VNNI pairs of rows, dS in rows.
      // (Pairs never straddle two heads: BQ is even. A tail block's missing queries: zeros.)
      for (int64_t row = 0; row < m; row += 2) {
        const int64_t j = row / BQ, r = row % BQ;
        const RowPair pr = row_pair(mask, bi, i0, r, rows, n0, n);
        float lse_r[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
        for (int64_t e = 0; e < 2; ++e)
          if (pr.valid(e)) {
            lse_r[e] = lp[(bi * h + hk * g + j) * t + i0 + r + e];
            delta[e] = deltas[j * t + i0 + r + e];
          }
        const int64_t c0 = pr.c0, c1 = pr.c1;
        for (auto* buf : {&p_vnni, &ds_vnni}) {
          std::memset(buf->data() + row * n, 0, 2 * c0 * sizeof(BFloat16));
          std::memset(buf->data() + row * n + 2 * c1, 0, 2 * (n - c1) * sizeof(BFloat16));
        }
        for (int e = 0; e < 2; ++e) {
          std::memset(ds_rows.data() + (row + e) * n, 0, c0 * sizeof(BFloat16));
          std::memset(ds_rows.data() + (row + e) * n + c1, 0, (n - c1) * sizeof(BFloat16));
        }
#pragma GCC unroll 2
        for (int64_t c = c0; c < c1; c += 16) {
          __m512 pv[2], dv[2];
          for (int e = 0; e < 2; ++e) {
            pv[e] = inside(exp_scaled(_mm512_loadu_ps(s + (row + e) * n + c), scale, lse_r[e]), c, pr.lo[e], pr.hi[e]);
            dv[e] = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(dp + (row + e) * n + c), _mm512_set1_ps(delta[e])), pv[e]), _mm512_set1_ps(scale));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows.data() + (row + e) * n + c), to_bf16(dv[e]));
          }
          _mm512_storeu_si512(p_vnni.data() + row * n + 2 * c, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(pv[1], pv[0])));
          _mm512_storeu_si512(ds_vnni.data() + row * n + 2 * c, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(dv[1], dv[0])));
        }
      }
      cpublas::brgemm(d, n, m, m, n, padded, true, dotb.data(), p_vnni.data(), dvt.data() + n0);
      cpublas::brgemm(d, n, m, m, n, padded, true, qtb.data(), ds_vnni.data(), dkt.data() + n0);
      cpublas::brgemm(m, d, n, n, d, d, false, ds_rows.data(), kr.data() + n0 * d, dq_buf.data());
      for (int64_t row = 0; row < m; ++row) {
        const int64_t j = row / BQ, r = row % BQ;
        if (r < rows) store_bf16(dq_buf.data() + row * d, d, dqp + ((bi * t + i0 + r) * h + hk * g + j) * d);
      }
    }
    for (auto [acc, grad] : {std::pair{&dkt, &dk}, std::pair{&dvt, &dv}}) {  // (d, padded) fp32 -> (t, d) bf16
      transpose32(reinterpret_cast<const uint32_t*>(acc->data()), padded, d, d, t, reinterpret_cast<uint32_t*>(rows_buf.data()), d);
      BFloat16* dst = grad->data_ptr<BFloat16>() + (bi * t * kv + hk) * d;
      for (int64_t j = 0; j < t; ++j) store_bf16(rows_buf.data() + j * d, d, dst + j * kv * d);
    }
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

bool available() { return cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(zhtune_cpu_attention, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor start, Tensor end, float scale) -> (Tensor, Tensor)", &forward);
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor start, Tensor end, "
        "float scale) -> (Tensor, Tensor, Tensor)", &backward);
  m.def("available() -> bool", &available);
}
