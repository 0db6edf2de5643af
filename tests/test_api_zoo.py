"""The DPO zoo through fused_dpo_loss: every loss type, combined losses, LD-DPO, WPO, f-divergences
and the same-pass token metrics, against the float64 oracle (tests/oracle.py), values, metrics and
the gradient w.r.t. the logits."""
import pytest
import torch

import oracle
from dpo_kernels import LOSSES, fused_dpo_loss
from dpo_kernels.backends import load_backend
from oracle import IGNORE, make_batch
from runs import run_linear
from runs import run_logits as _run

F32 = torch.float32




_check = oracle.assert_matches_oracle


def _eps(name):
    return {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)


def _reference_kwargs(name, logits, form):
    if name in oracle.REFERENCE_FREE:
        return {}, {}
    if form == "ref_logits":
        ref_logits = logits + torch.randn_like(logits)  # a nearby reference, fresh
        return {"ref_logits": ref_logits}, {"ref_logits": ref_logits}
    ref = torch.randn(logits.shape[0]) * 2 - 12
    return {"ref_logps": ref}, {"ref_logps": ref}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("form", ["ref_logits", "ref_logps"])
def test_every_loss_type_on_the_reference_backend(name, form):
    logits, labels = make_batch(3, 7, 60, F32)
    ours, theirs = _reference_kwargs(name, logits, form)
    kw = dict(beta=0.3, loss_type=name, label_smoothing=_eps(name), shift=True)
    out, grad = _run(logits, labels, backend="reference", **ours, **kw)
    want = oracle.dpo(logits, labels, **theirs, beta=0.3, loss_type=name, label_smoothing=_eps(name), shift=True)
    _check(out, want, grad)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "aot", "simpo", "orpo"])
def test_representative_losses_on_every_backend(backend, small_block, name):
    logits, labels = make_batch(2, 6, 300, torch.bfloat16)
    ours, theirs = _reference_kwargs(name, logits, "ref_logps")
    out, grad = _run(logits, labels, backend=backend, beta=0.5, loss_type=name, shift=True, **ours)
    want = oracle.dpo(logits, labels, **theirs, beta=0.5, loss_type=name, shift=True)
    _check(out, want, grad, torch.bfloat16)


def test_sft_alone_takes_beta_zero(backend):
    """beta enters no term of SFT's loss, only its logged rewards (TRL trains ``sft`` with beta = 0):
    the loss and gradient are the oracle's, the rewards exactly 0."""
    logits, labels = make_batch(2, 6, 300, torch.bfloat16)
    out, grad = _run(logits, labels, backend=backend, beta=0.0, loss_type="sft", shift=True)
    _check(out, oracle.dpo(logits, labels, beta=0.0, loss_type="sft", shift=True), grad, torch.bfloat16)
    assert out.loss.item() > 0
    assert not out.chosen_rewards.any() and not out.rejected_rewards.any()


@pytest.mark.parametrize("loss_type,weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["sigmoid", "sft"], [1.0, 0.5]),  # RPO
    (["ipo", "hinge", "sigmoid_norm"], None),
])
def test_loss_weights_backward_matches_float64_autograd(backend, loss_type, weights):
    logits, labels = make_batch(2, 6, 120, F32)
    ref_logits = logits + torch.randn_like(logits)
    out, grad = _run(logits, labels, ref_logits=ref_logits, loss_type=loss_type, loss_weights=weights,
                     beta=0.2, backend=backend)
    want = oracle.dpo(logits, labels, ref_logits=ref_logits, loss_type=loss_type, loss_weights=weights, beta=0.2)
    _check(out, want, grad)


