"""Unpaired preference losses from the logits: KTO (and its APO-zero and BCO siblings).

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) learns from single completions
labelled desirable or undesirable, as TRL's ``KTOTrainer`` defines it (``trl/trainer/kto_trainer.py``,
TRL 1.16). With ``r = pi(y|x) - ref(y|x)`` (summed completion log-probs) and the reference point

    z0 = clamp(mean_k(pi(y'_k|x_k) - ref(y'_k|x_k)), min=0)      (detached)

estimated on mismatched prompt/completion pairs ``(x_k, y'_k)`` (TRL rotates the completions of a
batch by one), the per-sequence losses are

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

and the loss is their mean over the whole batch (TRL's ``losses.nanmean()`` over the concatenation).
``loss_type="apo_zero_unpaired"`` (D'Oosterlinck et al. 2024) drops the KL term: ``1 - sigmoid(beta r)``
for desirable, ``sigmoid(beta r)`` for undesirable. ``loss_type="bco"`` is BCO's unpaired form
(Jung et al. 2024, https://arxiv.org/abs/2404.04656, TRL's experimental ``BCOTrainer.bco_loss``):
``-logsigmoid(beta r - delta)`` for desirable, ``-logsigmoid(-(beta r - delta))`` for undesirable,
where ``delta`` is a running mean of all implicit rewards ``beta r`` seen so far, updated with the
current batch before the loss is taken (:class:`BCORunningMean`). BCO's underlying-distribution
matching (a logistic-regression density-ratio classifier on prompt embeddings that reweights
undesirable sequences) is not part of this package.

The per-token work is ``logprobs.token_logprobs`` (one kernel pass over each logits tensor, with the
same-pass extras behind the ``logits/*`` and ``entropy`` metrics); nothing here launches a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .api import _check_token_results, reference_failures
from .checks import check_flags, check_inplace, check_like, check_logits_labels, is_finite_number, python_scalars
from .backends import resolve_backend
from .logprobs import TokenLogprobs, completion_lengths, sequence_logprobs, token_logprobs

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired", "bco")
_USES_KL = {"kto"}
_USES_CLASS_WEIGHTS = {"kto", "apo_zero_unpaired"}


@dataclass
class KTOOutput:
    """Result of one unpaired-preference loss evaluation on ``B`` sequences.

    ``loss`` is the batch mean (differentiable). ``logps`` are the per-sequence policy log-probs
    ``[B]`` (differentiable), ``rewards`` the implicit rewards ``beta * (pi - ref)`` ``[B]``
    (detached), ``desirable`` the ``[B]`` bool labels; ``kl`` is the clamped, detached KL estimate
    the loss used (0 for loss types without one), in the log-probs' dtype. The
    ``chosen_*``/``rejected_*`` properties select the desirable/undesirable sequences (a boolean
    index: one host sync when read). ``metrics`` holds detached scalar tensors under the names
    TRL's ``KTOTrainer`` logs (no host sync).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def chosen_rewards(self) -> torch.Tensor:
        return self.rewards[self.desirable]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        return self.rewards[~self.desirable]

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.logps[self.desirable]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps[~self.desirable]


class BCORunningMean:
    """BCO's running reward mean ``delta`` (TRL's ``RunningMoments.mean``), kept on the device.

    ``update(rewards)`` folds a batch in as TRL does: ``mean += (batch_mean - mean) * n / (count + n)``,
    ``count += n``, starting from ``mean = 0``, ``count = 1e-24`` (so the first batch sets the mean).
    The state is a device tensor: no host sync per step. Single process: TRL gathers the rewards of
    all ranks first; all-reduce them yourself (or call ``update`` with the gathered rewards) there.
    """

    def __init__(self, mean: float = 0.0, count: float = 1e-24):
        self._mean = torch.tensor(float(mean), dtype=torch.float64)
        self.count = float(count)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> torch.Tensor:
        n = rewards.numel()
        if n == 0:
            return self._mean
        mean = self._mean.to(rewards.device)
        batch_mean = rewards.detach().double().mean()
        total = self.count + n
        self._mean = mean + (batch_mean - mean) * (n / total)
        self.count = total
        return self._mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": float(self._mean.item()), "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._mean = torch.tensor(float(state["mean"]), dtype=torch.float64)
        self.count = float(state["count"])


