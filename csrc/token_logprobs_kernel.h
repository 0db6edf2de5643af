// The kernel contract on the CPU: forward (online log-sum-exp) and single-pass backward.
//
// Included by csrc/capability/kernel_<cap>.cpp only, each compiled with its own CPU_CAPABILITY
// (so at::vec::Vectorized is the AVX2 / AVX512 / scalar-default implementation there, and every
// symbol below lands in dpo_kernels::<CPU_CAPABILITY>, one copy per instruction set).
//
// One task = a range of token rows; a row is always processed by one thread with the same fixed
// order of operations, so results do not depend on the number of threads (bitwise).
//
// exp is a short polynomial (vexp below, ~2 ulp) rather than Sleef's: the kernels are bound by
// exp throughput on a few cores, not by memory bandwidth.
//
// A row is processed in chunks of kChunk elements that stay in L1:
//   forward,  per chunk: (a) load (converting bf16/fp16 to fp32, or gathering a strided row into
//             a small buffer) and take the chunk max (and the chunk sum of logits when asked; and,
//             for accuracy, the first index of the max when the chunk raises the row's max);
//             (b) sum e = exp(z - shift) over the chunk, shift = running max, rescaling the running
//             sums once per chunk when the max grows; entropy adds sum e (z - shift) and
//             log sum p^2 sum e^2 from the same e. One exp per element, whatever the extras.
//   backward, per chunk: grad = -coef * exp((z - lse_hi) - lse_lo), converted and stored once;
//             the true-class element is then rewritten as coef * (1 - p_y), formed in the
//             accumulation type from the target logit read before the row was written (in place
//             safe).
//
// lse is kept in fp64 (shift + log(s), both fp32, summed exactly) and split in the backward into
// fp32 hi + lo (split_lse): one fp32 lse would carry |lse| * 2^-24 of rounding into every log-prob
// and every probability, so logits sharing a large offset (|lse| ~ 1e5) would lose their last
// digits, and near 1e8 the log-sum entirely. z - lse_hi is exact where it matters (z within a
// factor 2 of lse_hi, Sterbenz), so the probabilities do not depend on a common offset.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "token_logprobs.h"

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DPO_KERNELS_PREFETCH(ptr) __builtin_prefetch(ptr)
#else
#define DPO_KERNELS_PREFETCH(ptr) ((void)(ptr))
#endif

namespace dpo_kernels {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 2048;  // elements per chunk: 8 KB of fp32, 16 KB of fp64

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// exp for the accumulation type, vectorized.
//
// fp32 on AVX2 / AVX512: Cody-Waite range reduction x = n ln2 + r (|r| <= ln2/2, ln2 split in two
// so that r is exact to fp32 rounding), a degree-5 polynomial for e^r (the coefficients of ATen's
// exp_u20), and 2^n applied through the exponent (scalef on AVX512). Max relative error ~2e-7
// (~2 ulp) over the whole range; 12-15 vector instructions, about half of exp_u20 with its
// NaN/overflow fix-ups, a third of Sleef's u10. Non-finite inputs behave as std::exp: the clamps
// keep NaN (max/min return their second operand when either is NaN), -inf and anything below
// about -87.5 give +0, +inf and anything above ~88.72 give +inf.
// fp64 (only for gradcheck): Sleef's exp (1 ulp). Default build: ATen's scalar std::exp map.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with few bits
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpC1 = 9.999997020e-01f;
constexpr float kExpC2 = 4.999915063e-01f;
constexpr float kExpC3 = 1.666763574e-01f;
constexpr float kExpC4 = 4.189793020e-02f;
constexpr float kExpC5 = 8.290315047e-03f;

#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp(const Vectorized<float>& a) {
  __m512 x = a;
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // 2^-150: scalef underflows to +0
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);    // 2^128: scalef overflows to +inf
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC5), r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vectorized<float> vexp(const Vectorized<float>& a) {
  __m256 x = a;
  x = _mm256_max_ps(_mm256_set1_ps(-87.6f), x);  // n >= -126: 2^(n-1) has a zero exponent field: +0
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);   // n <= 128: p * 2^(n-1) * 2 overflows to +inf
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^(n - 1) from the exponent bits (n - 1 in [-127, 127]), times 2 at the end.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_mul_ps(p, _mm256_set1_ps(2.0f));
}
#else
inline Vectorized<float> vexp(const Vectorized<float>& a) {
  return a.exp();
}
#endif
inline Vectorized<double> vexp(const Vectorized<double>& a) {
  return a.exp();
}

