"""Launch configuration for the Triton kernels: block sizes and warps chosen from V and dtype.

The logits path is bandwidth-bound, so a configuration only has to keep enough bytes in flight
per program (wide vocabulary blocks, 16-byte loads) and enough programs to cover the SMs. There
is no ``@triton.autotune`` on purpose: the interpreter (CPU tests) cannot launch an autotuner
with more than one config, and a fixed rule keeps the launch free of benchmarking on first call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    num_warps: int


# Bytes of logits one program reads per loop step. 16 KB keeps a Hopper SM's load pipeline full
# with 8 warps (each thread issues 16-byte vector loads); larger blocks only add registers.
_GPU_BYTES_PER_STEP = 16384
_INTERPRETER_BLOCK = 1024  # the interpreter runs programs one by one: small blocks, many of them

# Tests shrink the block to exercise V above one block with small vocabularies;
# benchmarks/token_kernel_sweep.py times other blocks and warps on a GPU.
_override: LaunchConfig | None = None


def set_block_override(block_v: int | None, num_warps: int = 4) -> None:
    """Force the vocabulary block size (a power of two) and the warps of every launch, or restore
    the automatic rule with None."""
    global _override
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
    _override = None if block_v is None else LaunchConfig(block_v=block_v, num_warps=num_warps)


# Extras that keep a second per-lane value live through the block's reductions (entropy: e * z;
# accuracy: the lane index). At 16 KB per step they need 94-143 registers per thread on sm_90
# (benchmarks/triton_codegen.py), one 8-warp program per SM; 4 KB steps with 4 warps need ~76,
# six programs per SM and more bytes in flight in total. (Chosen from compiled register counts;
# not yet timed on a GPU.)
_REGISTER_HEAVY_EXTRAS = frozenset({"entropy", "accuracy"})
_HEAVY_BYTES_PER_STEP = 4096


def pick_config(vocab_size: int, dtype: torch.dtype, extras: frozenset[str] = frozenset()) -> LaunchConfig:
    """Block of the vocabulary one program handles per step, and the warps behind it."""
    if _override is not None:
        return _override
    if interpreting():
        return LaunchConfig(block_v=min(_INTERPRETER_BLOCK, triton.next_power_of_2(vocab_size)), num_warps=1)
    elem = dtype.itemsize
    if extras & _REGISTER_HEAVY_EXTRAS:
        block_v = max(min(_HEAVY_BYTES_PER_STEP // elem, triton.next_power_of_2(vocab_size)), 128)
        return LaunchConfig(block_v=block_v, num_warps=4)
    block_v = min(_GPU_BYTES_PER_STEP // elem, triton.next_power_of_2(vocab_size))
    block_v = max(block_v, 128)
    num_warps = 8 if block_v >= 4096 else 4
    return LaunchConfig(block_v=block_v, num_warps=num_warps)


# split's forward needs each row's gradient of logp right after its forward. One kernel can do
# both (WRITE_GRAD: one launch, the row's second read from L2 if it is still there) or the
# backward can follow the forward. The second read hits L2 only while the rows in flight fit
# it: at 64 registers x 256 threads (benchmarks/triton_codegen.py) an H100/H200 runs 4 programs
# on each of its 132 SMs, 528 rows at once; 528 x 64 KB = 34 MB fits their 50 MB L2, Llama-3's
# 256 KB rows (135 MB) do not, and there one kernel would read the row twice from memory like
# two kernels, on the forward's one-program-per-row grid (run D, docs/perf.md: 2.5 TB/s against
# the backward's 2.9). Chosen from this model, not yet timed: benchmarks/token_kernel_sweep.py
# times both. Under the interpreter the one kernel runs, so the CPU tests cover it.
_FUSE_MAX_ROW_BYTES = 64 << 10
_fusion_override: bool | None = None


def set_forward_and_grad_fusion(fuse: bool | None) -> None:
    """Force the one-kernel forward-and-gradient (True), the forward then the backward (False), or
    restore the rule of :func:`fuse_forward_and_grad` (None)."""
    global _fusion_override
    _fusion_override = fuse


def fuse_forward_and_grad(vocab_size: int, dtype: torch.dtype) -> bool:
    """Whether ``token_logprobs_forward_and_grad_`` runs as one kernel (see above)."""
    if _fusion_override is not None:
        return _fusion_override
    if interpreting():
        return True
    return vocab_size * dtype.itemsize <= _FUSE_MAX_ROW_BYTES
