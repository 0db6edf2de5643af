"""fused_kto_loss (KTO, APO-zero unpaired, BCO) against float64 formulas, and parity with TRL's KTOTrainer.

The oracle below is written from TRL's definitions (trl/trainer/kto_trainer.py, TRL 1.16):
    r_i = sum_t logp_pi(y_it) - sum_t logp_ref(y_it)          (summed completion log-probs)
    z0  = max(0, mean_k [pi(y'_k) - ref(y'_k)])                 (KL on mismatched completions, detached)
    kto:   desirable  w_d * (1 - sigmoid(beta (r - z0)));  undesirable  w_u * (1 - sigmoid(beta (z0 - r)))
    apo_zero_unpaired: w_d * (1 - sigmoid(beta r));  w_u * sigmoid(beta r)
    bco:   -log sigmoid(beta r - delta);  -log sigmoid(delta - beta r), delta = mean of all rewards so far
    loss = mean over the batch.
It shares only the float64 per-token helper of ``oracle.py`` (itself independent of the package).
"""
import copy
import math

import numpy as np
import pytest
import torch

import oracle
from dpo_kernels import BCORunningMean, KTOOutput, fused_kto_loss
from oracle import IGNORE, assert_close_grad, assert_close_values, make_batch

NAN = float("nan")


# --------------------------------------------------------------------------------------------
# float64 oracle, per sequence, from the formulas above


def seq_logps64(logits, labels, shift):
    y = oracle.aligned(labels, shift)
    logp, _ = oracle.token_logprobs(logits.double() if not logits.requires_grad else logits, y)
    return logp.sum(-1)


