"""Backends of the kernel contract, and the one place where one is chosen.

A backend is a module with two functions over ``logits[B, T, V]`` (any strides) and
``labels[B, T]`` (already aligned: shifting is done by the caller):

- ``token_logprobs_forward(logits, labels, ignore_index, extras)``
  -> ``(logp, lse, {name: tensor for name in extras})``, each ``[B, T]`` fp32 (fp64 for fp64
  logits; ``lse`` in fp64 whatever the logits, :func:`lse_dtype`), 0 on ignored rows; ``extras``
  is a subset of :data:`EXTRAS`, computed in the same pass;
- ``token_logprobs_backward(logits, labels, lse, grad_logp, ignore_index, inplace)``
  -> the gradient w.r.t. ``logits`` in the logits dtype (``logits`` itself when ``inplace``);

and optionally ``dpo_sigmoid_loss(...)``, the default loss fused on the device,
``scale_(buf, scale)``, ``buf *= scale`` in place decided on the device (nothing when the
one-element ``scale`` is 1, and no host synchronisation to find that out), and
``token_logprobs_forward_and_grad_(logits, labels, ignore_index, extras)``: the forward, then
``logits`` overwritten with the backward for ``grad_logp = 1`` in one pass per row (callers go
through :func:`forward_and_grad_`, which composes the two functions where a backend lacks it).

Every kernel launch goes through a registered operator (``torch.ops.dpo_kernels.*``: the C++ ops
of ``cpu.py``, the ``triton_*`` custom ops of ``triton/``) with a fake implementation, so that
``torch.compile`` and fake tensors see shapes without running a kernel. Everything called while a
graph is traced (``resolve_backend`` and what it calls) avoids what Dynamo cannot trace
(``importlib``, ``functools.lru_cache``, ``warnings``), so dispatch costs no graph break.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from types import ModuleType

import torch

# Per-token statistics a forward pass can produce besides logp and lse (no gradient flows through
# them): sum of the row's logits, its entropy, whether its argmax is the label, log sum_v p_v^2
# (WPO's weights; NaN where the softmax is not defined).
EXTRAS = ("logits_sum", "entropy", "accuracy", "log_sum_p2")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in, and of their per-token outputs but ``lse``, for logits of
    ``dtype``: fp32 for every training dtype, fp64 for fp64 (so gradcheck runs through them)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The dtype of every backend's ``lse``, whatever the logits dtype. A kernel keeps a row's
# statistics as fp32 ``shift`` (the max) and ``log_sum`` (log sum exp(z - shift)); their sum in
# one fp32 number would round by |lse| * 2^-24, which every log-prob and every probability of the
# backward would inherit: with logits sharing a large offset (|lse| ~ 1e5) the last digits are
# lost, and near 1e8 the log-sum entirely. In fp64 the sum is exact (to 2^-53), and the backward
# splits it into fp32 ``hi + lo`` (:func:`split_lse`): ``exp((z - hi) - lo)``, where ``z - hi`` is
# exact for the logits that matter (within a factor 2 of ``hi``, Sterbenz's lemma).
LSE_DTYPE = torch.float64


def lse_dtype(device: torch.device | str) -> torch.dtype:
    """``lse``'s dtype on ``device``: :data:`LSE_DTYPE`, except where the device has no float64
    (Apple's MPS, which only the reference backend serves): fp32 there, with its |lse| * 2^-24."""
    return torch.float32 if torch.device(device).type == "mps" else LSE_DTYPE


def split_lse(lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` in ``dtype`` with ``hi + lo == lse`` to ``dtype``'s precision squared: ``hi`` is
    ``lse`` rounded, ``lo`` what the rounding lost (0 where ``hi`` is infinite or NaN, which ``hi``
    carries alone, and for an ``lse`` no wider than ``dtype``). The kernels' split, in torch (the
    reference backend's)."""
    hi = lse.to(dtype)
    if lse.dtype != LSE_DTYPE or dtype == LSE_DTYPE:
        return hi, torch.zeros_like(hi)
    return hi, torch.where(torch.isfinite(hi), lse - hi.to(LSE_DTYPE), 0.0).to(dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device_type``, or None where it is
    off (or where autocast does not know the device type: a meta tensor's)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type`` where it is on, else a null context: the
    hidden-state path casts its lm_head inputs itself, and its own fp32 accumulation (the weight
    gradient, split's per-token products) must never be re-cast to a half-precision dtype."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def extras_mask(extras) -> int:
    """The operators' encoding of a set of extras (names, or one name): bit ``i`` set for
    ``EXTRAS[i]``."""
    if isinstance(extras, str):  # one name, not its characters
        extras = (extras,)
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"extras must be among {EXTRAS}, got {sorted(unknown)}")
    return sum(1 << i for i, name in enumerate(EXTRAS) if name in extras)


def empty_forward_outputs(logits: torch.Tensor, mask: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(logp[B, T], lse[B, T], extras[K, B, T])`` of a forward operator on
    ``logits[B, T, V]``: contiguous, fp32 (fp64 for fp64 logits), ``lse`` in :func:`lse_dtype`.
    Also the fake implementation of the forward operators, so the real and fake outputs cannot
    disagree."""
    B, T = logits.shape[0], logits.shape[1]
    dtype = accumulation_dtype(logits.dtype)
    logp = logits.new_empty((B, T), dtype=dtype)
    lse = logits.new_empty((B, T), dtype=lse_dtype(logits.device))
    extras = logits.new_empty((len(extras_names(mask)), B, T), dtype=dtype)
    return logp, lse, extras


def extras_names(mask: int) -> tuple[str, ...]:
    """The extras of ``mask``, in bit order: the order of the slices of an operator's ``extras``
    output ``[K, B, T]``."""
    if not 0 <= mask < 1 << len(EXTRAS):
        raise ValueError(f"extras_mask must be in [0, {1 << len(EXTRAS)}), got {mask}")
    return tuple(name for i, name in enumerate(EXTRAS) if mask >> i & 1)


def check_writable_rows(logits: torch.Tensor, op: str) -> None:
    """Refuse to overwrite ``logits`` in place where two of its elements share memory (an expanded
    view): rows would be written by one program and read by another."""
    if torch._debug_has_internal_overlap(logits) == 1:
        raise RuntimeError(f"{op}: writing in place needs logits without internal overlap (not an expanded "
                           "view); pass a copy")


def forward_and_grad_(backend: ModuleType, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                      extras: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``backend.token_logprobs_forward``'s ``(logp, lse, extras)``, with ``logits`` overwritten
    by the gradient of ``logp`` (``onehot - softmax``; zeros on ignored rows): the backend's
    one-pass ``token_logprobs_forward_and_grad_`` where it has one, else its forward and then its
    in-place backward with ``grad_logp = 1`` (the same numbers).

    Only the Triton backend has the one-pass kernel: on a GPU the rows are bound by memory, and
    the row's second read can come from L2. The C++ kernels are bound by ``exp`` on a few cores;
    a one-pass C++ version measured the same as the two ops (78-82 ms either way for
    2048 x 128256 bf16 rows on a 2-core machine), so there is none."""
    fused = getattr(backend, "token_logprobs_forward_and_grad_", None)
    if fused is not None:
        return fused(logits, labels, ignore_index, extras)
    check_writable_rows(logits, "token_logprobs_forward_and_grad_")
    return forward_then_grad_(backend.token_logprobs_forward, backend.token_logprobs_backward, logits, labels,
                              ignore_index, extras)


def forward_then_grad_(forward, backward, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                       extras: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:func:`forward_and_grad_` from a backend's two functions: ``forward``, then ``backward`` in
    place with ``grad_logp = 1``."""
    logp, lse, values = forward(logits, labels, ignore_index, extras)
    backward(logits, labels, lse, torch.ones_like(lse), ignore_index, inplace=True)
    return logp, lse, values


def fused_logits_grad_matmul(backend: ModuleType, dtype: torch.dtype):
    """The backend's ``logits_grad_matmul`` (the logits' gradient written by the lm_head matmul's
    own epilogue, the logits never stored) when it has one and its rule takes it for ``dtype``;
    else None, and the caller forms the logits with a torch matmul and runs the backend's
    in-place backward on them (the same roundings).

    Only the Triton backend has one: its rule (``config.fuse_logits_grad``) keeps the measured
    cuBLAS path on a GPU until a run has timed the Triton matmul against it."""
    fused = getattr(backend, "logits_grad_matmul", None)
    if fused is None or not backend.fuse_logits_grad(dtype):
        return None
    return fused


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


_triton_importable: bool | None = None


def triton_available() -> bool:
    """Whether ``triton`` imports here (checked once). An ``import`` statement, not importlib:
    Dynamo traces it when the import succeeds."""
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_importable = False
        else:
            _triton_importable = True
    return _triton_importable


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


def _probe_cpu_extension() -> bool:
    try:
        load_backend("cpu")
    except RuntimeError:
        return False
    return True


# Probed once at import (loading the extension takes a few ms) rather than on first use: a first
# use inside torch.compile could not trace a failing import.
_CPU_EXTENSION = _probe_cpu_extension()


def cpu_extension_available() -> bool:
    """True when the C++ CPU backend (``dpo_kernels._C``) was built and loads (checked once)."""
    return _CPU_EXTENSION


def _auto_cpu() -> str:
    global _cpu_fallback_warned
    if cpu_extension_available():
        return "cpu"
    # Dynamo cannot trace warnings.warn: inside a compiled region the fallback is silent.
    if not _cpu_fallback_warned and not torch.compiler.is_compiling():
        _cpu_fallback_warned = True
        warnings.warn(
            "dpo_kernels: the C++ CPU backend (dpo_kernels._C) is not built, so backend='auto' uses "
            "the slower 'reference' backend on CPU tensors; rebuild it with "
            "`pip install --no-build-isolation -e .` (torch must be installed first)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def check_backend_name(name) -> None:
    """``name`` is one of :data:`BACKEND_NAMES` (whether it runs here is ``resolve_backend``'s)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` (possibly "auto") on ``device``."""
    check_backend_name(name)
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