template <typename T>
inline T nan_value() {
  return std::numeric_limits<T>::quiet_NaN();
}
template <typename T>
inline T inf_value() {
  return std::numeric_limits<T>::infinity();
}

// NaN-propagating max (a NaN anywhere in the row makes the row's lse NaN, as in torch).
template <typename T>
inline T max_nan(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return nan_value<T>();
  return a > b ? a : b;
}

// Elements [0, n) of a row (element stride sv) as a contiguous run of acc_t: the row itself when
// it already is one, otherwise converted / gathered into buf (kChunk elements).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_chunk(const scalar_t* p, int64_t sv, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sv == 1) return p;
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i * sv];
    return buf;
  } else {
    static_assert(std::is_same_v<acc_t, float>);
    if (sv == 1) {
      using VecF = Vectorized<float>;
      constexpr int64_t W = VecF::size();
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        VecF a, b;
        at::vec::load_to_float<scalar_t>(p + i, a, b);
        a.store(buf + i);
        b.store(buf + i + W);
      }
      for (; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i * sv]);
    return buf;
  }
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  __at_align__ acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t m = -inf_value<acc_t>();
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) m = max_nan(m, tmp[k]);
  return m;
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) s += tmp[k];
  return s;
}

// Max of d[0, n) (NaN-propagating) and, with kSum, their plain sum.
template <typename acc_t, bool kSum>
inline void chunk_max_sum(const acc_t* d, int64_t n, acc_t& out_max, acc_t& out_sum) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec m0(-inf_value<acc_t>()), m1(-inf_value<acc_t>());
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec x0 = Vec::loadu(d + i);
    const Vec x1 = Vec::loadu(d + i + W);
    m0 = at::vec::maximum(m0, x0);
    m1 = at::vec::maximum(m1, x1);
    if constexpr (kSum) {
      s0 += x0;
      s1 += x1;
    }
  }
  acc_t m = hmax(at::vec::maximum(m0, m1));
  acc_t s = 0;
  if constexpr (kSum) s = hsum(s0 + s1);
  for (; i < n; ++i) {
    m = max_nan(m, d[i]);
    if constexpr (kSum) s += d[i];
  }
  out_max = m;
  out_sum = s;
}

// Elements [0, n) of a row as a contiguous run of acc_t (see load_chunk), with their max and,
// with kSum, their sum; contiguous bf16/fp16 rows are converted and reduced in the same loop.
template <typename scalar_t, typename acc_t, bool kSum>
inline const acc_t* load_chunk_max_sum(const scalar_t* p, int64_t sv, int64_t n, acc_t* buf, acc_t& out_max,
                                       acc_t& out_sum) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    if (sv == 1) {
      using VecF = Vectorized<float>;
      constexpr int64_t W = VecF::size();
      VecF m0(-inf_value<float>()), m1(-inf_value<float>());
      VecF s0(0.0f), s1(0.0f);
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        VecF a, b;
        at::vec::load_to_float<scalar_t>(p + i, a, b);
        a.store(buf + i);
        b.store(buf + i + W);
        m0 = at::vec::maximum(m0, a);
        m1 = at::vec::maximum(m1, b);
        if constexpr (kSum) {
          s0 += a;
          s1 += b;
        }
      }
      float m = hmax(at::vec::maximum(m0, m1));
      float s = 0;
      if constexpr (kSum) s = hsum(s0 + s1);
      for (; i < n; ++i) {
        buf[i] = static_cast<float>(p[i]);
        m = max_nan(m, buf[i]);
        if constexpr (kSum) s += buf[i];
      }
      out_max = m;
      out_sum = s;
      return buf;
    }
  }
  const acc_t* d = load_chunk<scalar_t, acc_t>(p, sv, n, buf);
  chunk_max_sum<acc_t, kSum>(d, n, out_max, out_sum);
  return d;
}

// Sums over d[0, n) of e_i = exp(x_i), x_i = d[i] - shift: s = sum e_i and, with kEnt / kL2,
// ex = sum e_i x_i (entropy) and e2 = sum e_i^2 (log sum p^2), from the same exp.
template <typename acc_t>
struct ExpSums {
  acc_t s = 0, ex = 0, e2 = 0;
};

