// Operator registration for the CPU kernels of the kernel contract: dpo_kernels::token_logprobs_*.
//
// Validates inputs (shapes, dtypes, devices, overlap for the in-place variant), allocates the
// outputs, and spreads token rows over threads with at::parallel_for; the per-row work is in
// token_logprobs_kernel.h, compiled once per CPU capability and chosen here at run time.
//
// Schemas (fake / meta impls are registered in Python, dpo_kernels/backends/cpu.py):
//   token_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index, int extras_mask)
//       -> (Tensor logp, Tensor lse, Tensor extras)         lse in fp64; extras: [K, B, T], one slice per bit
//          of extras_mask (K = its popcount), in bit order: 1 logits_sum, 2 entropy, 4 accuracy,
//          8 log_sum_p2 (the order of backends.EXTRAS); [0, B, T] when the mask is 0
//   token_logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor grad_logp, int ignore_index)
//       -> Tensor                                           strides of empty_like(logits)
//   token_logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor grad_logp,
//       int ignore_index) -> ()                             the gradient overwrites logits
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <bitset>
#include <cstdint>
#include <string>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "token_logprobs.h"

namespace dpo_kernels {
namespace {

struct Kernels {
  ForwardRowsFn forward;
  BackwardRowsFn backward;
  const char* name;
};

Kernels pick_kernels() {
  // ATen's own choice ("DEFAULT", "AVX2", "AVX512", ...): what the CPU supports, lowered by
  // ATEN_CPU_CAPABILITY when set. (at::native::get_cpu_capability() is not exported.)
  const std::string cap = at::get_cpu_capability();
  (void)cap;
#ifdef DPO_KERNELS_HAVE_AVX512
  if (cap == "AVX512") return {AVX512::forward_rows, AVX512::backward_rows, "avx512"};
#endif
#ifdef DPO_KERNELS_HAVE_AVX2
  if (cap == "AVX2" || cap == "AVX512") return {AVX2::forward_rows, AVX2::backward_rows, "avx2"};
#endif
  return {DEFAULT::forward_rows, DEFAULT::backward_rows, "default"};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

DType logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return DType::Float;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Half;
    case at::kDouble:
      return DType::Double;
    default:
      TORCH_CHECK(false, "dpo_kernels (cpu): logits must be float32, bfloat16, float16 or float64, got ",
                  logits.scalar_type());
  }
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks logits/labels and returns the labels as int64 (a [B, T] copy only when not int64).
at::Tensor check_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, T, V], got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2, op, ": labels must be [B, T], got shape ", labels.sizes());
  TORCH_CHECK(labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels ", labels.sizes(), " do not match logits ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op,
              ": the cpu backend takes CPU tensors, got logits on ", logits.device(), " and labels on ",
              labels.device());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  logits_dtype(logits);  // dtype check
  return labels.scalar_type() == at::kLong ? labels : labels.to(at::kLong);
}

// x as a contiguous [B, T] tensor of `dtype`: the accumulation dtype for grad_logp, fp64 for lse
// (an fp32 lse is read exactly, with no low part).
at::Tensor check_row_tensor(const at::Tensor& x, const at::Tensor& logits, const char* what, const char* op,
                            at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1), op, ": ", what,
              " must be [B, T] = [", logits.size(0), ", ", logits.size(1), "], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", what, " must be floating point, got ",
              x.scalar_type());
  return x.to(dtype).contiguous();
}

// Rows per task: enough vocabulary work per task to amortise the scheduling.
int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

