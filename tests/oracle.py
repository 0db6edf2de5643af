"""Float64 PyTorch oracles, written from the formulas, independent of the code under test."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def make_batch(pairs, T, V, dtype, *, prompt=2, device="cpu", pad_last=True, scale=3.0):
    """Random logits ``[2P, T, V]`` (never zeros) and labels with a prompt and some padding."""
    logits = (torch.randn(2 * pairs, T, V, dtype=torch.float32, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, (2 * pairs, T), device=device)
    labels[:, :prompt] = IGNORE
    if pad_last and T > prompt + 1:
        labels[1, -1] = IGNORE  # ragged completion lengths
        labels[-1, -2:] = IGNORE
    return logits, labels


# Labels of each integer dtype the front doors take, with an ignore_index the dtype wraps (torch
# compares a tensor with a Python int in the tensor's dtype) or holds: (dtype, ignore_index, V,
# the id a wrapped comparison would take for ignore_index: it is planted, and must be scored).
LABEL_DTYPE_CASES = [
    (torch.uint8, IGNORE, 200, 156),  # -100 wraps to 156; a uint8 tensor holds no -100: nothing ignored
    (torch.int8, -1000, 120, 24),  # -1000 wraps to 24
    (torch.int16, IGNORE, 300, None),  # holds -100: a prompt and padding ignored as usual
    (torch.int32, 2 ** 32 + 24, 64, 24),  # wraps to 24
    (torch.int32, IGNORE, 300, None),
]


def label_dtype_id(case) -> str:
    dtype, ignore_index, _, _ = case
    return f"{str(dtype).removeprefix('torch.')}-ignore{ignore_index}"


def labels_of_dtype(case, rows, T, *, prompt=2, seed=0):
    """``(labels, wide)``: ``[rows, T]`` labels of the case's dtype and the same values in int64
    (what the oracle reads, with the case's ignore_index). Where the dtype holds ``IGNORE`` the
    first ``prompt`` tokens of each row and the last of row 1 are ignored; the planted id sits in
    rows 0 and -1, never at the very first position (a shift drops it)."""
    dtype, ignore_index, V, planted = case
    g = torch.Generator().manual_seed(seed)
    wide = torch.randint(0, V, (rows, T), generator=g)
    if planted is None:
        wide[:, :prompt] = ignore_index
        wide[1, -1] = ignore_index
    else:
        wide[0, 2] = wide[-1, T - 1] = planted
    narrow = wide.to(dtype)
    assert torch.equal(narrow.long(), wide)
    return narrow, wide


def aligned(labels, shift, ignore_index=IGNORE):
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def token_logprobs(logits, labels, ignore_index=IGNORE):
    """float64 per-token logp and lse; 0 where ignored."""
    z = logits.double()
    scored = labels != ignore_index
    lse = torch.logsumexp(z, -1)
    target = z.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(scored, target - lse, torch.zeros_like(lse))
    return logp, torch.where(scored, lse, torch.zeros_like(lse))


def token_extras(logits, labels, ignore_index=IGNORE):
    """The kernel contract's same-pass extras in float64, 0 on ignored tokens: the logits sum, the
    entropy, argmax == label (first index on ties) and log sum_v p_v^2 (NaN where the softmax is not
    defined: a row of -inf, or with +inf or NaN)."""
    z = logits.double()
    scored = labels != ignore_index
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    want = {
        "logits_sum": z.sum(-1),
        "entropy": lse - torch.where(p > 0, p * z, 0.0).sum(-1),
        "accuracy": (z.argmax(-1) == labels).double(),
        "log_sum_p2": torch.log((p * p).sum(-1)),
    }
    return {k: torch.where(scored, v, 0.0) for k, v in want.items()}


def rows_holding_nan(dtype=torch.float32, V=700):
    """Logits ``[2, 8, V]`` (fresh random values) whose rows hold NaN where the argmax's parts meet:
    in the first and last element (a row's head and tail peel), in two lanes of one block, in two
    blocks (the later index first in the row's order of arrival: the tail before the body), beside
    a +inf, and none at all. Labels make both answers occur: the first NaN (a hit for torch.argmax),
    a later NaN, the largest number (a miss when a NaN is present), and the argmax of a clean row.
    Rows are views at offsets 0, 3, 6, ... of a wider buffer, so they start anywhere in a vector."""
    buffer = torch.randn(2, 8, V + 3, dtype=torch.float64).to(dtype)
    logits = buffer[..., :V]
    nans = {(0, 0): [3], (0, 1): [V - 50, 10], (0, 2): [300, 301], (0, 3): [0], (0, 4): [V - 1],
            (1, 0): [256, 512], (1, 2): [5], (1, 3): [7, 8]}
    for (b, t), where in nans.items():
        for v in where:
            logits[b, t, v] = float("nan")
    logits[1, 2, V - 100] = float("inf")
    labels = logits.double().argmax(-1)  # the first NaN where there is one: hits
    labels[0, 1] = V - 50  # a later NaN: a miss
    labels[1, 0] = 512  # likewise
    labels[1, 3] = logits[1, 3].double().nan_to_num(nan=float("-inf")).argmax()  # the largest number: a miss
    return logits, labels


def sequence_logps(token_logp, labels, average, ignore_index=IGNORE):
    total = token_logp.sum(-1)
    if average:
        return total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def _logsig(x):
    return F.logsigmoid(x)  # log(sigmoid(x)) without its underflow at |x| > 700


class _Exo(torch.autograd.Function):
    """EXO-pref on the scaled margin ``x``: ``q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)``
    with ``q_w = sigmoid(x)``, ``q_l = sigmoid(-x)``. Its derivative is the textbook
    ``q_w q_l (x - log(1 - eps) + log eps)``: autograd through the formula cancels terms ~|x| times
    larger than the result and, saturated, is wrong even in float64 (15% at x = -40)."""

    @staticmethod
    def forward(ctx, x, eps):
        q_w, q_l = torch.sigmoid(x), torch.sigmoid(-x)
        ctx.save_for_backward(x)
        ctx.eps = eps
        return q_w * (torch.log(q_w) - math.log(1 - eps)) + q_l * (torch.log(q_l) - math.log(eps))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x) * torch.sigmoid(-x) * (x - math.log(1 - ctx.eps) + math.log(ctx.eps)), None


def f_scores(logratio, kind="reverse_kl", alpha=0.5):
    """f'(t) at t = pi/ref (f-DPO, Wang et al. 2023), written on t itself."""
    if kind == "reverse_kl":
        return logratio
    t = torch.exp(logratio)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (t + 1))
    if kind == "alpha_divergence":
        if abs(alpha - 1) < 1e-6:
            return logratio
        # t^(alpha-1), with TRL's clamp of the exponent at 80
        return (torch.exp(torch.clamp((alpha - 1) * logratio, max=80.0)) - 1) / (alpha - 1)
    raise KeyError(kind)


def zoo_loss(name, *, pc, pr, rc, rr, lc=None, lr=None, tc=None, tr=None, tok_c=None, mask_c=None, beta=0.1,
             eps=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05, gamma=0.5, cpo_alpha=None, averaged=False):
    """Per-pair losses [P] of loss type ``name`` from the per-sequence log-probs, from the papers'
    formulas as TRL 1.16 writes them (float64; p = policy, r = reference, c/r = chosen/rejected,
    l = completion lengths (DPOTrainer's, for ipo/sigmoid_norm), t = scored tokens (the CPO and
    ORPO trainers', for simpo/orpo; default: l), tok_c/mask_c = chosen per-token log-probs and mask)."""
    tc = lc if tc is None else tc
    tr = lr if tr is None else tr
    P = pc.shape[0]
    lrc, lrr = pc - rc, pr - rr
    sc, sr = f_scores(lrc, fdiv, alpha), f_scores(lrr, fdiv, alpha)

    def per_token(x, n):
        return x if averaged else x / n.clamp(min=1)

    def nll():
        m = mask_c.double()
        return -(tok_c * m).sum() / m.sum().clamp(min=1)

    def smoothed(x):
        return -(1 - eps) * _logsig(x) - eps * _logsig(-x)

    if name == "sigmoid":
        return smoothed(beta * (sc - sr))
    if name == "hinge":
        return torch.clamp(1 - beta * (sc - sr), min=0)
    if name == "ipo":
        return (per_token(sc, lc) - per_token(sr, lr) - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        return _Exo.apply(beta * (sc - sr), eps)
    if name == "nca_pair":
        a, b = beta * lrc, beta * lrr
        return -_logsig(a) - 0.5 * _logsig(-a) - 0.5 * _logsig(-b)
    if name == "robust":
        x = beta * (sc - sr)
        return ((1 - eps) * -_logsig(x) - eps * -_logsig(-x)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -_logsig(beta * lrc) - _logsig(-beta * lrr)
    if name == "sppo_hard":
        return (lrc - 1 / (2 * beta)) ** 2 + (lrr + 1 / (2 * beta)) ** 2
    if name == "aot":
        d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return smoothed(beta * d)
    if name == "aot_unpaired":
        d = torch.sort(lrc).values - torch.sort(lrr).values
        return smoothed(beta * d)
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * lrc) + torch.sigmoid(beta * lrr)
    if name == "apo_down":
        return torch.sigmoid(beta * lrc) + 1 - torch.sigmoid(beta * (lrc - lrr))
    if name == "discopop":
        x = beta * (sc - sr)
        w = torch.sigmoid(x / tau)
        return (1 - w) * -_logsig(x) + w * torch.exp(-x)
    if name == "sft":
        return nll() * torch.ones(P, dtype=torch.float64)
    if name == "sigmoid_norm":
        return -_logsig(beta * (per_token(sc, lc) - per_token(sr, lr)))
    if name == "simpo":
        x = beta * (per_token(pc, tc) - per_token(pr, tr)) - gamma
        return smoothed(x) + (cpo_alpha or 0.0) * nll()
    if name == "cpo":
        return smoothed(beta * (pc - pr)) + (1.0 if cpo_alpha is None else cpo_alpha) * nll()
    if name == "orpo":
        ac, ar = per_token(pc, tc), per_token(pr, tr)
        log_odds = torch.log(torch.exp(ac) / (1 - torch.exp(ac))) - torch.log(torch.exp(ar) / (1 - torch.exp(ar)))
        return nll() - beta * _logsig(log_odds)
    raise KeyError(name)


REFERENCE_FREE = {"simpo", "cpo", "orpo", "sft"}


def ld_weights(labels, alpha, ignore_index=IGNORE):
    """LD-DPO token weights, by walking each pair's completions: 1 for the first min(|y_c|, |y_r|)
    completion tokens, alpha after, 0 on ignored tokens."""
    P = labels.shape[0] // 2
    w = torch.zeros(labels.shape, dtype=torch.float64)
    for i in range(P):
        rows = (i, P + i)
        shared = min(int((labels[r] != ignore_index).sum()) for r in rows)
        for r in rows:
            seen = 0
            for t in range(labels.shape[1]):
                if labels[r, t] != ignore_index:
                    seen += 1
                    w[r, t] = 1.0 if seen <= shared else alpha
    return w


def dpo(logits, labels, *, ref_logps=None, ref_logits=None, beta=0.1, loss_type="sigmoid", loss_weights=None,
        label_smoothing=0.0, average=False, shift=False, ignore_index=IGNORE, ld_alpha=None,
        use_weighting=False, token_metrics=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        discopop_tau=0.05, simpo_gamma=0.5, cpo_alpha=None):
    """Everything fused_dpo_loss returns, in float64, plus d loss / d logits (TRL 1.16 semantics:
    per-sequence sums, losses normalize by length internally; ``average`` averages everywhere)."""
    y = aligned(labels, shift, ignore_index)
    z = logits.detach().double().requires_grad_(True)
    logp, _ = token_logprobs(z, y, ignore_index)
    scored = y != ignore_index
    lengths = scored.sum(-1).double()
    # TRL's completion length for ipo/sigmoid_norm: the completion tokens of the input sequence
    # (with shift, a completion token at position 0 counts although nothing predicts it).
    completion = (labels != ignore_index).sum(-1).double()
    w = ld_weights(y, ld_alpha, ignore_index) if ld_alpha is not None else scored.double()
    seq = (logp * w).sum(-1)
    if average:
        seq = seq / lengths.clamp(min=1)
    P = logits.shape[0] // 2
    if ref_logits is not None:
        ref_tok, _ = token_logprobs(ref_logits.double(), y, ignore_index)
        ref = (ref_tok * w).sum(-1)
        if average:
            ref = ref / lengths.clamp(min=1)
    elif ref_logps is not None:
        ref = ref_logps.double()
    else:
        ref = torch.zeros(2 * P, dtype=torch.float64)
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(names)
    pair_w = 1.0
    if use_weighting:
        with torch.no_grad():
            probs = torch.softmax(z, -1)
            log_sum_sq = torch.log((probs * probs).sum(-1))
            mean = torch.where(scored, logp - log_sum_sq, 0.0).sum(-1) / lengths.clamp(min=1)
            seq_w = torch.exp(mean)
            pair_w = seq_w[:P] * seq_w[P:]
    loss = 0.0
    for name, weight in zip(names, weights):
        per_pair = zoo_loss(
            name, pc=seq[:P], pr=seq[P:], rc=ref[:P], rr=ref[P:], lc=completion[:P], lr=completion[P:],
            tc=lengths[:P], tr=lengths[P:],
            tok_c=logp[:P], mask_c=scored[:P], beta=beta, eps=label_smoothing, fdiv=f_divergence_type,
            alpha=f_alpha_divergence_coef, tau=discopop_tau, gamma=simpo_gamma, cpo_alpha=cpo_alpha,
            averaged=average,
        )
        loss = loss + weight * (per_pair * pair_w).mean()
    loss.backward()
    chosen_ratio = seq[:P].detach() - ref[:P]
    rejected_ratio = seq[P:].detach() - ref[P:]
    cr, rr = beta * chosen_ratio, beta * rejected_ratio
    scored_d = scored.double()
    vocab_mean = z.detach().mean(-1) * scored_d
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": seq[:P].detach().mean(),
        "logps/rejected": seq[P:].detach().mean(),
        "logits/chosen": vocab_mean[:P].sum() / scored_d[:P].sum().clamp(min=1),
        "logits/rejected": vocab_mean[P:].sum() / scored_d[P:].sum().clamp(min=1),
    }
    if token_metrics:
        zd = z.detach()
        p = torch.softmax(zd, -1)
        entropy = -(p * torch.log_softmax(zd, -1)).sum(-1)
        correct = (zd.argmax(-1) == y).double()
        metrics["entropy"] = (entropy * scored_d).sum() / scored_d.sum().clamp(min=1)
        metrics["mean_token_accuracy"] = (correct * scored_d)[:P].sum() / scored_d[:P].sum().clamp(min=1)
    return {
        "loss": loss.detach(),
        "chosen_rewards": cr,
        "rejected_rewards": rr,
        "chosen_logps": seq[:P].detach(),
        "rejected_logps": seq[P:].detach(),
        "metrics": metrics,
        "grad": z.grad,
    }


# Tolerances per logits dtype, for (scalars and per-sequence values, gradient elements).
# Inputs are the same rounded values for oracle and kernel, so forward results differ only by
# fp32 accumulation; the gradient is rounded once to the logits dtype.
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def assert_close_values(actual, expected, dtype, what=""):
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol * 10, msg=lambda m: f"{what}: {m}")


