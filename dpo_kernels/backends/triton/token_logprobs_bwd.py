"""Backward of the kernel contract: one read of the logits, one write of their gradient.

With ``coef[n] = dLoss/dlogp[n]`` (forced to 0 on ignored rows) and the saved fp64 ``lse``,
split into fp32 ``hi + lo`` (``_common.split_lse``)::

    grad[n, v] = coef[n] * (onehot(y_n)[v] - exp((z[n, v] - hi[n]) - lo[n]))

computed in fp32 and rounded once to the logits dtype; the true-class entry ``coef * (1 - p_y)``
is formed in fp32 before rounding, so it does not cancel when ``p_y -> 1`` in bf16.

The grid is (token row, vocabulary block): a short batch still spreads over the whole chip, and
each tile's work is independent. Tiles cover the 16-byte-aligned body of each row (see
``row_split``), so loads and stores are 16-byte vectors whatever V is; the first tile of a row
also handles the few unaligned elements at its head and tail. Ignored rows are written as zeros without reading the logits.
With ``inplace=True`` the gradient overwrites the logits buffer (same strides, each element read
then written by the same program), which saves a logits-sized allocation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import LSE_DTYPE
from ._common import (acc_dtype, cast_rounded, launch_device, logprob_grad, peel_offsets, row_split, split_lse,
                      vector_width)
from .config import interpreting, pick_config


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, coef_ptr, grad_ptr,
    T, V,
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    stride_gb, stride_gt, stride_gv,
    ignore_index,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ROUND_BY_BITS: tl.constexpr,  # the interpreter's bf16 cast truncates: round on the bits (_common.round_to)
):
    row = tl.program_id(0).to(tl.int64)
    v_block = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
    is_ignored = label == ignore_index
    lse_hi, lse_lo = split_lse(tl.load(lse_ptr + row), ACC_DTYPE)
    # The loss may hand a gradient to an ignored token's (constant 0) logp; it must not leak.
    coef = tl.where(is_ignored, 0.0, tl.load(coef_ptr + row).to(ACC_DTYPE))
    z_start = b * stride_zb + t * stride_zt
    g_start = b * stride_gb + t * stride_gt
    # Elements to read: none for an ignored row, whose gradient row is still written (zeros).
    n_read = tl.where(is_ignored, 0, V)
    # The split is the same for logits and gradient rows: the wrapper only passes VEC > 1 when
    # both rows start at the same offset modulo the vector.
    head, body = row_split(z_start, V, VEC)

    # This tile's slice of the aligned body; out-of-row lanes are neither read nor written.
    offs = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    body = tl.multiple_of(body, VEC)
    z = tl.load(
        logits_ptr + tl.multiple_of(z_start + head * stride_zv, VEC) + offs * stride_zv,
        mask=offs < tl.where(is_ignored, 0, body),  # a bound, not a scalar-and-block mask,
        other=float("-inf"),                        # which Triton's interpreter rejects
    ).to(ACC_DTYPE)
    grad = logprob_grad(z, head + offs, label, lse_hi, lse_lo, coef)
    grad = tl.where(is_ignored, 0.0, grad)
    tl.store(
        grad_ptr + tl.multiple_of(g_start + head * stride_gv, VEC) + offs * stride_gv,
        cast_rounded(grad, grad_ptr.dtype.element_ty, ROUND_BY_BITS),
        mask=offs < body,
    )

    # The first tile also does the unaligned head and tail of the row.
    if v_block == 0:
        peel, peel_real = peel_offsets(head, body, V, VEC)
        z_peel = tl.load(logits_ptr + z_start + peel * stride_zv, mask=peel_real & (peel < n_read),
                         other=float("-inf")).to(ACC_DTYPE)
        grad_peel = tl.where(is_ignored, 0.0, logprob_grad(z_peel, peel, label, lse_hi, lse_lo, coef))
        tl.store(grad_ptr + g_start + peel * stride_gv, cast_rounded(grad_peel, grad_ptr.dtype.element_ty, ROUND_BY_BITS),
                 mask=peel_real)


def launch_backward(logits, labels, lse, grad_logp, ignore_index, grad) -> None:
    """Launch the backward kernel: the gradient of ``logits[B, T, V]`` into ``grad`` (``logits``
    itself in place). The body of the operators below."""
    B, T, V = logits.shape
    if grad.numel() == 0:
        return
    cfg = pick_config(V, logits.dtype, kernel="backward")
    grid = (B * T, triton.cdiv(V, cfg.block_v))
    with launch_device(logits):
        _token_logprobs_bwd_kernel[grid](
            logits, labels, lse.to(LSE_DTYPE).contiguous(), grad_logp.contiguous(), grad,  # [B, T] rows read at b * T + t
            T, V,
            logits.stride(0), logits.stride(1), logits.stride(2),
            labels.stride(0), labels.stride(1),
            grad.stride(0), grad.stride(1), grad.stride(2),
            ignore_index,
            BLOCK_V=cfg.block_v,
            VEC=vector_width(logits, grad),
            ACC_DTYPE=acc_dtype(logits.dtype),
            ROUND_BY_BITS=interpreting(),
            num_warps=cfg.num_warps,
        )


# The backward kernel as two registered operators, the same pair as the C++ backend's: one
# allocating the gradient (like ``torch.empty_like(logits)``), one overwriting ``logits``.


@torch.library.custom_op("dpo_kernels::triton_token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``coef * (onehot - softmax)`` in a new tensor allocated like ``torch.empty_like(logits)``."""
    grad = torch.empty_like(logits)
    launch_backward(logits, labels, lse, grad_logp, ignore_index, grad)
    return grad


@token_logprobs_bwd_op.register_fake
def _token_logprobs_bwd_fake(logits, labels, lse, grad_logp, ignore_index):
    return torch.empty_like(logits)


@torch.library.custom_op("dpo_kernels::triton_token_logprobs_bwd_", mutates_args=("logits",))
def token_logprobs_bwd_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, ignore_index: int
) -> None:
    """``coef * (onehot - softmax)`` written over ``logits`` (saves a logits-sized allocation)."""
    launch_backward(logits, labels, lse, grad_logp, ignore_index, logits)


@token_logprobs_bwd_inplace_op.register_fake
def _token_logprobs_bwd_inplace_fake(logits, labels, lse, grad_logp, ignore_index):
    return None


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """Gradient of the per-token log-probs w.r.t. ``logits[B, T, V]``, in the logits dtype.

    ``lse`` (fp64, as the forward gives it; a narrower one is read as it is) and ``grad_logp``
    are ``[B, T]``. With ``inplace`` the result is ``logits`` itself,
    overwritten.
    """
    acc_dtype(logits.dtype)  # a clear TypeError for a dtype the kernel cannot read, before the op
    if inplace:
        token_logprobs_bwd_inplace_op(logits, labels, lse, grad_logp, int(ignore_index))
        return logits
    return token_logprobs_bwd_op(logits, labels, lse, grad_logp, int(ignore_index))