def test_reference_free_combination():
    """CPO-SimPO-style combination of reference-free losses: no reference needed."""
    logits, labels = make_batch(2, 6, 80, F32)
    kw = dict(loss_type=["simpo", "cpo", "orpo"], loss_weights=[1.0, 0.5, 0.25], beta=1.5, simpo_gamma=0.3,
              cpo_alpha=0.7, label_smoothing=0.1)
    out, grad = _run(logits, labels, backend="reference", **kw)
    want = oracle.dpo(logits, labels, loss_type=kw["loss_type"], loss_weights=kw["loss_weights"], beta=1.5,
                      simpo_gamma=0.3, cpo_alpha=0.7, label_smoothing=0.1)
    _check(out, want, grad)


def test_ipo_with_precomputed_sums_equals_ipo_with_ref_logits():
    """TRL's convention: ref_logps are sums (precompute_ref_log_probs), IPO normalizes inside."""
    logits, labels = make_batch(3, 7, 90, F32)
    ref_logits = torch.randn_like(logits) * 2
    ref_tok, _ = oracle.token_logprobs(ref_logits, oracle.aligned(labels, True))
    ref_sums = ref_tok.sum(-1).float()
    a, ga = _run(logits, labels, ref_logits=ref_logits, loss_type="ipo", shift=True, backend="reference")
    b, gb = _run(logits, labels, ref_logps=ref_sums, loss_type="ipo", shift=True, backend="reference")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-9)
    want = oracle.dpo(logits, labels, ref_logps=ref_sums, loss_type="ipo", shift=True)
    _check(b, want, gb)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "orpo", "sigmoid"])
def test_average_log_prob_everywhere(name):
    """average_log_prob=True: averaged log-probs everywhere, and no second division inside."""
    logits, labels = make_batch(2, 6, 70, F32)
    ours, theirs = _reference_kwargs(name, logits, "ref_logits")
    out, grad = _run(logits, labels, backend="reference", loss_type=name, average_log_prob=True, beta=0.4, **ours)
    want = oracle.dpo(logits, labels, **theirs, loss_type=name, average=True, beta=0.4)
    _check(out, want, grad)


@pytest.mark.parametrize("f_div,coef", [("forward_kl", None), ("js_divergence", None), ("alpha_divergence", 0.3),
                                        ("alpha_divergence", None)])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "robust", "discopop"])
def test_f_divergences(name, f_div, coef):
    logits, labels = make_batch(2, 6, 50, F32, scale=1.0)
    ref_logits = logits + 0.3 * torch.randn_like(logits)  # keeps exp(-log ratio) moderate
    kw = dict(loss_type=name, f_divergence_type=f_div, beta=0.5, label_smoothing=_eps(name))
    if coef is not None:
        kw["f_alpha_divergence_coef"] = coef
    out, grad = _run(logits, labels, ref_logits=ref_logits, backend="reference", **kw)
    kw["f_alpha_divergence_coef"] = 0.5 if coef is None else coef
    want = oracle.dpo(logits, labels, ref_logits=ref_logits, loss_type=name, f_divergence_type=f_div, beta=0.5,
                      label_smoothing=_eps(name), f_alpha_divergence_coef=kw["f_alpha_divergence_coef"])
    _check(out, want, grad)


def _ref_for_log_ratios(logits, labels, chosen_lr, rejected_lr):
    """``ref_logps`` giving the policy these log-ratios (per pair: chosen, rejected)."""
    with torch.no_grad():
        pol = fused_dpo_loss(logits, labels, reference_free=True, backend="reference", shift=True)
    return torch.cat([pol.chosen_logps.double() - chosen_lr, pol.rejected_logps.double() - rejected_lr]).float()


@pytest.mark.parametrize("f_div, chosen_lr, rejected_lr", [
    ("reverse_kl", -150.0, 150.0),  # beta m = -150
    ("forward_kl", -6.0, 0.5),  # beta (1 - e^6 - (1 - e^-0.5)) = -201
])
def test_discopop_is_finite_past_the_fp32_exp_range(backend, f_div, chosen_lr, rejected_lr):
    """beta m below -88: fp32's exp(-beta m) overflows while w = sigmoid(beta m / tau) underflows, and
    TRL's exp(-x) * w is inf * 0 = NaN for the batch. The loss is ~ -beta m, finite; the float64
    oracle's own formula holds down to beta m = -709."""
    logits, labels = make_batch(2, 5, 100, F32, scale=1.0)
    ref = _ref_for_log_ratios(logits, labels, torch.tensor([chosen_lr, -3.0]), torch.tensor([rejected_lr, 2.0]))
    kw = dict(loss_type="discopop", beta=0.5, f_divergence_type=f_div, shift=True)
    out, grad = _run(logits, labels, ref_logps=ref, backend=backend, **kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, **kw), grad)