def assert_close_grad(actual, expected, dtype):
    """Elementwise to within one rounding of the logits dtype, relative to the row's scale."""
    rtol = GRAD_RTOL[dtype]
    expected = expected.double().cpu()
    atol = rtol * expected.abs().amax().clamp(min=1e-12).item() * 0.05 + 1e-12
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def assert_matches_oracle(out, want: dict, logits_grad, dtype=torch.float32):
    """Every output and metric of a ``DPOOutput`` and the logits gradient against ``dpo()``."""
    assert_close_values(out.loss, want["loss"], dtype, "loss")
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        assert_close_values(getattr(out, name), want[name], dtype, name)
    assert set(out.metrics) == set(want["metrics"])
    for name, value in want["metrics"].items():
        assert out.metrics[name].dim() == 0 and not out.metrics[name].requires_grad
        assert_close_values(out.metrics[name], value, dtype, name)
    assert logits_grad.dtype == dtype
    assert_close_grad(logits_grad, want["grad"], dtype)


def linear_logits(hidden, weight, bias=None, *, softcap=None, temperature=1.0):
    """float64 logits of an lm_head: ``softcap * tanh((h @ W.T + b) / softcap) / temperature``."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def linear_dpo(hidden, weight, labels, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None, softcap=None,
               temperature=1.0, **kwargs):
    """``dpo()`` on the materialized float64 logits of the hidden states, plus the gradients of
    hidden, weight and bias (chain rule through the float64 lm_head)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    z = linear_logits(h, w, b, softcap=softcap, temperature=temperature)
    ref_logits = None
    if ref_hidden is not None:
        rw = weight if ref_weight is None else ref_weight
        rb = (bias if ref_weight is None else None) if ref_bias is None else ref_bias
        ref_logits = linear_logits(ref_hidden, rw, rb, softcap=softcap, temperature=temperature)
    want = dpo(z.detach(), labels, ref_logits=ref_logits, **kwargs)
    z.backward(want["grad"])
    want["grad_hidden"], want["grad_weight"] = h.grad, w.grad
    want["grad_bias"] = None if b is None else b.grad
    return want
