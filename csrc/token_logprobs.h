// Shared declarations of the CPU kernels of the kernel contract (stated in dpo_kernels/backends/__init__.py).
//
// The kernels themselves (token_logprobs_kernel.h) are compiled once per CPU capability
// (DEFAULT, AVX2, AVX512 on x86-64), each copy in its own namespace, exactly as ATen does for its
// own kernels; ops.cpp picks one at run time with at::native::get_cpu_capability() (which honours
// ATEN_CPU_CAPABILITY). The interface is plain pointers and 64-bit element strides so that the
// capability-specific translation units include nothing but ATen's vector headers.
#pragma once

#include <cstdint>

namespace dpo_kernels {

enum class DType : int { Float = 0, BFloat16 = 1, Half = 2, Double = 3 };

struct FwdArgs {
  const void* logits;  // [B, T, V], element strides below (any sign/overlap, 64-bit)
  int64_t zs_b, zs_t, zs_v;
  const int64_t* labels;  // [B, T]
  int64_t ys_b, ys_t;
  void* logp;  // [B * T] contiguous, fp32 (fp64 for fp64 logits)
  void* lse;   // [B * T] contiguous, fp64 whatever the logits: the fp32 max + log-sum, exactly
  // Same-pass extras (backends.EXTRAS): each [B * T] contiguous like logp, nullptr when not asked.
  void* logits_sum;  // sum_v z_v
  void* entropy;     // lse - sum_v p_v z_v
  void* accuracy;    // 1 where the first index of the row's max is the label, else 0
  void* log_sum_p2;  // log sum_v p_v^2 (NaN where lse is not finite)
  int64_t T, V, ignore_index;
  DType dtype;
};

struct BwdArgs {
  const void* logits;
  int64_t zs_b, zs_t, zs_v;
  void* grad;  // same shape; may be the logits buffer itself (in place)
  int64_t gs_b, gs_t, gs_v;
  const int64_t* labels;
  int64_t ys_b, ys_t;
  const void* lse;   // [B * T] contiguous, fp64 (split into fp32 hi + lo per row)
  const void* coef;  // [B * T] contiguous, accumulation dtype (dLoss/dlogp)
  int64_t T, V, ignore_index;
  DType dtype;
};

using ForwardRowsFn = void (*)(const FwdArgs&, int64_t row_begin, int64_t row_end);
using BackwardRowsFn = void (*)(const BwdArgs&, int64_t row_begin, int64_t row_end);

#define DPO_KERNELS_DECLARE_CAPABILITY(cap)                                  \
  namespace cap {                                                            \
  void forward_rows(const FwdArgs& args, int64_t row_begin, int64_t row_end);  \
  void backward_rows(const BwdArgs& args, int64_t row_begin, int64_t row_end); \
  }

DPO_KERNELS_DECLARE_CAPABILITY(DEFAULT)
#ifdef DPO_KERNELS_HAVE_AVX2
DPO_KERNELS_DECLARE_CAPABILITY(AVX2)
#endif
#ifdef DPO_KERNELS_HAVE_AVX512
DPO_KERNELS_DECLARE_CAPABILITY(AVX512)
#endif

}  // namespace dpo_kernels
