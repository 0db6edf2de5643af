// The CPU kernels compiled for one CPU capability; setup.py adds the matching flags
// (-DCPU_CAPABILITY=... and, for AVX2/AVX512, the instruction-set flags) to this file only.
#include "../token_logprobs_kernel.h"