// Bits of extras_mask, in the order of backends.EXTRAS (and of the slices of the extras output).
enum ExtraBit : int64_t { kLogitsSum = 1, kEntropy = 2, kAccuracy = 4, kLogSumP2 = 8, kAllExtras = 15 };

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                   const at::Tensor& labels, int64_t ignore_index,
                                                                   int64_t extras_mask) {
  const char* op = "dpo_kernels::token_logprobs_fwd";
  const at::Tensor y = check_inputs(logits, labels, op);
  TORCH_CHECK(extras_mask >= 0 && extras_mask <= kAllExtras, op,
              ": extras_mask must be a combination of 1 (logits_sum), 2 (entropy), 4 (accuracy) and "
              "8 (log_sum_p2), got ", extras_mask);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({B, T}, opts);
  at::Tensor lse = at::empty({B, T}, opts.dtype(at::kDouble));  // see token_logprobs_kernel.h
  const int64_t K = static_cast<int64_t>(std::bitset<4>(static_cast<unsigned long long>(extras_mask)).count());
  at::Tensor extras = at::empty({K, B, T}, opts);
  if (B * T == 0) return {logp, lse, extras};

  FwdArgs a;
  a.logits = logits.const_data_ptr();
  a.zs_b = logits.stride(0);
  a.zs_t = logits.stride(1);
  a.zs_v = logits.stride(2);
  a.labels = y.const_data_ptr<int64_t>();
  a.ys_b = y.stride(0);
  a.ys_t = y.stride(1);
  a.logp = logp.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr();
  int64_t slot = 0;
  auto extra_out = [&](ExtraBit bit) -> void* {
    return (extras_mask & bit) ? extras[slot++].mutable_data_ptr() : nullptr;
  };
  a.logits_sum = extra_out(kLogitsSum);  // in bit order: the slices follow the mask's bits
  a.entropy = extra_out(kEntropy);
  a.accuracy = extra_out(kAccuracy);
  a.log_sum_p2 = extra_out(kLogSumP2);
  a.T = T;
  a.V = V;
  a.ignore_index = ignore_index;
  a.dtype = logits_dtype(logits);
  const ForwardRowsFn fn = kernels().forward;
  at::parallel_for(0, B * T, grain_rows(V), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  return {logp, lse, extras};
}

void run_backward(const at::Tensor& logits, const at::Tensor& y, const at::Tensor& lse, const at::Tensor& coef,
                  int64_t ignore_index, at::Tensor& grad) {
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  if (grad.numel() == 0) return;
  BwdArgs a;
  a.logits = logits.const_data_ptr();
  a.zs_b = logits.stride(0);
  a.zs_t = logits.stride(1);
  a.zs_v = logits.stride(2);
  a.grad = grad.mutable_data_ptr();
  a.gs_b = grad.stride(0);
  a.gs_t = grad.stride(1);
  a.gs_v = grad.stride(2);
  a.labels = y.const_data_ptr<int64_t>();
  a.ys_b = y.stride(0);
  a.ys_t = y.stride(1);
  a.lse = lse.const_data_ptr();
  a.coef = coef.const_data_ptr();
  a.T = T;
  a.V = V;
  a.ignore_index = ignore_index;
  a.dtype = logits_dtype(logits);
  const BackwardRowsFn fn = kernels().backward;
  at::parallel_for(0, B * T, grain_rows(V), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// The out-of-place gradient is a fresh logits-sized buffer: its first touch faults in every page,
// which with 4 KB pages costs about as much as the whole backward. Where transparent huge pages are
// in "madvise" mode, ask for them on the buffer (what torch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1); only whole 2 MB pages inside the buffer are advised. A no-op elsewhere.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.storage().nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory
#else
  (void)t;
#endif
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& grad_logp, int64_t ignore_index) {
  const char* op = "dpo_kernels::token_logprobs_bwd";
  const at::Tensor y = check_inputs(logits, labels, op);
  const at::Tensor lse_c = check_row_tensor(lse, logits, "lse", op, at::kDouble);
  const at::Tensor coef = check_row_tensor(grad_logp, logits, "grad_logp", op, acc_dtype(logits));
  at::Tensor grad = at::empty_like(logits);
  advise_huge_pages(grad);
  run_backward(logits, y, lse_c, coef, ignore_index, grad);
  return grad;
}

void token_logprobs_bwd_(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                         const at::Tensor& grad_logp, int64_t ignore_index) {
  const char* op = "dpo_kernels::token_logprobs_bwd_";
  const at::Tensor y = check_inputs(logits, labels, op);
  // Rows that share memory would be written by two threads (and read after being written).
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes, op,
              ": in-place backward needs logits without internal overlap (not an expanded view); use "
              "the out-of-place backward");
  const at::Tensor lse_c = check_row_tensor(lse, logits, "lse", op, at::kDouble);
  const at::Tensor coef = check_row_tensor(grad_logp, logits, "grad_logp", op, acc_dtype(logits));
  run_backward(logits, y, lse_c, coef, ignore_index, logits);
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY(dpo_kernels, m) {
  m.set_python_module("dpo_kernels.backends.cpu");
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index, int extras_mask) "
        "-> (Tensor logp, Tensor lse, Tensor extras)");
  m.def("token_logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor grad_logp, int ignore_index) "
        "-> Tensor");
  m.def("token_logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor grad_logp, "
        "int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &dpo_kernels::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &dpo_kernels::token_logprobs_bwd);
  m.impl("token_logprobs_bwd_", &dpo_kernels::token_logprobs_bwd_);
}

// A plain Python module, so that `import dpo_kernels._C` loads the library (and registers the
// operators above); no pybind11 needed.
namespace {
PyObject* py_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(dpo_kernels::kernels().name);
}
PyMethodDef module_methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "Instruction set of the kernels in use: 'avx512', 'avx2' or 'default' (follows ATEN_CPU_CAPABILITY)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of dpo_kernels (torch.ops.dpo_kernels).", -1,
                          module_methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
