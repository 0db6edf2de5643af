"""torch.func transforms and forward-mode AD over the public functions.

The per-token kernels are custom operators with a reverse-mode formula only. PyTorch takes an
operator without a forward-mode formula for a constant: ``torch.func.jvp`` through one was silently
0 (and ``torch.autograd.forward_ad`` gave no tangent). Those, and ``torch.func.grad`` / ``vjp`` /
``jacrev``, are refused with one message (``logprobs.refuse_forward_ad``); ``torch.func.vmap``
works, ``validate=True`` included (it skips its host read there, as under torch.compile).
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