@python_scalars
def fused_kto_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor | Sequence[bool],
    *,
    kl_logits: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    kl_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    ref_kl_logits: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    bco_running_mean: BCORunningMean | None = None,
    bco_update: bool = True,
    entropy: bool | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> KTOOutput:
    """KTO-family loss on unpaired completions straight from the policy's logits.

    Args:
        logits: ``[B, T, V]`` floating (fp32, bf16, fp16, fp64), any strides; one completion per row.
        labels: ``[B, T]`` integer token ids; ``ignore_index`` marks prompt and padding.
        desirable: ``[B]`` bool tensor (or a sequence of bools): TRL's ``label`` column.
        kl_logits, kl_labels: the policy's logits ``[K, T', V]`` and labels ``[K, T']`` of the
            mismatched KL completions (TRL's ``KL_input_ids`` with the ``KL_completion_mask``);
            scored without gradient, as TRL does. ``kl_logps`` ``[K]``: their summed log-probs instead.
        ref_logps: reference per-sequence log-probs ``[B]`` (summed), or ``ref_logits`` ``[B, T, V]``.
        ref_kl_logps: reference log-probs of the KL completions ``[K]``, or ``ref_kl_logits``
            ``[K, T', V]`` (scored on ``kl_labels``). The KL inputs are required for ``"kto"`` and
            rejected for the other loss types.
        beta: inverse temperature of the implicit reward, > 0.
        desirable_weight, undesirable_weight: class weights (``"kto"``, ``"apo_zero_unpaired"``), >= 0.
        loss_type: ``"kto"``, ``"apo_zero_unpaired"`` or ``"bco"``.
        bco_running_mean: a :class:`BCORunningMean` carried across steps (required for ``"bco"``).
        bco_update: fold this batch's rewards into the running mean before the loss (TRL's
            ``do_train``; pass False in evaluation).
        entropy: the ``entropy`` metric (a same-pass extra): None computes it when the backend
            provides the extra, True requires it, False skips it.
        ignore_index, shift, inplace_backward, validate, backend: as in ``fused_dpo_loss``; ``shift``
            and ``ignore_index`` apply to the KL completions too.
    """
    check_flags(bco_update=bco_update, shift=shift, inplace_backward=inplace_backward, validate=validate)
    loss_type = _check_loss_options(loss_type, beta, desirable_weight, undesirable_weight,
                                    bco_running_mean, bco_update, entropy)
    batch, vocab_size = check_logits_labels(logits, labels, ignore_index)
    if batch == 0:
        raise ValueError("logits has an empty batch (B = 0)")
    check_inplace(inplace_backward, logits)
    desirable = _check_desirable(desirable, batch, logits.device)
    ref = _one_of("ref_logps", ref_logps, "ref_logits", ref_logits, needed_for="reference")
    check_like("ref_logits", ref_logits, logits)
    _check_logps("ref_logps", ref_logps, batch, logits.device)
    kl_sources = _check_kl_inputs(loss_type, logits, kl_logits, kl_labels, kl_logps,
                                  ref_kl_logps, ref_kl_logits, ignore_index)
    backend_name = resolve_backend(backend, logits.device)

    policy = _policy_token_logprobs(logits, labels, ignore_index, shift, backend_name, entropy,
                                    inplace_backward)
    # The token results of every pass, validated together (one host sync) before any state changes.
    checks = [(policy, vocab_size, "logits")]
    logps = sequence_logprobs(policy.logp, policy.labels, ignore_index, average=False)

    ref_seq = _summed_logps(ref, labels, ignore_index, shift, backend_name, checks, "ref_logits")
    logratios = logps - ref_seq.to(logps.dtype)
    rewards = beta * logratios.detach()

    if kl_sources is not None:
        kl_policy = _summed_logps(kl_sources[0], kl_labels, ignore_index, shift, backend_name, checks, "kl_logits")
        kl_ref = _summed_logps(kl_sources[1], kl_labels, ignore_index, shift, backend_name, checks, "ref_kl_logits")
        # In the log-probs' dtype (fp32; fp64 for fp64 logits): .float() rounded an fp64 KL, and the
        # fp64 loss with it, to fp32 (2e-5 off at summed log-probs of -3e4).
        kl = (kl_policy.to(logps.dtype) - kl_ref.to(logps.dtype)).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=logps.dtype, device=logits.device)
    if validate:
        given = [reference_failures(name, value) for name, value in
                 (("ref_logps", ref_logps), ("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps))]
        _check_token_results(checks, ignore_index, [f for failures in given for f in failures])

    delta = None
    if loss_type == "kto":
        losses = torch.where(
            desirable,
            desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
        )
    elif loss_type == "apo_zero_unpaired":
        losses = torch.where(
            desirable,
            desirable_weight * (1 - torch.sigmoid(beta * logratios)),
            undesirable_weight * torch.sigmoid(beta * logratios),
        )
    else:  # bco
        if bco_update:
            bco_running_mean.update(rewards)
        delta = bco_running_mean.mean.to(device=logps.device, dtype=logps.dtype)
        implicit = beta * logratios - delta
        losses = torch.where(desirable, -F.logsigmoid(implicit), -F.logsigmoid(-implicit))
    loss = losses.mean()

    metrics = _metrics(loss_type, logps, rewards, desirable, kl, delta, policy, ignore_index, vocab_size)
    return KTOOutput(loss, logps, rewards, desirable, kl, metrics)


# --------------------------------------------------------------------------------------------
# Per-token passes


def _policy_token_logprobs(logits, labels, ignore_index, shift, backend_name, entropy, inplace_backward):
    extras = ("logits_sum", "entropy") if entropy is not False else ("logits_sum",)
    kwargs = dict(ignore_index=ignore_index, shift=shift, backend=backend_name, inplace_backward=inplace_backward)
    try:
        return token_logprobs(logits, labels, extras=extras, **kwargs)
    except NotImplementedError as exc:
        if entropy is True:
            raise NotImplementedError(
                f"entropy=True: backend {backend_name!r} does not compute the entropy extra yet ({exc}); "
                "pass entropy=None to skip the metric there, or another backend"
            ) from exc
        if entropy is False:
            raise
        return token_logprobs(logits, labels, extras=("logits_sum",), **kwargs)


def _summed_logps(source, labels, ignore_index, shift, backend_name, checks, name):
    """Detached per-sequence summed log-probs from ``("logps", t)`` or ``("logits", t)``; for
    logits, their token results join ``checks`` (validated with the policy's, one sync), the KL
    completions' labels named ``kl_labels`` in the error."""
    kind, value = source
    if kind == "logps":
        return value.detach()
    with torch.no_grad():
        tokens = token_logprobs(value, labels, ignore_index=ignore_index, shift=shift, backend=backend_name)
    checks.append((tokens, value.shape[-1], name, "kl_labels" if name.endswith("kl_logits") else "labels"))
    return sequence_logprobs(tokens.logp, tokens.labels, ignore_index, average=False)


# --------------------------------------------------------------------------------------------
# Metrics: TRL's KTOTrainer names; no host sync (NaN where TRL logs nothing, see below).


def _metrics(loss_type, logps, rewards, desirable, kl, delta, policy: TokenLogprobs, ignore_index, vocab_size):
    # fp32, or fp64 with fp64 logits (as fused_dpo_loss's metrics): the precision of the losses.
    acc = torch.promote_types(logps.dtype, torch.float32)
    lengths = completion_lengths(policy.labels, ignore_index)
    des = desirable.to(acc)
    und = 1 - des
    n_des, n_und = des.sum(), und.sum()
    nan = torch.full((), float("nan"), dtype=acc, device=logps.device)

    def class_mean(values, weights, count):
        return torch.where(count > 0, (values.to(acc) * weights).sum() / count.clamp(min=1), nan)

    logits_per_seq = policy.extras["logits_sum"].to(acc).sum(-1) / vocab_size
    tokens = lengths.to(acc)
    tok_des, tok_und = (tokens * des).sum(), (tokens * und).sum()
    metrics = {}
    if loss_type != "bco":
        metrics["kl"] = kl.to(acc)
    if "entropy" in policy.extras:
        total = tokens.sum()
        ent = policy.extras["entropy"].to(acc).sum()
        metrics["entropy"] = torch.where(total > 0, ent / total.clamp(min=1), torch.zeros_like(ent))
    metrics.update({
        "logits/chosen": torch.where(tok_des > 0, (logits_per_seq * des).sum() / tok_des.clamp(min=1), nan),
        "logits/rejected": torch.where(tok_und > 0, (logits_per_seq * und).sum() / tok_und.clamp(min=1), nan),
        "rewards/chosen": class_mean(rewards, des, n_des),
        "logps/chosen": class_mean(logps.detach(), des, n_des),
        "rewards/rejected": class_mean(rewards, und, n_und),
        "logps/rejected": class_mean(logps.detach(), und, n_und),
    })
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if delta is not None:
        metrics["delta"] = delta.detach().to(acc)
    return metrics


# --------------------------------------------------------------------------------------------
# Validation: every message names the argument at fault. Uses api.py's helpers where they fit;
# api._check_inputs requires an even (chosen, rejected) batch, so the shape checks are local.


def _check_loss_options(loss_type, beta, desirable_weight, undesirable_weight, bco_running_mean,
                        bco_update, entropy) -> str:
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    if not is_finite_number(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if value != 1.0 and loss_type not in _USES_CLASS_WEIGHTS:
            raise ValueError(
                f"{name}={value} does not apply to loss_type={loss_type!r} (BCO has no class weights)"
            )
    if loss_type == "bco":
        if not isinstance(bco_running_mean, BCORunningMean):
            raise ValueError(
                "loss_type='bco' needs bco_running_mean=BCORunningMean() (the running reward mean delta, "
                f"kept across steps), got {type(bco_running_mean).__name__}"
            )
    elif bco_running_mean is not None:
        raise ValueError(f"bco_running_mean does not apply to loss_type={loss_type!r} (only to 'bco')")
    if entropy not in (None, True, False):
        raise TypeError(f"entropy must be None, True or False, got {entropy!r}")
    return loss_type


def _check_desirable(desirable, batch, device) -> torch.Tensor:
    if isinstance(desirable, torch.Tensor):
        if desirable.dtype != torch.bool:
            raise TypeError(f"desirable must be a bool tensor [B] (TRL's label column), got {desirable.dtype}")
    elif isinstance(desirable, (list, tuple)):
        # Python's bools, or NumPy's (a column that went through NumPy or pandas); not 1/0, which
        # would as well be a class index or a score.
        for i, d in enumerate(desirable):
            if not isinstance(d, (bool, np.bool_)):
                raise TypeError(f"desirable must be a bool tensor [B] or a list of bools; desirable[{i}] is "
                                f"{d!r} ({type(d).__name__})")
        desirable = torch.tensor([bool(d) for d in desirable], dtype=torch.bool)
    else:
        raise TypeError(f"desirable must be a bool tensor [B] or a list of bools, got {type(desirable).__name__}")
    if desirable.shape != (batch,):
        raise ValueError(f"desirable must have shape [B] = ({batch},), got {tuple(desirable.shape)}")
    return desirable.to(device)


def _one_of(logps_name, logps, logits_name, logits, *, needed_for):
    """``("logps", tensor)`` or ``("logits", tensor)``: exactly one of the two must be given."""
    if logps is not None and logits is not None:
        raise ValueError(f"pass either {logps_name} or {logits_name}, not both")
    if logps is None and logits is None:
        raise ValueError(f"no {needed_for}: pass {logps_name} or {logits_name}")
    return ("logps", logps) if logps is not None else ("logits", logits)


def _check_logps(name, value, size, device):
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [{size}], got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating, got {value.dtype}")
    if value.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} are on {value.device} but logits are on {device}")


def _check_kl_inputs(loss_type, logits, kl_logits, kl_labels, kl_logps, ref_kl_logps, ref_kl_logits, ignore_index):
    """``((policy source), (reference source))`` for the KL estimate, or None when not used."""
    given = {name: value for name, value in (
        ("kl_logits", kl_logits), ("kl_labels", kl_labels), ("kl_logps", kl_logps),
        ("ref_kl_logps", ref_kl_logps), ("ref_kl_logits", ref_kl_logits)) if value is not None}
    if loss_type not in _USES_KL:
        if given:
            raise ValueError(
                f"{', '.join(given)} do(es) not apply to loss_type={loss_type!r}: only 'kto' estimates a KL term"
            )
        return None
    policy = _one_of("kl_logps", kl_logps, "kl_logits", kl_logits, needed_for="KL estimate for loss_type='kto'")
    reference = _one_of("ref_kl_logps", ref_kl_logps, "ref_kl_logits", ref_kl_logits,
                        needed_for="reference KL estimate for loss_type='kto'")
    uses_logits = kl_logits is not None or ref_kl_logits is not None
    if uses_logits and kl_labels is None:
        raise ValueError("kl_labels [K, T'] are needed to score kl_logits / ref_kl_logits")
    if not uses_logits and kl_labels is not None:
        raise ValueError("kl_labels given without kl_logits or ref_kl_logits (nothing to score them on)")
    size = None
    if uses_logits:
        like = kl_logits if kl_logits is not None else ref_kl_logits
        like_name = "kl_logits" if kl_logits is not None else "ref_kl_logits"
        size, vocab = check_logits_labels(like, kl_labels, ignore_index, logits_name=like_name,
                                           labels_name="kl_labels")
        if size == 0:
            raise ValueError(f"{like_name} has an empty batch (K = 0)")
        if vocab != logits.shape[-1]:
            raise ValueError(f"{like_name} vocabulary V={vocab} differs from logits V={logits.shape[-1]}")
        if like.device != logits.device:
            raise ValueError(f"{like_name} are on {like.device} but logits are on {logits.device}")
        if kl_logits is not None and ref_kl_logits is not None:
            check_like("ref_kl_logits", ref_kl_logits, kl_logits, "kl_logits")
    for name, value in (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor [K], got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        size = value.shape[0] if size is None else size
        _check_logps(name, value, size, logits.device)
    return policy, reference
