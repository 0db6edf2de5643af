"""Forward of the kernel contract: per-token log-probability and log-sum-exp in one pass.

For a row ``z`` of logits (``V`` entries) and its label ``y``::

    M, S       = max_v z_v, sum_v exp(z_v - M)     online over vocabulary blocks, in fp32
    lse        = M + log S                  stored in fp64: the fp32 M and log S summed exactly
    logp       = (z_y - M) - log S          0 where y == ignore_index
  optional extras, each behind a constexpr flag (free when off; none costs another exp):
    logits_sum = sum_v z_v                  TRL's logits/chosen|rejected metric
    entropy    = log S - sum_v p_v (z_v - M)   TRL's entropy metric (lse - sum_v p_v z_v)
    accuracy   = [argmax_v z_v == y]        TRL's mean_token_accuracy (torch.argmax: first index
                                         on ties, the first NaN if any)
    log_sum_p2 = log sum_v p_v^2 = log(sum_v exp(2 (z_v - M))) - 2 log S   WPO's weights

One program per token row. Rows are addressed as ``(b, t)`` of a ``[B, T, V]`` tensor with three
independent strides, so ``logits[:, :-1]`` and any other strided view are read in place; all
offsets are 64-bit (``B * T * V`` passes 2^31 at realistic shapes). Each row is split into an
unaligned head and tail (read in one small masked step) and a body that starts on a 16-byte
boundary, so the vocabulary loop uses 16-byte vector loads whatever V is (see ``row_split``).
The vocabulary loop takes one of two forms (``LANE_STATS``, chosen by ``config.lane_stats``): each
block reduced across the whole program into running row statistics (:func:`_fold_block`: a
cross-warp reduction per statistic per block), or per-lane running statistics, a lane being one
thread's vector, merged once per row after the loop (the same :func:`_fold_block` on ``[R, LANE]``
blocks, then :func:`_merge_lanes`: no cross-thread reduction inside the loop). The same formulas;
the sums differ only in order.
An ignored row makes no vocabulary pass at all, and all its outputs are 0. A label outside
``[0, V)`` that is not ``ignore_index`` is never used as an address: its row reports
``logp = NaN`` so the error cannot pass silently.

With ``WRITE_GRAD`` (``token_logprobs_forward_and_grad_``) the program then overwrites its row
with the gradient of ``logp`` itself::

    grad[v] = onehot(y)[v] - exp((z_v - hi) - lo)  (the backward kernel's formula, coef = 1)

in a second pass over the row, rounded once to the logits dtype; an ignored row is written as
zeros without being read. Why: the hidden-state path's ``split`` mode needs exactly this before
any loss exists (``u_t = d logp_t / d h_t``). As two kernels, the row is read from memory by the
forward, then read again and written by the backward; here the second read follows the first
within one program (last block first: the most recently read blocks are the likeliest still in
L2), and there is one launch instead of two. Whether that read does come from L2 depends on the
row's size: ``config.fuse_forward_and_grad`` decides where this kernel runs. The numbers are
those of the two kernels, bit for bit: the same ``lse`` and the same expression per element.

Every statistic is kept relative to the row's max and nothing adds the max back in fp32, so a
common offset of the logits (a row near 1e5, or 1e8) costs no precision: logp, the entropy and
the gradient are as exact as for the same row centred on 0 (``backends.LSE_DTYPE``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import check_writable_rows, empty_forward_outputs, extras_mask, extras_names, forward_then_grad_
from ._common import (acc_dtype, cast_rounded, launch_device, logprob_grad, peel_offsets, row_split, split_lse,
                      vector_width)
from .config import fuse_forward_and_grad, interpreting, pick_config
from .token_logprobs_bwd import token_logprobs_backward


@triton.jit
def _moved_entropy_sum(d, s, old_max, shift, scale):
    """The entropy's sum ``D = sum e (z - old shift)`` of a part whose ``S = sum e``, moved to a new
    ``shift``: ``scale (D + delta S)``, ``delta = old_max - shift`` and ``scale = exp(delta)`` (the
    caller's rescale of ``S``). ``delta`` is floored so that a part with nothing seen yet
    (``old_max = -inf``, ``S = 0``) gives 0, not ``-inf * 0``; and a part the new max leaves with
    no weight (``scale = 0``: the max jumped by more than ~104) gives 0, where ``delta S`` could
    overflow to ``-inf`` (a jump near 1e38 / S) and ``0 * -inf`` make the entropy NaN."""
    delta = tl.maximum(old_max - shift, -3.0e38)
    return tl.where(scale == 0, 0.0, scale * (d + delta * s))


@triton.jit
def _argmax_take(best_z, best_idx, z, idx):
    """The running argmax ``(best_z, best_idx)`` after a candidate ``(z, idx)`` (a part's own
    argmax), in torch.argmax's order: NaN above every number, then the larger value, ties (and
    NaN against NaN) to the smaller index. Parts arrive out of index order (the row's head and
    tail first, lanes merged last), so ties are settled by index, not by arrival. A NaN ``z``
    stands for "this part holds a NaN, the first at ``idx``"."""
    best_nan = best_z != best_z
    take = tl.where(z != z, ~best_nan | (idx < best_idx),
                    ~best_nan & ((z > best_z) | ((z == best_z) & (idx < best_idx))))
    return tl.where(take, z, best_z), tl.where(take, idx, best_idx)


@triton.jit
def _fold_block(z, offs, real, running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx,
                V, WITH_LOGITS_SUM: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_ACCURACY: tl.constexpr,
                WITH_LOG_SUM_P2: tl.constexpr, AXIS: tl.constexpr):
    """Fold one block of a row (``real`` lanes; others are -inf) into the running statistics.

    All sums are relative to the running max M: S = sum e, e = exp(z - M); entropy needs
    D = sum e (z - M), moved to a new max M' as alpha (D + (M - M') S) with alpha = exp(M - M')
    (relative to M, a common offset of the row cancels exactly in z - M), and log sum p^2 =
    log(sum e^2) - 2 log S, so the extras cost no further exp. (The shift is M, or 0 while M is
    infinite.)

    ``AXIS = 0``: ``z`` is the block ``[BLOCK_V]`` and the statistics are the row's scalars (each
    reduction spans the whole program). ``AXIS = 1`` (``LANE_STATS``): ``z`` is ``[R, LANE]`` and
    the statistics are per lane ``[R]``, a lane being one thread's vector: every reduction stays
    inside a thread, so the loop has no shuffle and no barrier (the lanes are merged once per row,
    :func:`_merge_lanes`), for one more exp per lane per block (its rescale).
    """
    if WITH_ACCURACY:
        # torch.argmax's answer is the first NaN if there is one, else the first index of the max:
        # NaN is taken out of the max explicitly (a GPU's max reduction skips NaN, the
        # interpreter's propagates it). The statistics lose nothing: a NaN still makes S NaN.
        is_nan = real & (z != z)
        block_max = tl.max(tl.where(is_nan, float("-inf"), z), AXIS)
    else:
        block_max = tl.max(z, AXIS)
    new_max = tl.maximum(running_max, block_max)
    # An infinite max is not a usable shift: with -inf (a block or row of masked vocabulary)
    # exp(-inf - -inf) would make a NaN of a legitimate row, and with +inf the sum must become
    # +inf (as torch.logsumexp gives), not inf - inf. Shift by 0 in both cases.
    shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
    alpha = tl.exp(running_max - shift)
    if AXIS == 1:  # the lanes' values against each element of their lane
        shift_z = shift[:, None]
        max_z = block_max[:, None]
    else:
        shift_z = shift
        max_z = block_max
    e = tl.exp(z - shift_z)
    if WITH_ENTROPY:  # before running_sum moves: the shift's move weighs the old sum
        # e == 0 where z == -inf: its term is 0, and 0 * -inf must not make a NaN.
        z_dot_e = (_moved_entropy_sum(z_dot_e, running_sum, running_max, shift, alpha)
                   + tl.sum(tl.where(e > 0, e * (z - shift_z), 0.0), AXIS))
    running_sum = running_sum * alpha + tl.sum(e, AXIS)
    if WITH_LOGITS_SUM:
        logits_sum += tl.sum(tl.where(real, z, 0.0), AXIS)
    if WITH_LOG_SUM_P2:
        sum_e2 = sum_e2 * (alpha * alpha) + tl.sum(e * e, AXIS)
    if WITH_ACCURACY:
        # The block's own argmax in one reduction: a NaN's key is its index, the max's its index
        # + V, the rest 2V; the smallest key is the first NaN if there is one, else the first max
        # (V when the block has no element of the row).
        key = tl.min(tl.where(is_nan, offs, tl.where(real & (z == max_z), offs + V, 2 * V)), AXIS)
        has_nan = key < V
        best_z, best_idx = _argmax_take(best_z, best_idx, tl.where(has_nan, float("nan"), block_max),
                                        tl.where(has_nan, key, key - V))
    return new_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx


@triton.jit
def _merge_lanes(lane_max, lane_sum, lane_logits_sum, lane_z_dot_e, lane_sum_e2, lane_best_z, lane_best_idx,
                 running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx, V,
                 WITH_LOGITS_SUM: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_ACCURACY: tl.constexpr,
                 WITH_LOG_SUM_P2: tl.constexpr):
    """The lanes' statistics ``[R]`` and the scalar ones of the row's head and tail, merged into the
    row's: once per row, after the vocabulary loop. Each sum is rescaled from its own max to the
    row's (``exp(max - shift)``, 0 for a lane that saw nothing), as the loop rescales per block."""
    lanes_top = tl.max(lane_max, 0)
    new_max = tl.maximum(running_max, lanes_top)
    shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
    alpha = tl.exp(running_max - shift)
    weight = tl.exp(lane_max - shift)
    if WITH_ENTROPY:  # before running_sum moves (see _fold_block): each sum moves from its own max
        z_dot_e = (_moved_entropy_sum(z_dot_e, running_sum, running_max, shift, alpha)
                   + tl.sum(_moved_entropy_sum(lane_z_dot_e, lane_sum, lane_max, shift, weight), 0))
    running_sum = running_sum * alpha + tl.sum(lane_sum * weight, 0)
    if WITH_LOGITS_SUM:
        logits_sum += tl.sum(lane_logits_sum, 0)
    if WITH_LOG_SUM_P2:
        sum_e2 = sum_e2 * (alpha * alpha) + tl.sum(lane_sum_e2 * (weight * weight), 0)
    if WITH_ACCURACY:  # the lanes' candidates reduced as _fold_block reduces a block's elements
        lane_nan = lane_best_z != lane_best_z
        lanes_num = tl.where(lane_nan, float("-inf"), lane_best_z)
        lanes_best = tl.max(lanes_num, 0)
        key = tl.min(tl.where(lane_nan, lane_best_idx, tl.where(lanes_num == lanes_best, lane_best_idx + V, 2 * V)), 0)
        has_nan = key < V
        best_z, best_idx = _argmax_take(best_z, best_idx, tl.where(has_nan, float("nan"), lanes_best),
                                        tl.where(has_nan, key, key - V))
    return new_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr,
    logits_sum_ptr, entropy_ptr, accuracy_ptr, log_sum_p2_ptr,
    T, V,
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    ignore_index,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WITH_LOGITS_SUM: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_ACCURACY: tl.constexpr,
    WITH_LOG_SUM_P2: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ROUND_BY_BITS: tl.constexpr,  # the interpreter's bf16 cast truncates: round on the bits (_common.round_to)
    LANE_STATS: tl.constexpr,  # per-lane running statistics in the loop (_fold_block's AXIS 1), merged once per row
    LANE: tl.constexpr,  # elements per lane with LANE_STATS: the 16-byte vector (8 when loads are scalar)
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
    z_dot_e = tl.zeros([], ACC_DTYPE)
    sum_e2 = tl.zeros([], ACC_DTYPE)
    best_z = tl.full([], float("-inf"), ACC_DTYPE)
    best_idx = tl.zeros([], tl.int32)
    # An ignored row reads nothing: zero elements, zero loop trips.
    n = tl.where(is_ignored, 0, V)
    head, body = row_split(row_start, n, VEC)

    # Head and tail of the row (fewer than VEC elements each), in one masked step.
    peel, peel_real = peel_offsets(head, body, n, VEC)
    z_peel = tl.load(logits_ptr + row_start + peel.to(tl.int64) * stride_zv, mask=peel_real, other=float("-inf"))
    running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx = _fold_block(
        z_peel.to(ACC_DTYPE), peel, peel_real, running_max, running_sum, logits_sum, z_dot_e, sum_e2,
        best_z, best_idx, V, WITH_LOGITS_SUM, WITH_ENTROPY, WITH_ACCURACY, WITH_LOG_SUM_P2, 0)

    # The body: whole 16-byte vectors from a 16-byte boundary (true by construction of head).
    body_ptr = logits_ptr + tl.multiple_of(row_start + head * stride_zv, VEC)
    body = tl.multiple_of(body, VEC)
    if LANE_STATS:
        # The block as [R, LANE]: a row of it is one thread's vector (see _fold_block, AXIS = 1).
        R: tl.constexpr = BLOCK_V // LANE
        lanes = tl.arange(0, R)[:, None] * LANE + tl.arange(0, LANE)[None, :]
        lane_max = tl.full([R], float("-inf"), ACC_DTYPE)
        lane_sum = tl.zeros([R], ACC_DTYPE)
        lane_logits_sum = tl.zeros([R], ACC_DTYPE)
        lane_z_dot_e = tl.zeros([R], ACC_DTYPE)
        lane_sum_e2 = tl.zeros([R], ACC_DTYPE)
        lane_best_z = tl.full([R], float("-inf"), ACC_DTYPE)
        lane_best_idx = tl.zeros([R], tl.int32)
        for v_start in range(0, body, BLOCK_V):
            offs = v_start + lanes
            in_body = offs < body
            z = tl.load(body_ptr + offs.to(tl.int64) * stride_zv, mask=in_body, other=float("-inf"))
            lane_max, lane_sum, lane_logits_sum, lane_z_dot_e, lane_sum_e2, lane_best_z, lane_best_idx = _fold_block(
                z.to(ACC_DTYPE), head + offs, in_body, lane_max, lane_sum, lane_logits_sum, lane_z_dot_e,
                lane_sum_e2, lane_best_z, lane_best_idx, V, WITH_LOGITS_SUM, WITH_ENTROPY, WITH_ACCURACY,
                WITH_LOG_SUM_P2, 1)
        running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx = _merge_lanes(
            lane_max, lane_sum, lane_logits_sum, lane_z_dot_e, lane_sum_e2, lane_best_z, lane_best_idx,
            running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx, V,
            WITH_LOGITS_SUM, WITH_ENTROPY, WITH_ACCURACY, WITH_LOG_SUM_P2)
    else:
        for v_start in range(0, body, BLOCK_V):
            offs = v_start + tl.arange(0, BLOCK_V)
            in_body = offs < body
            z = tl.load(body_ptr + offs.to(tl.int64) * stride_zv, mask=in_body, other=float("-inf"))
            # upcast right after the load: all arithmetic in fp32
            running_max, running_sum, logits_sum, z_dot_e, sum_e2, best_z, best_idx = _fold_block(
                z.to(ACC_DTYPE), head + offs, in_body, running_max, running_sum, logits_sum, z_dot_e, sum_e2,
                best_z, best_idx, V, WITH_LOGITS_SUM, WITH_ENTROPY, WITH_ACCURACY, WITH_LOG_SUM_P2, 0)

    # An ignored row (and a row of -inf) has running_sum == 0: log S = -inf, so lse = -inf.
    shift = tl.where(tl.abs(running_max) == float("inf"), 0.0, running_max)
    log_sum = tl.where(running_sum == 0, float("-inf"), tl.log(tl.where(running_sum == 0, 1.0, running_sum)))
    # lse in fp64: shift + log S exactly; in fp32 it would round by |lse| * 2^-24.
    lse = tl.where(is_ignored, 0.0, shift.to(tl.float64) + log_sum.to(tl.float64))
    # The target logit is one scalar load, clamped into the row so it can never leave it. (After
    # the loop: loaded before, it costs the lane loop registers.)
    target_offset = tl.where(in_range, label, 0)
    z_target = tl.load(logits_ptr + row_start + target_offset * stride_zv, mask=is_scored, other=0.0).to(ACC_DTYPE)
    # (z_y - shift) - log S, not z_y - lse: z_y - shift is exact near the max.
    logp = tl.where(in_range, (z_target - shift) - log_sum, float("nan"))
    tl.store(logp_ptr + row, tl.where(is_ignored, 0.0, logp))
    tl.store(lse_ptr + row, lse)
    if WITH_LOGITS_SUM:
        tl.store(logits_sum_ptr + row, tl.where(is_ignored, 0.0, logits_sum))
    if WITH_ENTROPY:
        # H = log S - sum_v p_v (z_v - shift), with p_v = e_v / S.
        entropy = log_sum - z_dot_e / tl.where(running_sum == 0, 1.0, running_sum)
        # A row with +inf (or all -inf) has an infinite lse (log S): report it as the entropy, as
        # the other backends do, instead of inf - inf / inf.
        entropy = tl.where(tl.abs(log_sum) == float("inf"), log_sum, entropy)
        tl.store(entropy_ptr + row, tl.where(is_ignored, 0.0, entropy))
    if WITH_ACCURACY:
        hit = (best_idx == label).to(ACC_DTYPE)
        tl.store(accuracy_ptr + row, tl.where(is_ignored, 0.0, hit))
    if WITH_LOG_SUM_P2:
        # Both logs relative to the same shift: no large number cancels. NaN where lse is not
        # finite (a row of -inf, or with +inf or NaN): its softmax is not defined.
        log_sum_p2 = tl.log(tl.where(sum_e2 == 0, 1.0, sum_e2)) - 2.0 * log_sum
        log_sum_p2 = tl.where(tl.abs(log_sum) < float("inf"), log_sum_p2, float("nan"))
        tl.store(log_sum_p2_ptr + row, tl.where(is_ignored, 0.0, log_sum_p2))
    if WRITE_GRAD:
        # The whole row is written (an ignored one with zeros, unread), after every read above:
        # the target logit was loaded before this pass overwrites it. The body goes last block
        # first: the blocks this program read most recently are the likeliest still in L2.
        head, body = row_split(row_start, V, VEC)
        lse_hi, lse_lo = split_lse(lse, ACC_DTYPE)  # the stored lse, as the backward kernel splits it
        body_ptr = logits_ptr + tl.multiple_of(row_start + head * stride_zv, VEC)
        body = tl.multiple_of(body, VEC)
        read_bound = tl.where(is_ignored, 0, body)  # a bound, not a scalar-and-block mask (interpreter)
        n_blocks = tl.cdiv(body, BLOCK_V)
        for k in range(0, n_blocks):
            offs = (n_blocks - 1 - k) * BLOCK_V + tl.arange(0, BLOCK_V)
            ptrs = body_ptr + offs.to(tl.int64) * stride_zv
            z = tl.load(ptrs, mask=offs < read_bound, other=float("-inf")).to(ACC_DTYPE)
            grad = tl.where(is_ignored, 0.0, logprob_grad(z, head + offs, label, lse_hi, lse_lo, 1.0))
            tl.store(ptrs, cast_rounded(grad, logits_ptr.dtype.element_ty, ROUND_BY_BITS), mask=offs < body)
        n_read = tl.where(is_ignored, 0, V)
        peel, peel_real = peel_offsets(head, body, V, VEC)
        peel_ptr = logits_ptr + row_start + peel.to(tl.int64) * stride_zv
        z_peel = tl.load(peel_ptr, mask=peel_real & (peel < n_read), other=float("-inf")).to(ACC_DTYPE)
        grad_peel = tl.where(is_ignored, 0.0, logprob_grad(z_peel, peel, label, lse_hi, lse_lo, 1.0))
        tl.store(peel_ptr, cast_rounded(grad_peel, logits_ptr.dtype.element_ty, ROUND_BY_BITS), mask=peel_real)


