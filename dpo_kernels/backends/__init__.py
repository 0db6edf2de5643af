"""Backends of the kernel contract, and the one place where one is chosen.

A backend is a module with two functions over ``logits[B, T, V]`` (any strides) and
``labels[B, T]`` (already aligned: shifting is done by the caller):

- ``token_logprobs_forward(logits, labels, ignore_index, extras)``
  -> ``(logp, lse, {name: tensor for name in extras})``, each ``[B, T]`` fp32 (fp64 for fp64
  logits), 0 on ignored rows; ``extras`` is a subset of :data:`EXTRAS`, computed in the same pass;
- ``token_logprobs_backward(logits, labels, lse, grad_logp, ignore_index, inplace)``
  -> the gradient w.r.t. ``logits`` in the logits dtype (``logits`` itself when ``inplace``);

and optionally ``dpo_sigmoid_loss(...)``, the default loss fused on the device.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

# Per-token statistics a forward pass can produce besides logp and lse (no gradient flows through
# them): sum of the row's logits, its entropy, whether its argmax is the label, logsumexp(2z).
EXTRAS = ("logits_sum", "entropy", "accuracy", "lse_2z")

# name -> module path; "auto" picks among them per device.
_BACKEND_MODULES = {
    "triton": "dpo_kernels.backends.triton",
    "reference": "dpo_kernels.backends.reference",
    "cpu": "dpo_kernels.backends.cpu",
}
BACKEND_NAMES = ("auto", *_BACKEND_MODULES)


def load_backend(name: str) -> ModuleType:
    """Import a backend by name; a clear error when it cannot run here."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
    except ImportError as exc:
        raise RuntimeError(f"backend {name!r} is not available here: {exc}") from exc


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def available_backends(device: torch.device) -> list[str]:
    """Concrete backends that can run on ``device`` in this process."""
    names = []
    for name in _BACKEND_MODULES:
        try:
            resolve_backend(name, device)
            load_backend(name)
        except (RuntimeError, ValueError):
            continue
        names.append(name)
    return names


_cpu_fallback_warned = False


@functools.lru_cache(maxsize=None)
def cpu_extension_available() -> bool:
    """True when the C++ CPU backend (``dpo_kernels._C``) was built and loads (checked once)."""
    try:
        load_backend("cpu")
    except RuntimeError:
        return False
    return True


def _auto_cpu() -> str:
    global _cpu_fallback_warned
    if cpu_extension_available():
        return "cpu"
    if not _cpu_fallback_warned:
        _cpu_fallback_warned = True
        warnings.warn(
            "dpo_kernels: the C++ CPU backend (dpo_kernels._C) is not built, so backend='auto' uses "
            "the slower 'reference' backend on CPU tensors; rebuild it with "
            "`pip install --no-build-isolation -e .` (torch must be installed first)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` (possibly "auto") on ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        if name == "triton" and device.type == "cpu":
            from .triton.config import interpreting

            if not interpreting():
                raise RuntimeError(
                    "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                    "dpo_kernels is imported (Triton's interpreter); use backend='auto' instead"
                )
        if name == "cpu" and device.type != "cpu":
            raise RuntimeError(
                f"backend 'cpu' runs on CPU tensors only, got tensors on {device}; "
                "use backend='auto' (or 'triton' on CUDA)"
            )
        return name
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return _auto_cpu()
    return "reference"
