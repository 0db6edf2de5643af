"""fused_linear_dpo_loss (the hidden-state path) against a float64 oracle that materializes the
logits (``oracle.linear_dpo``): loss, outputs, metrics and the gradients of hidden, weight, bias.

Tolerances: fp32 inputs differ from the oracle by fp32 accumulation only. bf16 inputs: the chunk's
logits are the lm_head's bf16 output (one rounding of each logit, as the model's own logits), so
per-sequence values are within a few bf16 roundings of the summed logits, and gradients within
bf16 rounding level (normwise relative error below 2^-7).
"""
import itertools
import math
from dataclasses import replace

import pytest
import torch

import oracle
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss, linear
from oracle import IGNORE
from conftest import BACKENDS
from runs import run_linear as run

F32, BF16 = torch.float32, torch.bfloat16
MODES = ["two_phase", "one_pass", "split"]


def make_inputs(P, T, H, V, dtype=F32, *, bias=False, prompt=2, seed=None):
    """Hidden states ``[2P, T, H]``, an lm_head giving logits of a few units, labels with a prompt
    and ragged padding (``oracle.make_batch``'s)."""
    if seed is not None:
        torch.manual_seed(seed)
    hidden = torch.randn(2 * P, T, H).to(dtype)
    weight = (torch.randn(V, H) * (2.0 / math.sqrt(H))).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    _, labels = oracle.make_batch(P, T, V, F32, prompt=prompt)
    return hidden, weight, b, labels




def _rel(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def check(out, want, grads, dtype=F32):
    if dtype == F32:
        vt = dict(rtol=2e-5, atol=2e-4)
    else:
        vt = dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.loss.double(), want["loss"], **vt, msg=lambda m: f"loss: {m}")
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(out, name).double(), want[name], **vt, msg=lambda m, n=name: f"{n}: {m}")
    assert set(out.metrics) == set(want["metrics"])
    for name, value in want["metrics"].items():
        assert out.metrics[name].dim() == 0 and not out.metrics[name].requires_grad
        if name == "rewards/accuracies" and dtype != F32:
            continue  # a near-tie may flip under bf16 logits
        torch.testing.assert_close(out.metrics[name].double(), value, **vt, msg=lambda m, n=name: f"{n}: {m}")
    for grad, key in zip(grads, ("grad_hidden", "grad_weight", "grad_bias")):
        expected = want[key]
        if expected is None:
            assert grad is None
            continue
        assert grad is not None and grad.dtype == dtype and grad.shape == expected.shape
        if dtype == F32:
            atol = 1e-5 * expected.abs().max().item() + 1e-12
            torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert _rel(grad, expected) < 2 ** -7, (key, _rel(grad, expected))


def oracle_kwargs(kwargs):
    """fused_linear_dpo_loss kwargs -> oracle.linear_dpo kwargs."""
    rename = {"average_log_prob": "average", "logit_softcap": "softcap"}
    drop = {"mode", "chunk_tokens", "vocab_chunk", "backend", "validate", "reference_free"}
    return {rename.get(k, k): v for k, v in kwargs.items() if k not in drop}


def compare(hidden, weight, labels, bias=None, dtype=F32, **kwargs):
    out, grads = run(hidden, weight, labels, bias, **kwargs)
    want = oracle.linear_dpo(hidden, weight, labels, bias, **oracle_kwargs(kwargs))
    check(out, want, grads, dtype)
    return out, grads


# --------------------------------------------------------------------------------------------
# Against the float64 oracle.


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("average, smoothing", [(False, 0.0), (True, 0.0), (True, 0.2), (False, 0.2)])
def test_one_pass_with_the_one_kernel_sigmoid_loss(monkeypatch, dtype, average, smoothing):
    """With the Triton backend one_pass takes each chunk's coefficients from the fused sigmoid
    loss kernel (cDPO smoothing, per-token averages, one pair per chunk): same as the oracle."""
    from dpo_kernels import api

    calls = []
    fused = api.fused_sigmoid_dpo
    monkeypatch.setattr(api, "fused_sigmoid_dpo", lambda *a, **k: calls.append(1) or fused(*a, **k))
    hidden, weight, b, labels = make_inputs(3, 9, 24, 200, dtype, bias=True, seed=4)
    compare(hidden, weight, labels, b, dtype, ref_logps=torch.randn(6) - (2 if average else 20), mode="one_pass",
            chunk_tokens=1, backend="triton", average_log_prob=average, label_smoothing=smoothing, shift=True)
    assert len(calls) == 3 + 1  # one per chunk (a pair each), one for the final terms


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shift", [False, True])
def test_sigmoid_matches_oracle(mode, dtype, bias, shift):
    hidden, weight, b, labels = make_inputs(3, 9, 24, 200, dtype, bias=bias)
    compare(hidden, weight, labels, b, dtype, ref_logps=torch.randn(6) - 20, shift=shift, mode=mode, chunk_tokens=5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_softcap_and_temperature(mode, dtype):
    hidden, weight, b, labels = make_inputs(2, 8, 16, 150, dtype, bias=True)
    weight = (weight.float() * 3).to(dtype)  # logits of ~10: the softcap of 8 bends them
    compare(hidden, weight, labels, b, dtype, ref_logps=torch.randn(4) - 30, logit_softcap=8.0, temperature=0.7,
            shift=True, mode=mode, chunk_tokens=4, token_metrics=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "orpo", "simpo", "cpo", "apo_down", "discopop"])
def test_loss_types(mode, loss_type):
    hidden, weight, b, labels = make_inputs(3, 7, 16, 120, bias=True)
    kwargs = dict(loss_type=loss_type, beta=0.3, shift=True, mode=mode, chunk_tokens=3)
    if loss_type in oracle.REFERENCE_FREE:
        kwargs["reference_free"] = True
    else:
        kwargs["ref_logps"] = torch.randn(6) - 15
    compare(hidden, weight, labels, b, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_combined_mpo_with_weights(mode):
    hidden, weight, b, labels = make_inputs(3, 8, 16, 130)
    compare(hidden, weight, labels, b, ref_logps=torch.randn(6) - 18, loss_type=["sigmoid", "bco_pair", "sft"],
            loss_weights=[0.8, 0.2, 1.0], mode=mode, chunk_tokens=4, shift=True)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_coupled_loss_two_phase(loss_type):
    hidden, weight, b, labels = make_inputs(4, 6, 16, 100, bias=True)
    out, _ = compare(hidden, weight, labels, b, ref_logps=torch.randn(8) - 12, loss_type=loss_type,
                     label_smoothing=0.1, chunk_tokens=3)
    assert out.chosen_logps.requires_grad  # auto picked two_phase


@pytest.mark.parametrize("mode", MODES)
def test_ld_alpha_weighting_token_metrics(mode):
    hidden, weight, b, labels = make_inputs(3, 9, 16, 140, bias=True)
    labels[0, -3:] = IGNORE  # unequal pair lengths: LD's verbose tail is real
    compare(hidden, weight, labels, b, ref_logps=torch.randn(6) - 20, ld_alpha=0.4, use_weighting=True,
            token_metrics=True, shift=True, mode=mode, chunk_tokens=2)


@pytest.mark.parametrize("mode", MODES)
def test_average_log_prob_and_f_divergence(mode):
    hidden, weight, b, labels = make_inputs(2, 8, 16, 90)
    compare(hidden, weight, labels, b, ref_logps=torch.randn(4) - 3, average_log_prob=True,
            f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, mode=mode, chunk_tokens=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ref_form", ["policy_head", "own_head"])
def test_reference_from_hidden_states(mode, ref_form):
    hidden, weight, b, labels = make_inputs(2, 7, 16, 110, bias=True)
    ref_hidden = torch.randn_like(hidden)
    kwargs = dict(ref_hidden=ref_hidden, mode=mode, chunk_tokens=3, shift=True, logit_softcap=6.0)
    if ref_form == "own_head":
        kwargs.update(ref_weight=torch.randn_like(weight) * 0.4, ref_bias=torch.randn_like(b))
    out, _ = compare(hidden, weight, labels, b, **kwargs)
    assert not ref_hidden.requires_grad


def test_ref_head_gets_no_gradient():
    hidden, weight, b, labels = make_inputs(2, 6, 16, 80, bias=True)
    ref_hidden, ref_weight = torch.randn_like(hidden).requires_grad_(True), weight.clone().requires_grad_(True)
    out, _ = run(hidden, weight, labels, b, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_every_backend(backend):
    """The per-token work goes through each backend of the kernel contract (Triton through its
    CPU interpreter: tiny shapes)."""
    hidden, weight, b, labels = make_inputs(2, 5, 16, 260, bias=True)
    for mode in MODES:
        compare(hidden, weight, labels, b, ref_logps=torch.randn(4) - 10, shift=True, mode=mode, chunk_tokens=4,
                token_metrics=True, backend=backend)


@pytest.mark.parametrize("use_weighting", [True, False])
def test_matches_fused_dpo_loss_on_materialized_logits(use_weighting):
    """Same outputs and metrics as the logits path given the same (fp32) logits. (With WPO's
    weighting, sigmoid + sft couples the pairs: one_pass refuses it, and auto takes split.)"""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 150, bias=True)
    ref = torch.randn(6) - 20
    kwargs = dict(ref_logps=ref, shift=True, token_metrics=True, use_weighting=use_weighting,
                  loss_type=["sigmoid", "sft"])
    logits = (hidden @ weight.T + b).detach().requires_grad_(True)
    a = fused_dpo_loss(logits, labels, backend="reference", **kwargs)
    for mode in ["auto", *MODES]:
        if use_weighting and mode == "one_pass":
            continue
        out, _ = run(hidden, weight, labels, b, mode=mode, chunk_tokens=5, backend="reference", **kwargs)
        for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
            torch.testing.assert_close(getattr(out, name), getattr(a, name), rtol=1e-5, atol=1e-5)
        assert set(out.metrics) == set(a.metrics)
        for name in a.metrics:
            torch.testing.assert_close(out.metrics[name], a.metrics[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Modes, chunking, skipped tokens, precision.


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 1000])
def test_every_mode_agrees_at_every_chunk_size(dtype, chunk_tokens):
    hidden, weight, b, labels = make_inputs(3, 8, 16, 100, dtype, bias=True)
    kwargs = dict(ref_logps=torch.randn(6) - 15, shift=True, token_metrics=True, chunk_tokens=chunk_tokens)
    two, g2 = run(hidden, weight, labels, b, mode="two_phase", **kwargs)
    one, g1 = run(hidden, weight, labels, b, mode="one_pass", **kwargs)
    split, gs = run(hidden, weight, labels, b, mode="split", **kwargs)
    big, gb = run(hidden, weight, labels, b, mode="two_phase", **{**kwargs, "chunk_tokens": 10_000})
    for other, grads in ((one, g1), (split, gs), (big, gb)):
        torch.testing.assert_close(other.loss, two.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(other.chosen_logps, two.chosen_logps, rtol=1e-6, atol=1e-5)
        for name in two.metrics:
            torch.testing.assert_close(other.metrics[name], two.metrics[name], rtol=1e-6, atol=1e-5)
        ulp = 2.0 ** -7 if dtype == BF16 else 2.0 ** -20
        for name, a, c in zip(("hidden", "weight", "bias"), grads, g2):
            if other is one and name == "weight" and dtype == BF16:
                # one_pass rounds the running weight gradient once per chunk of whole pairs, or per
                # piece of a pair larger than a chunk: each rounding is within half an ulp of a
                # partial sum, bounded by the row's magnitude.
                chunks = _one_pass_roundings(labels, True, 3, chunk_tokens)
                bound = chunks * ulp * c.float().abs().amax(-1, keepdim=True) + 1e-6
                assert ((a.float() - c.float()).abs() <= bound).all()
                continue
            if other is split and name == "hidden":
                # split rounds each token's logits gradient before its coefficient is known
                # (coef * round(d) instead of round(coef * d)): the same error, not the same bits,
                # so within a rounding step of the row's scale rather than of each element.
                bound = 2 * ulp * c.float().abs().amax(-1, keepdim=True) + 1e-6
                assert ((a.float() - c.float()).abs() <= bound).all()
                continue
            # fp32 accumulation, one final rounding: chunking changes at most one rounding step.
            assert ((a.float() - c.float()).abs() <= ulp * c.float().abs() + 1e-6).all()
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=kwargs["ref_logps"], shift=True, token_metrics=True)
    check(two, want, g2, dtype)


def _pair_sizes(labels, shift, pairs):
    per_seq = (oracle.aligned(labels, shift) != IGNORE).sum(-1)
    return (per_seq[:pairs] + per_seq[pairs:]).tolist()


def _one_pass_roundings(labels, shift, pairs, chunk_tokens):
    """How many times one_pass rounds a bf16 weight gradient: once per chunk of whole pairs (as
    many as fit ``chunk_tokens``), once per piece of a pair larger than that."""
    count, size = 0, 0
    for m in _pair_sizes(labels, shift, pairs):
        if m > chunk_tokens:
            count += (1 if size else 0) + -(-m // chunk_tokens)
            size = 0
        elif size + m > chunk_tokens:
            count, size = count + 1, m
        else:
            size += m
    return count + (1 if size else 0)


def test_bf16_weight_gradient_accumulated_in_fp32():
    """Many tiny chunks: the bf16 weight gradient is within bf16 rounding of the float64 one,
    about as close as the float64 gradient rounded once to bf16 (two_phase: one rounding whatever
    the chunks, and split, whose weight gradient is two_phase's; one_pass: one per chunk, here one
    pair per chunk)."""
    hidden, weight, b, labels = make_inputs(4, 16, 32, 64, BF16, bias=True, seed=7)
    ref = torch.randn(8) - 30
    for mode in MODES:
        # split: pieces of one token in the forward, chunks of one token in its weight-gradient backward
        chunk = max(_pair_sizes(labels, False, 4)) if mode == "one_pass" else 1
        out, grads = run(hidden, weight, labels, b, ref_logps=ref, mode=mode, chunk_tokens=chunk)
        want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref)
        rounded = _rel(want["grad_weight"].to(BF16), want["grad_weight"])
        assert _rel(grads[1], want["grad_weight"]) < max(4 * rounded, 2 ** -8)
        assert _rel(grads[2], want["grad_bias"]) < max(4 * _rel(want["grad_bias"].to(BF16), want["grad_bias"]), 2 ** -8)


def _count_matmul_rows(monkeypatch):
    rows = {"logits": [], "grad_hidden": [], "grad_weight": []}
    originals = (linear.logits_matmul, linear.grad_hidden_matmul, linear.grad_weight_matmul)

    def logits_mm(h, w, b):
        rows["logits"].append(h.shape[0])
        return originals[0](h, w, b)

    def grad_hidden_mm(g, w):
        rows["grad_hidden"].append(g.shape[0])
        return originals[1](g, w)

    def grad_weight_mm(out, g, h, accumulate):
        rows["grad_weight"].append(h.shape[0])
        return originals[2](out, g, h, accumulate)

    monkeypatch.setattr(linear, "logits_matmul", logits_mm)
    monkeypatch.setattr(linear, "grad_hidden_matmul", grad_hidden_mm)
    def grad_hidden_fp32_mm(out, g, w, step):
        rows["grad_hidden"].append(g.shape[0])
        return original_fp32(out, g, w, step)

    original_fp32 = linear.grad_hidden_matmul_fp32
    monkeypatch.setattr(linear, "grad_weight_matmul", grad_weight_mm)
    monkeypatch.setattr(linear, "grad_hidden_matmul_fp32", grad_hidden_fp32_mm)
    return rows


@pytest.mark.parametrize("mode", MODES)
def test_ignored_tokens_cost_no_matmul(monkeypatch, mode):
    hidden, weight, b, labels = make_inputs(2, 10, 16, 90, bias=True, prompt=4)
    rows = _count_matmul_rows(monkeypatch)
    chunk = 3
    run(hidden, weight, labels, b, ref_logps=torch.randn(4), shift=True, mode=mode, chunk_tokens=chunk)
    valid = int((oracle.aligned(labels, True) != IGNORE).sum())
    assert valid <= labels.numel() - 4 * 3 - 4 - 3  # prompt (after the shift), the last row, padding
    recomputed = 0
    if mode == "one_pass":  # pairs above the chunk: all but the last piece's logits are formed again
        recomputed += sum(m - min(m, chunk) for m in _pair_sizes(labels, True, 2))
    else:  # every logit formed again in the backward (split: for the weight gradient), none before
        recomputed += valid
    assert sum(rows["logits"]) == valid + recomputed
    assert sum(rows["grad_hidden"]) == valid and sum(rows["grad_weight"]) == valid
    assert max(rows["logits"]) <= chunk  # memory bounded by the chunk, not the sequence length


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_ignored_hidden_rows_does_not_leak(mode):
    hidden, weight, b, labels = make_inputs(2, 8, 16, 70, bias=True)
    aligned = oracle.aligned(labels, True)
    poisoned = hidden.clone()
    poisoned[aligned == IGNORE] = float("nan")
    out, grads = run(poisoned, weight, labels, b, ref_logps=torch.randn(4) - 10, shift=True, mode=mode,
                     chunk_tokens=3, token_metrics=True)
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=torch.zeros(4), shift=True, token_metrics=True)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][aligned == IGNORE] == 0).all()
    torch.testing.assert_close(out.chosen_logps.double(), want["chosen_logps"], rtol=2e-5, atol=2e-4)


