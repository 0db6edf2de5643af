"""torch.func transforms and forward-mode AD over the public functions.

The per-token kernels are custom operators with a reverse-mode formula only. PyTorch takes an
operator without a forward-mode formula for a constant: ``torch.func.jvp`` through one was silently
0 (and ``torch.autograd.forward_ad`` gave no tangent). Those, and ``torch.func.grad`` / ``vjp`` /
``jacrev``, are refused with one message (``logprobs.refuse_forward_ad``); ``torch.func.vmap``
works on every backend and loss, ``validate=True`` included (it skips its host read there, as
under torch.compile), and fused_linear_dpo_loss's ``auto`` takes ``two_phase`` under it.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import oracle
from dpo_kernels import fused_dpo_loss, fused_kto_loss, fused_linear_dpo_loss, token_logprobs
from oracle import make_batch

REFUSAL = r"supports reverse-mode autograd only .* not forward-mode AD"


def _calls(backend):
    """name -> f(x) over one differentiable input (logits, or the hidden states)."""
    logits, labels = make_batch(2, 5, 60, torch.float32)
    ref = torch.randn(4) - 12
    hidden = torch.randn(4, 5, 8)
    weight = torch.randn(60, 8) * 0.5
    return {
        "fused_dpo_loss": (logits, lambda z: fused_dpo_loss(z, labels, ref_logps=ref, backend=backend).loss),
        "token_logprobs": (logits, lambda z: token_logprobs(z, labels, backend=backend).logp.sum()),
        "fused_kto_loss": (logits, lambda z: fused_kto_loss(z, labels, [True, False, True, False], ref_logps=ref,
                                                            loss_type="apo_zero_unpaired", backend=backend).loss),
        "fused_linear_dpo_loss": (hidden, lambda h: fused_linear_dpo_loss(h, weight, labels, ref_logps=ref,
                                                                          mode="two_phase", backend=backend).loss),
    }


CALLS = ["fused_dpo_loss", "token_logprobs", "fused_kto_loss", "fused_linear_dpo_loss"]


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "forward_ad", "grad"])
def test_forward_mode_and_func_grad_are_refused(backend, name, transform):
    x, f = _calls(backend)[name]
    with pytest.raises(NotImplementedError, match=REFUSAL):
        if transform == "jvp":
            torch.func.jvp(f, (x,), (torch.randn_like(x),))
        elif transform == "jacfwd":
            torch.func.jacfwd(f)(x)
        elif transform == "grad":
            torch.func.grad(f)(x)
        else:
            with fwAD.dual_level():
                f(fwAD.make_dual(x, torch.randn_like(x)))


@pytest.mark.parametrize("validate", [True, False])
def test_vmap_matches_a_loop(validate):
    """Over a batch of logits: the per-item losses, bitwise; validate=True no longer reads a batched
    tensor on the host (it failed with "Cannot access data pointer")."""
    logits = torch.stack([make_batch(2, 5, 60, torch.float32)[0] for _ in range(3)])
    _, labels = make_batch(2, 5, 60, torch.float32)
    ref = torch.randn(4) - 12

    def loss(z):
        return fused_dpo_loss(z, labels, ref_logps=ref, validate=validate, backend="reference").loss

    got = torch.func.vmap(loss)(logits)
    want = torch.stack([loss(z) for z in logits])
    assert torch.equal(got, want)
    oracle.assert_close_values(got[1], oracle.dpo(logits[1], labels, ref_logps=ref)["loss"], torch.float32)


def _vmap_and_loop(f, xs, param):
    """``(vmapped values, looped values, param's gradient of the sum of each)``."""
    got = torch.func.vmap(f)(xs)
    (got_grad,) = torch.autograd.grad(got.sum(), param)
    want = torch.stack([f(x) for x in xs])
    (want_grad,) = torch.autograd.grad(want.sum(), param)
    return got, want, got_grad, want_grad


# The default sigmoid loss (on Triton a one-kernel autograd.Function launched on raw pointers),
# and exo_pair (an autograd.Function of its own): both refused vmap before.
@pytest.mark.parametrize("loss_type,options", [("sigmoid", {}), ("exo_pair", {"label_smoothing": 1e-3})])
def test_vmap_of_each_backend_matches_a_loop_with_gradients(backend, loss_type, options):
    """Values and the gradient through vmap against a loop; bitwise where the loop takes the same
    path (on Triton the loop's sigmoid is the one-kernel form: equal to fp32 rounding)."""
    logits = torch.stack([make_batch(2, 5, 60, torch.float32)[0] for _ in range(3)]).requires_grad_()
    _, labels = make_batch(2, 5, 60, torch.float32)
    ref = torch.randn(4) - 12

    def loss(z):
        return fused_dpo_loss(z, labels, ref_logps=ref, loss_type=loss_type, backend=backend, **options).loss

    got, want, got_grad, want_grad = _vmap_and_loop(loss, logits, logits)
    if backend == "triton" and loss_type == "sigmoid":
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    for i in range(3):
        oracle.assert_close_values(got[i], oracle.dpo(logits[i].detach(), labels, ref_logps=ref,
                                                      loss_type=loss_type, **options)["loss"], torch.float32)


@pytest.mark.parametrize("mode", ["auto", "two_phase"])
def test_vmap_of_the_hidden_path_matches_a_loop(backend, mode):
    """fused_linear_dpo_loss under vmap over hidden states, with a weight gradient: auto takes
    two_phase there (one_pass and split cannot run on a batched tensor)."""
    _, labels = make_batch(2, 5, 60, torch.float32)
    ref = torch.randn(4) - 12
    hidden = torch.randn(3, 4, 5, 8)
    weight = (torch.randn(60, 8) * 0.5).requires_grad_()

    def loss(h):
        return fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, mode=mode, backend=backend).loss

    got, want, got_grad, want_grad = _vmap_and_loop(loss, hidden, weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["one_pass", "split"])
def test_vmap_refuses_the_modes_that_fill_buffers_on_the_host(mode):
    _, labels = make_batch(2, 5, 60, torch.float32)
    hidden, weight, ref = torch.randn(3, 4, 5, 8), torch.randn(60, 8).requires_grad_(), torch.randn(4) - 12
    with pytest.raises(NotImplementedError, match=f"mode='{mode}' does not run under torch.func.vmap"):
        torch.func.vmap(lambda h: fused_linear_dpo_loss(h, weight, labels, ref_logps=ref, mode=mode,
                                                        backend="reference").loss)(hidden)
