"""Forward of the kernel contract: per-token log-probability and log-sum-exp in one pass.

For a row ``z`` of logits (``V`` entries) and its label ``y``::

    lse    = log(sum_v exp(z_v))            online over vocabulary blocks, accumulated in fp32
    logp   = z_y - lse                      0 where y == ignore_index
    zsum   = sum_v z_v                      optional (WITH_LOGITS_SUM), TRL's logits metric

One program per token row. Rows are addressed as ``(b, t)`` of a ``[B, T, V]`` tensor with three
independent strides, so ``logits[:, :-1]`` and any other strided view are read in place; all
offsets are 64-bit (``B * T * V`` passes 2^31 at realistic shapes). Each row is split into an
unaligned head and tail (read in one small masked step) and a body that starts on a 16-byte
boundary, so the vocabulary loop uses 16-byte vector loads whatever V is (see ``row_split``).
An ignored row makes no vocabulary pass at all. A label outside ``[0, V)`` that is not ``ignore_index`` is never used as
an address: its row reports ``logp = NaN`` so the error cannot pass silently.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, online_lse_update, out_dtype, peel_offsets, row_split, vector_width
from .config import pick_config


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, logits_sum_ptr,
    T, V,
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    ignore_index,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
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
    row_start = b * stride_zb + t * stride_zt

    running_max = tl.full([], float("-inf"), ACC_DTYPE)
    running_sum = tl.zeros([], ACC_DTYPE)
    logits_sum = tl.zeros([], ACC_DTYPE)
    # An ignored row reads nothing: zero elements, zero loop trips.
    n = tl.where(is_ignored, 0, V)
    head, body = row_split(row_start, n, VEC)

    # Head and tail of the row (fewer than VEC elements each), in one masked step.
    peel, peel_real = peel_offsets(head, body, n, VEC)
    z_peel = tl.load(logits_ptr + row_start + peel * stride_zv, mask=peel_real, other=float("-inf"))
    z_peel = z_peel.to(ACC_DTYPE)
    running_max, running_sum = online_lse_update(z_peel, running_max, running_sum)
    if WITH_LOGITS_SUM:
        logits_sum += tl.sum(tl.where(peel_real, z_peel, 0.0), 0)

    # The body: whole 16-byte vectors from a 16-byte boundary (true by construction of head).
    body_ptr = logits_ptr + tl.multiple_of(row_start + head * stride_zv, VEC)
    body = tl.multiple_of(body, VEC)
    for v_start in range(0, body, BLOCK_V):
        offs = v_start + tl.arange(0, BLOCK_V)
        in_body = offs < body
        z = tl.load(body_ptr + offs * stride_zv, mask=in_body, other=float("-inf"))
        z = z.to(ACC_DTYPE)  # upcast right after the load: all arithmetic in fp32
        running_max, running_sum = online_lse_update(z, running_max, running_sum)
        if WITH_LOGITS_SUM:
            logits_sum += tl.sum(tl.where(in_body, z, 0.0), 0)

    # An ignored row (and a row of -inf) has running_sum == 0: log(1) keeps lse = running_max.
    lse = running_max + tl.log(tl.where(running_sum == 0, 1.0, running_sum))
    # The target logit is one scalar load, clamped into the row so it can never leave it.
    target_offset = tl.where(in_range, label, 0)
    z_target = tl.load(logits_ptr + row_start + target_offset * stride_zv, mask=is_scored, other=0.0)
    logp = tl.where(in_range, z_target.to(ACC_DTYPE) - lse, float("nan"))
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
        VEC=vector_width(logits),
        ACC_DTYPE=acc_dtype(logits.dtype),
        WITH_LOGITS_SUM=with_logits_sum,
        num_warps=cfg.num_warps,
    )
    return logp, lse, logits_sum
