"""Input checks shared by every front door (``fused_dpo_loss``, ``fused_linear_dpo_loss``,
``fused_kto_loss``) and the public per-token functions (``token_logprobs``,
``sequence_logprobs``): each message names the argument at fault. Shapes, dtypes and devices
only, on the host, no sync (the values: ``validate=True``'s one read, in ``api``)."""
from __future__ import annotations

import functools
import math

import torch

try:
    import numpy
except ImportError:  # torch runs without NumPy; then there are no NumPy scalars to convert
    numpy = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def is_number(value) -> bool:
    """A Python int or float, not a bool (NumPy scalars arrive as Python's: :func:`python_scalars`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """:func:`is_number` and finite. By comparisons, not ``math.isfinite``: under ``torch.compile`` a
    float option that changed between calls (a beta schedule) or any float with ``dynamic=True`` is a
    symbolic float, which comparisons trace and ``math.isfinite`` does not (a graph break, an error
    with ``fullgraph=True``)."""
    return is_number(value) and -math.inf < value < math.inf


def python_scalar(value):
    """A NumPy bool, integer or float scalar as Python's (``np.int64(4)`` -> ``4``); anything else
    unchanged. A knob read from an array or a config is as good as a literal, and the checks (and
    the kernels' launches) then see one kind of number."""
    if numpy is not None and isinstance(value, (numpy.bool_, numpy.integer, numpy.floating)):
        return value.item()
    return value


def python_scalars(fn):
    """Calls ``fn`` with every NumPy scalar argument as Python's (:func:`python_scalar`): the public
    functions take ``chunk_tokens=np.int64(512)`` or ``beta=np.float32(0.1)``; tensors and
    everything else pass through, to be checked as before."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(python_scalar(a) for a in args)
        kwargs = {name: python_scalar(v) for name, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


def check_logits_labels(logits, labels, ignore_index, *, logits_name="logits", labels_name="labels",
                         layout="[B, T, V]") -> tuple[int, int]:
    """Types, shapes and devices of a logits tensor and its labels; returns ``(rows, V)``.

    ``layout`` is what the caller's logits must look like, for the message.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{logits_name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{logits_name} must be a floating tensor (fp32, bf16, fp16, fp64), got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must be {layout}, got shape {tuple(logits.shape)}")
    check_labels(labels, logits, labels_name=labels_name, rows_name=logits_name, layout=layout)
    if logits.shape[2] == 0:
        raise ValueError(f"{logits_name} has an empty vocabulary dimension (V = 0)")
    check_ignore_index(ignore_index)
    return logits.shape[0], logits.shape[2]


def check_labels(labels, rows, *, labels_name="labels", rows_name="logits", layout="[B, T, V]",
                 rows_are="are") -> None:
    """``labels`` an integer tensor ``[R, T]`` on the device of ``rows`` (``[R, T, ...]``: the
    logits or hidden states they label); ``layout`` is what ``rows`` must look like, and
    ``rows_are`` the verb its name takes, for the messages."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{labels_name} must be an integer tensor of token ids, got {labels.dtype}")
    if labels.shape != rows.shape[:2]:
        raise ValueError(
            f"{labels_name} shape {tuple(labels.shape)} does not match {rows_name} shape "
            f"{tuple(rows.shape)}: {labels_name} must be [{layout.split(',')[0].lstrip('[')}, T] = "
            f"{tuple(rows.shape[:2])}"
        )
    if labels.device != rows.device:
        raise ValueError(f"{labels_name} are on {labels.device} but {rows_name} {rows_are} on {rows.device}")


def check_like(name, value, like, like_name="logits") -> None:
    """``value`` (if given) a floating tensor of ``like``'s shape on its device: reference or KL
    logits beside the policy's."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, bf16, fp16, fp64)")
    if value.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal {like_name} shape {tuple(like.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} are on {value.device} but {like_name} are on {like.device}")


def check_flags(**flags) -> None:
    """Each of the on/off options is a bool (a NumPy bool arrives as Python's): a truthy string
    such as ``validate="no"`` would silently mean True."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def check_ignore_index(ignore_index) -> None:
    """An int that int64 labels can hold (the labels are compared with it as int64 at most)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2 ** 63) <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64 (the labels' widest dtype), got {ignore_index}")


def check_inplace(inplace_backward, logits) -> None:
    """``inplace_backward`` writes each logit's gradient over it: two logits sharing memory (an
    expanded or otherwise overlapping view) would get one gradient written over the other's.
    Not under ``torch.compile``, which ignores ``inplace_backward`` (and cannot sort symbolic
    strides: a new shape or ``dynamic=True`` broke the graph)."""
    if (inplace_backward and not torch.compiler.is_compiling() and logits.requires_grad
            and rows_may_overlap(logits)):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not overlap in memory "
            f"(got strides {logits.stride()} for shape {tuple(logits.shape)})"
        )


def rows_may_overlap(logits: torch.Tensor) -> bool:
    """Whether two elements of ``logits`` may share memory, for any order of the strides.

    Sufficient test for no overlap: with the dimensions sorted by stride, each stride exceeds the
    largest offset reachable through the dimensions with smaller strides.
    """
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(logits.stride(), logits.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_linear_options(logit_softcap, temperature, mode, chunk_tokens, vocab_chunk=None):
    """The hidden path's own options (``fused_linear_dpo_loss``, ``estimate_linear_memory``,
    ``FusedDPOTrainer``'s ``fused_lm_head_options``); returns ``(softcap, temperature)`` as floats."""
    from .linear import MODES

    def positive(value, name):
        if not is_finite_number(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        return float(value)

    temperature = positive(temperature, "temperature")
    softcap = None if logit_softcap is None else positive(logit_softcap, "logit_softcap")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("chunk_tokens", chunk_tokens), ("vocab_chunk", vocab_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None for the memory budget), got {value!r}")
    return softcap, temperature