def test_auto_mode_choice_and_one_pass_logps_refuse_gradient():
    hidden, weight, b, labels = make_inputs(2, 8, 16, 60)
    ref = torch.randn(4)
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, weight, labels, ref_logps=ref)  # the default chunk holds the pairs
    assert "OnePass" in type(out.loss.grad_fn).__name__
    with pytest.raises(RuntimeError, match="carry no gradient of their own.*two_phase"):
        (out.loss + out.chosen_logps.sum()).backward()
    # two_phase: extra terms on the per-sequence log-probs backpropagate
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, mode="two_phase")
    (out.loss - 0.1 * out.chosen_logps.mean()).backward()
    hd = hidden.double().requires_grad_(True)
    z = oracle.linear_logits(hd, weight)
    logp, _ = oracle.token_logprobs(z, labels)
    seq = logp.sum(-1)
    m = (seq[:2] - ref[:2].double()) - (seq[2:] - ref[2:].double())
    (torch.nn.functional.softplus(-0.1 * m).mean() - 0.1 * seq[:2].mean()).backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)


def test_auto_takes_split_when_one_pass_would_form_much_again():
    """auto: one_pass while pairs larger than its chunk would have at most half of their logits
    formed again (pieces), else split; split for a batch-coupled loss; two_phase without a
    gradient. Pairs of 16 valid tokens here."""
    hidden, weight, _, labels = make_inputs(2, 8, 16, 60)
    labels = torch.randint(0, 60, labels.shape, generator=torch.Generator().manual_seed(1))  # every token scored
    ref = torch.randn(4)
    assert linear.formed_again([16, 16], 12) == 0.25 and linear.formed_again([16, 16], 6) == 0.625
    assert linear.formed_again([16, 4], 8) == 8 / 20 and linear.formed_again([], 8) == 0.0

    def grad_fn(**kwargs):
        h = hidden.clone().requires_grad_(True)
        return type(fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, **kwargs).loss.grad_fn).__name__

    assert "OnePass" in grad_fn(chunk_tokens=12)  # 25% formed again
    assert "Split" in grad_fn(chunk_tokens=6)  # 62.5%
    assert "Split" in grad_fn(loss_type="aot")  # batch-coupled: one_pass cannot serve it
    with torch.no_grad():
        out = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, chunk_tokens=6)
    assert out.loss.grad_fn is None  # the chunked forward alone (two_phase's)
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, chunk_tokens=6)
    assert out.chosen_logps.requires_grad  # split: the log-probs carry gradients
    (out.loss + out.chosen_logps.sum()).backward()


@pytest.mark.parametrize("loss_type,options", [("sft", {}), (["sigmoid", "sft"], {}), ("cpo", {}), ("orpo", {}),
                                                ("simpo", {"cpo_alpha": 0.5})])
def test_wpo_weighting_a_batch_nll_is_not_one_pass(loss_type, options):
    """With ``use_weighting`` a loss that adds the batch's mean chosen NLL to every pair (sft, RPO's
    sigmoid + sft, cpo, orpo, simpo with ``cpo_alpha``) weights it by every pair's WPO weight: each
    token's gradient holds the batch's mean weight, which one_pass cannot know while later pairs are
    still placeholders. auto takes split and matches the float64 oracle over several chunks;
    mode="one_pass" says why it refuses. Without the weighting (or with simpo's NLL off) one_pass
    serves these losses exactly (the NLL is linear in the token log-probs)."""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 90, bias=True, seed=11)
    ref = None if loss_type in ("cpo", "orpo", "simpo") else torch.randn(6) - 15
    kwargs = dict(ref_logps=ref, loss_type=loss_type, use_weighting=True, chunk_tokens=12, shift=True, **options)
    if ref is None:
        kwargs["reference_free"] = True
    out, _ = compare(hidden, weight, labels, b, **kwargs)
    assert "Split" in type(out.loss.grad_fn).__name__
    with pytest.raises(ValueError, match="one_pass.*use_weighting=True multiplies the batch's mean chosen NLL"):
        run(hidden, weight, labels, b, mode="one_pass", **kwargs)
    compare(hidden, weight, labels, b, mode="one_pass", **{**kwargs, "use_weighting": False})
    if loss_type == "simpo":
        out, _ = compare(hidden, weight, labels, b, **{**kwargs, "cpo_alpha": 0.0})
        assert "OnePass" in type(out.loss.grad_fn).__name__


@pytest.mark.parametrize("mode", ["auto", *MODES])
def test_under_autocast_the_lm_head_runs_in_the_autocast_dtype(mode):
    """Under ``torch.autocast`` (fp32 activations and head, bf16 autocast) the path does what
    autocast does to the model's own lm_head: hidden, weight and bias (and the reference's hidden
    states) cast to bf16, differentiably, with its own fp32 accumulation left alone, whether the
    backward runs inside the region or after it. So the loss and gradients are those of the same
    call on bf16 copies, bit for bit (the gradients in the leaves' fp32), and those are within
    bf16 rounding of the float64 oracle on the copies. (one_pass used to fail under autocast with
    an index_put dtype error.)"""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 130, bias=True, seed=5)
    ref_hidden = torch.randn_like(hidden)
    kwargs = dict(mode=mode, chunk_tokens=5, shift=True)
    bf = [t.to(BF16) for t in (hidden, weight, b, ref_hidden)]
    want, want_grads = compare(*bf[:2], labels, bf[2], BF16, ref_hidden=bf[3], **kwargs)
    for backward_inside in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
        with torch.autocast("cpu", dtype=BF16):
            out = fused_linear_dpo_loss(leaves[0], leaves[1], labels, leaves[2], ref_hidden=ref_hidden, **kwargs)
            if backward_inside:
                out.loss.backward()
        if not backward_inside:
            out.loss.backward()
        assert torch.equal(out.loss, want.loss) and torch.equal(out.chosen_logps, want.chosen_logps)
        for leaf, grad in zip(leaves, want_grads):
            assert leaf.grad.dtype == F32 and torch.equal(leaf.grad, grad.float()), (mode, backward_inside)


# Memory: each mode's estimated peak (auto's check) against what the allocator saw.
# (mode, P, T, H, V, chunk_tokens, vocab_chunk, softcap, bias, frozen weight, token_metrics[, frozen hidden])
MEMORY_CASES = [
    # One chunk holds every pair: its softcap temporaries come before the gradients exist (the
    # estimate was 18% over); no hidden gradient: no product, no kept derivative in split (24-33%).
    ("one_pass", 2, 64, 128, 3000, None, None, 30.0, False, False, False),
    ("one_pass", 2, 64, 128, 3000, None, None, 30.0, True, True, False),
    ("one_pass", 2, 64, 128, 3000, None, None, None, False, False, False, True),
    ("split", 2, 64, 128, 3000, None, 499, 30.0, False, False, False, True),
    ("split", 2, 64, 128, 3000, 48, None, 30.0, False, False, False, True),
    ("one_pass", 2, 64, 128, 3000, 48, None, None, False, False, False),  # pieces: pairs > chunk
    ("one_pass", 2, 64, 128, 3000, 48, None, 30.0, True, False, False),
    ("one_pass", 2, 64, 128, 3000, 48, None, 30.0, True, True, False),
    ("one_pass", 4, 96, 256, 5000, None, None, None, False, False, False),  # one chunk holds every pair
    ("one_pass", 4, 96, 256, 5000, 100, None, None, False, False, True),
    ("split", 2, 64, 128, 3000, 48, None, None, False, False, False),
    ("split", 2, 64, 128, 3000, 48, None, 30.0, True, False, False),
    ("split", 2, 64, 128, 3000, 48, None, 30.0, False, True, False),
    ("split", 4, 96, 256, 5000, None, None, None, False, False, False),  # one forward chunk: u and rows never coexist
    ("split", 4, 96, 64, 20000, 40, 3000, None, True, False, True),  # several slices, several tokens chunks each
    # A bias gradient alone, few tokens: the bias sum's [V] fp32 temporary was 8% of the peak.
    ("split", 1, 8, 16, 3000, None, None, None, True, True, False),
]