def test_alpha_divergence_near_alpha_one_does_not_cancel():
    """(t^(a-1) - 1) / (a - 1) at a = 1 + 2e-6: expm1, not exp - 1 (which is 0.6% off the loss in
    fp32, TRL's formula)."""
    logits, labels = make_batch(4, 6, 80, F32, scale=1.0)
    ref = _ref_for_log_ratios(logits, labels, torch.tensor([0.3, -1.2, 2.0, 0.7]), torch.tensor([1.1, 0.4, -0.9, 0.2]))
    kw = dict(beta=1.0, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 + 2e-6, shift=True)
    out, grad = _run(logits, labels, ref_logps=ref, backend="reference", **kw)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, **kw), grad)


def test_f_divergence_sigmoid_on_every_backend(backend):
    """Not the fused Triton sigmoid: the registry path, on each backend."""
    logits, labels = make_batch(2, 5, 100, F32, scale=1.0)
    ref = torch.randn(4) - 14
    out, grad = _run(logits, labels, ref_logps=ref, loss_type="sigmoid", f_divergence_type="js_divergence",
                     backend=backend)
    want = oracle.dpo(logits, labels, ref_logps=ref, f_divergence_type="js_divergence")
    _check(out, want, grad)


def _no_prompt_batch():
    """shift=True labels where chosen pair 1 has no prompt and rejected pair 0 a completion token at
    position 0 only: the first completion token of each has no prediction."""
    logits, labels = make_batch(2, 6, 50, F32)
    labels[1, :2] = torch.randint(0, 50, (2,))
    labels[2, 0] = 7
    return logits, labels


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "orpo", "sft"])
def test_empty_prompt_lengths_follow_each_trainer(name):
    """With shift=True and an empty prompt, the first completion token has no prediction. ipo and
    sigmoid_norm divide by a length that still counts it (TRL DPOTrainer's completion_mask.sum());
    simpo and orpo by the scored tokens, which do not (TRL's CPO and ORPO trainers' loss_mask.sum()):
    the oracle's lengths for each."""
    logits, labels = _no_prompt_batch()
    ours, theirs = _reference_kwargs(name, logits, "ref_logps")
    out, grad = _run(logits, labels, backend="reference", loss_type=name, shift=True, **ours)
    _check(out, oracle.dpo(logits, labels, **theirs, loss_type=name, shift=True), grad)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_simpo_and_orpo_average_as_trls_cpo_and_orpo_trainers(name):
    """Their per-token averages are TRL's ``get_batch_logps(average_log_prob=True)`` (the CPO and
    ORPO trainers' own, an external reference for the divisor) with an empty prompt, and the loss
    is the same whether the caller or the loss averages (it was not: the loss divided by a length
    that counted the unpredicted first token)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    logits, labels = _no_prompt_batch()
    beta, gamma = 0.4, 0.5
    trainer = CPOTrainer if name == "simpo" else ORPOTrainer
    avg = trainer.get_batch_logps(logits.double(), labels, average_log_prob=True).float()
    ac, ar = avg[:2], avg[2:]
    if name == "simpo":
        want = -torch.nn.functional.logsigmoid(beta * (ac - ar) - gamma).mean()
    else:
        ratio = (ac - ar) - (torch.log(-torch.expm1(ac)) - torch.log(-torch.expm1(ar)))
        nll = -torch.nn.functional.log_softmax(logits[:2, :-1].double(), -1).gather(
            -1, labels[:2, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[labels[:2, 1:] != IGNORE].mean()
        want = (nll - beta * torch.nn.functional.logsigmoid(ratio)).mean().float()
    summed = fused_dpo_loss(logits, labels, loss_type=name, beta=beta, shift=True, backend="reference")
    averaged = fused_dpo_loss(logits, labels, loss_type=name, beta=beta, shift=True, average_log_prob=True,
                              backend="reference")
    torch.testing.assert_close(averaged.chosen_logps, ac, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summed.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(averaged.loss, summed.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("front", ["logits", "one_pass", "split", "two_phase"])
def test_orpo_with_a_confident_chosen_completion(backend, front):
    """Chosen sequence 0 puts p = 1 - 7e-10 on each label: its average log-prob is exactly 0 in
    fp32 and its odds infinite. The loss and every gradient are finite and match the float64
    oracle (autograd through the formula gave NaN for that sequence's logits and, on the hidden
    path, the whole weight gradient). The hidden path runs on the logits as hidden states with an
    identity lm_head, so its hidden gradient is the logits' gradient."""
    logits, labels = make_batch(2, 5, 50, F32)
    for t in range(2, 5):
        logits[0, t] = 0.0
        logits[0, t, labels[0, t]] = 25.0
    want = oracle.dpo(logits, labels, loss_type="orpo", beta=0.3)
    if front == "logits":
        out, grad = _run(logits, labels, loss_type="orpo", beta=0.3, backend=backend)
        assert out.chosen_logps[0] == 0.0  # the premise: fp32 rounds it to exactly 0
        _check(out, want, grad)
        return
    out, (grad, grad_weight, _) = run_linear(logits, torch.eye(50), labels, loss_type="orpo", beta=0.3,
                                             backend=backend, mode=front)
    assert torch.isfinite(grad_weight).all()
    _check(out, want, grad)


