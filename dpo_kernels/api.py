"""Front door of the logits path: validate, call the core, assemble a :class:`DPOOutput`.

No kernel is launched here: per-token work goes through ``logprobs`` (which picks a backend),
losses come from the registry in ``losses``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .backends import resolve_backend
from .logprobs import (
    TokenLogprobs,
    completion_lengths,
    fused_sigmoid_dpo,
    sequence_logprobs,
    token_logprobs,
)
from .losses import LossOptions, PreferencePair, get_loss, rewards

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass
class DPOOutput:
    """Result of one DPO loss evaluation on ``P`` preference pairs.

    ``loss`` is the mean over pairs (differentiable); ``chosen_logps``/``rejected_logps`` are the
    per-sequence policy log-probs ``[P]`` (differentiable); rewards are ``beta * (pi - ref)``,
    detached. ``metrics`` holds detached scalar tensors under TRL's names (no host sync).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def fused_dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logps: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ref_logits: torch.Tensor | None = None,
    reference_free: bool = False,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    shift: bool = False,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> DPOOutput:
    """DPO-family loss straight from the policy's logits, without a logits-sized temporary.

    Args:
        logits: ``[2B, T, V]`` floating (fp32, bf16, fp16, fp64), any strides. Rows ``0..B-1``
            are the chosen completions, rows ``B..2B-1`` the rejected ones (TRL's layout).
        labels: ``[2B, T]`` integer token ids; ``ignore_index`` marks prompt and padding.
        ref_logps: reference per-sequence log-probs, ``[2B]`` or ``(chosen[B], rejected[B])``,
            computed with the same ``average_log_prob`` convention.
        ref_logits: the reference model's ``[2B, T, V]`` logits instead (same labels, no grad).
        reference_free: use a zero reference (no ``ref_logps``/``ref_logits``).
        beta: inverse temperature of the implicit reward, > 0.
        loss_type: a name in ``dpo_kernels.losses.LOSSES`` ("sigmoid", "hinge", "ipo").
        label_smoothing: cDPO's ``eps`` in ``[0, 0.5)``; only for losses that define it.
        average_log_prob: average instead of sum the token log-probs of a sequence (IPO always
            averages, as in TRL).
        ignore_index: label value of tokens that are not scored.
        shift: score ``logits[:, t]`` against ``labels[:, t + 1]`` (causal LM outputs as they come
            from the model); done through strides, the logits are never copied.
        inplace_backward: write the logits gradient into the logits buffer (saves one logits-sized
            allocation). Nothing else may need these logits in backward, and the graph can be
            backpropagated only once.
        validate: check labels range and non-finite logits on the host (one device sync per call).
            With ``validate=False`` a bad label yields NaN and NaN/inf logits propagate to the loss.
        backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton", "reference".
    """
    spec = get_loss(loss_type)
    num_pairs, vocab_size = _check_inputs(logits, labels, ignore_index)
    _check_options(spec, beta, label_smoothing, inplace_backward, logits)
    ref_given = _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs)
    average = average_log_prob or spec.averages_logps
    backend_name = resolve_backend(backend, logits.device)

    policy = token_logprobs(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend_name,
        extras=("logits_sum",), inplace_backward=inplace_backward,
    )
    if validate:
        _check_token_results(policy, ignore_index, vocab_size, "logits")
    ref_seq = _reference_logps(ref_given, policy.labels, ignore_index, average, backend_name,
                               num_pairs, logits.device, validate)

    use_fused_loss = (
        backend_name == "triton" and spec.name == "sigmoid" and policy.logp.dtype == torch.float32
    )
    if use_fused_loss:
        loss, seq_logps, chosen_rewards, rejected_rewards, _ = fused_sigmoid_dpo(
            policy.logp, policy.labels, ref_seq, ignore_index=ignore_index, beta=beta,
            label_smoothing=label_smoothing, average=average,
        )
        chosen_logps, rejected_logps = seq_logps[:num_pairs], seq_logps[num_pairs:]
    else:
        seq_logps = sequence_logprobs(policy.logp, policy.labels, ignore_index, average)
        ref_seq = ref_seq.to(seq_logps.dtype)
        pair = PreferencePair(seq_logps[:num_pairs], seq_logps[num_pairs:], ref_seq[:num_pairs], ref_seq[num_pairs:])
        loss = spec.fn(pair, LossOptions(beta=beta, label_smoothing=label_smoothing)).mean()
        chosen_rewards, rejected_rewards = rewards(pair, beta)
        chosen_logps, rejected_logps = pair.chosen_logps, pair.rejected_logps

    metrics = _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, policy,
                       ignore_index, vocab_size, num_pairs)
    return DPOOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, metrics)


# --------------------------------------------------------------------------------------------
# Validation: every message names the argument at fault.


def _check_inputs(logits, labels, ignore_index) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be a floating tensor (fp32, bf16, fp16, fp64), got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [2B, T, V] (chosen rows then rejected rows), got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"labels must be [2B, T] = {tuple(logits.shape[:2])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    rows, _, vocab_size = logits.shape
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logits batch must be 2B > 0 sequences (B chosen then B rejected), got {rows}"
        )
    if vocab_size == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return rows // 2, vocab_size


def _check_options(spec, beta, label_smoothing, inplace_backward, logits) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and not spec.label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing} does not apply to loss_type={spec.name!r}")
    if inplace_backward and logits.requires_grad and _rows_may_overlap(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not overlap in memory "
            f"(got strides {logits.stride()} for shape {tuple(logits.shape)})"
        )