def _memory_case(case):
    """A MEMORY_CASES row's inputs: ``(mode, P, hidden, weight, bias, labels, inputs needing a
    gradient, the size options)``, with the gradients the case asks for."""
    mode, P, T, H, V, chunk, vocab_chunk, softcap, bias, frozen, metrics, *frozen_hidden = case
    hidden, weight, b, labels = make_inputs(P, T, H, V, bias=bias, prompt=T // 4, seed=3)
    hidden.requires_grad_(not frozen_hidden)
    weight.requires_grad_(not frozen)
    if b is not None:
        b.requires_grad_(True)
    inputs = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    options = dict(chunk_tokens=chunk, vocab_chunk=vocab_chunk, logit_softcap=softcap, token_metrics=metrics)
    return mode, P, hidden, weight, b, labels, inputs, options


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_peak_estimate_matches_the_allocator(case):
    """``estimate_linear_memory`` (auto's memory check) against the CPU allocator's peak over a
    whole forward + backward, gradients included: within 2%, with softcap, bias, a frozen weight,
    pieces, several vocabulary slices and backward token chunks. fp32: the model is of the GPU's
    buffers, and on the CPU half-precision products add fp32 upcasts the GPU does not make
    (``test_peak_estimate_reproduces_the_h200_measurements`` covers bf16)."""
    from dpo_kernels import estimate_linear_memory
    from dpo_kernels.bench import peak_extra_bytes

    mode, P, hidden, weight, b, labels, inputs, options = _memory_case(case)

    def step():
        out = fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=torch.randn(2 * P) - 30, mode=mode,
                                    validate=False, backend="cpu", **options)
        return torch.autograd.grad(out.loss, inputs)

    step()  # first-call allocations (the fp32 product path's probe) out of the way
    peak = peak_extra_bytes(step, "cpu")
    if peak is None:
        pytest.skip("the CPU allocator's events are not observable here")
    estimate = estimate_linear_memory(hidden, weight, labels, b, **options)[mode]
    assert abs(peak - estimate) <= 0.02 * peak, (peak, estimate)


def _row_by_row_logits_grad(h, weight, bias, y, lse, coef, ignore_index, softcap, temperature):
    """A stand-in for a fused logits-gradient matmul with its memory profile: the ``[n, rows]``
    gradient is the only buffer of its size, each row formed by the CPU backend's unfused path
    (its temporaries one row wide)."""
    head = linear.Head(weight, bias, temperature, softcap, "cpu", ignore_index)
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype)
    for i in range(h.shape[0]):
        z, dcap = linear._chunk_logits(head, h[i:i + 1], keep_derivative=True)
        out[i:i + 1] = linear._chunk_grad_logits_(head, z, y[i:i + 1], lse[i:i + 1], coef[i:i + 1], dcap)
    return out


# Not the frozen-hidden rows: without u the slices' phase is small enough that the stand-in's own
# per-row temporaries (a few rows of a slice, 2.5% here; none in a real fused matmul) show.
@pytest.mark.parametrize("case", [c for c in MEMORY_CASES if c[0] == "split" and c[7] is not None and len(c) == 11],
                         ids=lambda c: "-".join(map(str, c)))
def test_peak_estimate_of_fused_slices_matches_the_allocator(case, monkeypatch):
    """Where the backward's slices take a fused logits-gradient matmul, a slice holds its gradient
    alone (no softcap temporaries): the estimate (``Footprint.fused_logits_grad``) against the
    CPU allocator's peak within 2%, with a row-by-row stand-in for the matmul (the Triton one
    runs here only under the interpreter, whose own copies the allocator also sees). The
    stand-in's gradients equal the unfused path's, and the estimate is below the unfused one
    wherever the backward forms slices (a weight or bias gradient)."""
    from dpo_kernels import api, estimate_linear_memory
    from dpo_kernels.bench import peak_extra_bytes

    mode, P, hidden, weight, b, labels, inputs, options = _memory_case(case)
    ref = torch.randn(2 * P) - 30

    def step():
        out = fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=ref, mode=mode, validate=False,
                                    backend="cpu", **options)
        return torch.autograd.grad(out.loss, inputs)

    unfused_grads = step()
    unfused_estimate = estimate_linear_memory(hidden, weight, labels, b, backend="cpu", **options)[mode]
    for module in (linear, api):
        monkeypatch.setattr(module, "fused_logits_grad_matmul", lambda backend, dtype: _row_by_row_logits_grad)
    fused_grads = step()
    for got, want in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    peak = peak_extra_bytes(step, "cpu")
    if peak is None:
        pytest.skip("the CPU allocator's events are not observable here")
    estimate = estimate_linear_memory(hidden, weight, labels, b, backend="cpu", **options)[mode]
    if not weight.requires_grad and b is None:  # no weight or bias gradient: the backward forms no slices
        assert estimate == unfused_estimate
    else:
        assert estimate < unfused_estimate
    assert abs(peak - estimate) <= 0.02 * peak, (peak, estimate, unfused_estimate)


def test_peak_estimate_reproduces_the_h200_measurements():
    """The model at issue 5's three shapes (bf16, 25% of each sequence ignored, gradients of
    hidden and weight) against the peaks run D measured on an H200 (docs/perf.md, GB of 1e9
    bytes, two decimals), whose split slices were H rows (the default then): one_pass 1.96 / 1.96
    / 2.16, split 1.22 / 1.24 / 1.72; and the sweep's split at 8 x 1024 with 8192 and 16384 rows,
    1.27 and 1.37 GB. Today's default slice at 8 x 1024 is the 8192-row one."""
    from dpo_kernels import estimate_linear_memory

    measured = {(8, 1024, 4096, 128256): (1.96, 1.22), (4, 2048, 3584, 152064): (1.96, 1.24),
                (2, 16384, 4096, 128256): (2.16, 1.72)}
    for (B, T, H, V), (one_pass, split) in measured.items():
        labels = torch.randint(0, V, (B, T))
        labels[:, : T // 4] = IGNORE
        hidden = torch.empty(B, T, H, dtype=BF16, requires_grad=True)  # never written: sizes only
        weight = torch.empty(V, H, dtype=BF16, requires_grad=True)
        peaks = estimate_linear_memory(hidden, weight, labels, vocab_chunk=H)
        assert round(peaks["one_pass"] / 1e9, 2) == one_pass and round(peaks["split"] / 1e9, 2) == split, peaks
        if (B, T) == (8, 1024):
            for rows, gb in ((8192, 1.27), (16384, 1.37)):
                assert round(estimate_linear_memory(hidden, weight, labels, vocab_chunk=rows)["split"] / 1e9, 2) == gb
            assert (estimate_linear_memory(hidden, weight, labels)["split"]
                    == estimate_linear_memory(hidden, weight, labels, vocab_chunk=8192)["split"])


def test_auto_fits_one_pass_to_the_memory_or_takes_split(monkeypatch):
    """auto checks one_pass's estimated peak against the device's free memory (only on CUDA; the
    free memory is faked here). In order it takes:

    1. one_pass at its default chunk while that fits within ``AUTO_MEMORY_HEADROOM`` of the free
       memory (first from bounds that need no count, then from the counts);
    2. else one_pass with the largest chunk that fits, while at most half of the logits would be
       formed again;
    3. else split if it fits;
    4. else one_pass with the chunk that fits, pieces and all;
    5. else the smaller of split and one_pass at its default chunk.

    A given ``chunk_tokens`` is never shrunk. Every choice gives the same loss and gradients.
    Here split's one forward chunk holds every token, so it needs more than one_pass with a pair
    per chunk; a patched split estimate stands for a split that needs less."""
    from dpo_kernels import estimate_linear_memory

    hidden, weight, _, labels = make_inputs(2, 64, 128, 3000, prompt=16, seed=4)
    ref = torch.randn(4) - 30
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    peaks = estimate_linear_memory(h, w, labels)
    headroom = linear.AUTO_MEMORY_HEADROOM
    fits = math.ceil(peaks["one_pass"] / headroom)
    everything = labels.numel()
    assert linear.one_pass_peak_bytes(linear.Footprint(everything, everything, 128, 3000, 4, 4, 0,
                                                       (True, True, False), False), everything) > fits
    counts = linear.TokenCensus(labels, IGNORE, 2).pair_counts()
    # 4 words per token: logp, the fp64 lse, the logits_sum extra
    fp = linear.Footprint(everything, sum(counts), 128, 3000, 4, 4, 0, (True, True, False), False, 4)
    one_pair = math.ceil(linear.one_pass_peak_bytes(fp, max(counts)) / headroom)
    pieces = math.ceil(linear.one_pass_peak_bytes(fp, 30) / headroom)  # 30-token pieces: 68% formed again
    assert linear.formed_again(counts, 30) > linear.AUTO_MAX_FORMED_AGAIN
    assert pieces < one_pair < peaks["split"] / headroom < fits
    want = None
    original = linear.logits_matmul

    def step(available, **options):
        nonlocal want
        rows = []

        def counting(h_chunk, *args):
            rows.append(h_chunk.shape[0])
            return original(h_chunk, *args)

        monkeypatch.setattr(linear, "available_bytes", lambda device, enough=None: available)
        monkeypatch.setattr(linear, "logits_matmul", counting)
        out = fused_linear_dpo_loss(h, w, labels, ref_logps=ref, **options)
        grads = torch.autograd.grad(out.loss, (h, w))
        got = (out.loss, *grads)
        want = got if want is None else want
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return type(out.loss.grad_fn).__name__.removesuffix("Backward"), rows

    assert step(None) == ("_OnePassFunction", [sum(counts)])  # off CUDA: no limit; one chunk
    assert step(fits) == ("_OnePassFunction", [sum(counts)])  # over the count-free bound, within the counts
    assert step(one_pair) == ("_OnePassFunction", counts)  # 2: a chunk per pair
    mode, rows = step(pieces)  # 4: split does not fit either: one_pass in pieces
    assert mode == "_OnePassFunction" and max(rows) <= 30 and len(rows) > 2 * len(counts), rows
    assert step(0)[0] == "_SplitFunction"  # 5: nothing fits; split needs less than one_pass's default
    assert step(one_pair, chunk_tokens=4096)[0] == "_SplitFunction"  # the given chunk is kept
    monkeypatch.setattr(linear, "split_peak_bytes", lambda *args: math.floor(pieces * headroom))
    assert step(one_pair)[1] == counts  # 2 before 3
    assert step(pieces)[0] == "_SplitFunction"  # 3: split fits; one_pass only in pieces
    monkeypatch.setattr(linear, "split_peak_bytes", lambda *args: peaks["one_pass"])
    assert step(0) == ("_OnePassFunction", [sum(counts)])  # 5: split would need as much


def test_available_bytes_counts_the_allocator_cache_and_the_process_fraction(monkeypatch):
    """Free device memory + what the caching allocator holds unused, capped by
    ``set_per_process_memory_fraction``; None off CUDA."""
    state = {"fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10000))
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device=None: {
        "allocated_bytes": {"all": {"current": 3000, "peak": 9000}, "large_pool": {"current": 2000}},
        "reserved_bytes": {"all": {"current": 3500, "peak": 9500}}})
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: state["fraction"])
    cuda = torch.device("cuda", 0)
    assert linear.available_bytes(cuda) == 1500
    assert linear.available_bytes(cuda, enough=1001) == 1500
    assert linear.available_bytes(torch.device("cpu"), enough=1) is None
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", None)  # not read when the free memory is enough
    assert linear.available_bytes(cuda, enough=1000) == 1000
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device=None: {
        "allocated_bytes": {"all": {"current": 3000}}, "reserved_bytes": {"all": {"current": 3500}}})
    state["fraction"] = 0.4
    assert linear.available_bytes(cuda) == 1000  # 4000 allowed, 3000 allocated
    assert linear.available_bytes(cuda, enough=10) == 1000  # a fraction: the statistics are read
    state["fraction"] = 0.2
    assert linear.available_bytes(cuda) == 0
    assert linear.available_bytes(torch.device("cpu")) is None


