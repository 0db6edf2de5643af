"""Autograd around the kernel contract, and the per-sequence reductions built on it.

``token_logprobs`` is the torch-facing form of the kernel contract (stated in the docstring of
``dpo_kernels/backends/__init__.py``): per-token ``log softmax(z)[y]`` with its exact single-pass
backward. ``sequence_logprobs`` sums (or averages) it per sequence. ``fused_sigmoid_dpo`` is the
default DPO loss computed on the device from the per-token log-probs by one small kernel (Triton
backend). Backends are chosen here and only here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backends import (accumulation_dtype, empty_forward_outputs, extras_mask, extras_names, load_backend,
                       resolve_backend)
from .checks import check_flags, check_ignore_index, check_inplace, check_labels, check_logits_labels, python_scalars


class TokenLogprobs(NamedTuple):
    """Per-token results, all ``[B, T]``; ``labels`` is the label each logits row was scored on."""

    logp: torch.Tensor  # differentiable; 0 where ignored
    lse: torch.Tensor  # detached log-sum-exp of each row; 0 where ignored
    extras: dict[str, torch.Tensor]  # detached same-pass statistics (backends.EXTRAS); 0 where ignored
    labels: torch.Tensor  # aligned with the logits rows (shifted when shift=True)


def label_ids(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels`` as every mask and kernel reads them: int64, unless they already are, or are int32
    with ``ignore_index`` in int32's range (then as given: no copy).

    Why: torch compares an integer tensor with a Python int in the tensor's own dtype, wrapping
    the int (``uint8_labels != -100`` compares with 156; int32 labels against ``2**32 + 1`` with
    1). A narrower dtype would make a real token id look ignored to the masks (the sequence
    lengths, the valid-token gathers) while the kernels score it, a silent wrong answer; and the
    gathers index with int32 or int64 only. Widening keeps the meaning the user wrote: a uint8
    tensor holds no -100, so none of its tokens is ignored. The copy is ``[rows, T]`` integers."""
    if labels.dtype == torch.int64 or (labels.dtype == torch.int32 and -(2 ** 31) <= ignore_index < 2 ** 31):
        return labels
    return labels.to(torch.int64)


