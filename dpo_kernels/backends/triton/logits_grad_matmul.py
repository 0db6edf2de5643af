"""The logits' gradient straight out of the lm_head matmul: the backward of ``two_phase`` and ``split``.

For a chunk of valid tokens ``h [M, K]``, a vocabulary slice ``w [N, K]`` (rows ``v0:v1`` of the
lm_head weight, ``bias`` its entries), each token's full-row ``lse``, its loss coefficient
``coef = dLoss/dlogp`` and its label shifted into the slice ``y`` (a label outside the slice gets
no one-hot), one program computes an ``[BLOCK_M, BLOCK_N]`` tile of::

    a = h @ w.T (+ bias)                 fp32 accumulation, rounded to the input dtype (the lm_head's output)
    t = tanh(a / s);  z = round(s * t)   softcap s (Gemma-2), dcap = 1 - t^2 kept in registers
    z = round(z * (1/T))                 temperature T (times its fp32 reciprocal, as linear.py does)
    g = coef * (onehot(y) - exp(z - lse))   in fp32, the true class as coef * (1 - p), with the
                                         fp64 lse as fp32 hi + lo: exp((z - hi) - lo)
    g = round(g) * (1/T), rounded        the chain rule through the temperature
    g = round(g) * dcap, rounded         ... and through the softcap

and writes ``g`` (zeros on rows whose label is ``ignore_index``). These are the roundings of the
unfused path, step for step: a torch matmul, the softcap and temperature in torch
(``linear._chunk_logits``), the backward kernel of the contract in place, the chain rule in torch
(``linear._to_raw_logits_grad_``). So the two differ only by the matmul's order of accumulation,
and with a softcap by the tanh (``_common.tanh``, within 4 fp32 ulps of ``torch.tanh``): each
capped logit may then differ from the forward's by ``4 * 2^-24 * s``, a relative ``2^-17`` in
every probability at Gemma-2's ``s = 30`` (the forward's lse is exact for its own logits).

Why: the unfused path writes the slice's logits, reads them back and writes their gradient; here
the gradient is the matmul's only write (one pass over ``[M, N]`` instead of three, one launch
instead of two, and with a softcap no fp32 ``[M, N]`` derivative buffer). The weight gradient
``g.T @ h`` (and the hidden gradient, in ``two_phase``) stay cuBLAS products: their inputs are
``g`` itself, nothing to fuse.

The matmul is the Triton tutorial's (``03-matrix-multiplication``): a 1D grid in groups of
``GROUP_M`` row blocks (the weight tiles are re-read from L2), pointer tiles advanced along K,
out-of-range rows and columns clamped into range on load and masked on store, K masked.
Offsets are formed in 64 bits. Two options of ``MatmulConfig`` follow tutorial 09
(``09-persistent-matmul``), for the sweep to time against it: ``use_tma`` reads the operands
through tensor descriptors (Hopper's bulk copies; where an operand's strides allow it, else the
pointer tiles), ``persistent`` launches one program per SM that walks the tiles. Under the interpreter a half-precision ``tl.dot`` is wrong, so
the tiles are upcast to fp32 first (``DOT_DTYPE``), and its fp32-to-bf16 casts truncate, so
there every rounding is done on the bits (``ROUND_BY_BITS``, see ``_common.round_to``): the CPU
tests check the numbers a GPU computes. fp32 inputs take ``input_precision="ieee"`` (torch's
default for fp32 matmuls: no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import LSE_DTYPE
from ._common import cast_rounded, launch_device, logprob_grad, round_to, split_lse, tanh

try:  # host-side tensor descriptors (Hopper's TMA): Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer tiles only
    TensorDescriptor = None
from .config import interpreting, pick_matmul_config

_DOT_INPUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(row block, column block)`` of tile number ``tile``: GROUP_M row blocks sweep the columns
    together, so the weight tiles they share are read from memory once per group rather than
    once per row block."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _tile_product(h, w, pid_m, pid_n, M, N, K, stride_hm, stride_hk, stride_wn, stride_wk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """``h[rows] @ w[cols].T`` of one tile in fp32. ``h``/``w`` are tensor descriptors (``USE_TMA``:
    Hopper's bulk copies, out-of-range elements read as zeros) or pointers (tiles clamped into
    range, K masked)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = h.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = w.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE).T, acc, input_precision=INPUT_PRECISION)
    else:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows and columns past the end are clamped onto real ones for the loads (no mask in the
        # K loop but K's own); their results are never stored.
        load_m = tl.where(offs_m < M, offs_m, 0)
        load_n = tl.where(offs_n < N, offs_n, 0)
        h_ptrs = h + load_m[:, None] * stride_hm + offs_k[None, :] * stride_hk
        w_ptrs = w + load_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # a tile of w.T
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(h_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _tile_gradient(acc, pid_m, pid_n, bias_ptr, labels_ptr, lse_ptr, coef_ptr, out_ptr, M, N,
                   stride_bn, stride_om, stride_on, ignore_index, softcap, inv_temperature,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
    """The epilogue: the tile's logits from the fp32 product, then their gradient, stored."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ty = out_ptr.dtype.element_ty
    row_in = offs_m < M
    col_in = offs_n < N
    label = tl.load(labels_ptr + offs_m, mask=row_in, other=ignore_index).to(tl.int64)
    lse_hi, lse_lo = split_lse(tl.load(lse_ptr + offs_m, mask=row_in, other=0.0), tl.float32)
    ignored = label == ignore_index
    # The loss may hand a gradient to an ignored token; it must not leak.
    coef = tl.where(ignored, 0.0, tl.load(coef_ptr + offs_m, mask=row_in, other=0.0).to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bn, mask=col_in, other=0.0).to(tl.float32)[None, :]
    z = round_to(acc, out_ty, ROUND_BY_BITS)  # the lm_head's output, rounded as torch.addmm rounds it
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        dcap = 1.0 - t * t
        z = round_to(t * softcap, out_ty, ROUND_BY_BITS)
    if HAS_TEMPERATURE:
        z = round_to(z * inv_temperature, out_ty, ROUND_BY_BITS)
    g = logprob_grad(z, offs_n[None, :], label[:, None], lse_hi[:, None], lse_lo[:, None], coef[:, None])
    if HAS_TEMPERATURE:
        g = round_to(g, out_ty, ROUND_BY_BITS) * inv_temperature
    if HAS_SOFTCAP:
        g = round_to(g, out_ty, ROUND_BY_BITS) * dcap
    g = tl.where(ignored[:, None], 0.0, g)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, cast_rounded(g, out_ty, ROUND_BY_BITS), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _logits_grad_matmul_kernel(
    h, w, bias_ptr, labels_ptr, lse_ptr, coef_ptr, out_ptr,
    M, N, K,
    stride_hm, stride_hk,
    stride_wn, stride_wk,
    stride_bn,
    stride_om, stride_on,
    ignore_index, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_BY_BITS: tl.constexpr,
    USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # PERSISTENT: one program per SM walks the tiles, so its next tile's loads are issued while
    # the previous tile's epilogue (the exp, the store) runs; else one program per tile.
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tile_product(h, w, pid_m, pid_n, M, N, K, stride_hm, stride_hk, stride_wn, stride_wk,
                                BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, USE_TMA)
            _tile_gradient(acc, pid_m, pid_n, bias_ptr, labels_ptr, lse_ptr, coef_ptr, out_ptr, M, N,
                           stride_bn, stride_om, stride_on, ignore_index, softcap, inv_temperature,
                           HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_M, BLOCK_N, ROUND_BY_BITS)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tile_product(h, w, pid_m, pid_n, M, N, K, stride_hm, stride_hk, stride_wn, stride_wk,
                            BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, USE_TMA)
        _tile_gradient(acc, pid_m, pid_n, bias_ptr, labels_ptr, lse_ptr, coef_ptr, out_ptr, M, N,
                       stride_bn, stride_om, stride_on, ignore_index, softcap, inv_temperature,
                       HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_M, BLOCK_N, ROUND_BY_BITS)


def _check(hidden, weight, bias, labels, lse, coef):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"logits_grad_matmul: hidden [M, K] and weight [N, K] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype not in _DOT_INPUT or weight.dtype != hidden.dtype:
        raise TypeError(f"logits_grad_matmul: hidden and weight must share a dtype among "
                        f"{[str(d) for d in _DOT_INPUT]}, got {hidden.dtype} and {weight.dtype}")
    M, N = hidden.shape[0], weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype != hidden.dtype):
        raise ValueError(f"logits_grad_matmul: bias must be [{N}] of {hidden.dtype}, got "
                         f"{tuple(bias.shape)} of {bias.dtype}")
    if labels.shape != (M,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"logits_grad_matmul: labels must be [{M}] int64/int32, got {tuple(labels.shape)} "
                         f"of {labels.dtype}")
    for name, x in (("lse", lse), ("coef", coef)):
        if x.shape != (M,) or not x.is_floating_point():
            raise ValueError(f"logits_grad_matmul: {name} must be a floating [{M}] tensor, got "
                             f"{tuple(x.shape)} of {x.dtype}")
    tensors = [hidden, weight, labels, lse, coef] + ([bias] if bias is not None else [])
    if any(x.device != hidden.device for x in tensors):
        raise ValueError("logits_grad_matmul: every tensor must be on one device")


def logits_grad_matmul(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, ignore_index: int,
                       softcap: float | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The gradient of ``sum_m coef[m] * logp[m]`` w.r.t. the raw logits ``hidden @ weight.T + bias``,
    ``[M, N]`` in the input dtype, without the logits ever being stored (see the module docstring).

    ``hidden`` ``[M, K]``, ``weight`` ``[N, K]`` and ``bias`` ``[N]`` or None (any strides: a slice
    of the lm_head's rows is the intended use), all bf16, fp16 or fp32; ``labels`` ``[M]`` already
    shifted into the slice; ``lse`` (each row's over the full vocabulary, fp64 as the forward
    gives it; a narrower one is read as it is) and ``coef`` ``[M]``.
    """
    _check(hidden, weight, bias, labels, lse, coef)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logits_grad_matmul: softcap must be > 0 or None, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"logits_grad_matmul: temperature must be > 0, got {temperature}")
    M, K = hidden.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out
    cfg = pick_matmul_config(hidden.dtype)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    grid = (min(tiles, _programs_at_once(hidden.device)) if cfg.persistent else tiles,)
    dot_dtype = tl.float32 if interpreting() else _DOT_INPUT[hidden.dtype]
    use_tma = cfg.use_tma and K > 0 and _tma_ready(hidden) and _tma_ready(weight)
    h, w = hidden, weight
    if use_tma:
        h = TensorDescriptor.from_tensor(hidden, [cfg.block_m, cfg.block_k])
        w = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    with launch_device(hidden):
        _logits_grad_matmul_kernel[grid](
            h, w, bias if bias is not None else hidden, labels.contiguous(),
            lse.to(LSE_DTYPE).contiguous(), coef.float().contiguous(), out,
            M, N, K,
            hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0,
            out.stride(0), out.stride(1),
            int(ignore_index), float(softcap or 1.0), 1.0 / float(temperature),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_TEMPERATURE=temperature != 1.0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION="ieee" if hidden.dtype == torch.float32 or interpreting() else "tf32",
            ROUND_BY_BITS=interpreting(),
            USE_TMA=use_tma,
            PERSISTENT=cfg.persistent,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D operand can be read through a tensor descriptor: unit column stride, a
    16-byte-aligned base and row stride (what Hopper's bulk copies require), and a Triton that
    has host-side descriptors. Else the pointer tiles read it."""
    return (TensorDescriptor is not None and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def _programs_at_once(device: torch.device) -> int:
    """A persistent grid: one program per SM (the tiles' registers allow one), a few under the
    interpreter (so its tile loop runs more than once in the tests)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count
