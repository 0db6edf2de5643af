"""Front door of the logits path: validate, call the core, assemble a :class:`DPOOutput`.

No kernel is launched here: per-token work goes through ``logprobs`` (which picks a backend),
losses come from the registry in ``losses``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .backends import resolve_backend
from .logprobs import (
    TokenLogprobs,
    completion_lengths,
    fused_sigmoid_dpo,
    ld_token_weights,
    sequence_logprobs,
    token_logprobs,
    wpo_weights,
)
from .losses import (
    PreferencePair,
    combined_loss,
    describe,
    loss_options,
    resolve_loss_types,
    resolve_loss_weights,
    rewards,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass
class DPOOutput:
    """Result of one DPO loss evaluation on ``P`` preference pairs.

    ``loss`` is the (weighted sum of the) mean over pairs (differentiable);
    ``chosen_logps``/``rejected_logps`` are the per-sequence policy log-probs ``[P]``
    (differentiable): sums over the completion tokens (LD-weighted with ``ld_alpha``, averages with
    ``average_log_prob``); rewards are ``beta * (pi - ref)`` (``ref`` = 0 without a reference),
    detached. ``metrics`` holds detached scalar tensors under TRL's names (no host sync), plus
    ``entropy`` and ``mean_token_accuracy`` with ``token_metrics=True``.
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
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | None = None,
    simpo_gamma: float | None = None,
    cpo_alpha: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    average_log_prob: bool = False,
    token_metrics: bool = False,
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
        ref_logps: reference per-sequence log-probs, ``[2B]`` or ``(chosen[B], rejected[B])``:
            SUMS over the completion tokens, as TRL's ``precompute_ref_log_probs`` stores them
            (averages when ``average_log_prob=True``; LD-weighted ``shared + ld_alpha * tail``
            when ``ld_alpha`` is given). Losses that want per-token averages divide internally.
        ref_logits: the reference model's ``[2B, T, V]`` logits instead (same labels, no grad).
        reference_free: use a zero reference (no ``ref_logps``/``ref_logits``). When every loss
            type is reference-free (``simpo``, ``cpo``, ``orpo``, ``sft``) the reference is
            optional: given, it enters only the rewards and metrics (as TRL's DPOTrainer does
            for ``sft``); absent, it is zero.
        beta: inverse temperature of the implicit reward, > 0 (IPO's tau, ORPO's lambda).
        loss_type: a name in ``dpo_kernels.losses.LOSSES`` or a list of names (summed with
            ``loss_weights``, e.g. MPO ``["sigmoid", "bco_pair", "sft"]``, RPO ``["sigmoid", "sft"]``).
        loss_weights: one weight per loss type (default 1.0 each).
        label_smoothing: in ``[0, 0.5)``: cDPO on ``sigmoid``, the flip rate of ``robust``, EXO's
            epsilon (``exo_pair``, must be > 0), and the smoothing of ``aot``, ``aot_unpaired``,
            ``simpo``, ``cpo``. It must apply to at least one of the loss types.
        f_divergence_type: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"``,
            ``"alpha_divergence"``: the scores replacing the log-ratios (f-DPO). A non-default one
            needs every loss type to be among sigmoid, sigmoid_norm, hinge, ipo, exo_pair,
            robust, discopop, sft (TRL's rule).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"`` (default 0.5); only with it.
        discopop_tau: DiscoPOP's temperature (default 0.05); only with ``"discopop"``.
        simpo_gamma: SimPO's target margin gamma (default 0.5, TRL's ``simpo_gamma``); only with
            ``"simpo"``.
        cpo_alpha: weight of the chosen NLL term of ``"cpo"`` (default 1.0) and ``"simpo"``
            (default 0.0; > 0 is CPO-SimPO).
        ld_alpha: LD-DPO's alpha in ``[0, 1]``: completion tokens past the shorter completion of
            each pair weigh ``alpha`` in the per-sequence sums of policy and reference (and
            every loss and metric sees those sums; ``sft`` uses the raw tokens). Not with
            ``average_log_prob``.
        use_weighting: WPO: multiply each pair's loss by the detached ``w_c * w_r``,
            ``w = exp(mean_t (logp_t - log sum_v p_v^2))``, computed in the same kernel pass.
            Not with ``aot``/``aot_unpaired`` (they sort the pairs).
        average_log_prob: every per-sequence log-prob (policy, reference, ``ref_logps`` given,
            outputs, rewards, metrics) is the per-token average instead of the sum; the losses
            that normalize by length (ipo, sigmoid_norm, simpo, orpo) then do not divide again.
        token_metrics: also compute TRL's ``entropy`` (mean over all completion tokens) and
            ``mean_token_accuracy`` (argmax == label over the chosen completion tokens) in the
            same kernel pass, into ``metrics``.
        ignore_index: label value of tokens that are not scored.
        shift: score ``logits[:, t]`` against ``labels[:, t + 1]`` (causal LM outputs as they come
            from the model); done through strides, the logits are never copied.
        inplace_backward: write the logits gradient into the logits buffer (saves one logits-sized
            allocation). Nothing else may need these logits in backward, and the graph can be
            backpropagated only once.
        validate: check labels range and non-finite logits on the host (one device sync per call).
            With ``validate=False`` a bad label yields NaN and NaN/inf logits propagate to the loss.
        backend: "auto" (Triton on CUDA, the C++ or PyTorch reference on CPU), "triton", "cpu",
            "reference".
    """
    specs = resolve_loss_types(loss_type)
    weights = resolve_loss_weights(specs, loss_weights)
    opts = loss_options(
        specs, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
        simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha,
    )
    num_pairs, vocab_size = _check_inputs(logits, labels, ignore_index)
    _check_token_options(specs, ld_alpha, use_weighting, average_log_prob, token_metrics)
    _check_inplace(inplace_backward, logits)
    ref_given = _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs, specs)
    average = bool(average_log_prob)
    backend_name = resolve_backend(backend, logits.device)

    extras = {"logits_sum"}
    if use_weighting:
        extras.add("lse_2z")
    if token_metrics:
        extras.update(("entropy", "accuracy"))
    policy = token_logprobs(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend_name,
        extras=tuple(sorted(extras)), inplace_backward=inplace_backward,
    )
    if validate:
        _check_token_results(policy, ignore_index, vocab_size, "logits")
    token_weights = None if ld_alpha is None else ld_token_weights(policy.labels, ignore_index, ld_alpha)
    ref_seq = _reference_logps(ref_given, policy.labels, ignore_index, average, backend_name,
                               num_pairs, logits.device, validate, token_weights)

    use_fused_loss = (
        backend_name == "triton" and len(specs) == 1 and specs[0].name == "sigmoid"
        and f_divergence_type == "reverse_kl" and ld_alpha is None and not use_weighting
        and policy.logp.dtype == torch.float32
    )
    if use_fused_loss:
        loss, seq_logps, chosen_rewards, rejected_rewards, _ = fused_sigmoid_dpo(
            policy.logp, policy.labels, ref_seq, ignore_index=ignore_index, beta=beta,
            label_smoothing=label_smoothing, average=average,
        )
        chosen_logps, rejected_logps = seq_logps[:num_pairs], seq_logps[num_pairs:]
    else:
        seq_logps = sequence_logprobs(policy.logp, policy.labels, ignore_index, average, token_weights)
        ref_seq = ref_seq.to(seq_logps.dtype)
        # Completion lengths for the losses that normalize by length: TRL's completion_mask.sum(),
        # which with shift=True counts the input labels (a completion token at position 0, i.e.
        # an empty prompt, counts although nothing predicts it).
        lengths = completion_lengths(labels if shift else policy.labels, ignore_index).to(seq_logps.dtype)
        chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        pair = PreferencePair(
            seq_logps[chosen], seq_logps[rejected], ref_seq[chosen], ref_seq[rejected],
            chosen_lengths=lengths[chosen], rejected_lengths=lengths[rejected],
            chosen_token_logps=policy.logp[chosen], chosen_mask=policy.labels[chosen] != ignore_index,
            averaged=average,
        )
        pair_weights = None
        if use_weighting:
            seq_weights = wpo_weights(policy, ignore_index).to(seq_logps.dtype)
            pair_weights = seq_weights[chosen] * seq_weights[rejected]
        loss = combined_loss(pair, specs, weights, opts, pair_weights)
        chosen_rewards, rejected_rewards = rewards(pair, beta)
        chosen_logps, rejected_logps = pair.chosen_logps, pair.rejected_logps

    metrics = _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, policy,
                       ignore_index, vocab_size, num_pairs, token_metrics)
    return DPOOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, metrics)


# --------------------------------------------------------------------------------------------
# Validation: every message names the argument at fault.


def _check_logits_labels(logits, labels, ignore_index, *, logits_name="logits", labels_name="labels",
                         layout="[B, T, V]") -> tuple[int, int]:
    """Types, shapes and devices of a logits tensor and its labels; returns ``(rows, V)``.

    Shared by every front door (``fused_dpo_loss``, ``fused_kto_loss``); ``layout`` is what the
    caller's logits must look like, for the message.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{logits_name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{logits_name} must be a floating tensor (fp32, bf16, fp16, fp64), got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must be {layout}, got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{labels_name} must be an integer tensor of token ids, got {labels.dtype}")
    rows_name = layout.split(",")[0].lstrip("[")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"{labels_name} shape {tuple(labels.shape)} does not match {logits_name} shape "
            f"{tuple(logits.shape)}: {labels_name} must be [{rows_name}, T] = {tuple(logits.shape[:2])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{labels_name} are on {labels.device} but {logits_name} are on {logits.device}")
    if logits.shape[2] == 0:
        raise ValueError(f"{logits_name} has an empty vocabulary dimension (V = 0)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return logits.shape[0], logits.shape[2]


def _check_inputs(logits, labels, ignore_index) -> tuple[int, int]:
    """The paired batch of ``fused_dpo_loss``; returns ``(P, V)``."""
    rows, vocab_size = _check_logits_labels(
        logits, labels, ignore_index, layout="[2B, T, V] (chosen rows then rejected rows)"
    )
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logits batch must be 2B > 0 sequences (B chosen then B rejected), got {rows}"
        )
    return rows // 2, vocab_size