// While this (compute-bound) loop runs from L1, the next chunk of a contiguous row, `next`
// (n_next bytes), is prefetched: the load-and-max pass over it then finds it in cache, so memory
// traffic and exp arithmetic overlap.
//
// x_i = -inf (a -inf logit) has e_i = 0: its entropy term is e_i * max(x_i, lowest) = 0, never
// 0 * -inf. (No NaN reaches this loop: a NaN row stops at its first NaN chunk.)
template <typename acc_t, bool kEnt, bool kL2>
inline ExpSums<acc_t> chunk_expsum(const acc_t* d, int64_t n, acc_t shift, const char* next, int64_t n_next) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kLine = 64;
  const Vec vs(shift);
  const Vec vlow(std::numeric_limits<acc_t>::lowest());
  Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
  Vec h0(acc_t(0)), h1(acc_t(0)), h2(acc_t(0)), h3(acc_t(0));  // sum e * x (kEnt)
  Vec q0(acc_t(0)), q1(acc_t(0)), q2(acc_t(0)), q3(acc_t(0));  // sum e * e (kL2)
  int64_t i = 0;
  int64_t pf = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    if (pf < n_next) {
      // 4 lines per 4 vectors: a whole chunk of fp32 ahead (bf16 / fp16 chunks take half of it).
      DPO_KERNELS_PREFETCH(next + pf);
      DPO_KERNELS_PREFETCH(next + pf + kLine);
      DPO_KERNELS_PREFETCH(next + pf + 2 * kLine);
      DPO_KERNELS_PREFETCH(next + pf + 3 * kLine);
      pf += 4 * kLine;
    }
    if constexpr (!kEnt && !kL2) {
      a0 += vexp(Vec::loadu(d + i) - vs);
      a1 += vexp(Vec::loadu(d + i + W) - vs);
      a2 += vexp(Vec::loadu(d + i + 2 * W) - vs);
      a3 += vexp(Vec::loadu(d + i + 3 * W) - vs);
    } else {
      const Vec x0 = Vec::loadu(d + i) - vs;
      const Vec x1 = Vec::loadu(d + i + W) - vs;
      const Vec x2 = Vec::loadu(d + i + 2 * W) - vs;
      const Vec x3 = Vec::loadu(d + i + 3 * W) - vs;
      const Vec e0 = vexp(x0), e1 = vexp(x1), e2 = vexp(x2), e3 = vexp(x3);
      a0 += e0;
      a1 += e1;
      a2 += e2;
      a3 += e3;
      if constexpr (kEnt) {
        h0 = at::vec::fmadd(e0, at::vec::maximum(x0, vlow), h0);
        h1 = at::vec::fmadd(e1, at::vec::maximum(x1, vlow), h1);
        h2 = at::vec::fmadd(e2, at::vec::maximum(x2, vlow), h2);
        h3 = at::vec::fmadd(e3, at::vec::maximum(x3, vlow), h3);
      }
      if constexpr (kL2) {
        q0 = at::vec::fmadd(e0, e0, q0);
        q1 = at::vec::fmadd(e1, e1, q1);
        q2 = at::vec::fmadd(e2, e2, q2);
        q3 = at::vec::fmadd(e3, e3, q3);
      }
    }
  }
  for (; i + W <= n; i += W) {
    const Vec x = Vec::loadu(d + i) - vs;
    const Vec e = vexp(x);
    a0 += e;
    if constexpr (kEnt) h0 = at::vec::fmadd(e, at::vec::maximum(x, vlow), h0);
    if constexpr (kL2) q0 = at::vec::fmadd(e, e, q0);
  }
  ExpSums<acc_t> r;
  r.s = hsum((a0 + a1) + (a2 + a3));
  if constexpr (kEnt) r.ex = hsum((h0 + h1) + (h2 + h3));
  if constexpr (kL2) r.e2 = hsum((q0 + q1) + (q2 + q3));
  for (; i < n; ++i) {
    const acc_t x = d[i] - shift;
    const acc_t e = std::exp(x);
    r.s += e;
    if constexpr (kEnt) {
      if (e > 0) r.ex += e * x;
    }
    if constexpr (kL2) r.e2 += e * e;
  }
  return r;
}

