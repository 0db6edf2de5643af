"""The loss registry: each loss against its formula in float64 (tests/oracle.py, written from the
papers and TRL's definitions, never calling dpo_kernels), values and gradients w.r.t. the
per-sequence log-probs (and the chosen per-token log-probs for the NLL terms)."""
import decimal
import math

import pytest
import torch

from dpo_kernels.losses import (
    F_DIVERGENCES,
    LOSSES,
    LossOptions,
    PreferencePair,
    combined_loss,
    get_loss,
    log1mexp,
    loss_options,
    register_loss,
    resolve_loss_types,
    rewards,
)
from oracle import zoo_loss

T = 7


def _pair(P=5, *, averaged=False, ref_spread=3.0):
    """Fresh float64 inputs: sums of T token log-probs, refs near the policy, ragged lengths."""
    lengths = [torch.randint(1, T + 1, (P,)).double() for _ in range(2)]
    if averaged:
        logps = [(-torch.rand(P, dtype=torch.float64) * 3 - 0.05) for _ in range(2)]
    else:
        logps = [-(torch.rand(P, dtype=torch.float64) * 4 + 0.2) * n for n in lengths]
    refs = [x + torch.randn(P, dtype=torch.float64) * ref_spread for x in logps]
    mask = torch.rand(P, T) < 0.7
    mask[:, 0] = True
    tokens = -torch.rand(P, T, dtype=torch.float64) * 6
    leaves = [x.clone().requires_grad_(True) for x in (*logps, tokens)]
    # The scored tokens: the completion lengths less the unpredicted first token of some (empty prompts).
    scored = [(n - torch.randint(0, 2, (P,))).clamp(min=1) for n in lengths]
    pair = PreferencePair(leaves[0], leaves[1], refs[0], refs[1], chosen_lengths=lengths[0],
                          rejected_lengths=lengths[1], chosen_scored=scored[0], rejected_scored=scored[1],
                          chosen_token_logps=leaves[2], chosen_mask=mask, averaged=averaged)
    return pair, leaves


def _want(name, pair, leaves, opts: LossOptions):
    return zoo_loss(
        name, pc=leaves[0], pr=leaves[1], rc=pair.ref_chosen_logps, rr=pair.ref_rejected_logps,
        lc=pair.chosen_lengths, lr=pair.rejected_lengths, tc=pair.chosen_scored, tr=pair.rejected_scored,
        tok_c=leaves[2], mask_c=pair.chosen_mask,
        beta=opts.beta, eps=opts.label_smoothing, fdiv=opts.f_divergence_type,
        alpha=opts.f_alpha_divergence_coef, tau=opts.discopop_tau, gamma=opts.simpo_gamma,
        cpo_alpha=opts.cpo_alpha, averaged=pair.averaged,
    )


def _compare(name, pair, leaves, opts):
    got = get_loss(name).fn(pair, opts)
    want = _want(name, pair, leaves, opts)
    assert got.shape == want.shape == (pair.chosen_logps.shape[0],)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.rand_like(want)  # a random cotangent, so every pair's gradient is checked
    g_got = torch.autograd.grad((got * weights).sum(), leaves, allow_unused=True)
    g_want = torch.autograd.grad((want * weights).sum(), leaves, allow_unused=True)
    for which, a, b in zip(("chosen_logps", "rejected_logps", "chosen_token_logps"), g_got, g_want):
        a = torch.zeros_like(leaves[0] if which != "chosen_token_logps" else leaves[2]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name} d/d{which}: {m}")
    return got


def _default_eps(spec):
    if spec.name == "exo_pair":
        return 1e-3
    return 0.2 if spec.label_smoothing else 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_loss_matches_formula(name, beta):
    spec = get_loss(name)
    pair, leaves = _pair()
    got = _compare(name, pair, leaves, LossOptions(beta=beta, label_smoothing=_default_eps(spec)))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if s.label_smoothing))