def _rows_may_overlap(logits: torch.Tensor) -> bool:
    B, T, V = logits.shape
    sb, st, sv = logits.stride()
    return not (
        (V == 1 or sv >= 1)
        and (T == 1 or st >= (V - 1) * sv + 1)
        and (B == 1 or sb >= (T - 1) * st + (V - 1) * sv + 1)
    )


def _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs):
    """Returns ``("logps", tensor[2B])``, ``("logits", tensor)`` or ``("none", None)``."""
    given = [name for name, value in (("ref_logps", ref_logps), ("ref_logits", ref_logits)) if value is not None]
    if reference_free:
        if given:
            raise ValueError(f"reference_free=True conflicts with {' and '.join(given)}")
        return ("none", None)
    if not given:
        raise ValueError("no reference: pass ref_logps or ref_logits, or reference_free=True")
    if len(given) == 2:
        raise ValueError("pass either ref_logps or ref_logits, not both")
    if ref_logits is not None:
        if not isinstance(ref_logits, torch.Tensor) or ref_logits.dtype not in _FLOAT_DTYPES:
            raise TypeError("ref_logits must be a floating tensor (fp32, bf16, fp16, fp64)")
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}"
            )
        if ref_logits.device != logits.device:
            raise ValueError(f"ref_logits are on {ref_logits.device} but logits are on {logits.device}")
        return ("logits", ref_logits)
    if isinstance(ref_logps, (tuple, list)):
        if len(ref_logps) != 2 or not all(isinstance(t, torch.Tensor) for t in ref_logps):
            raise TypeError("ref_logps as a pair must be (ref_chosen_logps[B], ref_rejected_logps[B])")
        for name, t in zip(("ref_logps[0] (chosen)", "ref_logps[1] (rejected)"), ref_logps):
            if t.shape != (num_pairs,):
                raise ValueError(f"{name} must have shape [B] = ({num_pairs},), got {tuple(t.shape)}")
        ref_logps = torch.cat([ref_logps[0], ref_logps[1]])
    if not isinstance(ref_logps, torch.Tensor):
        raise TypeError(f"ref_logps must be a tensor [2B] or a pair of tensors [B], got {type(ref_logps).__name__}")
    if ref_logps.shape != (2 * num_pairs,):
        raise ValueError(f"ref_logps must have shape [2B] = ({2 * num_pairs},), got {tuple(ref_logps.shape)}")
    if not ref_logps.dtype.is_floating_point:
        raise TypeError(f"ref_logps must be floating, got {ref_logps.dtype}")
    if ref_logps.device != logits.device:
        raise ValueError(f"ref_logps are on {ref_logps.device} but logits are on {logits.device}")
    return ("logps", ref_logps.detach())


def _reference_logps(ref_given, aligned_labels, ignore_index, average, backend_name, num_pairs, device, validate):
    kind, value = ref_given
    if kind == "none":
        return torch.zeros(2 * num_pairs, dtype=torch.float32, device=device)
    if kind == "logps":
        return value
    with torch.no_grad():
        # aligned_labels are already shifted: score the reference rows on them as they are.
        ref = token_logprobs(value, aligned_labels, ignore_index=ignore_index, shift=False, backend=backend_name)
    if validate:
        _check_token_results(ref, ignore_index, value.shape[-1], "ref_logits")
    return sequence_logprobs(ref.logp, aligned_labels, ignore_index, average)


def _check_token_results(tokens: TokenLogprobs, ignore_index: int, vocab_size: int, name: str) -> None:
    """One host sync: bad labels, and non-finite log-probs of scored tokens."""
    labels = tokens.labels
    scored = labels != ignore_index
    bad_label = scored & ((labels < 0) | (labels >= vocab_size))
    non_finite = scored & ~bad_label & ~(torch.isfinite(tokens.lse) & torch.isfinite(tokens.logp.detach()))
    any_bad_label, any_non_finite = torch.stack([bad_label.any(), non_finite.any()]).tolist()
    if any_bad_label:
        b, t = bad_label.nonzero()[0].tolist()
        raise ValueError(
            f"labels[{b}, {t}] (as aligned with the logits rows) = {labels[b, t].item()} is outside "
            f"[0, V={vocab_size}) and is not ignore_index={ignore_index}"
        )
    if any_non_finite:
        b, t = non_finite.nonzero()[0].tolist()
        raise ValueError(
            f"{name}[{b}, {t}] gives a non-finite log-probability for its label (NaN or inf in the "
            "logits, a row of -inf, or a label whose logit is -inf); pass validate=False to let it "
            "propagate to the loss instead"
        )


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, policy: TokenLogprobs,
             ignore_index, vocab_size, num_pairs) -> dict[str, torch.Tensor]:
    """TRL's logged metrics, as detached device scalars."""
    lengths = completion_lengths(policy.labels, ignore_index)
    # Mean over completion tokens of the per-token vocabulary-mean logit.
    logits_per_seq = policy.extras["logits_sum"].sum(-1) / vocab_size

    def token_mean(rows: slice) -> torch.Tensor:
        return logits_per_seq[rows].sum() / lengths[rows].sum().clamp(min=1)

    chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logits/chosen": token_mean(chosen),
        "logits/rejected": token_mean(rejected),
    }
