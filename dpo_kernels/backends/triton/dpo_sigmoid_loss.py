"""The default DPO loss fused on the per-token log-probs: one small kernel, one program per pair.

Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), with the conservative
label smoothing ``eps`` of cDPO (Mitchell 2023). For pair ``i`` with chosen row ``i`` and rejected
row ``i + P`` of the ``[2P, T]`` per-token log-probs::

    s_r      = sum_t logp[r, t]            (divided by the completion length when AVERAGE)
    margin_i = (s_c - ref_c) - (s_r - ref_r)
    loss_i   = (1 - eps) * softplus(-beta * margin_i) + eps * softplus(beta * margin_i)
    reward   = beta * (s - ref)            chosen and rejected, detached
    coef_c   = dloss_i/ds_c / P = beta * ((1 - eps) * -sigmoid(-beta m) + eps * sigmoid(beta m)) / P
    coef_r   = -coef_c

``coef`` is the gradient of the mean loss w.r.t. each sequence log-prob, so the backward needs
no further loss math: ``dL/dlogp[r, t] = coef_r * valid[r, t] / (len_r if AVERAGE else 1)``.
Everything stays on the device: no host synchronisation between forward, loss and backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_device


@triton.jit
def _log1p(u):
    # log1p from log and exp only (libdevice is unavailable to the interpreter). The correction
    # factor u / ((1 + u) - 1) undoes the rounding of 1 + u (Goldberg's trick).
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _sequence_logp(logp_ptr, labels_ptr, row, T, stride_yb, stride_yt, ignore_index,
                   AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr):
    total = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.float32)
    for t_start in range(0, T, BLOCK_T):
        offs = t_start + tl.arange(0, BLOCK_T)
        in_seq = offs < T
        logp = tl.load(logp_ptr + row * T + offs, mask=in_seq, other=0.0).to(tl.float32)
        label = tl.load(labels_ptr + row * stride_yb + offs * stride_yt, mask=in_seq, other=ignore_index)
        valid = in_seq & (label != ignore_index)
        total += tl.sum(tl.where(valid, logp, 0.0), 0)
        count += tl.sum(valid.to(tl.float32), 0)
    if AVERAGE:
        # A sequence with no completion tokens averages to 0, never 0/0.
        total = total / tl.maximum(count, 1.0)
    return total, count


@triton.jit
def _dpo_sigmoid_loss_kernel(
    logp_ptr, labels_ptr, ref_logps_ptr,
    loss_ptr, chosen_reward_ptr, rejected_reward_ptr, seq_logp_ptr, seq_count_ptr, seq_coef_ptr,
    P, T,
    stride_yb, stride_yt,
    ignore_index,
    beta, label_smoothing, inv_num_pairs,
    AVERAGE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    chosen_row = pair
    rejected_row = pair + P
    s_c, n_c = _sequence_logp(logp_ptr, labels_ptr, chosen_row, T, stride_yb, stride_yt,
                              ignore_index, AVERAGE, BLOCK_T)
    s_r, n_r = _sequence_logp(logp_ptr, labels_ptr, rejected_row, T, stride_yb, stride_yt,
                              ignore_index, AVERAGE, BLOCK_T)
    ref_c = tl.load(ref_logps_ptr + chosen_row).to(tl.float32)
    ref_r = tl.load(ref_logps_ptr + rejected_row).to(tl.float32)
    chosen_reward = beta * (s_c - ref_c)
    rejected_reward = beta * (s_r - ref_r)
    x = chosen_reward - rejected_reward  # beta * margin
    loss = (1.0 - label_smoothing) * _softplus(-x) + label_smoothing * _softplus(x)
    dloss_dx = -(1.0 - label_smoothing) * _sigmoid(-x) + label_smoothing * _sigmoid(x)
    coef = beta * dloss_dx * inv_num_pairs

    tl.store(loss_ptr + pair, loss)
    tl.store(chosen_reward_ptr + pair, chosen_reward)
    tl.store(rejected_reward_ptr + pair, rejected_reward)
    tl.store(seq_logp_ptr + chosen_row, s_c)
    tl.store(seq_logp_ptr + rejected_row, s_r)
    tl.store(seq_count_ptr + chosen_row, n_c)
    tl.store(seq_count_ptr + rejected_row, n_r)
    tl.store(seq_coef_ptr + chosen_row, coef)
    tl.store(seq_coef_ptr + rejected_row, -coef)


_OUTPUTS = ("losses", "chosen_rewards", "rejected_rewards", "seq_logps", "seq_counts", "seq_coef")


def _empty_outputs(token_logp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The op's outputs in ``_OUTPUTS`` order: three ``[P]`` and three ``[2P]`` fp32 tensors."""
    rows = token_logp.shape[0]
    P = rows // 2
    return tuple(token_logp.new_empty((P if i < 3 else rows,), dtype=torch.float32) for i in range(6))


def launch_dpo_sigmoid_loss(token_logp, labels, ref_logps, ignore_index, beta, label_smoothing, average):
    """Allocate the outputs (``_OUTPUTS`` order) and launch the loss kernel (the operator's body)."""
    out = _empty_outputs(token_logp)
    rows, T = token_logp.shape
    P = rows // 2
    if P == 0:
        return out
    losses, chosen_rewards, rejected_rewards, seq_logps, seq_counts, seq_coef = out
    block_t = min(1024, triton.next_power_of_2(max(T, 1)))
    with launch_device(token_logp):
        _dpo_sigmoid_loss_kernel[(P,)](
            token_logp.contiguous(), labels, ref_logps.to(torch.float32).contiguous(),
            losses, chosen_rewards, rejected_rewards, seq_logps, seq_counts, seq_coef,
            P, T,
            labels.stride(0), labels.stride(1),
            ignore_index,
            float(beta), float(label_smoothing), 1.0 / P,
            AVERAGE=average,
            BLOCK_T=block_t,
            num_warps=4,
        )
    return out


@torch.library.custom_op("dpo_kernels::triton_dpo_sigmoid_loss", mutates_args=())
def dpo_sigmoid_loss_op(
    token_logp: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    ignore_index: int,
    beta: float,
    label_smoothing: float,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss kernel as a registered operator; outputs in ``_OUTPUTS`` order. No autograd of
    its own: ``logprobs.fused_sigmoid_dpo`` builds the gradient from ``seq_coef``."""
    return launch_dpo_sigmoid_loss(token_logp, labels, ref_logps, ignore_index, beta, label_smoothing, average)


@dpo_sigmoid_loss_op.register_fake
def _dpo_sigmoid_loss_fake(token_logp, labels, ref_logps, ignore_index, beta, label_smoothing, average):
    return _empty_outputs(token_logp)


def dpo_sigmoid_loss(
    token_logp: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    ignore_index: int,
    beta: float,
    label_smoothing: float,
    average: bool,
) -> dict[str, torch.Tensor]:
    """The loss kernel on ``token_logp[2P, T]`` (fp32) and ``ref_logps[2P]``.

    Returns per-pair ``losses``, ``chosen_rewards``, ``rejected_rewards`` (``[P]``) and
    per-sequence ``seq_logps``, ``seq_counts`` and ``seq_coef`` (``[2P]``, fp32).
    """
    out = dpo_sigmoid_loss_op(
        token_logp, labels, ref_logps, int(ignore_index), float(beta), float(label_smoothing), bool(average)
    )
    return dict(zip(_OUTPUTS, out))
