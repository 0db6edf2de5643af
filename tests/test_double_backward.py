"""retain_graph and double backward (issue 7).

- Without ``inplace_backward``: ``backward(retain_graph=True)`` twice accumulates the same gradient
  twice, bitwise.
- With ``inplace_backward=True``: the second backward raises the documented RuntimeError.
- ``torch.autograd.grad(..., create_graph=True)`` then a second-order gradient: must either be
  right or raise clearly (today: a clear RuntimeError from every backend).
"""
import pytest
import torch

import oracle
from dpo_kernels import fused_dpo_loss
from oracle import make_batch

INPLACE_MESSAGE = r"a second backward through a loss computed with inplace_backward=True"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retain_graph_twice_accumulates_the_same_gradient(backend, dtype):
    logits, labels = make_batch(2, 6, 300, dtype)
    ref = torch.randn(4) * 5
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend, shift=True)
    out.loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    out.loss.backward()
    assert torch.equal(leaf.grad, first + first)  # x + x is exact in every float format
    want = oracle.dpo(logits, labels, ref_logps=ref, shift=True)
    oracle.assert_matches_oracle(out, want, first, dtype)


def test_retain_graph_through_chosen_logps_and_loss(backend):
    """Two different backward passes through one graph: each gives its own float64 gradient."""
    logits, labels = make_batch(2, 5, 100, torch.float32)
    ref = torch.randn(4) * 5
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend)
    g_loss, = torch.autograd.grad(out.loss, leaf, retain_graph=True)
    g_logps, = torch.autograd.grad(out.chosen_logps.sum(), leaf)
    want = oracle.dpo(logits, labels, ref_logps=ref)
    oracle.assert_close_grad(g_loss, want["grad"], torch.float32)
    z = logits.double().requires_grad_(True)
    logp, _ = oracle.token_logprobs(z, labels)
    logp[:2].sum().backward()
    oracle.assert_close_grad(g_logps, z.grad, torch.float32)


def test_inplace_backward_twice_raises(backend):
    logits, labels = make_batch(2, 5, 100, torch.bfloat16)
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=torch.randn(4), backend=backend, inplace_backward=True)
    out.loss.backward(retain_graph=True)
    written = leaf.detach().clone()
    with pytest.raises(RuntimeError, match=INPLACE_MESSAGE):
        out.loss.backward()
    assert torch.equal(leaf.detach(), written)  # the failed second backward wrote nothing


def test_inplace_backward_then_create_graph_raises(backend):
    logits, labels = make_batch(2, 5, 100, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=torch.randn(4), backend=backend, inplace_backward=True)
    torch.autograd.grad(out.loss, leaf, retain_graph=True)
    with pytest.raises(RuntimeError, match=INPLACE_MESSAGE):
        torch.autograd.grad(out.loss, leaf, create_graph=True)


def _true_hvp(logits, labels, ref, v):
    """d/dz <d loss/d z, v> of the sigmoid DPO loss, float64 from the formula."""
    z = logits.double().requires_grad_(True)
    logp, _ = oracle.token_logprobs(z, labels)
    seq = logp.sum(-1)
    P = seq.shape[0] // 2
    loss = -torch.nn.functional.logsigmoid(0.1 * ((seq[:P] - ref[:P]) - (seq[P:] - ref[P:]))).mean()
    g, = torch.autograd.grad(loss, z, create_graph=True)
    hvp, = torch.autograd.grad((g * v).sum(), z)
    return g.detach(), hvp


def test_double_backward_is_right_or_raises_clearly(backend):
    logits, labels = make_batch(2, 5, 33, torch.float64)
    ref = torch.randn(4, dtype=torch.float64) * 5
    v = torch.randn_like(logits)
    want_g, want_hvp = _true_hvp(logits, labels, ref, v)
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend)
    try:
        g, = torch.autograd.grad(out.loss, leaf, create_graph=True)
        torch.testing.assert_close(g.detach(), want_g, rtol=1e-9, atol=1e-12)  # first order is right
        assert g.requires_grad, "create_graph=True gave a gradient that cannot be differentiated"
        hvp, = torch.autograd.grad((g * v).sum(), leaf)
    except RuntimeError as exc:
        # A clear error names the library and what is not supported.
        assert "dpo_kernels" in str(exc) and "double backward" in str(exc), str(exc)
        return
    torch.testing.assert_close(hvp, want_hvp, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mode", ["one_pass", "two_phase", "split"])
def test_linear_path_double_backward_raises_clearly(mode):
    from dpo_kernels import fused_linear_dpo_loss

    hidden = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (4, 5))
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=torch.randn(4, dtype=torch.float64), mode=mode)
    with pytest.raises(RuntimeError, match="dpo_kernels: double backward"):
        torch.autograd.grad(out.loss, (hidden, weight), create_graph=True)
