"""Small pieces shared by the Triton kernels and their launch wrappers."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def launch_device(tensor: torch.Tensor):
    """The context every launch runs in: ``tensor``'s CUDA device made current. Triton launches on
    the current device and its current stream, which need not be the tensors' (a model spread
    over GPUs with ``device_map``, the hidden states on the lm_head's device): the kernel would
    run on another GPU than its data. PyTorch's own CUDA operators guard the same way. Off CUDA
    (the interpreter) nothing."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# Accumulation type per logits dtype: fp32 for every training dtype; float64 stays float64 so that
# torch.autograd.gradcheck can run through the kernels.
_ACC_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float16: tl.float32,
    torch.float64: tl.float64,
}

_VECTOR_BYTES = 16  # the widest global load/store of one thread (ld.global.v4.b32)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype for logits of ``dtype``."""
    try:
        return _ACC_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"logits dtype {dtype} is not supported by the Triton backend") from None


def vector_width(*tensors: torch.Tensor) -> int:
    """Elements per 16-byte vector that the kernels may assume for rows of all ``tensors``.

    The kernels peel each row so that its main loop starts on a 16-byte boundary (see
    :func:`row_split`); the peel is computed from the first tensor's row offsets, so every tensor
    must have a contiguous vocabulary, a 16-byte-aligned base, and row strides congruent to the
    first's modulo the vector. Otherwise 1: no alignment is claimed and loads stay scalar.
    """
    elem = tensors[0].element_size()
    vec = _VECTOR_BYTES // elem
    first = tensors[0]
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % _VECTOR_BYTES or t.element_size() != elem:
            return 1
        if any((a - b) % vec for a, b in zip(t.stride()[:-1], first.stride()[:-1])):
            return 1
    return vec


@triton.jit
def row_split(row_start, n, VEC: tl.constexpr):
    """Split ``n`` row elements starting at element offset ``row_start`` into an unaligned head,
    a body of whole ``VEC``-element vectors starting on a ``VEC`` boundary, and a tail.

    Returns ``(head, body)``: the body is ``[head, head + body)``; the tail ``[head + body, n)``
    and the head each hold fewer than ``VEC`` elements. With a vocabulary that is not a multiple
    of 16 bytes (GPT-2's 50257, or a vocabulary resized to ``len(tokenizer)``) rows start at any
    element, and without this split Triton can prove no alignment and loads one element at a time.
    """
    # Row-relative offsets fit in int32 (V < 2^31) and keep per-lane index math at half the
    # registers of int64; addresses are formed in 64 bits by the callers.
    head = tl.minimum((VEC - row_start % VEC) % VEC, n).to(tl.int32)
    body = ((n - head) // VEC * VEC).to(tl.int32)
    return head, body


@triton.jit
def peel_offsets(head, body, n, VEC: tl.constexpr):
    """Row offsets of the head and tail elements (``2 * VEC`` lanes) and which lanes are real."""
    lanes = tl.arange(0, 2 * VEC)
    offs = tl.where(lanes < VEC, lanes, head + body + lanes - VEC)
    real = tl.where(lanes < VEC, lanes < head, offs < n)
    return offs, real


@triton.jit
def split_lse(lse, ACC_DTYPE: tl.constexpr):
    """The fp64 ``lse`` (``backends.LSE_DTYPE``) as ``(hi, lo)`` in ``ACC_DTYPE``: ``hi`` is ``lse``
    rounded, ``lo`` what the rounding lost (0 for fp64, and where ``hi`` is infinite or NaN, which
    ``hi`` carries alone). ``backends.split_lse`` is the same split in torch."""
    lse = lse.to(tl.float64)
    hi = lse.to(ACC_DTYPE)
    lo = tl.where(tl.abs(hi) < float("inf"), (lse - hi.to(tl.float64)).to(ACC_DTYPE), 0.0)
    return hi, lo


@triton.jit
def logprob_grad(z, offs, label, lse_hi, lse_lo, coef):
    """``coef * (onehot(label) - exp(z - lse))`` for one block of a row, in the accumulation
    dtype, with ``lse = lse_hi + lse_lo`` (:func:`split_lse`): ``(z - lse_hi) - lse_lo`` is exact
    where ``z`` is near ``lse``, whatever their common offset. The true-class entry
    ``coef * (1 - p)`` is formed before any rounding, so it does not cancel when ``p -> 1``."""
    prob = tl.exp((z - lse_hi) - lse_lo)
    return tl.where(offs == label, coef * (1.0 - prob), -coef * prob)


@triton.jit
def tanh(x):
    """``tanh`` of fp32 ``x`` from ``exp`` (libdevice's is missing under the interpreter).

    ``sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` (never overflows) for ``|x| >= 1/4``;
    below, where ``1 - e`` would cancel, the odd Taylor polynomial to ``x^13`` (its first omitted
    term, ``929569/638512875 x^15``, is under ``1e-11`` of ``tanh(x)`` there). Within 4 fp32 ulps
    of ``torch.tanh`` (``tests/backends/test_triton_common.py``)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * tl.minimum(ax, 30.0))  # past 30, tanh is 1 in fp32 (and 2|x| stays finite)
    big = (1.0 - e) / (1.0 + e)
    s = tl.minimum(tl.maximum(x, -0.25), 0.25)  # the polynomial is only taken below 1/4; -0 stays -0
    s2 = s * s
    small = s * (1.0 + s2 * (-1.0 / 3.0 + s2 * (2.0 / 15.0 + s2 * (-17.0 / 315.0 + s2 * (
        62.0 / 2835.0 + s2 * (-1382.0 / 155925.0 + s2 * (21844.0 / 6081075.0)))))))
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def round_to(x, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype`` and returned in fp32 (so the next step
    computes on the rounded value, as torch does between two ops).

    ``BY_BITS`` rounds bf16 on the bits: Triton's interpreter converts fp32 to bf16 by truncation
    (a GPU rounds to nearest-even), which would make the CPU tests check a different number than
    the GPU computes. ``bits + 0x7FFF + lsb`` then clearing the low half is round-to-nearest-even;
    infinities stay infinite."""
    if BY_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest-even: :func:`round_to`, then for bf16 under
    ``BY_BITS`` the top half of the bits (exact; the interpreter's own cast also flushes bf16
    subnormals to zero)."""
    if BY_BITS and dtype == tl.bfloat16:
        r = round_to(x, dtype, BY_BITS)
        return (r.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)  # the hardware's conversion: round-to-nearest-even
