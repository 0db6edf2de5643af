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
    # The forward kernels' loop keeps per-lane running statistics, merged once per row
    # (token_logprobs_fwd._fold_block on [R, LANE] blocks), instead of block-wide reductions per block. The backward
    # has no such loop and ignores it.
    lane_stats: bool = False


# Bytes of logits one program reads per loop step. 16 KB keeps a Hopper SM's load pipeline full
# with 8 warps (each thread issues 16-byte vector loads); larger blocks only add registers.
_GPU_BYTES_PER_STEP = 16384
_INTERPRETER_BLOCK = 1024  # the interpreter runs programs one by one: small blocks, many of them

# Tests shrink the block to exercise V above one block with small vocabularies;
# benchmarks/token_kernel_sweep.py times other blocks and warps on a GPU. Overrides are kept as
# (block_v, num_warps, lane_stats or None: the rule's).
_override: tuple[int, int, bool | None] | None = None

# The forward's vocabulary loop either reduces each block across the whole program (max, sum and
# each extra: a cross-warp reduction with its barriers per statistic per block, the next block's
# loads waiting behind them) or keeps running statistics per lane (one thread's 16-byte vector)
# and reduces once per row. Compiled for sm_90 (benchmarks/triton_codegen.py) the lane loop has
# no shuffle and no barrier and the same 16-byte loads; at 8192 bf16 per step and 8 warps it
# needs 63 registers against the block loop's 58 with triton 3.6 (the GPU image's), 59 against
# 64 with triton 3.9: 4 programs per SM either way. What it changes is that a warp's next loads
# no longer wait for the whole program at a barrier. It costs one more
# exp per lane per block (1/8 of an exp per bf16 element).
# Not yet timed on a GPU: the rule keeps the measured block loop there (run D: 2.5 TB/s), and
# token_kernel_sweep.py times both. Under the interpreter the lane loop runs, so the CPU tests
# cover it; tests force the block loop where they test it.
_lane_stats_override: bool | None = None


def set_lane_stats(enabled: bool | None) -> None:
    """Force the forward's per-lane statistics (True), its block reductions (False), or restore
    the rule of :func:`lane_stats` (None). An override with its own ``lane_stats`` wins."""
    global _lane_stats_override
    _lane_stats_override = enabled


def lane_stats(kernel: str) -> bool:
    """Whether ``kernel``'s launches use the per-lane loop (see above; never the backward)."""
    if kernel == "backward":
        return False
    if _lane_stats_override is not None:
        return _lane_stats_override
    return interpreting()


# The token kernels, as pick_config's callers name them: the forward, the forward that also
# writes the gradient (WRITE_GRAD), the backward.
KERNELS = ("forward", "forward_and_grad", "backward")
# Configurations forced for one kernel at one vocabulary size (the hidden path's full rows or
# slices): what the benchmarks' tuned variants apply from the token sweep's timings, so that a
# whole step can be timed with them before any becomes the rule.
_kernel_overrides: dict[tuple[str, int], tuple[int, int, bool | None]] = {}


def _checked_launch(block_v: int, num_warps: int, lane_stats: bool | None) -> tuple[int, int, bool | None]:
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
    return int(block_v), int(num_warps), None if lane_stats is None else bool(lane_stats)


def set_block_override(block_v: int | None, num_warps: int = 4, lane_stats: bool | None = None) -> None:
    """Force the vocabulary block size (a power of two) and the warps of every launch, or restore
    the automatic rule with None; ``lane_stats`` forces the forward's loop too (None: the rule's,
    :func:`lane_stats`)."""
    global _override
    _override = None if block_v is None else _checked_launch(block_v, num_warps, lane_stats)


