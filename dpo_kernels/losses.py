"""The DPO zoo: preference losses as small pure functions of per-sequence log-probabilities.

Nothing here sees a vocabulary. Each loss takes a :class:`PreferencePair` (policy and reference
log-probs of the chosen and rejected completions, ``[P]`` each) and :class:`LossOptions`, and
returns the per-pair losses ``[P]``; the caller averages them. A loss is registered with
:func:`register_loss`, which records what it needs (averaged log-probs, label smoothing) so that
``fused_dpo_loss`` can validate options against it. Definitions follow TRL's ``DPOTrainer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferencePair:
    """Per-sequence log-probs of one batch of preference pairs, each ``[P]``."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        """``(pi_c - ref_c) - (pi_r - ref_r)``: what TRL calls ``logits``."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0


LossFn = Callable[[PreferencePair, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    paper: str
    averages_logps: bool  # the loss is defined on length-averaged log-probs (TRL forces this)
    label_smoothing: bool  # whether label_smoothing means anything for this loss


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, paper: str, averages_logps: bool = False, label_smoothing: bool = False):
    """Add a loss function to the registry under ``name``."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss type {name!r} is already registered")
        LOSSES[name] = LossSpec(name, fn, paper, averages_logps, label_smoothing)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; the error lists every valid name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got {name!r}") from None


@register_loss("sigmoid", paper="Rafailov et al. 2023, arXiv:2305.18290; cDPO: Mitchell 2023", label_smoothing=True)
def sigmoid_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """DPO, with cDPO's label smoothing ``eps``:
    ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``, ``m`` the log-ratio margin."""
    x = opts.beta * pair.margin
    return -(1.0 - opts.label_smoothing) * F.logsigmoid(x) - opts.label_smoothing * F.logsigmoid(-x)


@register_loss("hinge", paper="Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425")
def hinge_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """SLiC hinge on the margin: ``relu(1 - beta m)``."""
    return torch.relu(1.0 - opts.beta * pair.margin)


@register_loss("ipo", paper="Azar et al. 2023, arXiv:2310.12036", averages_logps=True)
def ipo_loss(pair: PreferencePair, opts: LossOptions) -> torch.Tensor:
    """IPO: ``(m - 1 / (2 beta))^2`` on length-averaged log-probs (as TRL computes it)."""
    return (pair.margin - 1.0 / (2.0 * opts.beta)) ** 2


def rewards(pair: PreferencePair, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``beta * (pi - ref)`` of chosen and rejected, detached (TRL's)."""
    return (beta * pair.chosen_logratios).detach(), (beta * pair.rejected_logratios).detach()