// Offset of the first element of d[0, n) equal to `target` (the first NaN when target is NaN);
// n when there is none. Runs only when a chunk raises the row's max, so a few times per row.
template <typename acc_t>
inline int64_t first_index_of(const acc_t* d, int64_t n, acc_t target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if (std::isnan(target)) {  // once per NaN row
    for (; i < n; ++i)
      if (std::isnan(d[i])) return i;
    return n;
  }
  const Vec vt(target);
  for (; i + W <= n; i += W) {
    // (x == target) is all-ones (not zero) in the equal lanes: zero_mask() has their bits clear.
    const int not_equal = (Vec::loadu(d + i) == vt).zero_mask();
    if (not_equal != (1 << W) - 1) break;  // the first equal element is in this vector
  }
  for (; i < n; ++i)
    if (d[i] == target) return i;
  return n;
}

// The forward over rows [row_begin, row_end). kSum / kEnt / kL2 (logits_sum, entropy, log_sum_p2)
// add work to the per-element loops, so they are template flags: with all three off this is the
// plain logp / lse kernel. accuracy costs a compare per chunk (and a scan of the chunks that raise
// the row's max), so it is a run-time flag.
template <typename scalar_t, bool kSum, bool kEnt, bool kL2>
void forward_rows_impl(const FwdArgs& a, int64_t row_begin, int64_t row_end) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);
  acc_t* out_logp = static_cast<acc_t*>(a.logp);
  double* out_lse = static_cast<double*>(a.lse);
  acc_t* out_sum = static_cast<acc_t*>(a.logits_sum);
  acc_t* out_ent = static_cast<acc_t*>(a.entropy);
  acc_t* out_acc = static_cast<acc_t*>(a.accuracy);
  acc_t* out_l2 = static_cast<acc_t*>(a.log_sum_p2);
  const bool with_acc = out_acc != nullptr;
  const int64_t V = a.V;
  const int64_t sv = a.zs_v;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  __at_align__ acc_t buf[kChunk];

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.T;
    const int64_t t = row - b * a.T;
    const int64_t y = a.labels[b * a.ys_b + t * a.ys_t];
    if (y == a.ignore_index) {  // no vocabulary pass, no logits read
      out_logp[row] = 0;
      out_lse[row] = 0;
      if constexpr (kSum) out_sum[row] = 0;
      if constexpr (kEnt) out_ent[row] = 0;
      if constexpr (kL2) out_l2[row] = 0;
      if (with_acc) out_acc[row] = 0;
      continue;
    }
    const scalar_t* zrow = logits + b * a.zs_b + t * a.zs_t;
    acc_t m = -kInf;  // running max (NaN once a NaN was seen)
    acc_t shift = 0;  // the running sums are of exp(z - shift); 0 while m is +-inf
    acc_t s = 0;      // sum e,      e = exp(z - shift)
    acc_t ex = 0;     // sum e (z - shift)   (kEnt)
    acc_t e2 = 0;     // sum e^2             (kL2)
    acc_t zsum = 0;
    int64_t argmax = 0;  // first index of the max (torch.argmax; the first NaN once there is one)
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      acc_t cmax, csum;
      const acc_t* d = load_chunk_max_sum<scalar_t, acc_t, kSum>(zrow + c * sv, sv, n, buf, cmax, csum);
      if constexpr (kSum) zsum += csum;
      // Chunks come in index order: only a strictly greater max (or a first NaN) moves the argmax.
      if (with_acc && !(cmax <= m)) argmax = c + first_index_of(d, n, cmax);
      m = max_nan(m, cmax);
      if (std::isnan(m)) break;  // every statistic of the row is NaN (or decided: the argmax)
      if (m == kInf) continue;   // lse is +inf unless a NaN follows: keep reading, no exp
      if (m == -kInf) continue;  // nothing but -inf so far: the sums stay 0
      if (m != shift) {
        if (s != 0) {
          // Rescale to the new shift: e' = alpha e, z - m = (z - shift) + delta.
          const acc_t delta = shift - m;
          const acc_t alpha = std::exp(delta);
          if constexpr (kEnt) ex = alpha == 0 ? acc_t(0) : alpha * (ex + delta * s);
          if constexpr (kL2) e2 *= alpha * alpha;
          s *= alpha;
        }
        shift = m;
      }
      // Prefetch the next chunk of a contiguous row (a strided row is gathered element-wise).
      const int64_t n_next = (sv == 1) ? std::min(kChunk, V - c - n) * int64_t(sizeof(scalar_t)) : 0;
      const ExpSums<acc_t> r =
          chunk_expsum<acc_t, kEnt, kL2>(d, n, shift, reinterpret_cast<const char*>(zrow + c + n), n_next);
      s += r.s;
      if constexpr (kEnt) ex += r.ex;
      if constexpr (kL2) e2 += r.e2;
    }
    // NaN, +inf (as torch.logsumexp gives) and a row of -inf (or V == 0; never -inf - -inf) decide
    // lse and entropy alike, as the reference's formulas do; log sum p^2 is NaN there (no softmax).
    const bool finite = s > 0 && !std::isnan(m) && m != kInf;
    const acc_t log_s = finite ? std::log(s) : acc_t(0);
    const acc_t lse = finite ? shift + log_s : m;
    // The target logit is read only when the label lies inside the row. (z_y - shift) - log(s),
    // not z_y - lse: z_y - shift is exact near the max, so no rounding of lse reaches logp.
    const acc_t z_y = (y >= 0 && y < V) ? static_cast<acc_t>(zrow[y * sv]) : nan_value<acc_t>();
    out_logp[row] = finite ? (z_y - shift) - log_s : z_y - lse;
    out_lse[row] = finite ? static_cast<double>(shift) + static_cast<double>(log_s) : static_cast<double>(m);
    if constexpr (kSum) out_sum[row] = std::isnan(m) ? m : zsum;
    // H = lse - sum p z = log(s) - sum e (z - shift) / s.
    if constexpr (kEnt) out_ent[row] = finite ? log_s - ex / s : m;
    // log sum p^2 = log(sum e^2) - 2 log(s), both relative to shift (no cancellation of large
    // numbers); e^2 >= 1 at the max.
    if constexpr (kL2) out_l2[row] = finite ? std::log(e2) - 2 * log_s : nan_value<acc_t>();
    if (with_acc) out_acc[row] = (V > 0 && y == argmax) ? acc_t(1) : acc_t(0);
  }
}