def set_kernel_override(kernel: str, vocab_size: int, block_v: int | None, num_warps: int = 4,
                        lane_stats: bool | None = None) -> None:
    """Force the block and warps (and, for a forward, the loop: ``lane_stats``, None for the
    rule's) of one kernel (:data:`KERNELS`) at one vocabulary size (the length of the rows it is
    launched on), or restore the rule there with ``block_v=None``. :func:`set_block_override`,
    which forces every launch, takes precedence."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if block_v is None:
        _kernel_overrides.pop((kernel, int(vocab_size)), None)
    else:
        _kernel_overrides[kernel, int(vocab_size)] = _checked_launch(block_v, num_warps, lane_stats)


def clear_kernel_overrides() -> None:
    """Every :func:`set_kernel_override` undone."""
    _kernel_overrides.clear()


# The accuracy keeps a second value per lane live through each block's reductions (the argmax's
# index). At 16 KB per step with 8 warps the forward then needs 104-112 registers per thread with
# the accuracy alone and 128-147 with every extra on sm_90 (benchmarks/triton_codegen.py, triton
# 3.6 and 3.9): two 8-warp programs per SM; 4 KB steps with 4 warps need 71 (69 with 3.9) with
# every extra, seven programs per SM and more bytes in flight in total. The entropy alone needs 63
# at 16 KB, as the plain forward (58-64): it keeps the 16 KB step. (Chosen from compiled register
# counts; not yet timed on a GPU.)
_REGISTER_HEAVY_EXTRAS = frozenset({"accuracy"})
_HEAVY_BYTES_PER_STEP = 4096


def pick_config(vocab_size: int, dtype: torch.dtype, extras: frozenset[str] = frozenset(),
                kernel: str = "forward") -> LaunchConfig:
    """Block of the vocabulary one program handles per step, and the warps behind it, for
    ``kernel`` (:data:`KERNELS`) on rows of ``vocab_size``."""
    lanes = lane_stats(kernel)
    forced = _override if _override is not None else _kernel_overrides.get((kernel, vocab_size))
    if forced is not None:
        block_v, num_warps, forced_lanes = forced
        return LaunchConfig(block_v, num_warps, lanes if forced_lanes is None or kernel == "backward"
                            else forced_lanes)
    if interpreting():
        return LaunchConfig(block_v=min(_INTERPRETER_BLOCK, triton.next_power_of_2(vocab_size)), num_warps=1,
                            lane_stats=lanes)
    elem = dtype.itemsize
    if extras & _REGISTER_HEAVY_EXTRAS:
        block_v = max(min(_HEAVY_BYTES_PER_STEP // elem, triton.next_power_of_2(vocab_size)), 128)
        return LaunchConfig(block_v=block_v, num_warps=4, lane_stats=lanes)
    block_v = min(_GPU_BYTES_PER_STEP // elem, triton.next_power_of_2(vocab_size))
    block_v = max(block_v, 128)
    num_warps = 8 if block_v >= 4096 else 4
    return LaunchConfig(block_v=block_v, num_warps=num_warps, lane_stats=lanes)


# split's forward needs each row's gradient of logp right after its forward. One kernel can do
# both (WRITE_GRAD: one launch, the row's second read from L2 if it is still there) or the
# backward can follow the forward. The second read hits L2 only while the rows in flight fit
# it: at 79 registers x 256 threads (benchmarks/triton_codegen.py, triton 3.6; 64 with 3.9) an
# H100/H200 runs 3 programs (4) on each of its 132 SMs, 396 rows (528) at once; 396 x 64 KB =
# 26 MB (34 MB) fits their 50 MB L2, Llama-3's 256 KB rows (101 MB, 135 MB) do not, and there one kernel would read the row twice from memory like
# two kernels, on the forward's one-program-per-row grid (run D, docs/perf.md: 2.5 TB/s against
# the backward's 2.9). Chosen from this model, not yet timed: benchmarks/token_kernel_sweep.py
# times both. Under the interpreter the one kernel runs, so the CPU tests cover it.
_FUSE_MAX_ROW_BYTES = 64 << 10
_fusion_override: bool | None = None
_fusion_by_vocab: dict[int, bool] = {}


def set_forward_and_grad_fusion(fuse: bool | None, vocab_size: int | None = None) -> None:
    """Force the one-kernel forward-and-gradient (True), the forward then the backward (False), or
    restore the rule of :func:`fuse_forward_and_grad` (None): for every row length, or only for
    rows of ``vocab_size`` (the override for every length takes precedence)."""
    global _fusion_override
    if vocab_size is None:
        _fusion_override = fuse
    elif fuse is None:
        _fusion_by_vocab.pop(int(vocab_size), None)
    else:
        _fusion_by_vocab[int(vocab_size)] = bool(fuse)


def fuse_forward_and_grad(vocab_size: int, dtype: torch.dtype) -> bool:
    """Whether ``token_logprobs_forward_and_grad_`` runs as one kernel (see above)."""
    if _fusion_override is not None:
        return _fusion_override
    if vocab_size in _fusion_by_vocab:
        return _fusion_by_vocab[vocab_size]
    if interpreting():
        return True
    return vocab_size * dtype.itemsize <= _FUSE_MAX_ROW_BYTES


# The backward of two_phase and split forms each vocabulary slice's logits only to turn them into
# their gradient. logits_grad_matmul.py does both in one Triton matmul whose epilogue writes the
# gradient: the unfused path (a cuBLAS matmul, then the backward kernel in place) writes, reads
# and writes the slice again. What that saves depends on the Triton matmul keeping up with
# cuBLAS, which no GPU run has measured yet: on a GPU the rule keeps the measured path until
# benchmarks/token_kernel_sweep.py has timed both. Under the interpreter the fused matmul runs,
# so the CPU tests cover it.
@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    use_tma: bool = False  # operands through tensor descriptors (Hopper's TMA) where their strides allow
    persistent: bool = False  # one program per SM walking the tiles


# The Triton tutorial's Hopper configuration for 16-bit inputs (128 x 256 x 64, 8 warps, 3 stages),
# and a half-width tile for fp32 (twice the bytes per element in shared memory).
_MATMUL_16BIT = MatmulConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3)
_MATMUL_FP32 = MatmulConfig(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3)
_MATMUL_INTERPRETER = MatmulConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=1, num_stages=1)
_matmul_override: MatmulConfig | None = None
_matmul_override_dtypes: frozenset[torch.dtype] | None = None  # None: every dtype
_logits_grad_override: bool | None = None


def set_matmul_config_override(cfg: MatmulConfig | None, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Force the tiles of the fused logits-gradient matmul (tests, the sweep), or restore the rule
    with None. Block sizes must be powers of two, at least 16 (``tl.dot``'s smallest tile).
    ``dtypes``: the input dtypes the tiles are forced for (default: all); the others keep the
    rule's (a 16-bit tile may need more shared memory than a GPU has in fp32)."""
    global _matmul_override, _matmul_override_dtypes
    if cfg is not None:
        for name in ("block_m", "block_n", "block_k", "group_m", "num_warps"):
            value = getattr(cfg, name)
            if value < 1 or value & (value - 1) or (name.startswith("block") and value < 16):
                raise ValueError(f"MatmulConfig.{name} must be a power of two"
                                 f"{' >= 16' if name.startswith('block') else ''}, got {value}")
        if cfg.num_stages < 1:
            raise ValueError(f"MatmulConfig.num_stages must be >= 1, got {cfg.num_stages}")
    _matmul_override = cfg
    _matmul_override_dtypes = None if dtypes is None else frozenset(dtypes)


def pick_matmul_config(dtype: torch.dtype) -> MatmulConfig:
    """Tiles, warps and pipeline stages of the fused logits-gradient matmul."""
    if _matmul_override is not None and (_matmul_override_dtypes is None or dtype in _matmul_override_dtypes):
        return _matmul_override
    if interpreting():
        return _MATMUL_INTERPRETER
    return _MATMUL_FP32 if dtype == torch.float32 else _MATMUL_16BIT


def set_logits_grad_fusion(fuse: bool | None) -> None:
    """Force the fused logits-gradient matmul in the backward of two_phase and split (True), the
    cuBLAS matmul then the backward kernel (False), or restore :func:`fuse_logits_grad` (None)."""
    global _logits_grad_override
    _logits_grad_override = fuse


def fuse_logits_grad(dtype: torch.dtype) -> bool:
    """Whether the backward's slices take the fused matmul (see above). Never for float64 (the
    matmul is written for the training dtypes; gradcheck's fp64 runs take the torch path)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if _logits_grad_override is not None:
        return _logits_grad_override
    return interpreting()