def test_no_grad_forward_matches():
    hidden, weight, b, labels = make_inputs(2, 6, 16, 60, bias=True)
    ref = torch.randn(4)
    with torch.no_grad():
        out = fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=ref, token_metrics=True)
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref, token_metrics=True)
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=2e-5, atol=2e-5)


def test_grad_output_scales_and_frozen_weight():
    hidden, weight, b, labels = make_inputs(2, 6, 16, 60, bias=True)
    ref = torch.randn(4)
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref)
    for mode in MODES:
        h = hidden.clone().requires_grad_(True)
        out = fused_linear_dpo_loss(h, weight, labels, b, ref_logps=ref, mode=mode)  # weight, bias frozen
        (2.5 * out.loss).backward()
        torch.testing.assert_close(h.grad.double(), 2.5 * want["grad_hidden"], rtol=1e-4, atol=1e-6)


def test_sequences_without_completion_tokens():
    hidden, weight, b, labels = make_inputs(2, 5, 16, 50, bias=True)
    labels[0] = IGNORE
    labels[3] = IGNORE
    for mode in MODES:
        compare(hidden, weight, labels, b, ref_logps=torch.randn(4), mode=mode, average_log_prob=True)
    labels[:] = IGNORE
    for mode in ["auto", *MODES]:
        out, grads = run(hidden, weight, labels, b, ref_logps=torch.zeros(4), mode=mode)
        assert torch.isfinite(out.loss) and all((g == 0).all() for g in grads), mode


def test_default_chunk_size_from_memory_budget():
    assert linear.chunk_size(128256, BF16, None, None) * 128256 * 2 <= linear.DEFAULT_CHUNK_BYTES
    assert linear.chunk_size(128256, BF16, None, None) >= 512
    assert linear.chunk_size(128256, F32, 30.0, None) < linear.chunk_size(128256, F32, None, None)
    assert linear.chunk_size(10, F32, None, 7) == 7


# --------------------------------------------------------------------------------------------
# The sliced backward (two_phase's; split's for the weight): vocabulary slices outer, token chunks inner.


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("vocab_chunk, chunk_tokens", [(64, 5), (64, 1000), (1, 7), (1000, 4), (None, None)])
@pytest.mark.parametrize("mode", ["two_phase", "split"])
def test_vocab_slices_match_oracle(dtype, vocab_chunk, chunk_tokens, mode):
    """V = 301 in slices of 64 (four full and one of 45), of 1 row, or one slice (V smaller than
    the slice, given or default), with several token chunks or one (split: its forward's chunks
    are pieces of a pair too, where ``chunk_tokens`` is below a pair)."""
    hidden, weight, b, labels = make_inputs(3, 9, 16, 301, dtype, bias=True, seed=3)
    compare(hidden, weight, labels, b, dtype, ref_logps=torch.randn(6) - 25, shift=True, mode=mode,
            chunk_tokens=chunk_tokens, vocab_chunk=vocab_chunk, token_metrics=True)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode", ["two_phase", "split"])
def test_vocab_slices_softcap_temperature_backends(backend, dtype, mode):
    """The sliced backward (two_phase's, and split's for its weight gradient) with the softcap's
    derivative and the temperature, on every backend, several token chunks per slice."""
    hidden, weight, b, labels = make_inputs(2, 8, 16, 301, dtype, bias=True, seed=4)
    weight = (weight.float() * 3).to(dtype)
    compare(hidden, weight, labels, b, dtype, ref_logps=torch.randn(4) - 30, logit_softcap=8.0, temperature=0.7,
            shift=True, mode=mode, chunk_tokens=4, vocab_chunk=64, backend=backend)


def test_two_phase_vocab_slices_agree_with_one_slice():
    """Slicing the vocabulary changes no more than the final rounding of each gradient."""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 301, BF16, bias=True, seed=5)
    kwargs = dict(ref_logps=torch.randn(6) - 15, shift=True, mode="two_phase", chunk_tokens=6)
    whole, gw = run(hidden, weight, labels, b, vocab_chunk=301, **kwargs)
    parts, gp = run(hidden, weight, labels, b, vocab_chunk=64, **kwargs)
    torch.testing.assert_close(parts.loss, whole.loss, rtol=0, atol=0)
    for a, c in zip(gp, gw):
        assert ((a.float() - c.float()).abs() <= 2.0 ** -7 * c.float().abs() + 1e-6).all()


def test_two_phase_vocab_slices_keep_four_matmuls_over_valid_tokens(monkeypatch):
    """Each matmul is split into slices, never repeated: the products cover valid x V x H once."""
    hidden, weight, b, labels = make_inputs(2, 10, 16, 301, bias=True, prompt=4)
    area = {"logits": 0, "grad_hidden": 0, "grad_weight": 0}
    originals = (linear.logits_matmul, linear.grad_hidden_matmul, linear.grad_hidden_matmul_acc,
                 linear.grad_weight_matmul)

    def logits_mm(h, w, bias):
        area["logits"] += h.shape[0] * w.shape[0]
        return originals[0](h, w, bias)

    def grad_hidden_mm(g, w):
        area["grad_hidden"] += g.shape[0] * g.shape[1]
        return originals[1](g, w)

    def grad_hidden_acc(acc, g, w, accumulate=True):
        area["grad_hidden"] += g.shape[0] * g.shape[1]
        return originals[2](acc, g, w, accumulate)

    def grad_weight_mm(out, g, h, accumulate):
        area["grad_weight"] += g.shape[0] * g.shape[1]
        return originals[3](out, g, h, accumulate)

    monkeypatch.setattr(linear, "logits_matmul", logits_mm)
    monkeypatch.setattr(linear, "grad_hidden_matmul", grad_hidden_mm)
    monkeypatch.setattr(linear, "grad_hidden_matmul_acc", grad_hidden_acc)
    monkeypatch.setattr(linear, "grad_weight_matmul", grad_weight_mm)
    valid = int((oracle.aligned(labels, True) != IGNORE).sum())
    for vocab_chunk in (64, 301):
        for key in area:
            area[key] = 0
        run(hidden, weight, labels, b, ref_logps=torch.randn(4), shift=True, mode="two_phase", chunk_tokens=3,
            vocab_chunk=vocab_chunk)
        assert area == {"logits": 2 * valid * 301, "grad_hidden": valid * 301, "grad_weight": valid * 301}


@pytest.mark.parametrize("mode", ["two_phase", "split"])
def test_sliced_backward_allocates_no_fp32_vocab_by_hidden_buffer(mode):
    """Every tensor created during the backward is recorded: none is fp32 (or wider) with V x H
    elements; the weight gradient exists only in its own (bf16) dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    V, H = 301, 16
    hidden, weight, b, labels = make_inputs(2, 9, H, V, BF16, bias=True, seed=6)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, w, labels, b, ref_logps=torch.randn(4), shift=True, mode=mode,
                                chunk_tokens=5, vocab_chunk=64)
    valid = int((oracle.aligned(labels, True) != IGNORE).sum())
    assert valid * max(H, 64) < V * H  # the largest legitimate fp32 buffers are smaller than V x H

    created = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    created.append((str(func), tuple(t.shape), t.dtype))
            return result

    with Record():
        out.loss.backward()
    assert created and w.grad is not None and w.grad.dtype == BF16
    wide = [c for c in created if c[2] in (torch.float32, torch.float64) and math.prod(c[1]) >= V * H]
    assert not wide, wide


def test_two_phase_backward_peak_holds_the_hidden_gradient_and_gathered_rows_never_together():
    """The backward's peak (CPU allocator, every byte) is the weight gradient + the fp32
    ``[n, H]`` accumulator + the gathered ``[n, H]`` rows + one slice's ``[n, rows]`` logits, plus
    small per-token vectors: the ``[2P, T, H]`` hidden gradient is allocated after the rows are
    freed (it would add 0.5 MB here)."""
    from dpo_kernels.bench import peak_extra_bytes

    P, T, H, V, rows = 4, 64, 256, 2048, 512
    hidden = torch.randn(2 * P, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.1).requires_grad_(True)
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :24] = IGNORE
    n = int((labels != IGNORE).sum())
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=torch.randn(2 * P) - 30, mode="two_phase",
                                vocab_chunk=rows)
    peak = peak_extra_bytes(lambda: torch.autograd.grad(out.loss, (hidden, weight)), "cpu")
    if peak is None:
        pytest.skip("the CPU allocator's events are not observable here")
    model = V * H * 4 + n * H * 4 + n * H * 4 + n * rows * 4  # weight grad, accumulator, rows, logits
    hidden_grad = 2 * P * T * H * 4
    assert model <= peak <= model + hidden_grad // 4, (peak, model)


def test_one_pass_peak_is_bounded_by_the_chunk_not_the_pair():
    """A pair larger than ``chunk_tokens``: one_pass keeps at most one piece's logits (its forward
    forms the gradients too; CPU allocator, every byte). The peak is the gradients + one piece's
    ``[chunk, V]`` logits (+ a ``V x H`` fp32 temporary of the CPU's accumulating ``addmm_``, and
    small vectors); with a chunk that holds the whole pair it grows by the pair's logits. Same
    result either way."""
    from dpo_kernels.bench import peak_extra_bytes

    P, T, H, V, chunk = 2, 96, 64, 4096, 16
    hidden = torch.randn(2 * P, T, H)
    weight = torch.randn(V, H) * 0.1
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :16] = IGNORE  # pairs of 160 valid tokens: 10 pieces of 16
    ref = torch.randn(2 * P) - 30

    def step(chunk_tokens):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_linear_dpo_loss(h, w, labels, ref_logps=ref, mode="one_pass", chunk_tokens=chunk_tokens)
        return out.loss, torch.autograd.grad(out.loss, (h, w))

    pieces, whole = peak_extra_bytes(lambda: step(chunk), "cpu"), peak_extra_bytes(lambda: step(160), "cpu")
    if pieces is None or whole is None:
        pytest.skip("the CPU allocator's events are not observable here")
    grads, addmm_temp, piece = 2 * P * T * H * 4 + V * H * 4, V * H * 4, chunk * V * 4
    assert grads + piece <= pieces <= grads + addmm_temp + 2 * piece, (pieces, grads, piece)
    assert whole - pieces >= 0.9 * (160 - chunk) * V * 4, (whole, pieces)
    (loss, (gh, gw)), (whole_loss, (wgh, wgw)) = step(chunk), step(160)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, wgh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, wgw, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# split: each token's hidden gradient before the loss is known (the forward), every gradient
# from the loss's coefficients in the backward (the weight and bias ones as two_phase's).


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("vocab_chunk, chunk_tokens", [(None, None), (64, None), (64, 5), (7, 3)])
def test_split_gradients_are_two_phase_s(dtype, vocab_chunk, chunk_tokens):
    """split's weight and bias gradients are two_phase's backward, driven by the same per-token
    coefficients: the same slices, chunks and roundings (a bf16 weight gradient rounded once).
    Its hidden gradient rounds each token's logits gradient before the coefficient multiplies it:
    the same error, within a rounding step of each row's scale."""
    hidden, weight, b, labels = make_inputs(3, 9, 16, 301, dtype, bias=True, seed=8)
    kwargs = dict(ref_logps=torch.randn(6) - 25, shift=True, vocab_chunk=vocab_chunk, chunk_tokens=chunk_tokens)
    split, (sh, sw, sb) = run(hidden, weight, labels, b, mode="split", **kwargs)
    two, (th, tw, tb) = run(hidden, weight, labels, b, mode="two_phase", **kwargs)
    ulp = 2.0 ** -7 if dtype == BF16 else 2.0 ** -20
    for got, want in ((sw, tw), (sb, tb)):
        # The coefficients come from the same loss, through the custom op (two_phase) or the kept
        # graph (split): equal up to fp32 rounding, so a bf16 gradient rarely differs, by one step.
        assert ((got.float() - want.float()).abs() <= ulp * want.float().abs() + 1e-7).all()
        if dtype == BF16:
            assert (got == want).float().mean() > 0.99
    assert ((sh.float() - th.float()).abs() <= 2 * ulp * th.float().abs().amax(-1, keepdim=True) + 1e-7).all()
    torch.testing.assert_close(split.loss, two.loss, rtol=1e-6, atol=1e-7)
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=kwargs["ref_logps"], shift=True)
    check(split, want, (sh, sw, sb), dtype)