def kto_oracle(logits, labels, desirable, *, ref_seq, kl_raw=None, beta=0.1, wd=1.0, wu=1.0,
               loss_type="kto", shift=False, delta=None, vocab_stats=True):
    z = logits.detach().double().requires_grad_(True)
    seq = seq_logps64(z, labels, shift)
    r = seq - ref_seq.double()
    kl = max(kl_raw, 0.0) if kl_raw is not None else 0.0
    terms = []
    for i, d in enumerate(desirable.tolist()):
        if loss_type == "kto":
            t = wd * (1 - torch.sigmoid(beta * (r[i] - kl))) if d else wu * (1 - torch.sigmoid(beta * (kl - r[i])))
        elif loss_type == "apo_zero_unpaired":
            t = wd * (1 - torch.sigmoid(beta * r[i])) if d else wu * torch.sigmoid(beta * r[i])
        else:
            x = beta * r[i] - delta
            t = -torch.log(torch.sigmoid(x)) if d else -torch.log(torch.sigmoid(-x))
        terms.append(t)
    loss = torch.stack(terms).mean()
    loss.backward()

    rewards = beta * r.detach()
    d = desirable.bool()
    y = oracle.aligned(labels, shift)
    scored = (y != IGNORE).double()
    zd = logits.double()
    p = torch.softmax(zd, -1)
    ent_tok = (torch.logsumexp(zd, -1) - (p * zd).sum(-1)) * scored
    vmean = zd.mean(-1) * scored

    def mean_or_nan(x, m):
        return x[m].mean() if m.any() else torch.tensor(NAN, dtype=torch.float64)

    def tok_mean_or_nan(m):
        n = scored[m].sum()
        return vmean[m].sum() / n if n > 0 else torch.tensor(NAN, dtype=torch.float64)

    metrics = {
        "logits/chosen": tok_mean_or_nan(d),
        "logits/rejected": tok_mean_or_nan(~d),
        "rewards/chosen": mean_or_nan(rewards, d),
        "logps/chosen": mean_or_nan(seq.detach(), d),
        "rewards/rejected": mean_or_nan(rewards, ~d),
        "logps/rejected": mean_or_nan(seq.detach(), ~d),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["entropy"] = ent_tok.sum() / scored.sum() if scored.sum() > 0 else torch.tensor(0.0, dtype=torch.float64)
    if loss_type != "bco":
        metrics["kl"] = torch.tensor(kl, dtype=torch.float64)
    else:
        metrics["delta"] = torch.tensor(delta, dtype=torch.float64)
    return dict(loss=loss.detach(), logps=seq.detach(), rewards=rewards, kl=kl, metrics=metrics, grad=z.grad)


def check(out: KTOOutput, want, grad, dtype, backend):
    assert isinstance(out, KTOOutput)
    assert_close_values(out.loss, want["loss"], dtype, "loss")
    assert_close_values(out.logps, want["logps"], dtype, "logps")
    assert_close_values(out.rewards, want["rewards"], dtype, "rewards")
    assert_close_values(out.kl, torch.tensor(want["kl"], dtype=torch.float64), dtype, "kl")
    expected = dict(want["metrics"])
    if backend == "cpu" and "entropy" not in out.metrics:
        expected.pop("entropy")  # the C++ backend may not compute the entropy extra yet
    assert set(out.metrics) == set(expected)
    # The logged metrics are fp32, fp64 with fp64 logits (they were fp32 there too), as fused_dpo_loss's.
    for name, value in expected.items():
        got = out.metrics[name]
        assert got.dim() == 0 and not got.requires_grad, name
        assert got.dtype == torch.promote_types(dtype, torch.float32), name
        if math.isnan(value.item()):
            assert torch.isnan(got), name
        else:
            assert_close_values(got, value, dtype, name)
    assert grad.dtype == dtype
    assert_close_grad(grad, want["grad"], dtype)
    d = out.desirable
    torch.testing.assert_close(out.chosen_logps, out.logps[d])
    torch.testing.assert_close(out.rejected_rewards, out.rewards[~d])


def run(logits, labels, desirable, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fused_kto_loss(leaf, labels, desirable, **kwargs)
    out.loss.backward()
    return out, leaf.grad


def unpaired_batch(B, T, V, dtype, *, kl_T=None):
    """B completions (odd B allowed) and K=B mismatched KL completions, prompt and padding ignored."""
    logits, labels = make_batch((B + 1) // 2, T, V, dtype)
    logits, labels = logits[:B].contiguous(), labels[:B].contiguous()
    kl_logits, kl_labels = make_batch((B + 1) // 2, kl_T or T, V, dtype, prompt=1)
    return logits, labels, kl_logits[:B].contiguous(), kl_labels[:B].contiguous()


# --------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("case", [c for c in oracle.LABEL_DTYPE_CASES if c[1] == IGNORE], ids=oracle.label_dtype_id)
def test_labels_of_every_integer_dtype(backend, case):
    """uint8 labels (which hold no -100: every token scored, 156 included) and int16 labels
    (which hold it) for the completions and the KL completions, shifted: the float64 oracle
    reads the same values as int64."""
    _, _, V, _ = case
    labels, wide = oracle.labels_of_dtype(case, 3, 6)
    kl_labels, kl_wide = oracle.labels_of_dtype(case, 3, 5, seed=1)
    logits, kl_logits = torch.randn(3, 6, V) * 3, torch.randn(3, 5, V) * 3
    desirable = torch.tensor([True, False, True])
    ref = torch.randn(3) + seq_logps64(logits, wide, True).float()
    kl_pol = seq_logps64(kl_logits, kl_wide, True)
    ref_kl = (kl_pol - 2.0 + 0.3 * torch.randn(3, dtype=torch.float64)).float()
    kl_raw = (kl_pol - ref_kl.double()).mean().item()
    out, grad = run(logits, labels, desirable, ref_logps=ref, kl_logits=kl_logits, kl_labels=kl_labels,
                    ref_kl_logps=ref_kl, backend=backend, shift=True)
    check(out, kto_oracle(logits, wide, desirable, ref_seq=ref, kl_raw=kl_raw, shift=True), grad, torch.float32,
          backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift,kl_state", [(False, "active"), (True, "clamped"), (True, "active")])
def test_kto_matches_oracle(backend, small_block, dtype, shift, kl_state):
    B, V = 5, 260
    logits, labels, kl_logits, kl_labels = unpaired_batch(B, 5, V, dtype, kl_T=4)
    desirable = torch.tensor([True, False, False, True, False])
    ref = torch.randn(B) * 3 + seq_logps64(logits, labels, shift).float()
    kl_pol = seq_logps64(kl_logits, kl_labels, shift)
    offset = 2.5 if kl_state == "active" else -2.5
    ref_kl = (kl_pol - offset + 0.3 * torch.randn(B, dtype=torch.float64)).float()
    kl_raw = (kl_pol - ref_kl.double()).mean().item()
    assert (kl_raw > 1.0) if kl_state == "active" else (kl_raw < -1.0)

    kwargs = dict(beta=0.7, desirable_weight=1.5, undesirable_weight=0.6, shift=shift)
    out, grad = run(logits, labels, desirable, ref_logps=ref, kl_logits=kl_logits, kl_labels=kl_labels,
                    ref_kl_logps=ref_kl, backend=backend, **kwargs)
    want = kto_oracle(logits, labels, desirable, ref_seq=ref, kl_raw=kl_raw, beta=0.7, wd=1.5, wu=0.6, shift=shift)
    check(out, want, grad, dtype, backend)
    assert (out.kl > 1.0) if kl_state == "active" else (out.kl == 0)


@pytest.mark.parametrize("kl_form", ["logps", "logits"])
def test_float64_keeps_the_kl_in_float64(backend, kl_form):
    """fp64 logits: the KL estimate, and the loss through it, stay fp64 (they were rounded to fp32:
    2e-5 off the loss at summed KL log-probs of -3e4)."""
    B, V = 4, 90
    logits, labels, kl_logits, kl_labels = unpaired_batch(B, 5, V, torch.float64)
    desirable = torch.tensor([True, False, True, False])
    ref = torch.randn(B, dtype=torch.float64) * 3 + seq_logps64(logits, labels, False)
    kl_pol = seq_logps64(kl_logits, kl_labels, False)
    if kl_form == "logps":
        # Long KL completions: summed log-probs near -3e4, their difference 0.2 + 1e-9-scale detail.
        kl_pol = kl_pol - 30000.0
        kw = dict(kl_logps=kl_pol)
    else:
        kw = dict(kl_logits=kl_logits, kl_labels=kl_labels)
    ref_kl = kl_pol - 0.2 - 1e-6 * torch.arange(B, dtype=torch.float64)
    kl_raw = (kl_pol - ref_kl).mean().item()
    out, grad = run(logits, labels, desirable, ref_logps=ref, ref_kl_logps=ref_kl, beta=1.0, backend=backend, **kw)
    assert out.loss.dtype == out.kl.dtype == torch.float64
    check(out, kto_oracle(logits, labels, desirable, ref_seq=ref, kl_raw=kl_raw, beta=1.0), grad, torch.float64,
          backend)


@pytest.mark.parametrize("composition", ["all_desirable", "all_undesirable"])
def test_single_class_batches(backend, composition):
    logits, labels, kl_logits, kl_labels = unpaired_batch(4, 4, 120, torch.float32)
    desirable = torch.full((4,), composition == "all_desirable")
    ref_logits = torch.randn_like(logits) * 3
    ref_kl_logits = torch.randn_like(kl_logits) * 3
    kl_raw = (seq_logps64(kl_logits, kl_labels, True) - seq_logps64(ref_kl_logits, kl_labels, True)).mean().item()
    out, grad = run(logits, labels, desirable, ref_logits=ref_logits, kl_logits=kl_logits, kl_labels=kl_labels,
                    ref_kl_logits=ref_kl_logits, shift=True, backend=backend, beta=0.3)
    want = kto_oracle(logits, labels, desirable, ref_seq=seq_logps64(ref_logits, labels, True), kl_raw=kl_raw,
                      beta=0.3, shift=True)
    check(out, want, grad, torch.float32, backend)
    missing = "rejected" if composition == "all_desirable" else "chosen"
    for name in (f"rewards/{missing}", f"logps/{missing}", f"logits/{missing}", "rewards/margins"):
        assert torch.isnan(out.metrics[name]), name  # TRL logs nothing for an absent class
    assert out.chosen_logps.numel() == (4 if composition == "all_desirable" else 0)


def test_apo_zero_unpaired_matches_oracle(backend, small_block):
    logits, labels, _, _ = unpaired_batch(5, 4, 300, torch.bfloat16)
    desirable = torch.tensor([False, True, True, False, True])
    ref_logits = (torch.randn(5, 4, 300) * 3).to(torch.bfloat16)
    out, grad = run(logits, labels, desirable, ref_logits=ref_logits, loss_type="apo_zero_unpaired", beta=0.2,
                    desirable_weight=0.8, undesirable_weight=1.7, backend=backend)
    want = kto_oracle(logits, labels, desirable, ref_seq=seq_logps64(ref_logits, labels, False),
                      loss_type="apo_zero_unpaired", beta=0.2, wd=0.8, wu=1.7)
    check(out, want, grad, torch.bfloat16, backend)
    assert out.kl == 0


def test_bco_running_delta_over_steps(backend):
    """delta is the count-weighted mean of every reward seen so far, this batch included."""
    running = BCORunningMean()
    seen = []
    for step in range(2):
        logits, labels, _, _ = unpaired_batch(4, 4, 100, torch.float32)
        desirable = torch.tensor([True, False, step == 0, True])
        ref = torch.randn(4) * 2 - 12
        seq = seq_logps64(logits, labels, True)
        seen.append(0.4 * (seq - ref.double()))
        delta = torch.cat(seen).mean().item()
        out, grad = run(logits, labels, desirable, ref_logps=ref, loss_type="bco", bco_running_mean=running,
                        beta=0.4, shift=True, backend=backend)
        want = kto_oracle(logits, labels, desirable, ref_seq=ref, loss_type="bco", beta=0.4, shift=True, delta=delta)
        check(out, want, grad, torch.float32, backend)
    assert running.count == pytest.approx(8.0)
    # Evaluation (TRL's do_train=False): delta is used as it is, not updated.
    before = running.mean.clone()
    out, _ = run(logits, labels, desirable, ref_logps=ref, loss_type="bco", bco_running_mean=running,
                 bco_update=False, beta=0.4, shift=True, backend=backend)
    assert torch.equal(running.mean, before) and running.count == pytest.approx(8.0)
    torch.testing.assert_close(out.metrics["delta"], before.float())
    state = running.state_dict()
    restored = BCORunningMean()
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_logps_and_logits_forms_agree(backend):
    """ref_logps vs ref_logits and kl_logps vs kl_logits give the same loss (and both the oracle's)."""
    logits, labels, kl_logits, kl_labels = unpaired_batch(4, 4, 90, torch.float32)
    desirable = torch.tensor([True, False, True, False])
    ref_logits = logits.detach() + torch.randn_like(logits)
    ref_kl_logits = kl_logits * 2.0  # sharper reference: mismatched completions get lower ref log-probs
    as_logits, g1 = run(logits, labels, desirable, ref_logits=ref_logits, kl_logits=kl_logits, kl_labels=kl_labels,
                        ref_kl_logits=ref_kl_logits, backend=backend)
    ref_seq = seq_logps64(ref_logits, labels, False)
    kl_pol, kl_ref = seq_logps64(kl_logits, kl_labels, False), seq_logps64(ref_kl_logits, kl_labels, False)
    as_logps, g2 = run(logits, labels, desirable, ref_logps=ref_seq.float(), kl_logps=kl_pol.float(),
                       ref_kl_logps=kl_ref.float(), backend=backend)
    want = kto_oracle(logits, labels, desirable, ref_seq=ref_seq, kl_raw=(kl_pol - kl_ref).mean().item())
    assert want["kl"] > 0
    check(as_logits, want, g1, torch.float32, backend)
    check(as_logps, want, g2, torch.float32, backend)


def test_inplace_backward_and_no_grad_to_reference(backend, small_block):
    logits, labels, kl_logits, kl_labels = unpaired_batch(3, 5, 400, torch.bfloat16)
    desirable = torch.tensor([True, False, True])
    kl_leaf = kl_logits.clone().requires_grad_(True)  # scored without gradient, as TRL does
    ref = torch.randn(3) - 30
    ref_kl = (seq_logps64(kl_logits, kl_labels, True) - 3 + torch.randn(3, dtype=torch.float64)).float()
    out, grad = run(logits, labels, desirable, ref_logps=ref, kl_logits=kl_leaf, kl_labels=kl_labels,
                    ref_kl_logps=ref_kl, shift=True, inplace_backward=True, backend=backend)
    assert kl_leaf.grad is None and torch.equal(kl_leaf.detach(), kl_logits)
    kl_raw = (seq_logps64(kl_logits, kl_labels, True) - ref_kl.double()).mean().item()
    assert kl_raw > 1.0
    want = kto_oracle(logits, labels, desirable, ref_seq=ref, kl_raw=kl_raw, shift=True)
    check(out, want, grad, torch.bfloat16, backend)


def test_entropy_option(backend):
    logits, labels, _, _ = unpaired_batch(3, 5, 80, torch.float32)
    desirable = torch.tensor([True, False, True])
    kwargs = dict(ref_logps=torch.randn(3), loss_type="apo_zero_unpaired", backend=backend)
    assert "entropy" not in fused_kto_loss(logits, labels, desirable, entropy=False, **kwargs).metrics
    if backend == "cpu":
        try:
            out = fused_kto_loss(logits, labels, desirable, entropy=True, **kwargs)
        except NotImplementedError as exc:
            assert "entropy=True" in str(exc)
            return
    else:
        out = fused_kto_loss(logits, labels, desirable, entropy=True, **kwargs)
    want = kto_oracle(logits, labels, desirable, ref_seq=kwargs["ref_logps"], loss_type="apo_zero_unpaired")
    assert_close_values(out.metrics["entropy"], want["metrics"]["entropy"], torch.float32, "entropy")


def test_desirable_as_list_and_sequences_without_completion(backend):
    logits, labels, _, _ = unpaired_batch(3, 4, 60, torch.float32)
    labels[1] = IGNORE  # nothing to score in one sequence
    ref = torch.randn(3)
    out, grad = run(logits, labels, [True, True, False], ref_logps=ref, loss_type="apo_zero_unpaired",
                    backend=backend)
    want = kto_oracle(logits, labels, torch.tensor([True, True, False]), ref_seq=ref, loss_type="apo_zero_unpaired")
    check(out, want, grad, torch.float32, backend)
    assert (grad[1] == 0).all()
    # NumPy's bools (a label column that went through NumPy or pandas) read as Python's
    out_np, _ = run(logits, labels, list(np.array([True, True, False])), ref_logps=ref,
                    loss_type="apo_zero_unpaired", backend=backend)
    assert torch.equal(out_np.loss, out.loss)


# --------------------------------------------------------------------------------------------
# errors: each names the argument at fault


def _good():
    logits, labels, kl_logits, kl_labels = unpaired_batch(3, 4, 32, torch.float32)
    return dict(logits=logits, labels=labels, desirable=torch.tensor([True, False, True]), kl_logits=kl_logits,
                kl_labels=kl_labels, ref_logps=torch.randn(3), ref_kl_logps=torch.randn(3))


def _call(kw):
    kw = dict(kw)
    return fused_kto_loss(kw.pop("logits"), kw.pop("labels"), kw.pop("desirable"), **kw)


ERROR_CASES = [
    ("loss_type", dict(loss_type="sigmoid"), ValueError, r"loss_type must be one of \('kto', 'apo_zero_unpaired', 'bco'\), got 'sigmoid'"),
    ("beta0", dict(beta=0.0), ValueError, r"beta must be a finite number > 0, got 0.0"),
    ("beta_nan", dict(beta=NAN), ValueError, r"beta must be a finite number > 0"),
    ("beta_bool", dict(beta=True), ValueError, r"beta must be a finite number > 0"),
    ("dw_neg", dict(desirable_weight=-1.0), ValueError, r"desirable_weight must be a finite number >= 0, got -1.0"),
    ("uw_inf", dict(undesirable_weight=math.inf), ValueError, r"undesirable_weight must be a finite number >= 0"),
    ("desirable_int", dict(desirable=torch.tensor([1, 0, 1])), TypeError, r"desirable must be a bool tensor \[B\].*torch.int64"),
    ("desirable_shape", dict(desirable=torch.tensor([True, False])), ValueError, r"desirable must have shape \[B\] = \(3,\), got \(2,\)"),
    ("desirable_type", dict(desirable="yes"), TypeError, r"desirable must be a bool tensor \[B\] or a list of bools"),
    ("desirable_ints", dict(desirable=[True, 0, True]), TypeError,
     r"desirable must be a bool tensor \[B\] or a list of bools; desirable\[1\] is 0 \(int\)"),
    ("logits_2d", dict(logits=torch.randn(3, 32)), ValueError, r"logits must be \[B, T, V\]"),
    ("logits_int", dict(logits=torch.ones(3, 4, 32, dtype=torch.int64)), TypeError, r"logits must be a floating tensor"),
    ("logits_list", dict(logits=[[1.0]]), TypeError, r"logits must be a torch.Tensor"),
    ("labels_float", dict(labels=torch.zeros(3, 4)), TypeError, r"labels must be an integer tensor"),
    ("labels_shape", dict(labels=torch.zeros(3, 3, dtype=torch.long)), ValueError, r"labels shape \(3, 3\) does not match logits shape \(3, 4, 32\)"),
    ("empty_batch", dict(logits=torch.randn(0, 4, 32), labels=torch.zeros(0, 4, dtype=torch.long), desirable=torch.zeros(0, dtype=torch.bool)), ValueError, r"logits has an empty batch"),
    ("ignore_index", dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
    ("no_ref", dict(ref_logps=None), ValueError, r"no reference: pass ref_logps or ref_logits"),
    ("both_ref", dict(ref_logits=torch.randn(3, 4, 32)), ValueError, r"pass either ref_logps or ref_logits, not both"),
    ("ref_logps_shape", dict(ref_logps=torch.randn(4)), ValueError, r"ref_logps must have shape \(3,\), got \(4,\)"),
    ("ref_logps_int", dict(ref_logps=torch.ones(3, dtype=torch.long)), TypeError, r"ref_logps must be floating"),
    ("ref_logits_shape", dict(ref_logps=None, ref_logits=torch.randn(3, 4, 31)), ValueError, r"ref_logits shape \(3, 4, 31\) must equal logits shape \(3, 4, 32\)"),
    ("no_kl", dict(kl_logits=None, kl_labels=None), ValueError, r"no KL estimate for loss_type='kto': pass kl_logps or kl_logits"),
    ("no_ref_kl", dict(ref_kl_logps=None), ValueError, r"no reference KL estimate for loss_type='kto': pass ref_kl_logps or ref_kl_logits"),
    ("both_kl", dict(kl_logps=torch.randn(3)), ValueError, r"pass either kl_logps or kl_logits, not both"),
    ("kl_labels_missing", dict(kl_labels=None), ValueError, r"kl_labels \[K, T'\] are needed to score kl_logits / ref_kl_logits"),
    ("kl_labels_unused", dict(kl_logits=None, kl_logps=torch.randn(3)), ValueError, r"kl_labels given without kl_logits or ref_kl_logits"),
    ("kl_vocab", dict(kl_logits=torch.randn(3, 4, 33)), ValueError, r"kl_logits vocabulary V=33 differs from logits V=32"),
    ("kl_labels_shape", dict(kl_labels=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"kl_labels shape \(3, 2\) does not match kl_logits shape"),
    ("ref_kl_shape", dict(ref_kl_logps=torch.randn(5)), ValueError, r"ref_kl_logps must have shape \(3,\), got \(5,\)"),
    ("ref_kl_logits_shape", dict(ref_kl_logps=None, ref_kl_logits=torch.randn(3, 5, 32)), ValueError, r"ref_kl_logits shape \(3, 5, 32\) must equal kl_logits shape \(3, 4, 32\)"),
    ("kl_logps_2d", dict(kl_logits=None, kl_labels=None, kl_logps=torch.randn(3, 1)), ValueError, r"kl_logps must be a non-empty 1-D tensor \[K\]"),
    ("kl_for_apo", dict(loss_type="apo_zero_unpaired"), ValueError, r"kl_logits, kl_labels, ref_kl_logps do\(es\) not apply to loss_type='apo_zero_unpaired'"),
    ("bco_without_state", dict(loss_type="bco", kl_logits=None, kl_labels=None, ref_kl_logps=None), ValueError, r"loss_type='bco' needs bco_running_mean=BCORunningMean\(\)"),
    ("bco_weights", dict(loss_type="bco", desirable_weight=2.0, bco_running_mean=BCORunningMean()), ValueError, r"desirable_weight=2.0 does not apply to loss_type='bco'"),
    ("state_for_kto", dict(bco_running_mean=BCORunningMean()), ValueError, r"bco_running_mean does not apply to loss_type='kto'"),
    ("bco_update", dict(bco_update=1), TypeError, r"bco_update must be a bool"),
    ("entropy", dict(entropy="yes"), TypeError, r"entropy must be None, True or False"),
    ("backend", dict(backend="cuda"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("name,change,exc,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_argument(name, change, exc, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(exc, match=match):
        _call(kw)


def test_overlapping_logits_with_inplace_backward():
    kw = _good()
    kw["logits"] = torch.randn(1, 1, 32).expand(3, 4, 32).requires_grad_(True)
    with pytest.raises(ValueError, match=r"inplace_backward=True needs logits whose elements do not overlap"):
        _call(dict(kw, inplace_backward=True))


@pytest.mark.parametrize("where", ["logits", "kl_logits", "ref_kl_logits"])
def test_bad_labels_and_non_finite_logits(backend, where):
    kw = _good()
    if where == "ref_kl_logits":
        kw.update(ref_kl_logps=None, ref_kl_logits=kw["kl_logits"].clone())
    kw[where] = kw[where].clone()
    kw[where][0, 3, :] = NAN
    labels_name = "labels" if where == "logits" else "kl_labels"
    kw[labels_name][0, 3] = 5
    with pytest.raises(ValueError, match=rf"^{where}\[0, 3\] gives a non-finite log-probability"):
        _call(dict(kw, backend=backend))
    kw[where][0, 3, :] = 0.5
    kw[labels_name] = kw[labels_name].clone()
    kw[labels_name][1, 2] = 32
    with pytest.raises(ValueError, match=rf"^{labels_name}\[1, 2\] \(as aligned with the logits rows\) = 32 is outside \[0, V=32\)"):
        _call(dict(kw, backend=backend))


@pytest.mark.parametrize("name", ["ref_logps", "kl_logps", "ref_kl_logps"])
def test_non_finite_given_logps_raise_when_validated(backend, name):
    """A precomputed log-prob that is not finite is named (as a bad logit is); with validate=False it
    reaches the loss."""
    kw = _good()
    if name == "kl_logps":
        kw.update(kl_logits=None, kl_labels=None, kl_logps=torch.randn(3))
    kw[name] = kw[name].clone()
    kw[name][1] = NAN
    with pytest.raises(ValueError, match=rf"^{name}\[1\] = nan is not finite"):
        _call(dict(kw, backend=backend))
    assert not torch.isfinite(_call(dict(kw, backend=backend, validate=False)).loss)


@pytest.mark.parametrize("validate", [True, False])
def test_validation_is_one_host_read(backend, validate):
    """Policy, reference, KL and reference-KL logits: their token results are validated together,
    one host read (a GPU synchronisation); none without validation."""
    from host_syncs import host_reads

    kw = _good()
    kw.update(ref_logps=None, ref_logits=torch.randn_like(kw["logits"]), ref_kl_logps=None,
              ref_kl_logits=torch.randn_like(kw["kl_logits"]), backend=backend, validate=validate)
    with host_reads() as reads:
        out = _call(kw)
    assert len(reads) == (1 if validate else 0), reads
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------
# parity with TRL's KTOTrainer on a tiny Llama (fp32, CPU, one batch)


def _tiny_trainer(tmp_path, loss_type, ref_kind):
    pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    datasets = pytest.importorskip("datasets")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import KTOConfig, KTOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        if ref_kind == "sharper":  # mismatched completions lose log-prob under the reference: KL > 0
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        else:  # a uniform reference: E[log pi] <= -log V on mismatched completions, so the KL clamps at 0
            ref.lm_head.weight.zero_()
    g = torch.Generator().manual_seed(7)

    def words_(n):
        return " ".join(f"w{i}" for i in torch.randint(0, 61, (n,), generator=g).tolist())

    rows = [dict(prompt=words_(3 + i % 3) + " ", completion=words_(2 + (2 * i) % 5), label=label)
            for i, label in enumerate([True, False, False, True])]
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, bf16=False, use_cpu=True, report_to=[],
                     beta=0.3, desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type,
                     gradient_checkpointing=False, dataset_num_proc=None)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    return trainer, ref


@pytest.mark.parametrize("loss_type,ref_kind", [("kto", "sharper"), ("kto", "uniform"), ("apo_zero_unpaired", "sharper")])
def test_parity_with_trl_kto_trainer(tmp_path, loss_type, ref_kind):
    trainer, ref = _tiny_trainer(tmp_path, loss_type, ref_kind)
    model = trainer.model
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(model, batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    params = [p for p in model.parameters() if p.requires_grad]
    trl_grads = torch.autograd.grad(trl_loss, params)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kwargs = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type, shift=True)
    with torch.no_grad():
        kwargs["ref_logits"] = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if loss_type == "kto":
            kwargs["kl_labels"] = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, IGNORE)
            kl_inputs = dict(input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"])
            kwargs["kl_logits"] = model(**kl_inputs).logits
            kwargs["ref_kl_logits"] = ref(**kl_inputs).logits
    if loss_type == "kto":
        assert (trl_metrics["kl"] > 0.1) if ref_kind == "sharper" else (trl_metrics["kl"] == 0.0)

    for backend in ("reference", "auto"):
        out = fused_kto_loss(logits, labels, batch["label"].bool(), backend=backend, **kwargs)
        torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
        expected = set(trl_metrics) - ({"entropy"} if backend == "auto" and "entropy" not in out.metrics else set())
        assert set(out.metrics) == expected
        for name in expected:
            torch.testing.assert_close(out.metrics[name].item(), trl_metrics[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        grads = torch.autograd.grad(out.loss, params, retain_graph=True)
        for ours, theirs in zip(grads, trl_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item() + 1e-9)


@pytest.mark.parametrize("shift", [False, True])
def test_completions_of_no_tokens(backend, shift):
    """T = 0, shifted or not: log-probs 0 and the oracle's loss of the reference alone."""
    logits = torch.randn(3, 0, 40)
    labels = torch.zeros(3, 0, dtype=torch.long)
    desirable = torch.tensor([True, False, True])
    ref = torch.randn(3)
    out, grad = run(logits, labels, desirable, ref_logps=ref, kl_logps=torch.zeros(3), ref_kl_logps=torch.zeros(3),
                    backend=backend, shift=shift)
    want = kto_oracle(logits, labels, desirable, ref_seq=ref, kl_raw=0.0, shift=shift)
    assert_close_values(out.loss, want["loss"], torch.float32, "loss")
    assert torch.equal(out.logps, torch.zeros(3)) and grad.shape == logits.shape
