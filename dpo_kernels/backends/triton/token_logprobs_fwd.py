"""Forward of the kernel contract: per-token log-probability and log-sum-exp in one pass.

For a row ``z`` of logits (``V`` entries) and its label ``y``::

    lse    = log(sum_v exp(z_v))            online over vocabulary blocks, accumulated in fp32
    logp   = z_y - lse                      0 where y == ignore_index
    zsum   = sum_v z_v                      optional (WITH_LOGITS_SUM), TRL's logits metric

One program per token row. Rows are addressed as ``(b, t)`` of a ``[B, T, V]`` tensor with three
independent strides, so ``logits[:, :-1]`` and any other strided view are read in place; all
offsets are 64-bit (``B * T * V`` passes 2^31 at realistic shapes). An ignored row makes no
vocabulary pass at all. A label outside ``[0, V)`` that is not ``ignore_index`` is never used as
an address: its row reports ``logp = NaN`` so the error cannot pass silently.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, out_dtype
from .config import pick_config


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, logits_sum_ptr,
    T, V,
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WITH_LOGITS_SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
    is_ignored = label == ignore_index
    is_scored = label != ignore_index
    in_range = (label >= 0) & (label < V)
    row_ptr = logits_ptr + b * stride_zb + t * stride_zt

    running_max = tl.full([], float("-inf"), ACC_DTYPE)
    running_sum = tl.zeros([], ACC_DTYPE)
    logits_sum = tl.zeros([], ACC_DTYPE)
    # An ignored row skips the vocabulary loop entirely: zero trips, zero bytes read.
    v_end = tl.where(is_ignored, 0, V)
    for v_start in range(0, v_end, BLOCK_V):
        offs = v_start + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(row_ptr + offs.to(tl.int64) * stride_zv, mask=in_vocab, other=float("-inf"))
        z = z.to(ACC_DTYPE)  # upcast right after the load: all arithmetic in fp32
        new_max = tl.maximum(running_max, tl.max(z, 0))
        # A block (or row) of -inf logits keeps the max at -inf; shift by 0 then, not by -inf,
        # so exp(-inf - -inf) never makes a NaN out of a legitimately masked vocabulary.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), 0)
        running_max = new_max
        if WITH_LOGITS_SUM:
            logits_sum += tl.sum(tl.where(in_vocab, z, 0.0), 0)

    # An ignored row (and a row of -inf) has running_sum == 0: log(1) keeps lse = running_max.
    lse = running_max + tl.log(tl.where(running_sum == 0, 1.0, running_sum))
    # The target logit is one scalar load, clamped into the row so it can never leave it.
    target_offset = tl.where(in_range, label, 0)
    z_target = tl.load(row_ptr + target_offset * stride_zv, mask=is_scored, other=0.0).to(ACC_DTYPE)
    logp = tl.where(in_range, z_target - lse, float("nan"))
    logp = tl.where(is_ignored, 0.0, logp)
    lse = tl.where(is_ignored, 0.0, lse)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_LOGITS_SUM:
        tl.store(logits_sum_ptr + row, tl.where(is_ignored, 0.0, logits_sum))


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    with_logits_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on ``logits[B, T, V]`` (any strides) and ``labels[B, T]``.

    Returns ``(logp, lse, logits_sum)``, each ``[B, T]`` contiguous fp32 (fp64 for fp64 logits);
    ``logits_sum`` is None unless requested.
    """
    B, T, V = logits.shape
    dtype = out_dtype(logits.dtype)
    logp = torch.empty((B, T), dtype=dtype, device=logits.device)
    lse = torch.empty((B, T), dtype=dtype, device=logits.device)
    logits_sum = torch.empty((B, T), dtype=dtype, device=logits.device) if with_logits_sum else None
    if B * T == 0:
        return logp, lse, logits_sum
    cfg = pick_config(V, logits.dtype)
    _token_logprobs_fwd_kernel[(B * T,)](
        logits, labels, logp, lse, logits_sum if with_logits_sum else logp,
        T, V,
        logits.stride(0), logits.stride(1), logits.stride(2),
        labels.stride(0), labels.stride(1),
        ignore_index,
        BLOCK_V=cfg.block_v,
        ACC_DTYPE=acc_dtype(logits.dtype),
        WITH_LOGITS_SUM=with_logits_sum,
        num_warps=cfg.num_warps,
    )
    return logp, lse, logits_sum