def test_split_peak_holds_no_fp32_accumulator():
    """split's peak (CPU allocator, every byte, forward + backward) is its backward's: the weight
    gradient + the hidden gradient + the gathered ``[n, H]`` rows + one chunk's ``[chunk, rows]``
    slice of logits, plus small per-token vectors. No fp32 ``[n, H]`` accumulator summed over
    slices (two_phase's) and no ``[V, H]`` one. The forward's fp32 ``[n, H]`` per-token hidden
    gradients are freed before the weight gradient exists; with a chunk of logits they stay
    below that peak."""
    from dpo_kernels.bench import peak_extra_bytes

    P, T, H, V, rows = 4, 64, 256, 2048, 512
    hidden = torch.randn(2 * P, T, H)
    weight = torch.randn(V, H) * 0.1
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :24] = IGNORE  # pairs of 80 valid tokens
    n, chunk = int((labels != IGNORE).sum()), 80
    ref = torch.randn(2 * P) - 30

    def step():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_linear_dpo_loss(h, w, labels, ref_logps=ref, mode="split", vocab_chunk=rows, chunk_tokens=chunk)
        return torch.autograd.grad(out.loss, (h, w))

    peak = peak_extra_bytes(step, "cpu")
    if peak is None:
        pytest.skip("the CPU allocator's events are not observable here")
    inputs = 2 * P * T * H * 4 + V * H * 4  # the clones of hidden and weight
    # The forward's peak: the per-token hidden gradients [n, H] + a chunk's rows and logits [80, V].
    forward = n * H * 4 + chunk * V * 4 + chunk * H * 4
    model = V * H * 4 + 2 * P * T * H * 4 + n * H * 4 + chunk * rows * 4  # weight grad, hidden grad, rows, logits
    assert forward < model <= peak - inputs <= model + n * H * 4 // 4, (peak - inputs, model)


def test_split_forward_chunk_is_as_large_as_the_weight_gradient():
    """split's forward chunks hold up to the weight gradient's size in logits (H tokens at bf16 or
    fp32 without a softcap), at least one_pass's budget; ``chunk_tokens`` overrides both."""
    assert linear.split_chunk_size(128256, 4096, BF16, None, None) == 4096  # 2 pairs of 1536 at 8 x 1024
    assert linear.split_chunk_size(152064, 3584, BF16, None, None) == 3584  # a pair of 3072 at 4 x 2048
    one_pass = linear.one_pass_chunk_size(151936, BF16, None, None)
    assert linear.split_chunk_size(151936, 896, BF16, None, None) == one_pass > 896  # small H: one_pass's
    assert linear.split_chunk_size(128256, 4096, F32, 30.0, None) < 4096  # the softcap's fp32 temporaries
    assert linear.split_chunk_size(128256, 4096, BF16, None, 7) == 7


@pytest.mark.parametrize("n, chunk", [(0, 5), (3, 5), (5, 5), (6, 5), (11, 5), (64, 16), (65, 16), (7, 1)])
def test_split_token_chunks_are_the_fewest_and_even(n, chunk):
    """split's forward chunks: every valid token once, in order, the fewest chunks of at most
    ``chunk`` tokens, their sizes within one token of each other (a smaller peak than full chunks
    and a remainder, for the same matmuls)."""
    bounds = linear.token_chunks(n, chunk)
    assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]] and (not bounds or bounds[0][0] == 0)
    assert (bounds[-1][1] if bounds else 0) == n
    assert len(bounds) == -(-n // chunk)
    sizes = [b - a for a, b in bounds]
    assert all(0 < size <= chunk for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)


def test_split_forward_chunks_tokens_up_to_its_chunk(monkeypatch):
    """With the default budget the forward's logits matmul sees the chunks split_chunk_size allows
    (here: V x H bytes of logits hold 16 tokens; one_pass's default would hold all of them), and
    a frozen head takes one_pass's chunks. The chunks are tokens, not whole pairs."""
    rows = _count_matmul_rows(monkeypatch)
    monkeypatch.setattr(linear, "DEFAULT_ONE_PASS_CHUNK_BYTES", 1)  # so the weight gradient's size decides
    P, T, H, V = 4, 8, 16, 90  # fp32 logits of V x H bytes: 16 tokens
    hidden, weight, _, _ = make_inputs(P, T, H, V, seed=2)
    labels = torch.randint(0, V, (2 * P, T))  # pairs of 16 valid tokens
    ref = torch.randn(2 * P) - 10
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, w, labels, ref_logps=ref, mode="split")
    assert rows["logits"] == [16, 16, 16, 16]  # forward: 64 valid tokens in chunks of 16
    out.loss.backward()
    # backward: one vocabulary slice (V < H's default slice), all 64 tokens in one chunk
    assert rows["logits"][4:] == [64] and rows["grad_hidden"] == [16] * 4 and rows["grad_weight"] == [64]
    want = oracle.linear_dpo(hidden, weight, labels, ref_logps=ref)
    check(out, want, (h.grad, w.grad, None), F32)
    for key in rows:
        rows[key].clear()
    h = hidden.clone().requires_grad_(True)
    fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, mode="split").loss.backward()  # frozen head
    assert max(rows["logits"]) == 1  # one_pass's (here 1-byte) budget: pieces of one token


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_split_serves_what_one_pass_refuses(dtype, backend):
    """split runs the loss once, on the whole batch's token results, and keeps its graph for the
    backward: a batch-coupled loss (aot) and gradients through the returned log-probs work, equal
    to two_phase's and the float64 oracle's. One backward: a second one raises."""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 60, dtype, bias=True, seed=6)
    ref = torch.randn(6) - 10
    ulp = 2.0 ** -7 if dtype == BF16 else 2.0 ** -20

    def grads(mode, extra, **kwargs):
        h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
        out = fused_linear_dpo_loss(h, w, labels, bb, ref_logps=ref, mode=mode, backend=backend, **kwargs)
        extra(out).backward()
        return out, (h.grad, w.grad, bb.grad)

    with pytest.raises(ValueError, match="mode='one_pass' needs each pair's gradient.*sorts the pairs.*'split'"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, loss_type="aot", mode="one_pass")
    cases = [(dict(loss_type="aot"), lambda out: out.loss),
             ({}, lambda out: out.loss - 0.3 * out.chosen_logps.mean() + 0.1 * out.rejected_logps.sum()),
             ({}, lambda out: out.chosen_logps.sum())]  # the log-probs alone
    for kwargs, extra in cases:
        split, gs = grads("split", extra, **kwargs)
        two, g2 = grads("two_phase", extra, **kwargs)
        torch.testing.assert_close(split.loss, two.loss, rtol=1e-6, atol=1e-6)
        for name, got, want in zip(("hidden", "weight", "bias"), gs, g2):
            scale = want.float().abs().amax(-1, keepdim=True) if name == "hidden" else want.float().abs()
            assert ((got.float() - want.float()).abs() <= 2 * ulp * scale + 1e-6).all(), name
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, w, labels, ref_logps=ref, loss_type="aot", mode="split")
    (out.loss + out.chosen_logps.sum()).backward()
    want = oracle.linear_dpo(hidden, weight, labels, ref_logps=ref, loss_type="aot")
    # the oracle's gradients are of the loss; here the log-probs add theirs: compare the loss only
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-4 if dtype == F32 else 2e-2, atol=1e-5)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(hidden, w, labels, ref_logps=ref, mode="split")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="mode='split'.*backward called twice"):
        out.loss.backward()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_split_forward_gradient_is_the_same_in_one_kernel_or_two(dtype):
    """split's forward turns each chunk's logits into their gradient through
    ``backends.forward_and_grad_``: on the Triton backend in the forward kernel itself or by the
    backward after it (``config.fuse_forward_and_grad``). With a softcap and a temperature (whose
    chain rule follows the kernel) and token metrics, both give the same loss, metrics and
    gradients bit for bit, and the float64 oracle's."""
    from dpo_kernels.backends.triton.config import set_forward_and_grad_fusion

    hidden, weight, b, labels = make_inputs(3, 8, 16, 300, dtype, bias=True, seed=11)
    ref = torch.randn(6) - 10
    options = dict(ref_logps=ref, mode="split", backend="triton", logit_softcap=5.0, temperature=0.7,
                   chunk_tokens=5)
    results = []
    try:
        for one_kernel in (True, False):
            set_forward_and_grad_fusion(one_kernel)
            h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
            out = fused_linear_dpo_loss(h, w, labels, bb, token_metrics=True, **options)
            out.loss.backward()
            results.append((out, (h.grad, w.grad, bb.grad)))
    finally:
        set_forward_and_grad_fusion(None)
    (fused, fused_grads), (two, two_grads) = results
    assert torch.equal(fused.loss, two.loss) and torch.equal(fused.chosen_logps, two.chosen_logps)
    assert fused.metrics.keys() == two.metrics.keys()
    assert all(torch.equal(fused.metrics[k], two.metrics[k]) for k in two.metrics)
    assert all(torch.equal(a, c) for a, c in zip(fused_grads, two_grads))
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref, softcap=5.0, temperature=0.7)
    torch.testing.assert_close(fused.loss.double(), want["loss"], rtol=2e-5 if dtype == F32 else 2e-2, atol=1e-5)
    for got, key in zip(fused_grads, ("grad_hidden", "grad_weight", "grad_bias")):
        assert _rel(got, want[key]) < (1e-5 if dtype == F32 else 1e-2), key


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode,knobs", [("two_phase", dict(vocab_chunk=64, chunk_tokens=4)),
                                        ("two_phase", {}), ("split", dict(vocab_chunk=96)),
                                        ("one_pass", dict(chunk_tokens=3))])
def test_backward_logits_gradient_fused_into_the_matmul_or_not(dtype, mode, knobs):
    """The logits formed again in the backward (two_phase's and split's vocabulary slices, with
    several token chunks and one; one_pass's earlier pieces of a pair larger than its chunk) turn
    into their gradient either in the fused matmul's epilogue or by a torch matmul then the
    backward kernel (``config.fuse_logits_grad``). With bias, softcap and temperature both give
    the float64 oracle's loss and gradients, and in fp32 each other's to rounding."""
    from dpo_kernels.backends.triton.config import set_logits_grad_fusion

    hidden, weight, b, labels = make_inputs(3, 8, 16, 300, dtype, bias=True, seed=5)
    ref = torch.randn(6) - 10
    options = dict(ref_logps=ref, mode=mode, backend="triton", logit_softcap=5.0, temperature=0.7, shift=True,
                   **knobs)
    results = []
    try:
        for fused in (True, False):
            set_logits_grad_fusion(fused)
            h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
            out = fused_linear_dpo_loss(h, w, labels, bb, **options)
            out.loss.backward()
            results.append((out.loss, (h.grad, w.grad, bb.grad)))
    finally:
        set_logits_grad_fusion(None)
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref, softcap=5.0, temperature=0.7, shift=True)
    for loss, grads in results:
        torch.testing.assert_close(loss.double(), want["loss"], rtol=2e-5 if dtype == F32 else 2e-2, atol=1e-5)
        for got, key in zip(grads, ("grad_hidden", "grad_weight", "grad_bias")):
            assert _rel(got, want[key]) < (1e-5 if dtype == F32 else 1e-2), key
    if dtype == F32:
        for a, c in zip(results[0][1], results[1][1]):
            assert _rel(a, c) < 2e-6


