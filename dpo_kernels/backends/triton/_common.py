"""Small pieces shared by the Triton kernels and their launch wrappers."""
from __future__ import annotations

import torch
import triton.language as tl

# Accumulation type per logits dtype: fp32 for every training dtype; float64 stays float64 so that
# torch.autograd.gradcheck can run through the kernels.
_ACC_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float16: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype for logits of ``dtype``."""
    try:
        return _ACC_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"logits dtype {dtype} is not supported by the Triton backend") from None


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch dtype of the per-token outputs (logp, lse, extras) for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