def _ragged_batch(V=80):
    logits, labels = make_batch(3, 8, V, F32)
    labels[0, 5:] = IGNORE  # pair 0: chosen shorter than rejected
    labels[4, 4:] = IGNORE  # pair 1: rejected shorter than chosen
    return logits, labels


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid_norm", "sft"]])
def test_ld_alpha_with_ref_logits(backend, alpha, loss_type):
    logits, labels = _ragged_batch()
    ref_logits = logits + torch.randn_like(logits)
    out, grad = _run(logits, labels, ref_logits=ref_logits, loss_type=loss_type, ld_alpha=alpha, beta=0.3,
                     backend=backend)
    want = oracle.dpo(logits, labels, ref_logits=ref_logits, loss_type=loss_type, ld_alpha=alpha, beta=0.3)
    _check(out, want, grad)


def test_ld_alpha_with_precomputed_ld_weighted_ref_logps():
    logits, labels = _ragged_batch()
    ref_logits = logits + torch.randn_like(logits)
    y = oracle.aligned(labels, True)
    ref_tok, _ = oracle.token_logprobs(ref_logits, y)
    ref = (ref_tok * oracle.ld_weights(y, 0.5)).sum(-1).float()  # what TRL's precompute stores
    a, ga = _run(logits, labels, ref_logps=ref, ld_alpha=0.5, shift=True, loss_type="apo_zero", backend="reference")
    b, gb = _run(logits, labels, ref_logits=ref_logits, ld_alpha=0.5, shift=True, loss_type="apo_zero",
                 backend="reference")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-9)
    _check(a, oracle.dpo(logits, labels, ref_logps=ref, ld_alpha=0.5, shift=True, loss_type="apo_zero"), ga)