@pytest.mark.parametrize("mode", ["split", "two_phase"])
@pytest.mark.parametrize("changed", ["weight", "hidden", "labels"])
def test_backward_sees_an_in_place_change_of_its_inputs(mode, changed):
    """The backward forms the weight gradient from ``hidden``, ``weight`` and the labels again:
    changed in place after the forward, autograd refuses (a saved tensor's version), never a
    silently wrong gradient. The labels without a shift are the caller's own tensor (a buffer
    refilled with the next batch, say): split used to form the weight gradient from the new
    labels. (one_pass forms its gradients during the forward: they are the forward's.)"""
    hidden, weight, b, labels = make_inputs(2, 8, 16, 60)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y = labels.clone()
    out = fused_linear_dpo_loss(h, w, y, ref_logps=torch.randn(4), mode=mode)
    with torch.no_grad():
        {"weight": w, "hidden": h}.get(changed, y).add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_vocab_slice_size_default_is_the_hidden_size():
    assert linear.vocab_slice_size(128256, 4096, None) == 4096
    assert linear.vocab_slice_size(152064, 3584, None) == 3584
    assert linear.vocab_slice_size(151936, 3500, None) == 3456  # a multiple of 128
    assert linear.vocab_slice_size(151936, 896, None) == linear.MIN_SLICE_ROWS == 2048
    assert linear.vocab_slice_size(300, 4096, None) == 300  # V smaller than one slice
    assert linear.vocab_slice_size(300, 16, 64) == 64 and linear.vocab_slice_size(300, 16, 1000) == 300
    head = linear.Head(torch.empty(128256, 1, device="meta"), None, 1.0, None, "reference", IGNORE)
    step, tokens = linear.backward_plan(head, 4096, BF16, None, None)
    assert step * tokens * 2 <= linear.DEFAULT_CHUNK_BYTES and tokens >= 8192
    assert linear.backward_plan(head, 4096, BF16, 7, 100) == (100, 7)


def test_split_backward_slices_widen_when_every_valid_token_fits_one_chunk():
    """split's backward (``valid_tokens`` given): twice the default slice when all valid tokens
    fit one chunk of it within the budget (8 x 1024 with 25% ignored: 6144 tokens, 8192 rows),
    else the default (24576 tokens: 4096 rows, one chunk of 32768); a knob given keeps its own
    plan; V smaller than the wider slice caps it; a softcap's fp32 temporaries count."""
    head = linear.Head(torch.empty(128256, 1, device="meta"), None, 1.0, None, "reference", IGNORE)
    assert linear.backward_plan(head, 4096, BF16, None, None, valid_tokens=6144) == (8192, 16384)
    assert linear.backward_plan(head, 4096, BF16, None, None, valid_tokens=16384) == (8192, 16384)
    assert linear.backward_plan(head, 4096, BF16, None, None, valid_tokens=16385) == (4096, 32768)
    assert linear.backward_plan(head, 4096, BF16, None, None, valid_tokens=24576) == (4096, 32768)
    assert linear.backward_plan(head, 4096, BF16, None, 4096, valid_tokens=6144) == (4096, 32768)
    assert linear.backward_plan(head, 4096, BF16, 6144, None, valid_tokens=6144) == (4096, 6144)
    capped = linear.Head(torch.empty(6000, 1, device="meta"), None, 1.0, None, "reference", IGNORE)
    assert linear.backward_plan(capped, 4096, BF16, None, None, valid_tokens=100)[0] == 6000
    capped = replace(capped, weight=torch.empty(4096, 1, device="meta"))
    assert linear.backward_plan(capped, 4096, BF16, None, None, valid_tokens=100)[0] == 4096
    softcapped = replace(head, softcap=30.0)  # 2 + 8 bytes per element in the budget: 3200 tokens of 8192 rows
    assert linear.backward_plan(softcapped, 4096, BF16, None, None, valid_tokens=3200)[0] == 8192
    assert linear.backward_plan(softcapped, 4096, BF16, None, None, valid_tokens=3201)[0] == 4096


def test_backward_plan_counts_no_softcap_temporaries_when_the_slices_are_fused():
    """A slice whose gradient the fused matmul writes holds no fp32 softcap temporaries
    (``Footprint.slice_grad_bytes``), so its plan (``fused_slices=True``) budgets 2 bytes per
    element in bf16, not 10: the wider slice and the larger token chunks of a head without a
    softcap. Unfused (two_phase's plan, always), the temporaries count."""
    weight = torch.empty(128256, 1, device="meta")
    capped = linear.Head(weight, None, 1.0, 30.0, "reference", IGNORE)
    plain = replace(capped, softcap=None)
    for valid in (3201, 16384, 24576):
        assert (linear.backward_plan(capped, 4096, BF16, None, None, valid, fused_slices=True)
                == linear.backward_plan(plain, 4096, BF16, None, None, valid))
    assert linear.backward_plan(capped, 4096, BF16, None, 4096, fused_slices=True) == (4096, 32768)
    assert linear.backward_plan(capped, 4096, F32, None, None, 3201, fused_slices=True) == (8192, 8192)
    assert linear.backward_plan(capped, 4096, BF16, None, None, 3201) == (4096, 6528)
    assert linear.backward_plan(capped, 4096, BF16, None, 4096) == (4096, 6528)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_split_plans_its_backward_with_the_fusion_rule_in_force():
    """``linear.slices_take_fused_matmul`` follows the backend's rule (the Triton one's override;
    never for float64, never on a backend without the fused matmul), and split's plan follows it:
    with a softcap its fused slices get the chunks of a head without one."""
    from dpo_kernels import api
    from dpo_kernels.backends.triton.config import set_logits_grad_fusion

    weight = torch.empty(128256, 1, device="meta")
    triton_head = linear.Head(weight, None, 1.0, 30.0, "triton", IGNORE)
    hidden = torch.empty(1, 1, 4096, dtype=BF16, device="meta")
    try:
        for fuse in (True, False):
            set_logits_grad_fusion(fuse)
            assert linear.slices_take_fused_matmul(triton_head, BF16) is fuse
            assert linear.slices_take_fused_matmul(triton_head, torch.float64) is False
            *_, split_plan = api._chunk_plan(linear, triton_head, hidden, 30.0, None, None, (True, True, False))
            assert split_plan(3201) == ((8192, 16384) if fuse else (4096, 6528))
        assert linear.slices_take_fused_matmul(replace(triton_head, backend_name="reference"), BF16) is False
    finally:
        set_logits_grad_fusion(None)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_vocab_chunk_errors(value):
    hidden, weight, labels, b = _args()
    with pytest.raises(ValueError, match="vocab_chunk must be an int >= 1"):
        fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=torch.randn(4), vocab_chunk=value)


# --------------------------------------------------------------------------------------------
# Liger-Kernel's LigerFusedLinearDPOLoss as an external reference.

LIGER_LOSSES = ["sigmoid", "hinge", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                "discopop", "exo_pair"]


@pytest.mark.parametrize("loss_type", LIGER_LOSSES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_matches_liger(loss_type, average, mode):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, b, labels = make_inputs(2, 7, 16, 90, bias=True)
    ref_hidden = torch.randn_like(hidden)
    ref_weight = weight + 0.1 * torch.randn_like(weight)
    ls = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    liger = chunked.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, average_log_prob=average, loss_type=loss_type,
                                            label_smoothing=ls, use_ref_model=True)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bl = b.clone().requires_grad_(True)
    loss, aux = liger(w, h, labels, bl, ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=b)
    loss.backward()
    out, grads = run(hidden, weight, labels, b, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=b,
                     beta=0.2, loss_type=loss_type, label_smoothing=ls, average_log_prob=average, mode=mode)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps, aux[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps, aux[1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, (h.grad, w.grad, bl.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors.


def _args():
    hidden, weight, b, labels = make_inputs(2, 5, 8, 30, bias=True)
    return hidden, weight, labels, b


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {"hidden": a["hidden"].numpy()}, TypeError, "hidden must be a torch.Tensor"),
    (lambda a: {"hidden": a["hidden"].long()}, TypeError, "hidden must be a floating"),
    (lambda a: {"hidden": a["hidden"][0]}, ValueError, r"hidden must be \[2B, T, H\]"),
    (lambda a: {"hidden": a["hidden"][:3], "labels": a["labels"][:3]}, ValueError, "2B > 0"),
    (lambda a: {"weight": a["weight"][:, :5]}, ValueError, r"weight must be \[V, H\] with H = 8"),
    (lambda a: {"weight": a["weight"][0]}, ValueError, r"weight must be the lm_head weight \[V, H\]"),
    (lambda a: {"weight": a["weight"].double()}, TypeError, "weight dtype torch.float64 must equal hidden dtype"),
    (lambda a: {"weight": a["weight"].int()}, TypeError, "weight must be a floating"),
    (lambda a: {"bias": a["bias"][:5]}, ValueError, r"bias must have shape \[V\]"),
    (lambda a: {"bias": a["bias"].double()}, TypeError, "bias dtype"),
    (lambda a: {"labels": a["labels"].float()}, TypeError, "labels must be an integer"),
    (lambda a: {"labels": a["labels"][:, :3]}, ValueError, r"labels shape .* does not match hidden"),
])
def test_input_errors(change, error, match):
    hidden, weight, labels, b = _args()
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=b)
    args.update(change(args))
    with pytest.raises(error, match=match):
        fused_linear_dpo_loss(args["hidden"], args["weight"], args["labels"], args["bias"], ref_logps=torch.randn(4))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be a finite number > 0"),
    (dict(logit_softcap=0), ValueError, "logit_softcap"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(chunk_tokens=0), ValueError, "chunk_tokens must be an int >= 1"),
    (dict(chunk_tokens=2.5), ValueError, "chunk_tokens"),
    (dict(loss_type="aot", mode="one_pass"), ValueError, "mode='one_pass' needs each pair's gradient"),
    (dict(loss_type="nope"), ValueError, "loss_type must be one of"),
    (dict(beta=-1.0), ValueError, "beta must be"),
    (dict(ld_alpha=2.0), ValueError, "ld_alpha"),
    (dict(use_weighting=True, loss_type="aot"), ValueError, "use_weighting"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_option_errors(kwargs, error, match):
    hidden, weight, labels, b = _args()
    with pytest.raises(error, match=match):
        fused_linear_dpo_loss(hidden, weight, labels, b, **{"ref_logps": torch.randn(4), **kwargs})


@pytest.mark.parametrize("mode", ["one_pass", "split", "two_phase"])
def test_sft_alone_takes_beta_zero(mode):
    """beta scales only SFT's logged rewards: at beta = 0 the loss and gradients are the oracle's in
    every mode, the rewards 0."""
    hidden, weight, b, labels = make_inputs(2, 7, 8, 70, bias=True, seed=11)
    out, _ = compare(hidden, weight, labels, b, loss_type="sft", beta=0.0, mode=mode, chunk_tokens=5, shift=True)
    assert not out.chosen_rewards.any() and not out.rejected_rewards.any()


def test_numpy_scalars_are_python_numbers():
    """Knobs read from NumPy (an array, a config) are taken as the Python numbers they hold: the same
    result bit for bit; a NumPy float where an int is needed is still refused."""
    import numpy as np

    hidden, weight, b, labels = make_inputs(2, 7, 8, 70, bias=True, seed=12)
    ref = torch.randn(4)
    plain = dict(beta=0.25, chunk_tokens=5, vocab_chunk=32, ignore_index=IGNORE, use_weighting=True,
                 loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], mode="split")
    numpy_ = dict(beta=np.float32(0.25), chunk_tokens=np.int64(5), vocab_chunk=np.int16(32),
                  ignore_index=np.int32(IGNORE), use_weighting=np.bool_(True), loss_type=["sigmoid", "sft"],
                  loss_weights=[np.float64(1.0), np.float32(0.5)], mode="split")
    want, want_grads = run(hidden, weight, labels, b, ref_logps=ref, **plain)
    got, got_grads = run(hidden, weight, labels, b, ref_logps=ref, **numpy_)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.chosen_rewards, want.chosen_rewards)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=ref, chunk_tokens=np.float64(5.0))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(chunk_tokens=0), ValueError, "chunk_tokens must be an int >= 1"),
    (dict(vocab_chunk=0), ValueError, "vocab_chunk must be an int >= 1"),
    (dict(vocab_chunk=True), ValueError, "vocab_chunk"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be a finite number > 0"),
    (dict(labels="short"), ValueError, "labels"),
    (dict(weight="wrongH"), ValueError, "weight"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_estimate_linear_memory_errors(kwargs, error, match):
    """estimate_linear_memory checks its inputs and options as fused_linear_dpo_loss does."""
    from dpo_kernels import estimate_linear_memory

    hidden, weight, labels, b = _args()
    values = {"short": labels[:, :3], "wrongH": torch.randn(30, 5)}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    args = {"hidden": hidden, "weight": weight, "labels": labels, "bias": b}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(error, match=match):
        estimate_linear_memory(**args, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "no reference: pass ref_logps or ref_hidden"),
    (dict(ref_logps=torch.randn(4), ref_hidden="H"), ValueError, "either ref_logps or ref_hidden"),
    (dict(ref_hidden="H", reference_free=True), ValueError, "reference_free=True conflicts with ref_hidden"),
    (dict(ref_weight="W"), ValueError, "ref_weight given without ref_hidden"),
    (dict(ref_logps=torch.randn(4), ref_bias="B"), ValueError, "ref_bias given without ref_hidden"),
    (dict(ref_hidden="H_short"), ValueError, r"ref_hidden must be \[2B, T, H_ref\]"),
    (dict(ref_hidden="H", ref_weight="W_wrongV"), ValueError, "ref_weight has V = 29 rows"),
    (dict(ref_hidden="H", ref_weight="W_wrongH"), ValueError, r"ref_weight must be \[V, H\] with H = 8"),
    (dict(ref_hidden="H_bf16"), TypeError, r"weight \(the default ref_weight\) dtype"),
    (dict(ref_hidden="H", ref_weight="W", ref_bias="B_short"), ValueError, r"ref_bias must have shape \[V\]"),
    (dict(ref_logps=torch.randn(3)), ValueError, r"ref_logps must have shape \[2B\]"),
    (dict(ref_hidden=[1.0]), TypeError, "ref_hidden must be a torch.Tensor"),
    # Named hidden, not logits (the argument fused_linear_dpo_loss has).
    (dict(ref_logps=torch.randn(4, device="meta")), ValueError, "^ref_logps are on meta but hidden is on cpu$"),
])
def test_reference_errors(kwargs, error, match):
    hidden, weight, labels, b = _args()
    values = {"H": torch.randn_like(hidden), "H_short": torch.randn(4, 3, 8), "W": torch.randn_like(weight),
              "W_wrongV": torch.randn(29, 8), "W_wrongH": torch.randn(30, 5), "B": torch.randn(30),
              "B_short": torch.randn(7), "H_bf16": torch.randn_like(hidden).to(BF16)}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        fused_linear_dpo_loss(hidden, weight, labels, b, **kwargs)


