"""Float64 PyTorch oracles, written from the formulas, independent of the code under test."""
from __future__ import annotations

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


def aligned(labels, shift, ignore_index=IGNORE):
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def token_logprobs(logits, labels, ignore_index=IGNORE):
    """float64 per-token logp and lse; 0 where ignored."""
    z = logits.double()
    scored = labels != ignore_index
    lse = torch.logsumexp(z, -1)
    target = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(scored, target - lse, torch.zeros_like(lse))
    return logp, torch.where(scored, lse, torch.zeros_like(lse))


def sequence_logps(token_logp, labels, average, ignore_index=IGNORE):
    total = token_logp.sum(-1)
    if average:
        return total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def pair_loss(loss_type, margin, beta, label_smoothing):
    """Per-pair losses from the float64 log-ratio margin, from the papers' formulas."""
    if loss_type == "sigmoid":
        x = beta * margin
        return -(1 - label_smoothing) * torch.log(torch.sigmoid(x)) - label_smoothing * torch.log(torch.sigmoid(-x))
    if loss_type == "hinge":
        return torch.clamp(1 - beta * margin, min=0)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise KeyError(loss_type)


def dpo(logits, labels, *, ref_logps=None, ref_logits=None, beta=0.1, loss_type="sigmoid",
        label_smoothing=0.0, average=False, shift=False, ignore_index=IGNORE):
    """Everything fused_dpo_loss returns, in float64, plus d loss / d logits."""
    average = average or loss_type == "ipo"
    y = aligned(labels, shift, ignore_index)
    z = logits.detach().double().requires_grad_(True)
    logp, _ = token_logprobs(z, y, ignore_index)
    seq = sequence_logps(logp, y, average, ignore_index)
    P = logits.shape[0] // 2
    if ref_logits is not None:
        ref_tok, _ = token_logprobs(ref_logits.double(), y, ignore_index)
        ref = sequence_logps(ref_tok, y, average, ignore_index)
    elif ref_logps is not None:
        ref = ref_logps.double()
    else:
        ref = torch.zeros(2 * P, dtype=torch.float64)
    chosen_ratio = seq[:P] - ref[:P]
    rejected_ratio = seq[P:] - ref[P:]
    loss = pair_loss(loss_type, chosen_ratio - rejected_ratio, beta, label_smoothing).mean()
    loss.backward()
    cr, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    scored = (y != ignore_index).double()
    vocab_mean = z.detach().mean(-1) * scored
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": seq[:P].detach().mean(),
        "logps/rejected": seq[P:].detach().mean(),
        "logits/chosen": vocab_mean[:P].sum() / scored[:P].sum().clamp(min=1),
        "logits/rejected": vocab_mean[P:].sum() / scored[P:].sum().clamp(min=1),
    }
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
