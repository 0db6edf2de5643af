"""CPU backend: the kernel contract in C++ (csrc/, built as ``dpo_kernels._C``).

The extension registers three operators in the ``dpo_kernels`` namespace (CPU kernels only):

- ``torch.ops.dpo_kernels.token_logprobs_fwd(logits, labels, ignore_index, with_logits_sum)``
  -> ``(logp, lse, logits_sum)`` (``logits_sum`` is an empty tensor unless requested);
- ``torch.ops.dpo_kernels.token_logprobs_bwd(logits, labels, lse, grad_logp, ignore_index)``
  -> the gradient, allocated like ``torch.empty_like(logits)``;
- ``torch.ops.dpo_kernels.token_logprobs_bwd_(...)``, same arguments: the gradient overwrites
  ``logits`` (mutating schema ``Tensor(a!)``, returns nothing).

Their fake (meta) implementations are registered below so that ``torch.library.opcheck``, fake
tensors and ``torch.compile`` see shapes. Importing this module raises ImportError when the
extension was not built (``pip install --no-build-isolation -e .`` builds it).
"""
from __future__ import annotations

import torch

from dpo_kernels import _C  # noqa: F401  (loads the library: registers torch.ops.dpo_kernels.*)

_ops = torch.ops.dpo_kernels


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dpo_kernels::token_logprobs_fwd")
def _token_logprobs_fwd_fake(logits, labels, ignore_index, with_logits_sum):
    torch._check(logits.dim() == 3, lambda: f"logits must be [B, T, V], got {tuple(logits.shape)}")
    B, T, _ = logits.shape
    dtype = _acc(logits.dtype)
    logp = logits.new_empty((B, T), dtype=dtype)
    lse = logits.new_empty((B, T), dtype=dtype)
    logits_sum = logits.new_empty((B, T) if with_logits_sum else (0,), dtype=dtype)
    return logp, lse, logits_sum


@torch.library.register_fake("dpo_kernels::token_logprobs_bwd")
def _token_logprobs_bwd_fake(logits, labels, lse, grad_logp, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("dpo_kernels::token_logprobs_bwd_")
def _token_logprobs_bwd_inplace_fake(logits, labels, lse, grad_logp, ignore_index):
    return None


def cpu_capability() -> str:
    """Instruction set of the kernels in use here: 'avx512', 'avx2' or 'default'."""
    return _C.cpu_capability()


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    extras: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``logits[B, T, V]`` (any strides), ``labels[B, T]`` -> ``(logp, lse, extras)``."""
    unsupported = set(extras) - {"logits_sum"}
    if unsupported:
        raise NotImplementedError(f"the cpu backend does not compute {sorted(unsupported)} yet")
    with_logits_sum = "logits_sum" in extras
    logp, lse, logits_sum = _ops.token_logprobs_fwd(logits, labels, int(ignore_index), with_logits_sum)
    return logp, lse, {"logits_sum": logits_sum} if with_logits_sum else {}


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """``coef * (onehot - softmax)`` in the logits dtype; written into ``logits`` when ``inplace``."""
    if inplace:
        _ops.token_logprobs_bwd_(logits, labels, lse, grad_logp, int(ignore_index))
        return logits
    return _ops.token_logprobs_bwd(logits, labels, lse, grad_logp, int(ignore_index))