// The fp64 lse as hi + lo in the accumulation type: hi = lse rounded, lo = what that rounding
// lost (0 for fp64 logits, and for an infinite or NaN lse, which hi carries alone).
template <typename acc_t>
struct LseParts {
  acc_t hi, lo;
};

template <typename acc_t>
inline LseParts<acc_t> split_lse(double lse) {
  const acc_t hi = static_cast<acc_t>(lse);
  const acc_t lo = std::isfinite(hi) ? static_cast<acc_t>(lse - static_cast<double>(hi)) : acc_t(0);
  return {hi, lo};
}

// Stores acc values src[0, n) into a row of scalar_t with element stride gv.
template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* src, scalar_t* dst, int64_t gv, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    if (gv == 1) {
      using VecF = Vectorized<float>;
      constexpr int64_t W = VecF::size();
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        const auto out = at::vec::convert_from_float<scalar_t>(VecF::loadu(src + i), VecF::loadu(src + i + W));
        out.store(dst + i);
      }
      for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i * gv] = static_cast<scalar_t>(src[i]);
}

template <typename scalar_t>
void backward_rows_impl(const BwdArgs& a, int64_t row_begin, int64_t row_end) {
  using acc_t = typename AccType<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  const double* lse_in = static_cast<const double*>(a.lse);
  const acc_t* coef_in = static_cast<const acc_t*>(a.coef);
  const int64_t V = a.V;
  const int64_t sv = a.zs_v;
  const int64_t gv = a.gs_v;
  __at_align__ acc_t buf[kChunk];
  __at_align__ acc_t obuf[kChunk];

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.T;
    const int64_t t = row - b * a.T;
    const int64_t y = a.labels[b * a.ys_b + t * a.ys_t];
    scalar_t* grow = grad + b * a.gs_b + t * a.gs_t;
    if (y == a.ignore_index) {  // zero-written, logits not read
      if (gv == 1) {
        std::memset(static_cast<void*>(grow), 0, sizeof(scalar_t) * V);  // all-zero bits are +0.0
      } else {
        for (int64_t v = 0; v < V; ++v) grow[v * gv] = scalar_t(0);
      }
      continue;
    }
    const scalar_t* zrow = logits + b * a.zs_b + t * a.zs_t;
    const acc_t coef = coef_in[row];
    const LseParts<acc_t> lse = split_lse<acc_t>(lse_in[row]);
    const bool hit = y >= 0 && y < V;
    // Read before the row is overwritten (in place).
    const acc_t z_target = hit ? static_cast<acc_t>(zrow[y * sv]) : acc_t(0);
    const Vec vneg(-coef);
    const Vec vhi(lse.hi), vlo(lse.lo);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (sv == 1 && gv == 1) {  // contiguous bf16/fp16: convert, compute, round, store in one loop
        using VecF = Vectorized<float>;
        constexpr int64_t WF = VecF::size();
        int64_t v = 0;
        for (; v + 2 * WF <= V; v += 2 * WF) {
          VecF a, b;
          at::vec::load_to_float<scalar_t>(zrow + v, a, b);
          const VecF ga = vneg * vexp((a - vhi) - vlo);
          const VecF gb = vneg * vexp((b - vhi) - vlo);
          at::vec::convert_from_float<scalar_t>(ga, gb).store(grow + v);
        }
        for (; v < V; ++v) {
          grow[v] = static_cast<scalar_t>(-coef * std::exp((static_cast<float>(zrow[v]) - lse.hi) - lse.lo));
        }
        if (hit) grow[y] = static_cast<scalar_t>(coef * (acc_t(1) - std::exp((z_target - lse.hi) - lse.lo)));
        continue;
      }
    }
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      const acc_t* d = load_chunk<scalar_t, acc_t>(zrow + c * sv, sv, n, buf);
      // Contiguous same-type output: write straight into the gradient row.
      const bool direct = std::is_same_v<scalar_t, acc_t> && gv == 1;
      acc_t* out = direct ? reinterpret_cast<acc_t*>(grow + c) : obuf;
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        const Vec g0 = vneg * vexp((Vec::loadu(d + i) - vhi) - vlo);
        const Vec g1 = vneg * vexp((Vec::loadu(d + i + W) - vhi) - vlo);
        g0.store(out + i);
        g1.store(out + i + W);
      }
      for (; i < n; ++i) out[i] = -coef * std::exp((d[i] - lse.hi) - lse.lo);
      if (!direct) store_chunk<scalar_t, acc_t>(obuf, grow + c * gv, gv, n);
    }
    if (hit) {
      // coef * (1 - p_y) in the accumulation type, rounded once.
      grow[y * gv] = static_cast<scalar_t>(coef * (acc_t(1) - std::exp((z_target - lse.hi) - lse.lo)));
    }
  }
}