def align_labels(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """Labels aligned with the logits rows: with ``shift``, row t predicts ``labels[:, t + 1]``.

    The logits are never sliced or copied for the shift: the last row gets ``ignore_index``,
    so the kernels skip it and its gradient row is written as zeros in the same pass. The labels
    are first read as :func:`label_ids` (int64 where their dtype cannot hold ``ignore_index``).
    """
    labels = label_ids(labels, ignore_index)
    if not shift or labels.shape[-1] == 0:  # T = 0: nothing to shift (a pad would add a column)
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def _bump_version(tensor: torch.Tensor) -> None:
    # The in-place backward overwrote ``tensor`` behind autograd's back. An empty in-place op on
    # a view shares the version counter with its base, so any other graph node that saved these
    # logits now fails loudly ("modified by an inplace operation") instead of reading gradients.
    # Not while torch.compile traces: there the mutation is a functionalized graph op, which
    # AOTAutograd already orders, and a traced view-and-write would only add graph nodes.
    if torch.compiler.is_compiling():
        return
    with torch.no_grad():
        tensor.as_strided((0,), (1,)).zero_()


def refuse_double_backward(what: str) -> None:
    """Raise when a backward runs with ``create_graph=True``: the kernels' backward is not itself
    differentiable, and a silently non-differentiable (or zero) second-order gradient is worse
    than an error. Call at the top of every kernel-backed ``backward``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"dpo_kernels: double backward (create_graph=True) through {what} is not supported: its "
            "backward kernel is not differentiable. Compute second-order terms (e.g. gradient "
            "penalties) on a plain PyTorch log_softmax instead."
        )


def functorch_transforms() -> list:
    """The ``torch.func`` transforms (``TransformType.Vmap``, ``Grad``, ``Jvp``, ...) active around
    this call, outermost first; ``[]`` outside them, while torch.compile traces, and on a torch
    without this (private) interface."""
    if torch.compiler.is_compiling():
        return []
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:
        return []
    return [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]


def under_vmap() -> bool:
    """Inside ``torch.func.vmap``: the tensors seen here are batched, with no single storage (no
    raw-pointer kernel launch, no host read of their values)."""
    return torch._C._functorch.TransformType.Vmap in functorch_transforms()


def refuse_forward_ad(what: str, *tensors: torch.Tensor | None) -> None:
    """Raise under forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``
    dual tensors) and under ``torch.func.grad`` / ``vjp`` / ``jacrev``. The custom operators carry a
    reverse-mode formula only, and PyTorch takes an operator without a forward-mode one for a
    constant: a ``jvp`` through it was silently 0. ``torch.func.vmap`` and ``torch.autograd`` work."""
    transforms = functorch_transforms()
    kinds = torch._C._functorch.TransformType
    dual = not transforms and any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )
    if dual or kinds.Jvp in transforms or kinds.Grad in transforms:
        raise NotImplementedError(
            f"dpo_kernels: {what} supports reverse-mode autograd only (loss.backward(), "
            "torch.autograd.grad; torch.func.vmap works), not forward-mode AD (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad) nor torch.func.grad / vjp / jacrev: PyTorch would take its "
            "kernels' outputs for constants and return a zero derivative"
        )


# The kernel contract as ONE registered operator for every backend, with its autograd formula
# attached by ``register_autograd``: torch.compile sees an opaque op with a fake implementation
# (no graph break, whatever the backend does inside), and eager autograd behaves as before.
@torch.library.custom_op("dpo_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    backend: str,
    extras_mask: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp[B, T], lse[B, T], extras[K, B, T])`` of ``logits[B, T, V]`` by the named concrete
    backend; ``extras`` has one slice per bit of ``extras_mask`` (``backends.extras_mask``), in
    bit order. ``lse`` and ``extras`` are not differentiable. ``inplace_backward`` only changes
    the backward: the gradient overwrites ``logits``, and a second backward raises."""
    names = extras_names(extras_mask)
    logp, lse, values = load_backend(backend).token_logprobs_forward(logits, labels, ignore_index, frozenset(names))
    if names:
        stacked = torch.stack([values[name] for name in names])
    else:
        stacked = empty_forward_outputs(logits, 0)[2]
    return logp, lse, stacked


@token_logprobs_op.register_fake
def _token_logprobs_fake(logits, labels, ignore_index, backend, extras_mask, inplace_backward):
    return empty_forward_outputs(logits, extras_mask)


def _token_logprobs_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, backend, _extras_mask, inplace_backward = inputs
    _logp, lse, extras = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.backend_name = backend
    ctx.inplace_backward = inplace_backward
    ctx.gradient_written = False
    ctx.mark_non_differentiable(lse, extras)


def _token_logprobs_backward(ctx, grad_logp, _grad_lse, _grad_extras):
    if ctx.inplace_backward and ctx.gradient_written:
        raise RuntimeError(
            "dpo_kernels: a second backward through a loss computed with inplace_backward=True; "
            "the first backward already overwrote the logits with their gradient. Use "
            "inplace_backward=False to backward more than once (retain_graph, double backward)."
        )
    refuse_double_backward("the fused per-token log-probs")
    logits, labels, lse = ctx.saved_tensors
    backend = load_backend(ctx.backend_name)
    grad_logp = grad_logp.to(accumulation_dtype(logits.dtype)).contiguous()
    grad = backend.token_logprobs_backward(
        logits, labels, lse, grad_logp, ctx.ignore_index, inplace=ctx.inplace_backward
    )
    if ctx.inplace_backward:
        ctx.gradient_written = True
        _bump_version(logits)
    return grad, None, None, None, None, None


token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup_context)


