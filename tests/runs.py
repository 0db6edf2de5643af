"""One forward + backward through each front door, on fresh leaves (the inputs are left as they
are): the call most tests make before comparing results. Imported as a top-level module (pytest
puts ``tests/`` on ``sys.path``, see ``tests/conftest.py``)."""
from __future__ import annotations

from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss


def run_logits(logits, labels, **kwargs):
    """``fused_dpo_loss`` on a fresh leaf copy of ``logits``, backpropagated: ``(out, grad)``."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, **kwargs)
    out.loss.backward()
    return out, leaf.grad


def run_linear(hidden, weight, labels, bias=None, **kwargs):
    """``fused_linear_dpo_loss`` on fresh leaf copies, backpropagated:
    ``(out, (grad_hidden, grad_weight, grad_bias))`` (``grad_bias`` None without a bias)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = fused_linear_dpo_loss(h, w, labels, b, **kwargs)
    out.loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)
