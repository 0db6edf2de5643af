"""In-place scaling by a device scalar, skipped on the device when the scalar is 1.

``buf *= s`` with ``s = scale[0]`` read by the kernel itself: the product is formed in fp32 (fp64
for fp64 buffers) and rounded once to the buffer's dtype, exactly as ``buf.mul_(float(s))``
does. When ``s == 1`` every program returns after reading ``s``: nothing of ``buf`` is read or
written.

Why a kernel: ``fused_linear_dpo_loss(mode="one_pass")`` forms its gradients during the forward
and its backward only scales them by the incoming gradient of the loss, which is 1 for a plain
``loss.backward()``. Deciding that on the host costs a device synchronisation in the middle of
the training step (the host waits for the whole forward to drain before it can queue anything
after it); multiplying unconditionally costs a read and a write of the weight gradient
(``V x H``: 1 GB for Llama-3-8B's lm_head). The device makes the decision at no cost to either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cast_rounded, launch_device
from .config import interpreting


@triton.jit
def _scale_unless_one_kernel(buf_ptr, scale_ptr, n, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
                             ROUND_BY_BITS: tl.constexpr):
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    if s != 1.0:
        # A grid-stride loop over blocks: a capped grid covers any ``n``. Offsets in 64 bits (n may
        # exceed 2^31). Compiled for sm_90 (benchmarks/triton_codegen.py): 16-byte vector loads
        # and stores while n < 2^31; past that (a 64-bit n) the accesses are scalar but correct.
        for block in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
            offs = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(buf_ptr + offs, mask=inside)
            tl.store(buf_ptr + offs, cast_rounded(x.to(ACC_DTYPE) * s, x.dtype, ROUND_BY_BITS), mask=inside)


# Elements per program step and the most programs launched: 8192 bf16 elements (16 KB) per step,
# and a grid small enough that the early exit costs one short wave of programs, large enough
# (~15 per SM on an H100/H200) that a real scaling still runs at memory speed.
_BLOCK = 8192
_MAX_PROGRAMS = 2048
_INTERPRETER_BLOCK = 1024


def launch_scale_unless_one(buf: torch.Tensor, scale: torch.Tensor) -> None:
    if buf.numel() == 0:
        return
    block = _INTERPRETER_BLOCK if interpreting() else _BLOCK
    grid = (min(triton.cdiv(buf.numel(), block), _MAX_PROGRAMS),)
    with launch_device(buf):
        _scale_unless_one_kernel[grid](buf, scale, buf.numel(), BLOCK=block, ACC_DTYPE=acc_dtype(buf.dtype),
                                       ROUND_BY_BITS=interpreting(),
                                       num_warps=8 if block >= 4096 else 4)


@torch.library.custom_op("dpo_kernels::triton_scale_unless_one_", mutates_args=("buf",))
def scale_unless_one_op(buf: torch.Tensor, scale: torch.Tensor) -> None:
    """``buf *= scale`` in place (``scale``: one element on ``buf``'s device), nothing when it is 1."""
    launch_scale_unless_one(buf, scale)


@scale_unless_one_op.register_fake
def _scale_unless_one_fake(buf, scale):
    return None


def scale_(buf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``buf *= scale`` in place, decided on the device: nothing is read or written when ``scale``
    is 1. ``buf``: contiguous, floating; ``scale``: a one-element tensor on ``buf``'s device."""
    if not buf.is_contiguous():
        raise ValueError("scale_: the buffer must be contiguous")
    if scale.numel() != 1 or scale.device != buf.device:
        raise ValueError(f"scale_: scale must be one element on {buf.device}, got shape {tuple(scale.shape)} "
                         f"on {scale.device}")
    acc_dtype(buf.dtype)  # a clear TypeError for a dtype the kernel cannot scale
    scale_unless_one_op(buf, scale.reshape(1))
    return buf