def lane_width(vec: int) -> int:
    """Elements per lane of the LANE_STATS loop: one 16-byte vector, so a lane is one thread's load
    and its reductions stay in that thread; 8 where loads are scalar (an unaligned or strided row:
    then a lane spans threads, whose reductions are shuffles within a warp, still no barrier)."""
    return vec if vec > 1 else 8


def launch_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, extras_mask: int, write_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch the forward kernel (the body of the operators below); with
    ``write_grad`` each row of ``logits`` is then overwritten with its gradient of ``logp``."""
    logp, lse, stacked = empty_forward_outputs(logits, extras_mask)
    B, T, V = logits.shape
    if B * T == 0:
        return logp, lse, stacked
    extras = dict(zip(extras_names(extras_mask), stacked.unbind(0)))
    cfg = pick_config(V, logits.dtype, frozenset(extras), "forward_and_grad" if write_grad else "forward")
    with launch_device(logits):
        _token_logprobs_fwd_kernel[(B * T,)](
            logits, labels, logp, lse,
            extras.get("logits_sum", logp), extras.get("entropy", logp), extras.get("accuracy", logp),
            extras.get("log_sum_p2", logp),
            T, V,
            logits.stride(0), logits.stride(1), logits.stride(2),
            labels.stride(0), labels.stride(1),
            ignore_index,
            BLOCK_V=cfg.block_v,
            VEC=vector_width(logits),
            ACC_DTYPE=acc_dtype(logits.dtype),
            WITH_LOGITS_SUM="logits_sum" in extras,
            WITH_ENTROPY="entropy" in extras,
            WITH_ACCURACY="accuracy" in extras,
            WITH_LOG_SUM_P2="log_sum_p2" in extras,
            WRITE_GRAD=write_grad,
            ROUND_BY_BITS=interpreting(),
            LANE_STATS=cfg.lane_stats,
            LANE=min(lane_width(vector_width(logits)), cfg.block_v),
            num_warps=cfg.num_warps,
        )
    return logp, lse, stacked


@torch.library.custom_op("dpo_kernels::triton_token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, extras_mask: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel as an operator: ``(logp[B, T], lse[B, T], extras[K, B, T])``.

    ``extras`` holds one slice per bit of ``extras_mask`` (``backends.extras_mask``), in bit
    order, like the C++ ``dpo_kernels::token_logprobs_fwd``. A registered operator (not a bare
    launch) so that torch.compile and fake tensors see its outputs without running it:
    ``torch.library.triton_op`` does not fit, as the launch reads ``data_ptr()`` alignment
    (``vector_width``) and the interpreter's kernels cannot be wrapped.
    """
    return launch_forward(logits, labels, ignore_index, extras_mask)


