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
//             a small buffer) and take the chunk max (and the chunk sum of logits when asked);
//             (b) sum exp(z - shift) over the chunk, shift = running max, rescaling the running
//             sum once per chunk when the max grows. One exp per element.
//   backward, per chunk: grad = -coef * exp(z - lse), converted and stored once; the true-class
//             element is then rewritten as coef * (1 - p_y), formed in the accumulation type
//             from the target logit read before the row was written (in place safe).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

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

// sum over d[0, n) of exp(d[i] - shift). While this (compute-bound) loop runs from L1, the
// next chunk of a contiguous row, `next` (n_next bytes), is prefetched: the load-and-max pass
// over it then finds it in cache, so memory traffic and exp arithmetic overlap.
template <typename acc_t>
inline acc_t chunk_expsum(const acc_t* d, int64_t n, acc_t shift, const char* next, int64_t n_next) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kLine = 64;
  const Vec vs(shift);
  Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
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
    a0 += vexp(Vec::loadu(d + i) - vs);
    a1 += vexp(Vec::loadu(d + i + W) - vs);
    a2 += vexp(Vec::loadu(d + i + 2 * W) - vs);
    a3 += vexp(Vec::loadu(d + i + 3 * W) - vs);
  }
  for (; i + W <= n; i += W) a0 += vexp(Vec::loadu(d + i) - vs);
  acc_t s = hsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += std::exp(d[i] - shift);
  return s;
}

template <typename scalar_t, bool kSum>
void forward_rows_impl(const FwdArgs& a, int64_t row_begin, int64_t row_end) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);
  acc_t* out_logp = static_cast<acc_t*>(a.logp);
  acc_t* out_lse = static_cast<acc_t*>(a.lse);
  acc_t* out_sum = static_cast<acc_t*>(a.logits_sum);
  const int64_t V = a.V;
  const int64_t sv = a.zs_v;
  __at_align__ acc_t buf[kChunk];

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.T;
    const int64_t t = row - b * a.T;
    const int64_t y = a.labels[b * a.ys_b + t * a.ys_t];
    if (y == a.ignore_index) {  // no vocabulary pass, no logits read
      out_logp[row] = 0;
      out_lse[row] = 0;
      if constexpr (kSum) out_sum[row] = 0;
      continue;
    }
    const scalar_t* zrow = logits + b * a.zs_b + t * a.zs_t;
    acc_t m = -inf_value<acc_t>();  // running max (NaN once a NaN was seen)
    acc_t shift = 0;                // the running sum is of exp(z - shift); 0 while m is +-inf
    acc_t s = 0;
    acc_t zsum = 0;
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      acc_t cmax, csum;
      const acc_t* d = load_chunk_max_sum<scalar_t, acc_t, kSum>(zrow + c * sv, sv, n, buf, cmax, csum);
      if constexpr (kSum) zsum += csum;
      m = max_nan(m, cmax);
      if (std::isnan(m) || m == inf_value<acc_t>()) {
        if constexpr (kSum) continue;  // lse is decided; only the logits sum still needs reading
        else break;
      }
      if (m == -inf_value<acc_t>()) continue;  // nothing but -inf so far: the sum stays 0
      if (m != shift) {
        if (s != 0) s *= std::exp(shift - m);
        shift = m;
      }
      // Prefetch the next chunk of a contiguous row (a strided row is gathered element-wise).
      const int64_t n_next = (sv == 1) ? std::min(kChunk, V - c - n) * int64_t(sizeof(scalar_t)) : 0;
      s += chunk_expsum<acc_t>(d, n, shift, reinterpret_cast<const char*>(zrow + c + n), n_next);
    }
    acc_t lse;
    if (std::isnan(m) || m == inf_value<acc_t>()) {
      lse = m;  // NaN, or +inf as torch.logsumexp gives
    } else if (s > 0) {
      lse = shift + std::log(s);
    } else {
      lse = m;  // a row of -inf (or V == 0): -inf, never -inf - -inf
    }
    // The target logit is read only when the label lies inside the row.
    out_logp[row] = (y >= 0 && y < V) ? static_cast<acc_t>(zrow[y * sv]) - lse : nan_value<acc_t>();
    out_lse[row] = lse;
    if constexpr (kSum) out_sum[row] = zsum;
  }
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
  const acc_t* lse_in = static_cast<const acc_t*>(a.lse);
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
    const acc_t lse = lse_in[row];
    const bool hit = y >= 0 && y < V;
    // Read before the row is overwritten (in place).
    const acc_t z_target = hit ? static_cast<acc_t>(zrow[y * sv]) : acc_t(0);
    const Vec vneg(-coef);
    const Vec vlse(lse);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (sv == 1 && gv == 1) {  // contiguous bf16/fp16: convert, compute, round, store in one loop
        using VecF = Vectorized<float>;
        constexpr int64_t WF = VecF::size();
        int64_t v = 0;
        for (; v + 2 * WF <= V; v += 2 * WF) {
          VecF a, b;
          at::vec::load_to_float<scalar_t>(zrow + v, a, b);
          const VecF ga = vneg * vexp(a - vlse);
          const VecF gb = vneg * vexp(b - vlse);
          at::vec::convert_from_float<scalar_t>(ga, gb).store(grow + v);
        }
        for (; v < V; ++v) grow[v] = static_cast<scalar_t>(-coef * std::exp(static_cast<float>(zrow[v]) - lse));
        if (hit) grow[y] = static_cast<scalar_t>(coef * (acc_t(1) - std::exp(z_target - lse)));
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
        const Vec g0 = vneg * vexp(Vec::loadu(d + i) - vlse);
        const Vec g1 = vneg * vexp(Vec::loadu(d + i + W) - vlse);
        g0.store(out + i);
        g1.store(out + i + W);
      }
      for (; i < n; ++i) out[i] = -coef * std::exp(d[i] - lse);
      if (!direct) store_chunk<scalar_t, acc_t>(obuf, grow + c * gv, gv, n);
    }
    if (hit) {
      // coef * (1 - p_y) in the accumulation type, rounded once.
      grow[y * gv] = static_cast<scalar_t>(coef * (acc_t(1) - std::exp(z_target - lse)));
    }
  }
}

}  // namespace

void forward_rows(const FwdArgs& args, int64_t row_begin, int64_t row_end) {
  const bool with_sum = args.logits_sum != nullptr;
  switch (args.dtype) {
    case DType::Float:
      return with_sum ? forward_rows_impl<float, true>(args, row_begin, row_end)
                      : forward_rows_impl<float, false>(args, row_begin, row_end);
    case DType::BFloat16:
      return with_sum ? forward_rows_impl<c10::BFloat16, true>(args, row_begin, row_end)
                      : forward_rows_impl<c10::BFloat16, false>(args, row_begin, row_end);
    case DType::Half:
      return with_sum ? forward_rows_impl<c10::Half, true>(args, row_begin, row_end)
                      : forward_rows_impl<c10::Half, false>(args, row_begin, row_end);
    case DType::Double:
      return with_sum ? forward_rows_impl<double, true>(args, row_begin, row_end)
                      : forward_rows_impl<double, false>(args, row_begin, row_end);
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
