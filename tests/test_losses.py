"""The loss registry: each loss against its formula in float64, values and gradients."""
import pytest
import torch

from dpo_kernels.losses import LOSSES, LossOptions, PreferencePair, get_loss, register_loss, rewards
from oracle import pair_loss


def _pair(P=6):
    logps = [(-torch.rand(P, dtype=torch.float64) * 40).requires_grad_(True) for _ in range(2)]
    refs = [-torch.rand(P, dtype=torch.float64) * 40 for _ in range(2)]
    return PreferencePair(logps[0], logps[1], refs[0], refs[1])


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_loss_matches_formula(name, beta):
    spec = get_loss(name)
    pair = _pair()
    ls = 0.2 if spec.label_smoothing else 0.0
    got = spec.fn(pair, LossOptions(beta=beta, label_smoothing=ls))
    margin = (pair.chosen_logps - pair.ref_chosen_logps) - (pair.rejected_logps - pair.ref_rejected_logps)
    want = pair_loss(name, margin, beta, ls)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), (pair.chosen_logps, pair.rejected_logps))
    g_want = torch.autograd.grad(want.sum(), (pair.chosen_logps, pair.rejected_logps))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_registry_records_what_each_loss_needs():
    assert LOSSES["ipo"].averages_logps and not LOSSES["sigmoid"].averages_logps
    assert LOSSES["sigmoid"].label_smoothing and not LOSSES["hinge"].label_smoothing
    assert all(spec.paper for spec in LOSSES.values())


def test_rewards_are_detached_and_scaled():
    pair = _pair()
    chosen, rejected = rewards(pair, 0.3)
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, 0.3 * (pair.chosen_logps - pair.ref_chosen_logps).detach())


def test_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match=r"loss_type must be one of \['hinge', 'ipo', 'sigmoid'\], got 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        register_loss("sigmoid", paper="x")(lambda pair, opts: pair.margin)