@token_logprobs_fwd_op.register_fake
def _token_logprobs_fwd_fake(logits, labels, ignore_index, extras_mask):
    return empty_forward_outputs(logits, extras_mask)


@torch.library.custom_op("dpo_kernels::triton_token_logprobs_fwd_and_grad_", mutates_args=("logits",))
def token_logprobs_fwd_and_grad_op(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, extras_mask: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward operator's outputs, and ``logits`` overwritten with ``onehot - softmax``."""
    return launch_forward(logits, labels, ignore_index, extras_mask, write_grad=True)


@token_logprobs_fwd_and_grad_op.register_fake
def _token_logprobs_fwd_and_grad_fake(logits, labels, ignore_index, extras_mask):
    return empty_forward_outputs(logits, extras_mask)


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    extras: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward kernel on ``logits[B, T, V]`` (any strides) and ``labels[B, T]``.

    Returns ``(logp, lse, extras)``: ``[B, T]`` contiguous fp32 tensors (fp64 for fp64 logits;
    ``lse`` always fp64, ``backends.LSE_DTYPE``),
    ``extras`` holding one such tensor per requested name (see ``backends.EXTRAS``).
    """
    acc_dtype(logits.dtype)  # a clear TypeError for a dtype the kernel cannot read, before the op
    mask = extras_mask(extras)
    logp, lse, stacked = token_logprobs_fwd_op(logits, labels, int(ignore_index), mask)
    return logp, lse, dict(zip(extras_names(mask), stacked.unbind(0)))


def token_logprobs_forward_and_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    extras: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`token_logprobs_forward`, then each row of ``logits`` overwritten with the gradient
    of its ``logp``: ``onehot(y) - softmax(z)`` (zeros on ignored rows). One kernel where
    ``config.fuse_forward_and_grad`` says so, else the forward then the in-place backward; the
    numbers are the same either way."""
    acc_dtype(logits.dtype)
    check_writable_rows(logits, "token_logprobs_forward_and_grad_")
    if not fuse_forward_and_grad(logits.shape[-1], logits.dtype):
        return forward_then_grad_(token_logprobs_forward, token_logprobs_backward, logits, labels, ignore_index,
                                  extras)
    mask = extras_mask(extras)
    logp, lse, stacked = token_logprobs_fwd_and_grad_op(logits, labels, int(ignore_index), mask)
    return logp, lse, dict(zip(extras_names(mask), stacked.unbind(0)))
