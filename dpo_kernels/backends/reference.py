"""The kernel contract in plain PyTorch: the fallback where no kernel runs, and a second oracle.

Same inputs, outputs and numerics as the Triton kernels (see ``triton/token_logprobs_fwd.py``),
processed a chunk of rows at a time so that the fp32 working copy is at most
``_CHUNK_ELEMENTS`` elements, never a full ``N x V`` fp32 copy of bf16 logits.
"""
from __future__ import annotations

import torch

from . import accumulation_dtype, lse_dtype, split_lse

# ~64 MB of fp32 working memory per chunk.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(B: int, T: int, V: int):
    """(sequence, token slice) pairs covering ``[B, T]``; each slice is a strided view, no copy."""
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for start in range(0, T, step):
            yield b, slice(start, min(start + step, T))


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    extras: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``logits[B, T, V]``, ``labels[B, T]`` -> ``(logp, lse, extras)``, each ``[B, T]``."""
    B, T, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logp = torch.empty((B, T), dtype=acc, device=logits.device)
    lse_type = lse_dtype(logits.device)
    lse = torch.empty((B, T), dtype=lse_type, device=logits.device)
    out = {name: torch.empty((B, T), dtype=acc, device=logits.device) for name in sorted(extras)}
    for b, ts in _row_chunks(B, T, V):
        z = logits[b, ts].to(acc)
        y = labels[b, ts]
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < V)
        shift, log_sum = _shift_and_log_sum(z)
        target = z.gather(-1, torch.where(in_range, y, 0).unsqueeze(-1)).squeeze(-1)
        # (z_y - shift) - log_sum, as the kernels: no rounding of lse reaches logp.
        chunk_logp = torch.where(in_range, (target - shift) - log_sum, torch.full_like(target, float("nan")))
        logp[b, ts] = torch.where(ignored, 0.0, chunk_logp)
        lse[b, ts] = torch.where(ignored, 0.0, shift.to(lse_type) + log_sum.to(lse_type))
        for name, value in _extras(z, y, shift, log_sum, extras):
            out[name][b, ts] = torch.where(ignored, 0.0, value)
    return logp, lse, out


def _shift_and_log_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(shift, log sum_v exp(z_v - shift))``: ``shift`` is the row's max, 0 where that
    is infinite or the row is empty (so a row of -inf gives -inf and a +inf gives +inf, as
    ``torch.logsumexp`` does); a NaN anywhere makes both NaN."""
    if z.shape[-1] == 0:
        shift = z.new_zeros(z.shape[:-1])
    else:
        top = z.amax(-1)
        shift = torch.where(torch.isinf(top), 0.0, top)
    return shift, torch.exp(z - shift.unsqueeze(-1)).sum(-1).log()


def _extras(z: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, log_sum: torch.Tensor, names: frozenset[str]):
    if "logits_sum" in names:
        yield "logits_sum", z.sum(-1)
    if "entropy" in names:
        # H = log_sum - sum p (z - shift): relative to the shift, so a common offset cancels exactly.
        x = z - shift.unsqueeze(-1)
        p = torch.exp(x - log_sum.unsqueeze(-1))
        yield "entropy", log_sum - torch.where(p > 0, p * x, 0.0).sum(-1)
    if "accuracy" in names:
        yield "accuracy", (z.argmax(-1) == y).to(z.dtype)
    if "log_sum_p2" in names:
        # log sum p^2 = log sum e^2 - 2 log_sum, e = exp(z - shift); NaN where lse is not finite.
        e = torch.exp(z - shift.unsqueeze(-1))
        value = (e * e).sum(-1).log() - 2.0 * log_sum
        yield "log_sum_p2", torch.where(torch.isfinite(log_sum), value, float("nan"))


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """``coef * (onehot - softmax)`` in the logits dtype; written into ``logits`` when ``inplace``."""
    B, T, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    grad = logits if inplace else torch.empty_like(logits)
    for b, ts in _row_chunks(B, T, V):
        y = labels[b, ts]
        ignored = y == ignore_index
        hit = (y >= 0) & (y < V) & ~ignored
        coef = torch.where(ignored, 0.0, grad_logp[b, ts].to(acc)).unsqueeze(-1)
        # -coef * softmax, built in one working buffer; then + coef on the label entry, both in
        # the accumulation dtype, so the true class gets coef * (1 - p) rounded once.
        hi, lo = split_lse(lse[b, ts], acc)
        chunk_grad = logits[b, ts].to(acc, copy=True).sub_(hi.unsqueeze(-1)).sub_(lo.unsqueeze(-1)).exp_().mul_(-coef)
        safe_y = torch.where(hit, y, 0).unsqueeze(-1)
        chunk_grad.scatter_add_(-1, safe_y, torch.where(hit.unsqueeze(-1), coef, 0.0))
        chunk_grad.masked_fill_(ignored.unsqueeze(-1), 0.0)  # even where an ignored row holds NaN
        grad[b, ts] = chunk_grad
    return grad