def _check_token_options(specs, ld_alpha, use_weighting, average_log_prob, token_metrics) -> None:
    """Options that change the per-token work, against the loss types they combine with."""
    desc = describe(specs)
    for name, value in (("use_weighting", use_weighting), ("average_log_prob", average_log_prob),
                        ("token_metrics", token_metrics)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if ld_alpha is not None:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be a number in [0, 1] (or None), got {ld_alpha!r}")
        if average_log_prob:
            raise ValueError(
                "ld_alpha does not combine with average_log_prob=True: LD-DPO weights the summed "
                f"log-probs (loss_type={desc})"
            )
        if all(spec.name == "sft" for spec in specs):
            raise ValueError(
                f"ld_alpha={ld_alpha} does not apply to loss_type={desc}: sft uses the raw per-token log-probs"
            )
    if use_weighting:
        coupled = [spec.name for spec in specs if spec.batch_coupled]
        if coupled:
            raise ValueError(
                f"use_weighting=True does not apply to loss_type {coupled!r}: these losses sort the pairs "
                "across the batch, which would misalign WPO's per-pair weights (as in TRL)"
            )


def _check_inplace(inplace_backward, logits) -> None:
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


def _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs, specs):
    """Returns ``("logps", tensor[2B])``, ``("logits", tensor)`` or ``("none", None)``."""
    given = [name for name, value in (("ref_logps", ref_logps), ("ref_logits", ref_logits)) if value is not None]
    if reference_free:
        if given:
            raise ValueError(f"reference_free=True conflicts with {' and '.join(given)}")
        return ("none", None)
    if not given:
        if not any(spec.needs_reference for spec in specs):
            return ("none", None)  # reference-free losses: rewards are beta * logps
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


def _reference_logps(ref_given, aligned_labels, ignore_index, average, backend_name, num_pairs, device, validate,
                     token_weights):
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
    return sequence_logprobs(ref.logp, aligned_labels, ignore_index, average, token_weights)


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
             ignore_index, vocab_size, num_pairs, token_metrics) -> dict[str, torch.Tensor]:
    """TRL's logged metrics, as detached device scalars."""
    scored = policy.labels != ignore_index
    lengths = scored.sum(-1)
    # Mean over completion tokens of the per-token vocabulary-mean logit.
    logits_per_seq = policy.extras["logits_sum"].sum(-1) / vocab_size

    def token_mean(rows: slice) -> torch.Tensor:
        return logits_per_seq[rows].sum() / lengths[rows].sum().clamp(min=1)

    chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logits/chosen": token_mean(chosen),
        "logits/rejected": token_mean(rejected),
    }
    if token_metrics:
        # Extras are 0 on ignored tokens; TRL reports 0 when there is no completion token.
        metrics["entropy"] = policy.extras["entropy"].sum() / lengths.sum().clamp(min=1)
        metrics["mean_token_accuracy"] = policy.extras["accuracy"][chosen].sum() / lengths[chosen].sum().clamp(min=1)
    return metrics