@pytest.mark.parametrize("mode", ["auto", *MODES])
@pytest.mark.parametrize("reference", ["logps", "hidden"])
@pytest.mark.parametrize("bad", [30, -3])
def test_label_out_of_range_is_caught_before_the_matmul(monkeypatch, mode, reference, bad):
    """The label check rides on the one read of the valid-token counts, which precedes every
    matmul (the reference model's too)."""
    hidden, weight, labels, b = _args()
    hidden.requires_grad_(True)
    labels[1, 3] = bad
    rows = _count_matmul_rows(monkeypatch)
    ref = dict(ref_logps=torch.randn(4)) if reference == "logps" else dict(ref_hidden=torch.randn_like(hidden))
    with pytest.raises(ValueError, match=rf"labels\[1, 3\] .* = {bad} is outside \[0, V=30\)"):
        fused_linear_dpo_loss(hidden, weight, labels, b, mode=mode, **ref)
    assert rows["logits"] == []


@pytest.mark.parametrize("where", ["policy", "reference"])
def test_non_finite_logits_are_reported(where):
    hidden, weight, labels, b = _args()
    ref_hidden = torch.randn_like(hidden)
    target = hidden if where == "policy" else ref_hidden
    target[0, 3, 0] = float("inf")
    name = "hidden @ weight.T" if where == "policy" else r"ref_hidden @ ref_weight.T"
    with pytest.raises(ValueError, match=rf"{name}\[0, 3\] gives a non-finite log-probability"):
        fused_linear_dpo_loss(hidden, weight, labels, b, ref_hidden=ref_hidden)


def test_logits_past_the_fp64_lse_precision_are_reported():
    """As in ``test_api_errors``: a scored row of hidden @ weight.T whose lse is past 2^44 raises
    with validate=True, in every mode (one_pass and split check the same way)."""
    hidden, weight, labels, b = _args()
    hidden[1, 2] *= 1e15
    for mode in ("one_pass", "split", "two_phase"):
        with pytest.raises(ValueError, match=r"hidden @ weight.T\[1, 2\]: the row's log-sum-exp"):
            fused_linear_dpo_loss(hidden, weight, labels, b, ref_logps=torch.randn(4), mode=mode)