def test_ld_alpha_zero_masks_the_tail_and_one_changes_nothing():
    logits, labels = _ragged_batch()
    ref = torch.randn(6) - 20
    plain, _ = _run(logits, labels, ref_logps=ref, backend="reference")
    one, _ = _run(logits, labels, ref_logps=ref, ld_alpha=1.0, backend="reference")
    zero, _ = _run(logits, labels, ref_logps=ref, ld_alpha=0.0, backend="reference")
    torch.testing.assert_close(one.chosen_logps, plain.chosen_logps)
    # pair 0: chosen has 3 completion tokens, rejected 6: with alpha=0 rejected keeps its first 3
    assert not torch.allclose(zero.rejected_logps[0], plain.rejected_logps[0])
    torch.testing.assert_close(zero.chosen_logps[0], plain.chosen_logps[0])


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "bco_pair", "sft"], "ipo"])
def test_use_weighting(backend, loss_type):
    logits, labels = make_batch(2, 6, 90, F32, scale=1.5)
    ref = torch.randn(4) - 10
    out, grad = _run(logits, labels, ref_logps=ref, loss_type=loss_type, use_weighting=True, backend=backend)
    want = oracle.dpo(logits, labels, ref_logps=ref, loss_type=loss_type, use_weighting=True)
    _check(out, want, grad)


def test_use_weighting_and_token_metrics_read_the_logits_in_one_forward_pass(monkeypatch):
    """WPO's log sum p^2 and the token metrics come from the policy's single kernel pass."""
    backend = load_backend("reference")
    calls = []
    original = backend.token_logprobs_forward

    def counting(logits, labels, ignore_index, extras=frozenset()):
        calls.append(frozenset(extras))
        return original(logits, labels, ignore_index, extras)

    monkeypatch.setattr(backend, "token_logprobs_forward", counting)
    logits, labels = make_batch(2, 5, 40, F32)
    fused_dpo_loss(logits, labels, ref_logps=torch.randn(4), use_weighting=True, token_metrics=True,
                   backend="reference")
    assert calls == [frozenset({"logits_sum", "log_sum_p2", "entropy", "accuracy"})]


def test_token_metrics(backend):
    logits, labels = make_batch(2, 7, 150, F32)
    # make some labels the argmax so that mean_token_accuracy is neither 0 nor 1
    top = logits.argmax(-1)
    hit = (torch.rand(labels.shape) < 0.5) & (labels != IGNORE)
    labels = torch.where(hit, top, labels)
    ref = torch.randn(4) - 15
    out, grad = _run(logits, labels, ref_logps=ref, token_metrics=True, backend=backend)
    want = oracle.dpo(logits, labels, ref_logps=ref, token_metrics=True)
    assert 0 < want["metrics"]["mean_token_accuracy"] < 1
    _check(out, want, grad)


def test_token_metrics_shifted_with_ld_alpha_and_weighting():
    logits, labels = _ragged_batch(V=120)
    ref_logits = logits + torch.randn_like(logits)
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.4, use_weighting=True,
              token_metrics=True, shift=True, beta=0.25)
    out, grad = _run(logits, labels, ref_logits=ref_logits, backend="reference", **kw)
    _check(out, oracle.dpo(logits, labels, ref_logits=ref_logits, **kw), grad)


def test_token_metrics_without_completion_tokens_are_zero():
    logits, labels = make_batch(1, 3, 40, F32)
    labels[:] = IGNORE
    out = fused_dpo_loss(logits, labels, ref_logps=torch.randn(2), token_metrics=True, backend="reference")
    assert out.metrics["entropy"] == 0 and out.metrics["mean_token_accuracy"] == 0


def test_fused_triton_sigmoid_equals_the_registry_with_all_metrics():
    pytest.importorskip("triton")
    logits, labels = make_batch(2, 6, 300, F32)
    ref = torch.randn(4)
    fused, gf = _run(logits, labels, ref_logps=ref, token_metrics=True, label_smoothing=0.1, backend="triton")
    registry, gr = _run(logits, labels, ref_logps=ref, token_metrics=True, label_smoothing=0.1,
                        backend="reference")
    for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(fused, name), getattr(registry, name), rtol=1e-6, atol=1e-6)
    for name in registry.metrics:
        torch.testing.assert_close(fused.metrics[name], registry.metrics[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-9)