def test_label_smoothing_changes_the_loss_as_the_formula_says(name):
    pair, leaves = _pair()
    for eps in (0.01, 0.3):
        _compare(name, pair, leaves, LossOptions(beta=0.3, label_smoothing=eps))


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if s.length_normalized))
def test_length_normalized_losses_on_averaged_logps_do_not_divide_again(name):
    pair, leaves = _pair(averaged=True)
    _compare(name, pair, leaves, LossOptions(beta=0.7))


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if s.f_divergence))
@pytest.mark.parametrize("f_div,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 1.0), ("alpha_divergence", 1.7)])
def test_f_divergences(name, f_div, alpha):
    pair, leaves = _pair(ref_spread=1.5)
    eps = _default_eps(get_loss(name))
    _compare(name, pair, leaves, LossOptions(beta=0.4, label_smoothing=eps, f_divergence_type=f_div,
                                             f_alpha_divergence_coef=alpha))


def test_alpha_divergence_clamps_the_exponent_at_80():
    pair, leaves = _pair(ref_spread=0.0)
    big = torch.tensor([50.0, 30.0, -2.0, 1.0, 45.0], dtype=torch.float64)  # (alpha-1) lr > 80 for 50, 45
    pair = PreferencePair(leaves[0], leaves[1], leaves[0].detach() - big, pair.ref_rejected_logps,
                          pair.chosen_lengths, pair.rejected_lengths, leaves[2], pair.chosen_mask)
    got = _compare("sigmoid", pair, leaves, LossOptions(beta=0.01, f_divergence_type="alpha_divergence",
                                                        f_alpha_divergence_coef=3.0))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", ["discopop"])
@pytest.mark.parametrize("tau", [0.01, 0.05, 1.0])
def test_discopop_tau(name, tau):
    pair, leaves = _pair(ref_spread=1.0)
    _compare(name, pair, leaves, LossOptions(beta=0.2, discopop_tau=tau))


@pytest.mark.parametrize("gamma,cpo_alpha", [(0.0, None), (1.2, None), (0.5, 0.3)])
def test_simpo_gamma_and_cpo_simpo(gamma, cpo_alpha):
    pair, leaves = _pair()
    _compare("simpo", pair, leaves, LossOptions(beta=2.0, simpo_gamma=gamma, cpo_alpha=cpo_alpha))


@pytest.mark.parametrize("cpo_alpha", [None, 0.0, 2.5])
def test_cpo_alpha(cpo_alpha):
    pair, leaves = _pair()
    _compare("cpo", pair, leaves, LossOptions(beta=0.1, label_smoothing=0.1, cpo_alpha=cpo_alpha))


def test_aot_couples_the_batch_and_others_do_not():
    """Permuting the pairs permutes per-pair losses, except for AOT (it sorts across the batch)."""
    pair, _ = _pair(P=6)
    perm = torch.randperm(6)
    while torch.equal(perm, torch.arange(6)):
        perm = torch.randperm(6)
    permuted = PreferencePair(*(getattr(pair, f)[perm] for f in ("chosen_logps", "rejected_logps",
                                                                 "ref_chosen_logps", "ref_rejected_logps")),
                              chosen_lengths=pair.chosen_lengths[perm], rejected_lengths=pair.rejected_lengths[perm],
                              chosen_scored=pair.chosen_scored[perm], rejected_scored=pair.rejected_scored[perm],
                              chosen_token_logps=pair.chosen_token_logps[perm], chosen_mask=pair.chosen_mask[perm])
    for name, spec in LOSSES.items():
        opts = LossOptions(beta=0.3, label_smoothing=_default_eps(spec))
        a, b = spec.fn(pair, opts)[perm], spec.fn(permuted, opts)
        if spec.batch_coupled:
            torch.testing.assert_close(a.sum(), b.sum())  # same multiset of sorted differences
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_combined_loss_is_the_weighted_sum_of_means_with_pair_weights():
    pair, leaves = _pair()
    specs = resolve_loss_types(["sigmoid", "bco_pair", "sft"])
    opts = LossOptions(beta=0.3)
    pair_weights = torch.rand(5, dtype=torch.float64)
    got = combined_loss(pair, specs, (0.8, 0.2, 1.0), opts, pair_weights)
    want = sum(w * (_want(n, pair, leaves, opts) * pair_weights).mean()
               for n, w in (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)))
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, leaves)
    g_want = torch.autograd.grad(want, leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exo_pair_gradient_keeps_its_precision_when_saturated(dtype):
    """Margins up to |beta m| = 60 either way, at beta = 2: the gradient w.r.t. the policy log-probs
    stays within a few ulps (relative) of the float64 closed form (autograd through the formula
    was 26% off in fp32 at beta m = -20)."""
    P = 9
    margins = torch.tensor([-30.0, -20.0, -10.0, -4.0, 0.3, 4.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    ref_c = -torch.rand(P, dtype=torch.float64) * 50 - 10
    ref_r = -torch.rand(P, dtype=torch.float64) * 50 - 10
    pc = (ref_c - 5.0).clone()
    pr = (pc - ref_c + ref_r - margins).clone()  # (pc - ref_c) - (pr - ref_r) = margins
    leaves64 = [pc.requires_grad_(True), pr.requires_grad_(True)]
    opts = loss_options([get_loss("exo_pair")], beta=2.0, label_smoothing=1e-3)
    want = zoo_loss("exo_pair", pc=leaves64[0], pr=leaves64[1], rc=ref_c, rr=ref_r, beta=2.0, eps=1e-3)
    g_want = torch.autograd.grad(want.sum(), leaves64)
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves64]
    pair = PreferencePair(leaves[0], leaves[1], ref_c.to(dtype), ref_r.to(dtype))
    g_got = torch.autograd.grad(get_loss("exo_pair").fn(pair, opts).sum(), leaves)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9  # fp32 inputs of ~50 hold margins to ~4e-6 absolute
    for got, exp in zip(g_got, g_want):
        assert (got.double() != 0).all()
        torch.testing.assert_close(got.double(), exp, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_gradient_is_finite_where_the_chosen_average_rounds_to_zero(dtype):
    """A confident chosen completion's average log-prob is exactly 0 in fp32: the odds are
    infinite, the odds-ratio term 0, and its derivative finite (-odds(a_r) per unit of beta).
    Autograd through the formula gave 0 * inf = NaN. The closed form against float64 autograd of
    the formula (just below 0 and at ordinary values, both inputs), then at 0."""
    beta = 0.7
    a_r = torch.tensor([-0.3, -2.0, -7.5, -0.01], dtype=torch.float64)
    near = torch.tensor([-1e-12, -1e-9, -0.5, -3.0], dtype=torch.float64)
    no_tokens = dict(tok_c=torch.zeros(4, 1, dtype=torch.float64), mask_c=torch.zeros(4, 1, dtype=torch.bool))

    def ours(chosen, rejected):
        c, r = chosen.to(dtype).requires_grad_(True), rejected.to(dtype).requires_grad_(True)
        pair = PreferencePair(c, r, torch.zeros_like(c), torch.zeros_like(r), averaged=True,
                              chosen_token_logps=no_tokens["tok_c"].to(dtype), chosen_mask=no_tokens["mask_c"])
        loss = get_loss("orpo").fn(pair, LossOptions(beta=beta))
        return (loss, *torch.autograd.grad(loss.sum(), (c, r)))

    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-12)
    pc, pr = near.clone().requires_grad_(True), a_r.clone().requires_grad_(True)
    want = zoo_loss("orpo", pc=pc, pr=pr, rc=0.0, rr=0.0, beta=beta, averaged=True, **no_tokens)
    want_c, want_r = torch.autograd.grad(want.sum(), (pc, pr))
    _, got_c, got_r = ours(near, a_r)
    torch.testing.assert_close(got_c.double(), want_c, **tol)
    torch.testing.assert_close(got_r.double(), want_r, **tol)

    loss, got_c, got_r = ours(torch.zeros(4, dtype=torch.float64), a_r)
    assert torch.isfinite(got_c).all() and (got_r == 0).all() and (loss == 0).all()
    torch.testing.assert_close(got_c.double(), -beta * torch.exp(a_r) / -torch.expm1(a_r), **tol)


def test_log1mexp_both_branches():
    x = -torch.cat([torch.rand(50, dtype=torch.float64) * 0.69, 0.7 + torch.rand(50, dtype=torch.float64) * 30])
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        want = torch.tensor([float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-14, atol=0)


def test_registry_records_what_each_loss_needs():
    # ipo normalizes the scores of summed log-probs by length inside the loss (TRL's convention);
    # it no longer asks the caller for averaged log-probs.
    assert LOSSES["ipo"].length_normalized and LOSSES["sigmoid_norm"].length_normalized
    assert not LOSSES["sigmoid"].length_normalized
    assert LOSSES["sigmoid"].label_smoothing and not LOSSES["hinge"].label_smoothing
    assert {n for n, s in LOSSES.items() if not s.needs_reference} == {"simpo", "cpo", "orpo", "sft"}
    assert {n for n, s in LOSSES.items() if s.f_divergence} == {
        "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    assert {n for n, s in LOSSES.items() if s.batch_coupled} == {"aot", "aot_unpaired"}
    # The losses adding the batch's mean chosen NLL to every pair (cpo by default; simpo with cpo_alpha)
    assert {n for n, s in LOSSES.items() if s.adds_batch_nll(LossOptions())} == {"sft", "cpo", "orpo"}
    assert LOSSES["simpo"].adds_batch_nll(LossOptions(cpo_alpha=0.5))
    assert not LOSSES["cpo"].adds_batch_nll(LossOptions(cpo_alpha=0.0))
    assert "chosen_tokens" in LOSSES["sft"].inputs and "lengths" in LOSSES["ipo"].inputs
    trl = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert trl | {"simpo", "cpo", "orpo"} <= set(LOSSES)
    for spec in LOSSES.values():
        assert spec.paper and spec.fn.__doc__, spec.name


def test_losses_name_what_they_miss():
    pair = PreferencePair(*(torch.randn(3) for _ in range(4)))
    with pytest.raises(ValueError, match="loss_type='ipo' needs PreferencePair.chosen_lengths"):
        get_loss("ipo").fn(pair, LossOptions())
    with pytest.raises(ValueError, match="loss_type='sft' needs PreferencePair.chosen_token_logps"):
        get_loss("sft").fn(pair, LossOptions())


def test_rewards_are_detached_and_scaled():
    pair, _ = _pair()
    chosen, rejected = rewards(pair, 0.3)
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, 0.3 * (pair.chosen_logps - pair.ref_chosen_logps).detach())


def test_loss_options_defaults_and_validation():
    specs = resolve_loss_types(["discopop", "simpo"])
    opts = loss_options(specs, beta=0.2)
    assert (opts.discopop_tau, opts.simpo_gamma, opts.cpo_alpha, opts.f_alpha_divergence_coef) == (0.05, 0.5, None, 0.5)
    assert set(F_DIVERGENCES) == {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}
    with pytest.raises(ValueError, match=r"discopop_tau=0.1 does not apply to loss_type='sigmoid'"):
        loss_options(resolve_loss_types("sigmoid"), discopop_tau=0.1)
    assert math.isclose(loss_options(specs, discopop_tau=0.1).discopop_tau, 0.1)


def test_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match=r"loss_type must be one of \[.*'sigmoid'.*\], got 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        register_loss("sigmoid", paper="x")(lambda pair, opts: pair.margin)
    with pytest.raises(ValueError, match="inputs must be among"):
        register_loss("new_loss", paper="x", inputs=("hidden",))
    with pytest.raises(ValueError, match="options must be among"):
        register_loss("new_loss", paper="x", options=("gamma",))
