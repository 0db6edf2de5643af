"""The DPO zoo: preference losses as small pure functions of per-sequence log-probabilities.

Nothing here sees a vocabulary. Each loss takes a :class:`PreferencePair` (policy and reference
log-probs of the chosen and rejected completions, ``[P]`` each, plus completion lengths and the
chosen per-token log-probs for the losses that need them) and :class:`LossOptions`, and returns
the per-pair losses ``[P]``; :func:`combined_loss` averages them and sums several loss types with
their weights, as TRL's ``DPOTrainer`` does. A loss is registered with :func:`register_loss`,
which records what it needs (a reference, label smoothing, an f-divergence, lengths, per-token
log-probs, its own options) so that ``fused_dpo_loss`` can validate options against it.

Conventions (TRL's): the per-sequence log-probs are SUMS over the completion tokens (possibly
LD-DPO weighted); losses defined on per-token averages divide inside the loss, each by its TRL
trainer's count: ``ipo`` and ``sigmoid_norm`` by the completion length, ``simpo`` and ``orpo`` by
the scored tokens (:class:`PreferencePair`). When the caller already averaged
(``average_log_prob=True``, ``PreferencePair.averaged``) they do not divide again.

Definitions follow TRL 1.16: ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``), and
``trl/experimental/cpo`` / ``trl/experimental/orpo`` for SimPO, CPO and ORPO, except ORPO's NLL,
which is the paper's (over the chosen completion, not TRL's prompt and completion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .checks import is_finite_number, is_number, python_scalar

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# What a loss may read beyond the per-sequence log-probs (LossSpec.inputs).
LOSS_INPUTS = ("lengths", "scored_lengths", "chosen_tokens")


@dataclass(frozen=True)
class PreferencePair:
    """Per-sequence log-probs of one batch of ``P`` preference pairs.

    ``*_logps`` are ``[P]``: sums over the completion tokens (TRL's convention; LD-DPO weighted
    when ``ld_alpha`` is used), or per-token averages when ``averaged`` is True. ``*_lengths`` are
    the completion lengths ``[P]`` (floating) that ``ipo`` and ``sigmoid_norm`` divide by (TRL's
    ``DPOTrainer``: ``completion_mask.sum()``, the input's completion tokens); ``*_scored`` the
    scored tokens ``[P]`` (the labels after any shift) that ``simpo`` and ``orpo`` divide by (TRL's
    CPO and ORPO trainers: ``loss_mask.sum()``). The two differ only with a shift, by the
    completion token at position 0 of an empty prompt, which nothing predicts.
    ``chosen_token_logps``/``chosen_mask`` are the
    policy's per-token log-probs ``[P, T]`` of the chosen completions and which tokens are scored
    (for the NLL terms: ``sft``, ``cpo``, ``orpo``). Losses that need a field that is ``None``
    raise a ValueError naming it.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    chosen_scored: torch.Tensor | None = None
    rejected_scored: torch.Tensor | None = None
    chosen_token_logps: torch.Tensor | None = None
    chosen_mask: torch.Tensor | None = None
    averaged: bool = False

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    def implicit_rewards(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``r = beta * (pi - ref)`` of chosen and rejected, differentiable (the losses'
        ``r_c``, ``r_r``; :func:`rewards` logs them detached)."""
        return beta * self.chosen_logratios, beta * self.rejected_logratios

    @property
    def margin(self) -> torch.Tensor:
        """``(pi_c - ref_c) - (pi_r - ref_r)``: what TRL calls ``logits``."""
        return self.chosen_logratios - self.rejected_logratios

    def per_token(self, chosen: torch.Tensor, rejected: torch.Tensor, loss: str,
                  scored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``chosen / |y_c|`` and ``rejected / |y_r|`` (clamped at 1), unless already averaged;
        ``|y|`` the completion lengths, or the scored tokens when ``scored``."""
        if self.averaged:
            return chosen, rejected
        names = ("chosen_scored", "rejected_scored") if scored else ("chosen_lengths", "rejected_lengths")
        chosen_n, rejected_n = (getattr(self, name) for name in names)
        if chosen_n is None or rejected_n is None:
            raise ValueError(f"loss_type={loss!r} needs PreferencePair.{names[0]} and {names[1]}")
        return chosen / chosen_n.clamp(min=1).to(chosen.dtype), rejected / rejected_n.clamp(min=1).to(rejected.dtype)

    def chosen_nll(self, loss: str) -> torch.Tensor:
        """Mean NLL over every scored chosen token of the batch (a scalar; 0 when there is none)."""
        if self.chosen_token_logps is None or self.chosen_mask is None:
            raise ValueError(f"loss_type={loss!r} needs PreferencePair.chosen_token_logps and chosen_mask")
        mask = self.chosen_mask.to(self.chosen_token_logps.dtype)
        return -(self.chosen_token_logps * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class LossOptions:
    """Options of the zoo. ``None`` means "the loss's own default" for the loss-specific ones."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float | None = None  # cpo: 1.0 (CPOConfig's default), simpo: 0.0 (SimPO)


LossFn = Callable[[PreferencePair, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs.

    - ``needs_reference``: uses the reference log-probs (False: SimPO, CPO, ORPO, SFT).
    - ``label_smoothing``: ``label_smoothing`` means something for it.
    - ``f_divergence``: accepts a non-default ``f_divergence_type`` (TRL's list).
    - ``length_normalized``: divides the per-sequence scores by the completion lengths itself.
    - ``inputs``: fields of :class:`PreferencePair` it reads beyond the per-sequence log-probs
      (``"lengths"``, ``"scored_lengths"``, ``"chosen_tokens"``).
    - ``options``: loss-specific :class:`LossOptions` fields it reads (``discopop_tau``, ...).
    - ``batch_coupled``: each pair's loss depends on the whole batch (AOT sorts across it).
    - ``check``: raises ValueError for option values out of this loss's range.
    - ``uses_beta``: ``beta`` enters its loss (False: SFT alone, where it only scales the logged
      rewards, so ``beta=0`` is allowed, as TRL allows it).
    - ``batch_nll``: for given options, whether each pair's loss adds the batch's mean chosen NLL
      (:meth:`PreferencePair.chosen_nll`: one scalar, the same in every pair's loss). It is linear
      in the token log-probs, so each pair's gradient stays its own, until WPO's per-pair weights
      multiply it: then every token's gradient holds the batch's mean weight (:meth:`adds_batch_nll`).
    """

    name: str
    fn: LossFn
    paper: str
    needs_reference: bool = True
    label_smoothing: bool = False
    f_divergence: bool = False
    length_normalized: bool = False
    inputs: frozenset[str] = field(default_factory=frozenset)
    options: frozenset[str] = field(default_factory=frozenset)
    batch_coupled: bool = False
    check: Callable[[LossOptions], None] | None = None
    batch_nll: Callable[[LossOptions], bool] | None = None
    uses_beta: bool = True

    def adds_batch_nll(self, opts: LossOptions) -> bool:
        """Whether, with ``opts``, this loss adds the batch's mean chosen NLL to every pair's loss."""
        return self.batch_nll is not None and bool(self.batch_nll(opts))


LOSSES: dict[str, LossSpec] = {}

# Loss-specific options (LossOptions fields). The generic validation rejects a value for one that no
# chosen loss reads.
LOSS_SPECIFIC_OPTIONS = ("discopop_tau", "simpo_gamma", "cpo_alpha")


def register_loss(
    name: str,
    *,
    paper: str,
    needs_reference: bool = True,
    label_smoothing: bool = False,
    f_divergence: bool = False,
    length_normalized: bool = False,
    inputs: Sequence[str] = (),
    options: Sequence[str] = (),
    batch_coupled: bool = False,
    check: Callable[[LossOptions], None] | None = None,
    batch_nll: Callable[[LossOptions], bool] | None = None,
    uses_beta: bool = True,
):
    """Add a loss function ``fn(pair, opts) -> per-pair losses [P]`` to the registry under ``name``."""
    unknown_inputs = set(inputs) - set(LOSS_INPUTS)
    if unknown_inputs:
        raise ValueError(f"inputs must be among {LOSS_INPUTS}, got {sorted(unknown_inputs)}")
    unknown_options = set(options) - set(LOSS_SPECIFIC_OPTIONS)
    if unknown_options:
        raise ValueError(f"options must be among {LOSS_SPECIFIC_OPTIONS}, got {sorted(unknown_options)}")

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss type {name!r} is already registered")
        LOSSES[name] = LossSpec(
            name, fn, paper, needs_reference, label_smoothing, f_divergence, length_normalized,
            frozenset(inputs), frozenset(options), batch_coupled, check, batch_nll, uses_beta,
        )
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; the error lists every valid name."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got {name!r}") from None


# --------------------------------------------------------------------------------------------
# f-divergences (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240): the "scores" that
# replace the log-ratios in the losses built on the chosen - rejected reward difference.


def f_divergence_scores(logratios: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """``f'(t)`` at ``t = pi / ref`` from ``log t``, as TRL computes it.

    reverse_kl: ``log t``; forward_kl: ``1 - 1/t``; js_divergence: ``log 2 + logsigmoid(log t)``;
    alpha_divergence: ``(t^(a-1) - 1) / (a - 1)`` with ``(a-1) log t`` clamped at 80 (11 in fp16)
    before the exp, and ``log t`` itself when ``|a - 1| < 1e-6``; the numerator is ``expm1``, not
    TRL's ``exp - 1``, which cancels near ``a = 1`` (0.6% off the loss at ``a = 1 + 2e-6``).
    """
    kind = opts.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        alpha = opts.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        t_wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return torch.expm1(t_wide.clamp(max=clamp_max)).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")


def scores(pair: PreferencePair, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores: the f-divergence transform of the log-ratios."""
    return f_divergence_scores(pair.chosen_logratios, opts), f_divergence_scores(pair.rejected_logratios, opts)


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)`` (both terms always, as TRL: an
    infinite ``x`` gives NaN rather than hiding a non-finite input)."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


# --------------------------------------------------------------------------------------------
# The losses. In the formulas: m = s_c - s_r with s the f-divergence scores of the log-ratios
# (s = log pi - log ref for the default reverse KL); r_c = beta (log pi_c - log ref_c), r_r alike;
# |y| a completion's token count; eps = label_smoothing.

_F_DIV = dict(f_divergence=True)


@register_loss("sigmoid", paper="Rafailov et al. 2023, arXiv:2305.18290; cDPO: Mitchell 2023",
               label_smoothing=True, **_F_DIV)
def sigmoid_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """DPO: ``-log sigmoid(beta m)``; with ``eps`` > 0 it is cDPO (our explicit option: TRL 1.16
    no longer smooths sigmoid): ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``."""
    chosen, rejected = scores(pair, opts)
    return _smoothed_sigmoid(opts.beta * (chosen - rejected), opts.label_smoothing)


@register_loss("hinge", paper="Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425", **_F_DIV)
def hinge_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """SLiC hinge on the margin: ``relu(1 - beta m)``."""
    chosen, rejected = scores(pair, opts)
    return torch.relu(1.0 - opts.beta * (chosen - rejected))


@register_loss("ipo", paper="Azar et al. 2023, arXiv:2310.12036", length_normalized=True,
               inputs=("lengths",), **_F_DIV)
def ipo_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """IPO (Eq. 17, beta = tau): ``(s_c / |y_c| - s_r / |y_r| - 1 / (2 beta))^2``; the scores of
    summed log-probs are divided by the completion lengths, as TRL does."""
    chosen, rejected = pair.per_token(*scores(pair, opts), "ipo")
    return (chosen - rejected - 1.0 / (2.0 * opts.beta)) ** 2


def _check_exo(opts: LossOptions) -> None:
    if not opts.label_smoothing > 0.0:
        raise ValueError(
            f"loss_type='exo_pair' needs label_smoothing > 0 (EXO's epsilon enters as log(eps); "
            f"the paper suggests 1e-3), got label_smoothing={opts.label_smoothing!r}"
        )


@register_loss("exo_pair", paper="Ji et al. 2024 (EXO), arXiv:2402.00856, Eq. 16", label_smoothing=True,
               check=_check_exo, **_F_DIV)
def exo_pair_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """EXO-pref, KL(q || p) over {chosen, rejected} with ``q = sigmoid(+-beta m)``, ``p = (1-eps, eps)``:
    ``q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)``, differentiated in closed form (see
    :class:`_ExoPair`)."""
    chosen, rejected = scores(pair, opts)
    x = opts.beta * (chosen - rejected)
    eps = opts.label_smoothing
    return _ExoPair.apply(x, math.log1p(-eps), math.log(eps))


class _ExoPair(torch.autograd.Function):
    """``f(x) = s(x) (log s(x) - a) + s(-x) (log s(-x) - b)`` with ``s`` the sigmoid, and its exact
    derivative ``f'(x) = s(x) s(-x) (x - a + b)``.

    Why not autograd on the formula: its terms' derivatives cancel each other (``s'(x) log s(x)``
    against ``s'(-x) log s(-x)``, each ~|x| times larger than their sum), so once the margin
    saturates the fp32 gradient has lost most of its digits (26% off at ``x = -20`` with
    ``eps = 1e-3``; even float64 is 15% off at ``x = -40``). ``s(x) s(-x) = e^-|x| / (1 + e^-|x|)^2``
    is formed without cancellation, so the gradient keeps full relative precision for every x."""

    # Its forward is torch operations alone, so torch.func.vmap batches it from them.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, a: float, b: float):
        return torch.sigmoid(x) * (F.logsigmoid(x) - a) + torch.sigmoid(-x) * (F.logsigmoid(-x) - b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, a, b = inputs
        ctx.save_for_backward(x)
        ctx.shift = b - a

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        e = torch.exp(-x.abs())
        return grad * (e / (1.0 + e) ** 2) * (x + ctx.shift), None, None


@register_loss("nca_pair", paper="Chen et al. 2024 (NCA), arXiv:2402.05369")
def nca_pair_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """NCA: ``-log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r)``."""
    r_c, r_r = pair.implicit_rewards(opts.beta)
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


@register_loss("robust", paper="Chowdhury et al. 2024 (rDPO), arXiv:2403.00409", label_smoothing=True, **_F_DIV)
def robust_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """Robust DPO, eps the label-flip rate in [0, 0.5):
    ``(-(1 - eps) log sigmoid(beta m) + eps log sigmoid(-beta m)) / (1 - 2 eps)``."""
    chosen, rejected = scores(pair, opts)
    x = opts.beta * (chosen - rejected)
    eps = opts.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


@register_loss("bco_pair", paper="Jung et al. 2024 (BCO), arXiv:2404.04656")
def bco_pair_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """BCO on pairs (TRL's form, no running reward shift): ``-log sigmoid(r_c) - log sigmoid(-r_r)``."""
    r_c, r_r = pair.implicit_rewards(opts.beta)
    return -F.logsigmoid(r_c) - F.logsigmoid(-r_r)


@register_loss("sppo_hard", paper="Wu et al. 2024 (SPPO), arXiv:2405.00675")
def sppo_hard_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for the winner, 0 for the loser):
    ``(lr_c - 1/(2 beta))^2 + (lr_r + 1/(2 beta))^2``, ``lr`` the log-ratios."""
    return (pair.chosen_logratios - 0.5 / opts.beta) ** 2 + (pair.rejected_logratios + 0.5 / opts.beta) ** 2


@register_loss("aot", paper="Melnyk et al. 2024 (AOT), arXiv:2406.05882", label_smoothing=True, batch_coupled=True)
def aot_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """AOT (paired): ``d = sort_batch(pi_c - pi_r) - sort_batch(ref_c - ref_r)``, then
    ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``; couples the pairs of a batch."""
    policy, _ = torch.sort(pair.chosen_logps - pair.rejected_logps, dim=0)
    ref, _ = torch.sort(pair.ref_chosen_logps - pair.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(opts.beta * (policy - ref), opts.label_smoothing)


@register_loss("aot_unpaired", paper="Melnyk et al. 2024 (AOT), arXiv:2406.05882", label_smoothing=True,
               batch_coupled=True)
def aot_unpaired_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """AOT (unpaired): ``d = sort_batch(lr_c) - sort_batch(lr_r)``, then the smoothed sigmoid of ``beta d``."""
    chosen, _ = torch.sort(pair.chosen_logratios, dim=0)
    rejected, _ = torch.sort(pair.rejected_logratios, dim=0)
    return _smoothed_sigmoid(opts.beta * (chosen - rejected), opts.label_smoothing)


@register_loss("apo_zero", paper="D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266, Eq. 7")
def apo_zero_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """APO-zero (chosen better than the model): ``1 - sigmoid(r_c) + sigmoid(r_r)``."""
    r_c, r_r = pair.implicit_rewards(opts.beta)
    return (1.0 - torch.sigmoid(r_c)) + torch.sigmoid(r_r)


@register_loss("apo_down", paper="D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266, Eq. 8")
def apo_down_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """APO-down (chosen worse than the model): ``sigmoid(r_c) + 1 - sigmoid(r_c - r_r)``."""
    r_c, r_r = pair.implicit_rewards(opts.beta)
    return torch.sigmoid(r_c) + (1.0 - torch.sigmoid(r_c - r_r))


def _check_discopop(opts: LossOptions) -> None:
    if not (is_finite_number(opts.discopop_tau) and opts.discopop_tau > 0):
        raise ValueError(f"discopop_tau must be a finite number > 0 for loss_type='discopop', got {opts.discopop_tau!r}")


@register_loss("discopop", paper="Chris Lu et al. 2024 (DiscoPOP), arXiv:2406.08414, Eq. 5",
               options=("discopop_tau",), check=_check_discopop, **_F_DIV)
def discopop_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """DiscoPOP, log-ratio modulated: with ``x = beta m`` and ``w = sigmoid(x / tau)``,
    ``(1 - w) (-log sigmoid(x)) + w exp(-x)``.

    ``w exp(-x)`` is formed as ``exp(log sigmoid(x / tau) - x)``: for ``x`` below about -88 (fp32)
    ``exp(-x)`` overflows while ``w`` underflows to 0, and TRL's ``exp(-x) * w`` is ``inf * 0`` =
    NaN for the whole batch, where the term is ``~exp(x (1 / tau - 1))``, 0 for ``tau < 1``."""
    chosen, rejected = scores(pair, opts)
    x = opts.beta * (chosen - rejected)
    w = torch.sigmoid(x / opts.discopop_tau)
    return -F.logsigmoid(x) * (1.0 - w) + torch.exp(F.logsigmoid(x / opts.discopop_tau) - x)


def _always(opts: LossOptions) -> bool:
    return True


@register_loss("sft", paper="negative log-likelihood of the chosen completions (RPO: Pang et al. 2024, "
               "arXiv:2404.19733, as sigmoid + sft)", needs_reference=False, inputs=("chosen_tokens",),
               batch_nll=_always, uses_beta=False, **_F_DIV)
def sft_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """SFT: ``-sum_{chosen tokens t} log pi(y_t) / #chosen tokens`` over the whole batch (TRL's
    token mean; the raw per-token log-probs, not LD-weighted nor averaged), repeated ``[P]``."""
    return pair.chosen_nll("sft").expand(pair.chosen_logps.shape[0])


@register_loss("sigmoid_norm", paper="Rafailov et al. 2023 on length-normalized scores (TRL)",
               length_normalized=True, inputs=("lengths",), **_F_DIV)
def sigmoid_norm_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """Length-normalized DPO: ``-log sigmoid(beta (s_c / |y_c| - s_r / |y_r|))``."""
    chosen, rejected = pair.per_token(*scores(pair, opts), "sigmoid_norm")
    return -F.logsigmoid(opts.beta * (chosen - rejected))


def _check_cpo_alpha(opts: LossOptions) -> None:
    a = opts.cpo_alpha
    if a is not None and not (is_finite_number(a) and a >= 0):
        raise ValueError(f"cpo_alpha must be a finite number >= 0, got {a!r}")


def _check_simpo(opts: LossOptions) -> None:
    if not is_finite_number(opts.simpo_gamma):
        raise ValueError(f"simpo_gamma must be a finite number for loss_type='simpo', got {opts.simpo_gamma!r}")
    _check_cpo_alpha(opts)


@register_loss("simpo", paper="Meng et al. 2024 (SimPO), arXiv:2405.14734; CPO-SimPO with cpo_alpha",
               needs_reference=False, label_smoothing=True, length_normalized=True,
               inputs=("scored_lengths", "chosen_tokens"), options=("simpo_gamma", "cpo_alpha"), check=_check_simpo,
               batch_nll=lambda opts: bool(opts.cpo_alpha))
def simpo_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """SimPO, reference-free on average log-probs ``a = log pi / |y|`` (``|y|`` the scored tokens, as
    TRL's CPOTrainer averages), ``x = beta (a_c - a_r) - gamma``:
    ``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)`` (TRL's CPOTrainer, ``gamma = simpo_gamma``),
    plus ``cpo_alpha`` times the chosen NLL (default 0: plain SimPO; TRL's CPOConfig defaults
    ``cpo_alpha`` to 1.0 for every loss type, so its ``simpo`` is CPO-SimPO unless told 0)."""
    chosen, rejected = pair.per_token(pair.chosen_logps, pair.rejected_logps, "simpo", scored=True)
    losses = _smoothed_sigmoid(opts.beta * (chosen - rejected) - opts.simpo_gamma, opts.label_smoothing)
    alpha = 0.0 if opts.cpo_alpha is None else opts.cpo_alpha
    if alpha:
        losses = losses + alpha * pair.chosen_nll("simpo")
    return losses


@register_loss("cpo", paper="Xu et al. 2024 (CPO), arXiv:2401.08417, Eq. 3 + NLL", needs_reference=False,
               label_smoothing=True, inputs=("chosen_tokens",), options=("cpo_alpha",), check=_check_cpo_alpha,
               batch_nll=lambda opts: opts.cpo_alpha is None or bool(opts.cpo_alpha))
def cpo_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """CPO, reference-free: ``-(1 - eps) log sigmoid(beta (pi_c - pi_r)) - eps log sigmoid(-beta (pi_c - pi_r))``
    on summed log-probs, plus ``cpo_alpha`` (default 1.0, CPOConfig's) times the chosen NLL."""
    losses = _smoothed_sigmoid(opts.beta * (pair.chosen_logps - pair.rejected_logps), opts.label_smoothing)
    alpha = 1.0 if opts.cpo_alpha is None else opts.cpo_alpha
    if alpha:
        losses = losses + alpha * pair.chosen_nll("cpo")
    return losses


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, branching at ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss("orpo", paper="Hong et al. 2024 (ORPO), arXiv:2403.07691, Eqs. 4-7", needs_reference=False,
               length_normalized=True, inputs=("scored_lengths", "chosen_tokens"), batch_nll=_always)
def orpo_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """ORPO, reference-free on average log-probs ``a = log pi / |y|`` (``|y|`` the scored tokens, as
    TRL's ORPOTrainer averages):
    ``NLL_chosen - beta log sigmoid((a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)))``
    (beta is ORPO's lambda; the odds-ratio term and its gradient: :class:`_OddsRatio`). The NLL
    is the token mean over the scored chosen completion tokens, the paper's ``L_SFT`` (Eq. 6);
    TRL's ORPOTrainer scores the prompt's tokens in it too."""
    chosen, rejected = pair.per_token(pair.chosen_logps, pair.rejected_logps, "orpo", scored=True)
    return pair.chosen_nll("orpo") + opts.beta * _OddsRatio.apply(chosen, rejected)


class _OddsRatio(torch.autograd.Function):
    """``f(a_c, a_r) = -log sigmoid(L)``, ``L = log odds(a_c) - log odds(a_r)``, ``odds(a) = e^a / (1 - e^a)``
    (average log-probs ``a <= 0``), with its exact derivatives written without ``1 / (1 - e^a)``:

    ``df/da_c = 1 / (expm1(a_c) + e^(a_c - a_r) expm1(a_r))``,
    ``df/da_r = -1 / (expm1(a_r) + e^(a_c - a_r) expm1(a_r)^2 / expm1(a_c))``

    (both denominators are sums of terms of one sign: no cancellation). Why not autograd on the
    formula: a confident chosen completion's average log-prob rounds to exactly 0 in fp32 (every
    token's ``p > 1 - 6e-8``), where ``L = +inf`` and autograd forms ``sigmoid(-L) / (1 - e^a_c) =
    0 * inf = NaN``, although the derivative is finite (``-odds(a_r)``): the NaN reached every
    token's gradient of that sequence and, on the hidden path, the whole weight gradient. ORPO's
    own NLL term drives chosen completions there."""

    # Its forward is torch operations alone, so torch.func.vmap batches it from them.
    generate_vmap_rule = True

    @staticmethod
    def forward(chosen, rejected):
        return -F.logsigmoid((chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        chosen, rejected = ctx.saved_tensors
        ratio = torch.exp(chosen - rejected)
        mc, mr = torch.expm1(chosen), torch.expm1(rejected)
        d_chosen = 1.0 / (mc + ratio * mr)
        d_rejected = -1.0 / (mr + ratio * mr * mr / mc)
        return grad * d_chosen, grad * d_rejected


# --------------------------------------------------------------------------------------------
# Assembly: which losses, with which options and weights, and their weighted sum.


def describe(specs: Sequence[LossSpec]) -> str:
    """``'ipo'`` for one loss type, ``['sigmoid', 'sft']`` for several (for error messages)."""
    names = [spec.name for spec in specs]
    return repr(names[0]) if len(names) == 1 else repr(names)


def resolve_loss_types(loss_type: str | Sequence[str]) -> tuple[LossSpec, ...]:
    """The specs of ``loss_type``: a registered name or a non-empty list of them."""
    if isinstance(loss_type, str):
        return (get_loss(loss_type),)
    if not isinstance(loss_type, (list, tuple)) or not loss_type:
        raise ValueError(f"loss_type must be a loss name or a non-empty list of loss names, got {loss_type!r}")
    return tuple(get_loss(name) for name in loss_type)


def resolve_loss_weights(specs: Sequence[LossSpec], loss_weights: Sequence[float] | None) -> tuple[float, ...]:
    """One finite weight per loss type (default 1.0 each, as TRL)."""
    if loss_weights is None:
        return (1.0,) * len(specs)
    if is_number(loss_weights):
        loss_weights = [loss_weights]
    if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(specs):
        raise ValueError(
            f"loss_weights must be a list with one weight per loss type ({len(specs)} for "
            f"loss_type={describe(specs)}), got {loss_weights!r}"
        )
    loss_weights = [python_scalar(w) for w in loss_weights]
    for w in loss_weights:
        if not is_finite_number(w):
            raise ValueError(f"loss_weights must be finite numbers, got {loss_weights!r}")
    return tuple(float(w) for w in loss_weights)


def loss_options(
    specs: Sequence[LossSpec],
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | None = None,
    simpo_gamma: float | None = None,
    cpo_alpha: float | None = None,
) -> LossOptions:
    """Validated :class:`LossOptions` for ``specs``.

    An option that none of the chosen loss types reads, or a value out of range, raises a
    ValueError naming the option and the loss type(s). ``None`` leaves a loss-specific option at
    its default.
    """
    desc = describe(specs)
    if not is_finite_number(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if beta == 0 and any(spec.uses_beta for spec in specs):
        users = [spec.name for spec in specs if spec.uses_beta]
        raise ValueError(
            f"beta must be a finite number > 0, got {beta!r}: loss_type {users} reads it (beta = 0 is "
            "allowed only where no loss does, as for 'sft' alone, where it only scales the logged rewards)"
        )
    if not is_number(label_smoothing) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (loss_type={desc}), got {label_smoothing!r}")
    if label_smoothing and not any(spec.label_smoothing for spec in specs):
        users = sorted(name for name, spec in LOSSES.items() if spec.label_smoothing)
        raise ValueError(
            f"label_smoothing={label_smoothing} does not apply to loss_type={desc} (it applies to {users})"
        )
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        bad = [spec.name for spec in specs if not spec.f_divergence]
        if bad:
            users = sorted(name for name, spec in LOSSES.items() if spec.f_divergence)
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} does not apply to loss_type {bad!r}: only {users} "
                "accept a non-default f-divergence (as in TRL); use f_divergence_type='reverse_kl'"
            )
    if f_alpha_divergence_coef is not None:
        if f_divergence_type != "alpha_divergence":
            raise ValueError(
                f"f_alpha_divergence_coef={f_alpha_divergence_coef!r} applies only with "
                f"f_divergence_type='alpha_divergence', got f_divergence_type={f_divergence_type!r} "
                f"(loss_type={desc})"
            )
        if not is_finite_number(f_alpha_divergence_coef):
            raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}")
    given = {"discopop_tau": discopop_tau, "simpo_gamma": simpo_gamma, "cpo_alpha": cpo_alpha}
    for name, value in given.items():
        if value is not None and not any(name in spec.options for spec in specs):
            users = sorted(n for n, spec in LOSSES.items() if name in spec.options)
            raise ValueError(f"{name}={value!r} does not apply to loss_type={desc} (it applies to {users})")
    defaults = LossOptions()
    opts = LossOptions(
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=defaults.f_alpha_divergence_coef if f_alpha_divergence_coef is None else f_alpha_divergence_coef,
        discopop_tau=defaults.discopop_tau if discopop_tau is None else discopop_tau,
        simpo_gamma=defaults.simpo_gamma if simpo_gamma is None else simpo_gamma,
        cpo_alpha=cpo_alpha,
    )
    for spec in specs:
        if spec.check is not None:
            spec.check(opts)
    return opts


def combined_loss(
    pair: PreferencePair,
    specs: Sequence[LossSpec],
    loss_weights: Sequence[float],
    opts: LossOptions,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_k w_k mean_pairs(loss_k * pair_weights)`` (TRL's multi-loss sum; ``pair_weights``
    are WPO's per-pair weights, or None)."""
    total = None
    for spec, weight in zip(specs, loss_weights, strict=True):
        per_pair = spec.fn(pair, opts)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        term = per_pair.mean() * weight
        total = term if total is None else total + term
    return total


def rewards(pair: PreferencePair, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``beta * (pi - ref)`` of chosen and rejected, detached (TRL's)."""
    chosen, rejected = pair.implicit_rewards(beta)
    return chosen.detach(), rejected.detach()