@python_scalars
def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    extras: tuple[str, ...] | frozenset[str] = (),
    inplace_backward: bool = False,
) -> TokenLogprobs:
    """Per-token ``log_softmax(logits)[label]`` for ``logits[B, T, V]`` and ``labels[B, T]``.

    Exact gradient in one pass over the logits. ``extras`` names same-pass statistics to compute
    as well (any of ``backends.EXTRAS``: "logits_sum", "entropy", "accuracy", "log_sum_p2"). Only
    the types, shapes and devices are checked here (``labels`` an integer ``[B, T]`` on the
    logits' device, ``ignore_index`` an int, ``inplace_backward`` only on logits whose elements do
    not overlap); the values are not (``fused_dpo_loss``'s ``validate``): the kernels still never
    read outside a row and report NaN for a bad label. One call of the ``dpo_kernels::token_logprobs``
    operator, so torch.compile(fullgraph=True) traces it without a graph break; compiled,
    ``inplace_backward`` is ignored (see below).
    """
    try:
        check_flags(shift=shift, inplace_backward=inplace_backward)
        check_logits_labels(logits, labels, ignore_index)
        check_inplace(inplace_backward, logits)
    except (TypeError, ValueError) as error:
        raise type(error)(f"token_logprobs: {error}") from None
    mask = extras_mask(extras)
    aligned = align_labels(labels, ignore_index, shift)
    name = resolve_backend(backend, logits.device)
    # Inside torch.compile the in-place write would be functionalized, and Inductor copies the
    # saved logits into a fresh buffer to overwrite that (a backward-graph input is never written):
    # an extra pass over the logits for no memory saved. The allocating backward is cheaper.
    inplace = bool(inplace_backward) and not torch.compiler.is_compiling()
    refuse_forward_ad("token_logprobs", logits)
    logp, lse, stacked = token_logprobs_op(logits, aligned, int(ignore_index), name, mask, inplace)
    return TokenLogprobs(logp, lse, dict(zip(extras_names(mask), stacked.unbind(0))), aligned)


def completion_lengths(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of scored (non-ignored) tokens per sequence, ``[B]`` int64."""
    return (label_ids(labels, ignore_index) != ignore_index).sum(-1)


@python_scalars
def sequence_logprobs(
    token_logp: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    average: bool,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum (or mean, when ``average``) of the per-token log-probs of each sequence, ``[B]``.

    Ignored tokens already carry 0. A sequence with no completion tokens gives 0, never 0/0.
    ``weights`` (``[B, T]``, e.g. :func:`ld_token_weights`) weight each token in the sum; the
    mean still divides by the number of scored tokens.
    """
    try:
        _check_sequence_inputs(token_logp, labels, ignore_index, average, weights)
    except (TypeError, ValueError) as error:
        raise type(error)(f"sequence_logprobs: {error}") from None
    total = (token_logp if weights is None else token_logp * weights.to(token_logp.dtype)).sum(-1)
    if not average:
        return total
    return total / completion_lengths(labels, ignore_index).clamp(min=1).to(total.dtype)


def _check_sequence_inputs(token_logp, labels, ignore_index, average, weights) -> None:
    """``token_logp`` a floating ``[B, T]`` tensor, integer ``labels`` of its shape and device,
    ``weights`` (if any) a floating tensor of its shape and device, an int ``ignore_index``."""
    check_flags(average=average)
    if not isinstance(token_logp, torch.Tensor):
        raise TypeError(f"token_logp must be a torch.Tensor, got {type(token_logp).__name__}")
    if not token_logp.is_floating_point() or token_logp.dim() != 2:
        raise ValueError(f"token_logp must be a floating [B, T] tensor, got {token_logp.dtype} of shape "
                         f"{tuple(token_logp.shape)}")
    check_labels(labels, token_logp, rows_name="token_logp", layout="[B, T]", rows_are="is")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"weights must be a floating tensor, got {getattr(weights, 'dtype', type(weights).__name__)}")
        if weights.shape != token_logp.shape or weights.device != token_logp.device:
            raise ValueError(f"weights must be token_logp's shape {tuple(token_logp.shape)} on {token_logp.device}, "
                             f"got {tuple(weights.shape)} on {weights.device}")
    check_ignore_index(ignore_index)


