"""CPU backend: the kernel contract in C++ (csrc/, built as ``dpo_kernels._C``).

The extension registers three operators in the ``dpo_kernels`` namespace (CPU kernels only):

- ``torch.ops.dpo_kernels.token_logprobs_fwd(logits, labels, ignore_index, extras_mask)``
  -> ``(logp, lse, extras)``: ``lse`` in fp64 (``backends.LSE_DTYPE``); ``extras`` is
  ``[K, B, T]``, one slice per bit set in ``extras_mask`` (bit ``i`` is ``backends.EXTRAS[i]``:
  1 logits_sum, 2 entropy, 4 accuracy, 8 log_sum_p2), in bit order, all computed in the one pass
  over each row;
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

from . import EXTRAS, empty_forward_outputs, extras_mask, extras_names

_ops = torch.ops.dpo_kernels


@torch.library.register_fake("dpo_kernels::token_logprobs_fwd")
def _token_logprobs_fwd_fake(logits, labels, ignore_index, extras_mask):
    torch._check(logits.dim() == 3, lambda: f"logits must be [B, T, V], got {tuple(logits.shape)}")
    torch._check(0 <= extras_mask < 1 << len(EXTRAS), lambda: f"extras_mask out of range: {extras_mask}")
    return empty_forward_outputs(logits, extras_mask)


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
    mask = extras_mask(extras)
    logp, lse, stacked = _ops.token_logprobs_fwd(logits, labels, int(ignore_index), mask)
    return logp, lse, dict(zip(extras_names(mask), stacked.unbind(0)))


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