using ForwardImplFn = void (*)(const FwdArgs&, int64_t, int64_t);

// forward_rows_impl<scalar_t, kSum, kEnt, kL2> for the 8 flag combinations, indexed by
// kSum | kEnt << 1 | kL2 << 2.
template <typename scalar_t, size_t... I>
constexpr std::array<ForwardImplFn, sizeof...(I)> forward_table(std::index_sequence<I...>) {
  return {&forward_rows_impl<scalar_t, (I & 1) != 0, (I & 2) != 0, (I & 4) != 0>...};
}

template <typename scalar_t>
void forward_rows_for(const FwdArgs& args, int64_t row_begin, int64_t row_end) {
  static constexpr auto table = forward_table<scalar_t>(std::make_index_sequence<8>{});
  const size_t k = (args.logits_sum != nullptr ? 1 : 0) | (args.entropy != nullptr ? 2 : 0) |
                   (args.log_sum_p2 != nullptr ? 4 : 0);
  table[k](args, row_begin, row_end);
}

}  // namespace

void forward_rows(const FwdArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case DType::Float:
      return forward_rows_for<float>(args, row_begin, row_end);
    case DType::BFloat16:
      return forward_rows_for<c10::BFloat16>(args, row_begin, row_end);
    case DType::Half:
      return forward_rows_for<c10::Half>(args, row_begin, row_end);
    case DType::Double:
      return forward_rows_for<double>(args, row_begin, row_end);
  }
}

void backward_rows(const BwdArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case DType::Float:
      return backward_rows_impl<float>(args, row_begin, row_end);
    case DType::BFloat16:
      return backward_rows_impl<c10::BFloat16>(args, row_begin, row_end);
    case DType::Half:
      return backward_rows_impl<c10::Half>(args, row_begin, row_end);
    case DType::Double:
      return backward_rows_impl<double>(args, row_begin, row_end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dpo_kernels