def ld_token_weights(labels: torch.Tensor, ignore_index: int, alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights ``[2P, T]`` (Liu et al. 2024, arXiv:2409.06411), TRL's masks.

    Rows ``0..P-1`` are chosen, ``P..2P-1`` rejected. In each pair the first
    ``min(|y_c|, |y_r|)`` completion tokens of both sequences (the shared part) weigh 1, the
    completion tokens past it (the verbose tail of the longer one) weigh ``alpha``; ignored
    tokens weigh 0. So ``sum_t w_t logp_t = shared + alpha * tail``.
    """
    scored = labels != ignore_index
    position = scored.cumsum(-1)  # 1-based position among the completion tokens
    lengths = scored.sum(-1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(-1)
    tail = scored & (position > shared)
    weights = scored.to(torch.float32)
    return torch.where(tail, torch.full_like(weights, alpha), weights)


def wpo_weights(tokens: TokenLogprobs, ignore_index: int) -> torch.Tensor:
    """WPO's per-sequence weights ``[2P]`` (Zhou et al. 2024, arXiv:2406.11827, Eq. 2), detached.

    ``exp(mean_t (logp_t - log sum_v p_v^2))`` over the completion tokens, with
    ``log sum_v p_v^2`` from the same-pass "log_sum_p2" extra (formed relative to the row's max,
    so it does not cancel as ``logsumexp(2z) - 2 logsumexp(z)`` would for large logits).
    A pair's weight is the chosen weight times the rejected weight (TRL's).
    """
    scored = tokens.labels != ignore_index
    log_sum_sq = tokens.extras["log_sum_p2"]
    aligned = torch.where(scored, tokens.logp.detach() - log_sum_sq, torch.zeros_like(log_sum_sq))
    mean = aligned.sum(-1) / scored.sum(-1).clamp(min=1).to(aligned.dtype)
    return torch.exp(mean)


class _FusedSigmoidDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logp, labels, ref_logps, ignore_index, beta, label_smoothing, average):
        from .backends.triton import dpo_sigmoid_loss

        # Unused outputs get None in the backward, not zero-filled tensors (the one-pass mode runs
        # this backward once per chunk: each fill would be one more launch).
        ctx.set_materialize_grads(False)
        out = dpo_sigmoid_loss(token_logp, labels, ref_logps, ignore_index, beta, label_smoothing, average)
        loss = out["losses"].mean()
        ctx.save_for_backward(labels, out["seq_counts"], out["seq_coef"])
        ctx.ignore_index = ignore_index
        ctx.average = average
        ctx.mark_non_differentiable(out["chosen_rewards"], out["rejected_rewards"], out["losses"])
        return loss, out["seq_logps"], out["chosen_rewards"], out["rejected_rewards"], out["losses"]

    @staticmethod
    def backward(ctx, grad_loss, grad_seq_logps, _gc, _gr, _gl):
        labels, seq_counts, seq_coef = ctx.saved_tensors
        if grad_loss is None and grad_seq_logps is None:
            return None, None, None, None, None, None, None
        grad_seq = None if grad_loss is None else grad_loss * seq_coef
        if grad_seq_logps is not None:
            grad_seq = grad_seq_logps if grad_seq is None else grad_seq + grad_seq_logps
        if ctx.average:
            grad_seq = grad_seq / seq_counts.clamp(min=1.0)
        grad_token = grad_seq.unsqueeze(-1) * (labels != ctx.ignore_index)
        return grad_token, None, None, None, None, None, None


def fused_sigmoid_dpo(
    token_logp: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    ignore_index: int,
    beta: float,
    label_smoothing: float,
    average: bool,
):
    """The sigmoid (cDPO) loss from per-token log-probs ``[2P, T]`` in one device kernel.

    Returns ``(loss, seq_logps[2P], chosen_rewards[P], rejected_rewards[P], losses[P])``; ``loss``
    and ``seq_logps`` carry gradients back to ``token_logp``.
    """
    return _FusedSigmoidDPOFunction.apply(
        token_logp, labels, ref_logps.detach(), ignore_index, beta, label_smoothing, average
    )