def test_device_mismatch_is_named():
    hidden, weight, labels, b = _args()
    meta_weight = torch.empty(weight.shape, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        fused_linear_dpo_loss(hidden, meta_weight, labels, b, ref_logps=torch.randn(4))


# --------------------------------------------------------------------------------------------
# The matmul primitives: fp32 results from half operands, in place, and the in-place scaling.


@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_fp32_into_views_against_float64(dtype, accumulate):
    """``out (+)= a @ b`` into a row block of a larger fp32 buffer (a view), a transposed operand
    (as the weight gradient's ``g.T``): fp32 accumulation, the rest of the buffer untouched."""
    a = torch.randn(37, 24).to(dtype)
    b = torch.randn(37, 19).to(dtype)
    parent = torch.randn(40, 19)
    start = parent.clone()
    out = parent[5:29]  # a view with an offset
    linear.mm_fp32_into(out, a.t(), b, accumulate)
    want = a.double().t() @ b.double() + (start[5:29].double() if accumulate else 0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(parent[:5], start[:5]) and torch.equal(parent[29:], start[29:])
    assert linear.fp32_mm_path(torch.device("cpu"), BF16) in ("dtype_out", "product", "upcast")


def test_fp32_mm_path_rejects_a_wrong_candidate(monkeypatch):
    """The probe checks the result: a path that runs but computes the wrong thing is never used."""
    original = linear._fp32_mm_candidates

    def broken(a, b, out, accumulate):
        paths = original(a, b, out, accumulate)
        paths["dtype_out"] = lambda: torch.mm(a.float(), b.float(), out=out)  # drops C: wrong when accumulating
        paths["product"] = lambda: out.zero_()
        return paths

    monkeypatch.setattr(linear, "_fp32_mm_candidates", broken)
    monkeypatch.setattr(linear, "_FP32_MM_PATH", {})
    assert linear.fp32_mm_path(torch.device("cpu"), BF16) == "upcast"


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_scale_in_place_rounds_once(dtype):
    buf = torch.randn(7, 5, 9).to(dtype)
    scale = torch.tensor(1 / 3)
    want = (buf.float() * scale).to(dtype)  # the fp32 product, rounded once
    got = linear._scale_(buf, scale)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, want)
    one = torch.randn(33).to(dtype)
    assert torch.equal(linear._scale_(one.clone(), torch.tensor(1.0)), one)


@pytest.mark.parametrize("mode", MODES)
def test_incoming_gradient_scales_every_gradient_in_bf16(mode, backend):
    """A loss scaled by 1/3 (gradient accumulation): each gradient is the scaled one, formed in fp32
    and rounded once (never a bf16-rounded scale), hidden, weight and bias. With the Triton backend
    one_pass scales on the device (``backends/triton/scale.py``)."""
    hidden, weight, b, labels = make_inputs(3, 8, 16, 70, BF16, bias=True, seed=3)
    ref = torch.randn(6) - 20
    _, plain = run(hidden, weight, labels, b, ref_logps=ref, mode=mode, backend=backend)
    h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    out = fused_linear_dpo_loss(h, w, labels, bb, ref_logps=ref, mode=mode, backend=backend)
    (out.loss / 3).backward()
    # Exact on every backend: under Triton's interpreter too, whose own fp32 -> bf16 cast would
    # truncate, the scale kernel rounds to nearest-even on the bits (_common.cast_rounded).
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref)
    for got, full, name, ulps in zip((h.grad, w.grad, bb.grad), plain, ("hidden", "weight", "bias"), (0, 0, 1)):
        if mode == "one_pass":
            # Formed in the forward, then scaled: exactly once more. hidden, weight: exactly the bf16
            # gradient times 1/3 rounded once; the bias is kept in fp32 until then, so `full`
            # (already rounded) may differ from it by one bf16 ulp.
            scaled = (full.float() / 3).to(BF16)
            assert ((got.float() - scaled.float()).abs() <= ulps * 2.0 ** -7 * scaled.float().abs()).all()
        else:  # two_phase, split: the scale enters the per-token coefficients before anything is
            # rounded
            assert _rel(got, want[f"grad_{name}"] / 3) < 2.0 ** -7


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
@pytest.mark.parametrize("mode", ["one_pass", "split"])
def test_one_pass_backward_reads_nothing_on_the_host_with_triton(grad_scale, mode):
    """one_pass's backward only scales the gradients formed in the forward; with the Triton
    backend the scale is applied (or, when 1, skipped) on the device: no host read of a device
    value (``aten._local_scalar_dense``: a synchronisation on a GPU) in the whole backward.
    split's weight-gradient slices take the scale into the coefficients, on the device too (a
    power of two: the same bits as scaling afterwards)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                self.reads.append(func)
            return func(*args, **(kwargs or {}))

    hidden, weight, b, labels = make_inputs(2, 6, 16, 90, bias=True, seed=5)
    ref = torch.randn(4) - 10
    _, plain = run(hidden, weight, labels, b, ref_logps=ref, mode=mode, backend="triton")
    h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    out = fused_linear_dpo_loss(h, w, labels, bb, ref_logps=ref, mode=mode, backend="triton")
    with HostReads() as reads:
        (out.loss * grad_scale).backward()
    assert reads.reads == []
    for got, want in zip((h.grad, w.grad, bb.grad), plain):
        torch.testing.assert_close(got, want * grad_scale, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["auto", "one_pass", "split"])
def test_nothing_stands_between_the_positions_and_the_first_matmul(mode, monkeypatch):
    """The one host sync sizes the gather of the valid positions (``nonzero_static``); on a GPU
    the device idles from that sync until the first matmul is queued, so only the position index
    and the hidden-row gather stand between them. The buffers and placeholders are made after the
    first matmul is queued (their launches overlap it). ``auto`` decides one_pass without a sync
    of its own when every pair fits one chunk and one_pass fits the free memory whatever the
    counts (faked here as on a GPU with room to spare)."""
    monkeypatch.setattr(linear, "available_bytes", lambda device, enough=None: 1 << 40)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    hidden, weight, _, labels = make_inputs(4, 12, 16, 90, seed=2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with Ops() as rec:
        fused_linear_dpo_loss(hidden, weight, labels, ref_logps=torch.randn(8) - 10, mode=mode, validate=False)
    aten = torch.ops.aten
    ops = rec.ops
    assert ops.count(aten.nonzero_static.default) == 1 and aten.nonzero.default not in ops
    start = ops.index(aten.nonzero_static.default)
    first_mm = next(i for i, op in enumerate(ops) if op in (aten.mm.default, aten.addmm.default))
    views = {aten.select.int, aten.slice.Tensor, aten.t.default, aten.view.default, aten.view.dtype,
             aten.detach.default}
    between = [op for op in ops[start + 1:first_mm] if op not in views]
    # one_pass: rows of the positions (pair order); the gather: flat row numbers, then whole rows
    # as 8-byte words. split takes the positions in row-major order as they come.
    gather = [aten.add.Tensor, aten.index_select.default]
    assert between == ([] if mode == "split" else [aten.index.Tensor]) + gather, between
    buffers = (aten.zeros_like.default, aten.empty_like.default, aten.where.self, aten.zeros.default, aten.empty.memory_format)
    assert not any(op in buffers for op in ops[start:first_mm])
    if mode != "split":
        assert aten.zeros_like.default in ops[first_mm:] and aten.empty_like.default in ops[first_mm:]  # the gradients


@pytest.mark.parametrize("mode", ["auto", *MODES])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("reference", ["logps", "hidden"])
def test_host_syncs_per_call(mode, validate, reference):
    """The host reads of one forward + backward: one before the matmuls (the valid tokens per
    sequence, shared by the reference's and the policy's gathers, auto's choice and one_pass's
    chunks; the label check rides on it), plus, with ``validate``, one after the policy's forward
    (non-finite results of the reference and the policy together). Nothing in the backward.
    ``chunk_tokens`` below the pairs' size makes auto read the counts for its choice (two_phase)."""
    from host_syncs import host_reads

    hidden, weight, b, labels = make_inputs(3, 10, 16, 90, bias=True, seed=4)
    h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    ref = (dict(ref_logps=torch.randn(6) - 10) if reference == "logps"
           else dict(ref_hidden=torch.randn_like(hidden)))
    chunk = dict(chunk_tokens=6) if mode == "auto" else {}
    with host_reads() as forward:
        out = fused_linear_dpo_loss(h, w, labels, bb, mode=mode, validate=validate, **ref, **chunk)
    with host_reads() as backward:
        out.loss.backward()
    assert len(forward) == (2 if validate else 1), forward
    # one_pass on the CPU backend reads the incoming gradient (a CPU tensor: nothing to wait for;
    # the Triton backend scales on the device, see the test above); split's coefficients take it
    # on the device. auto takes split here.
    assert backward == ([] if mode != "one_pass" else ["aten._local_scalar_dense.default"]), backward
    want = oracle.linear_dpo(hidden, weight, labels, b, **ref)
    torch.testing.assert_close(out.loss.detach().double(), want["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 9, 25, 1000])
def test_pair_positions_order_and_chunks(chunk_tokens):
    """Valid positions pair by pair (chosen sequence, then rejected, row-major inside each), whole
    pairs per chunk (at least one), empty pairs included; one sync, no sort."""
    P, T = 4, 11
    labels = torch.randint(0, 50, (2 * P, T))
    labels[torch.rand(2 * P, T) < 0.4] = IGNORE
    labels[1] = IGNORE
    labels[P + 1] = IGNORE  # pair 1 has no valid token
    rows, cols, bounds, largest = linear.pair_positions(labels, IGNORE, P, chunk_tokens)
    want = [(r, c) for p in range(P) for r in (p, P + p) for c in range(T) if labels[r, c] != IGNORE]
    assert list(zip(rows.tolist(), cols.tolist())) == want
    counts = [int((labels[p] != IGNORE).sum() + (labels[P + p] != IGNORE).sum()) for p in range(P)]
    assert largest == max(counts)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(want)
    edges = set(itertools.accumulate(counts, initial=0))
    for (s, e), (s2, _) in zip(bounds, bounds[1:] + [(len(want), None)]):
        assert e == s2 and s in edges and e in edges  # chunks cut only between pairs
        assert e - s <= chunk_tokens or sum(1 for x in edges if s < x < e) == 0  # over budget: one pair only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "narrow_h", "odd_h", "offset", "transposed", "packed"])
def test_row_gather_and_scatter_equal_advanced_indexing(dtype, layout):
    """The wide-word row gather/scatter moves exactly the rows advanced indexing does, whatever the
    layout: views that allow 8- or 4-byte words, views that do not (odd H, an odd storage offset),
    and rows that are not evenly spaced (then the plain index)."""
    g = torch.Generator().manual_seed(11)
    B, T, H = 3, 7, 12
    if layout == "contiguous":
        x = torch.randn(B, T, H, generator=g).to(dtype)
    elif layout == "narrow_h":  # rows evenly spaced, H narrower than the row stride
        x = torch.randn(B, T, H + 4, generator=g).to(dtype)[..., 2:H + 2]
    elif layout == "odd_h":
        x = torch.randn(B, T, 5, generator=g).to(dtype)
    elif layout == "offset":  # an odd element offset: no wide words
        x = torch.randn(B * T * H + 1, generator=g).to(dtype)[1:].view(B, T, H)
    elif layout == "transposed":  # rows not evenly spaced
        x = torch.randn(T, B, H, generator=g).to(dtype).transpose(0, 1)
    else:  # a packed batch [1, total, H]
        x = torch.randn(1, B * T, H, generator=g).to(dtype)
    mask = torch.rand(x.shape[:2], generator=g) > 0.4
    rows, cols = mask.nonzero(as_tuple=True)
    torch.testing.assert_close(linear.gather_rows(x, rows, cols), x[rows, cols], rtol=0, atol=0)
    dst = torch.randn(x.shape, generator=g).to(dtype)
    want = dst.clone()
    values = torch.randn(rows.numel(), x.shape[-1], generator=g).to(dtype)
    want[rows, cols] = values
    linear.scatter_rows_(dst, rows, cols, values)
    torch.testing.assert_close(dst, want, rtol=0, atol=0)
    if layout == "contiguous" and dtype != torch.float64:
        assert linear._row_words(x).dtype == torch.int64  # 12 bf16/fp32 values: whole 8-byte words


def _view_in_nan(values: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer, view)``: ``view`` equals ``values`` and is a non-contiguous view of ``buffer``,
    a NaN-filled leaf (so a read outside the view poisons the result) whose ``.grad`` holds the
    view's gradient. ``kind``: "rows" (every other row and column of a wider buffer), "transposed"
    (the storage of ``values.T``: the tied-embedding layout of a weight) or "strided" (every third
    element, from an offset)."""
    if kind == "transposed":
        buf = values.detach().t().contiguous().requires_grad_(True)
        return buf, buf.t()
    if kind == "strided":
        buf = torch.full((3 * values.numel() + 2,), float("nan"), dtype=values.dtype)
        buf[1:3 * values.numel() + 1:3] = values.reshape(-1)
        buf.requires_grad_(True)
        return buf, buf[1:3 * values.numel() + 1:3].view(values.shape)
    *lead, R, C = values.shape
    buf = torch.full((*lead, 2 * R + 1, 2 * C + 3), float("nan"), dtype=values.dtype)
    buf[..., 1::2, 3::2][..., :R, :C] = values
    buf.requires_grad_(True)
    return buf, buf[..., 1::2, 3::2][..., :R, :C]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode", ["one_pass", "split", "two_phase"])
def test_views_of_every_input(backend, dtype, mode):
    """hidden every other row and column of a NaN buffer, the weight the transpose of its storage
    (tied embeddings), the bias every third element of a NaN buffer, the labels a strided view:
    the loss and the gradients (read from the buffers, zero outside the views) are the float64
    oracle's, in every mode, with several token chunks and vocabulary slices, softcap and
    temperature (the fused backward matmul, where the backend takes it)."""
    hidden, weight, b, labels = make_inputs(2, 9, 24, 301, dtype, bias=True, seed=21)
    ref = torch.randn(4) - 8
    hbuf, h = _view_in_nan(hidden, "rows")
    wbuf, w = _view_in_nan(weight, "transposed")
    bbuf, bb = _view_in_nan(b, "strided")
    lbuf = torch.full((labels.shape[0], 2 * labels.shape[1]), 7)
    lbuf[:, ::2] = labels
    y = lbuf[:, ::2]
    assert not any(t.is_contiguous() for t in (h, w, bb, y))
    out = fused_linear_dpo_loss(h, w, y, bb, ref_logps=ref, mode=mode, backend=backend, chunk_tokens=5,
                                vocab_chunk=128, logit_softcap=6.0, temperature=0.8)
    out.loss.backward()
    grads = []
    for buf, view in ((hbuf, h), (wbuf, w), (bbuf, bb)):
        inside = torch.zeros_like(buf, dtype=torch.bool)
        inside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        assert torch.all(buf.grad[~inside] == 0)
        grads.append(buf.grad.as_strided(view.shape, view.stride(), view.storage_offset()))
    want = oracle.linear_dpo(hidden, weight, labels, b, ref_logps=ref, softcap=6.0, temperature=0.8)
    check(out, want, grads, dtype)


@pytest.mark.parametrize("trainable", [(True, False, False), (False, True, False), (False, False, True),
                                       (True, False, True), (False, True, True), (True, True, True)])
def test_split_serves_any_subset_of_trainable_inputs(trainable):
    """split with only some of hidden, weight and bias trainable (a frozen head, a frozen
    backbone, a trainable bias alone): the gradients asked for equal two_phase's, the others
    stay None."""
    hidden, weight, b, labels = make_inputs(2, 8, 16, 60, F32, bias=True, seed=3)
    ref = torch.randn(4) - 5
    grads = {}
    for mode in ("split", "two_phase"):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((hidden, weight, b), trainable)]
        out = fused_linear_dpo_loss(*leaves[:2], labels, leaves[2], ref_logps=ref, mode=mode, chunk_tokens=5,
                                    vocab_chunk=16)
        out.loss.backward()
        grads[mode] = [leaf.grad for leaf in leaves]
    for got, want, needed in zip(grads["split"], grads["two_phase"], trainable):
        assert (got is not None) == needed
        if needed:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", oracle.LABEL_DTYPE_CASES, ids=oracle.label_dtype_id)
@pytest.mark.parametrize("mode", ["one_pass", "split", "two_phase"])
def test_labels_of_every_integer_dtype(backend, case, mode):
    """As ``test_api``'s test of the same name, through the hidden-state path: the valid-token
    gathers, the lengths and the backward's shifted slice labels read the values as int64, so a
    wrapped ignore_index drops no token and every backend (the reference's gathers, the fused
    backward matmul) takes the narrow dtypes. Several chunks and slices, with the shift."""
    _, ignore_index, V, _ = case
    labels, wide = oracle.labels_of_dtype(case, 4, 7)
    hidden, weight, b, _ = make_inputs(2, 7, 16, V, bias=True, seed=4)
    ref = torch.randn(4) - 20
    kwargs = dict(ref_logps=ref, shift=True, average_log_prob=True, ignore_index=ignore_index)
    out, grads = run(hidden, weight, labels, b, mode=mode, backend=backend, chunk_tokens=5, vocab_chunk=48, **kwargs)
    check(out, oracle.linear_dpo(hidden, weight, wide, b, **oracle_kwargs(kwargs)), grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["one_pass", "split", "two_phase"])
def test_logits_with_a_large_common_offset_lose_no_precision(backend, mode):
    """A bias of 1e5 (every logit of every row shifted by it) gives the oracle's loss, log-probs,
    metrics and gradients, in every mode: the forward's lse is kept in fp64 and the backward's
    softmax, also the fused matmul's (``logits_grad_matmul``), forms ``exp((z - hi) - lo)``. The
    inputs are small multiples of powers of two, so the fp32 lm_head computes its logits exactly
    and the float64 oracle sees the same values; one fp32 lse would be off by up to 4e-3 there."""
    hidden, weight, b, labels = make_inputs(2, 6, 16, 300, bias=True)
    hidden = hidden.mul(2).round()  # integers in about [-6, 6]
    weight = weight.mul(16).round().div(16)  # multiples of 1/16: hidden @ weight.T in multiples of 1/16
    b = b.mul(16).round().div(16) + 1e5  # 1e5 + k/16 is exact in fp32 (its ulp there is 1/128)
    compare(hidden, weight, labels, b, ref_logps=torch.randn(4), token_metrics=True, use_weighting=True,
            mode=mode, backend=backend, chunk_tokens=5, vocab_chunk=128)


@pytest.mark.parametrize("mode", ["auto", *MODES])
@pytest.mark.parametrize("grad_mode_inside", [False, True])
def test_inference_mode_gives_the_loss_without_a_graph(backend, mode, grad_mode_inside):
    """Under torch.inference_mode the loss equals the one with gradients, bit for bit, and carries
    no graph, as a torch op's result would not (also with torch.enable_grad() nested inside it,
    where autograd still records nothing). split built its loss's graph anyway, and on Triton the
    one-kernel sigmoid loss then failed to save inference tensors for backward; with grad mode on
    inside, one_pass and auto raised and split's backward did."""
    hidden, weight, _, labels = make_inputs(2, 6, 16, 50, seed=5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ref = torch.randn(4) - 10
    want = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, mode=mode, backend=backend)
    with torch.inference_mode():
        if grad_mode_inside:
            with torch.enable_grad():
                got = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, mode=mode, backend=backend)
        else:
            got = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, mode=mode, backend=backend)
    assert not got.loss.requires_grad and not got.chosen_logps.requires_grad
    assert torch.equal(got.loss, want.loss.detach())
    assert torch.equal(got.chosen_logps, want.chosen_logps.detach())
