"""The chunked lm_head + logprob path: per-token log-probs from hidden states, never the full logits.

``logits = hidden @ weight.T (+ bias)`` is formed a chunk of tokens at a time (a torch matmul:
cuBLAS on the GPU), transformed in place (Gemma-2 ``logit_softcap``, then ``temperature``), and
handed to the kernel contract of the chosen backend (``token_logprobs_forward`` /
``token_logprobs_backward(..., inplace=True)``, so the logits gradient overwrites the chunk). Only
the valid tokens (label != ignore_index after the shift) are gathered into chunks: ignored tokens
cost no matmul and no vocabulary pass. Sizing that gather takes one host sync
(:class:`TokenCensus`: the valid tokens per sequence, read once per call and shared by the
reference's and the policy's gathers, ``auto``'s choice and ``one_pass``'s chunks).

Three modes, all exact (no gradient filtering; they differ in how often the bf16 weight gradient
is rounded, see below):

- ``two_phase`` (low memory; two registered operators, so torch.compile traces it whole): the
  forward keeps per-token ``lse`` and references to the inputs;
  the backward receives ``dL/dlogp`` per token (any loss, any extra use of the per-sequence
  log-probs) and loops over vocabulary slices ``[v0, v1)`` (outer) and chunks of valid tokens
  (inner): it recomputes the slice's logits ``h @ weight[v0:v1].T (+ bias[v0:v1])`` (softcap and
  temperature are elementwise), and the kernel contract turns them in place into
  ``coef * (onehot - exp(z - lse))`` with the full row's ``lse`` from the forward (each slice's
  softmax is exact) and the labels shifted into the slice (a label outside it is out of range:
  no one-hot). Four matmuls over the valid tokens (logits, recompute, grad hidden, grad weight),
  each split into slices, none repeated. Slice size: ``vocab_chunk`` or the hidden size H (at
  least :data:`MIN_SLICE_ROWS`; see there why); tokens per backward chunk: ``chunk_tokens`` or
  what keeps ``tokens x slice`` logits within :data:`DEFAULT_CHUNK_BYTES`. The hidden gradient
  itself is allocated after the slices, once the gathered hidden states are freed.
- ``one_pass`` (three matmuls): when each pair's gradient depends on that pair only (every loss
  but the batch-coupled ``aot``/``aot_unpaired``; the batch-mean NLL of ``sft``/``cpo``/``orpo``/
  CPO-SimPO is linear, so its per-token coefficient is a constant, except under WPO's per-pair
  weights, ``use_weighting=True``, which make it the batch's mean weight: ``Objective.coupling``),
  chunks hold whole pairs (default budget
  :data:`DEFAULT_ONE_PASS_CHUNK_BYTES` of logits), the per-token coefficients are computed right
  after each chunk's forward (autograd on the tiny per-pair loss) and the gradients of hidden,
  weight and bias are accumulated during the forward (Liger-style); the backward only scales them
  by the incoming gradient. A pair larger than a chunk is cut into pieces of at most
  ``chunk_tokens``: only the last piece's logits are kept through the pair's coefficients, the
  earlier pieces' are formed again for their gradient (3 + f matmuls, f the fraction formed
  again; still fewer than two_phase's 4), so no mode ever holds more than a chunk of logits.
  It keeps, from its forward to its backward, the weight gradient in the
  weight's dtype (no fp32 ``[V, H]`` buffer), an fp32 ``[V]`` bias one and the hidden gradient
  ``[2P, T, H]`` in the input dtype (plus the ``[2P, T]`` token results).
- ``split`` (four matmuls, every gradient rounded once, the least memory, any loss): each token's
  hidden gradient is ``coef_t * u_t`` with ``u_t = d logp_t / d h_t``, which needs no loss. The
  forward takes chunks of valid tokens (of any size: no whole pairs, nothing formed again), forms
  the logits, the token results and ``u`` (the logits' gradient for a coefficient of 1, times the
  weight: one product per token over the whole vocabulary, kept in fp32), then runs the loss once
  and keeps its small graph. The backward takes the per-token coefficients from that graph for
  the incoming gradients (so ``chosen_logps`` may carry gradients too), rounds ``coef_t * u_t``
  once into the hidden gradient, frees ``u``, and runs ``two_phase``'s backward for the weight and
  bias (:class:`Split`), with slices twice as wide where every valid token fits one chunk of
  them (:func:`backward_plan`). No fp32 ``[N_valid, H]`` accumulator summed over slices: ``two_phase``
  needs one only because its hidden gradient is summed over vocabulary slices.

Memory: :func:`one_pass_peak_bytes` and :func:`split_peak_bytes` count the buffers of each mode's
peak (a :class:`Footprint` of the call's sizes). On a GPU, ``mode="auto"`` takes one_pass only
where its peak fits :data:`AUTO_MEMORY_HEADROOM` of :func:`available_bytes`. Otherwise it takes
one_pass with a smaller chunk that fits, or split (``api._one_pass_chunk_for_memory``).
``api.estimate_linear_memory`` is the public face of the two estimates.

Precision of the products (fp32 accumulation inside every GEMM: cuBLAS for bf16/fp16 operands;
where an fp32 result is summed over chunks the GEMM writes/accumulates fp32 directly,
``torch.addmm(..., out_dtype=torch.float32)``, probed once per device, see :func:`fp32_mm_path`;
on the CPU both chunk-sized operands are upcast). The kernel rounds ``grad_logits`` to the input
dtype once (the same rounding as materialized bf16 logits would have); then:

- ``two_phase``: ``grad_weight[v0:v1] = grad_slice.T @ h``: with one token chunk per slice (the
  default up to ``DEFAULT_CHUNK_BYTES / (2 x slice)`` valid tokens: 32768 at a 4096-row slice in
  bf16) a single product written straight into the weight gradient, rounded once; with several
  token chunks summed in an fp32 ``[v1 - v0, H]`` buffer, rounded once. No ``[V, H]`` fp32
  buffer. ``grad_hidden = sum_slices grad_slice @ weight[v0:v1]`` in an fp32 ``[N_valid, H]``
  buffer rounded once at the end (one slice: a single product per token, no buffer). Bias likewise
  per slice. Every gradient is rounded to its dtype exactly once: the exact mode.
- ``one_pass``: the weight gradient is one product per chunk (or piece of a pair larger than a
  chunk; fp32 inside), summed over them in the weight's dtype by the GEMM (``addmm_``): a bf16
  weight gradient takes one rounding per chunk or piece (2 to 8 roundings of its running sum at
  typical batches with the default chunk; N_valid / chunk_tokens with small chunks; fp32
  weights: fp32 throughout);
  each token's hidden gradient is one product ``grad_logits @ weight``. The incoming gradient
  scales both in place in fp32, one rounding (none when it is 1). For a single rounding of every
  gradient use ``two_phase`` or ``split``.
- ``split``: the weight and bias gradients as ``two_phase``'s (the same code); each token's
  logits gradient is rounded to the input dtype before its coefficient multiplies it (the same
  error as rounding it after, not the same bits), the hidden gradient once, in fp32, from the
  product kept in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .backends import (accumulation_dtype, autocast_off, empty_forward_outputs, extras_mask, extras_names,
                       forward_and_grad_, fused_logits_grad_matmul, load_backend, lse_dtype)
from .logprobs import refuse_double_backward, refuse_forward_ad

MODES = ("auto", "one_pass", "two_phase", "split")

# Default memory budget of one chunk's logits (chunk_tokens x V in the compute dtype): the
# ``two_phase`` forward, the reference model's forward, and the ``two_phase`` backward's
# ``tokens x slice`` chunks.
DEFAULT_CHUNK_BYTES = 256 << 20

# Default budget of one ``one_pass`` chunk's logits (whole pairs): larger, because every chunk
# rounds the running bf16 weight gradient once (and its GEMM reads and writes that gradient once
# more) and runs the loss once: 3072 tokens at V = 128256 in bf16, two pairs of 1536 at issue 5's
# 8 x 1024 shape (H200, sweeps of runs C and D in docs/perf.md: 30.4 and 30.1 ms against 31.3 and
# 31.1 with 512 MiB's one pair per chunk, at 1.96 GB instead of 1.54). ``mode="auto"`` takes
# ``one_pass`` unless pairs larger than it would have much of their logits formed again (see
# :data:`AUTO_MAX_FORMED_AGAIN`).
DEFAULT_ONE_PASS_CHUNK_BYTES = 768 << 20

# Default vocabulary rows of one slice of the ``two_phase`` backward: the hidden size H (a multiple
# of 128), at least this many. Why H: each slice's hidden-gradient product ``[n, rows] @ [rows, H]``
# adds into an fp32 ``[n, H]`` accumulator that the GEMM reads and writes once per slice, 8 n H
# bytes per 2 n rows H flops, so the slice sets the arithmetic intensity of the accumulation
# (rows / 4 flop per byte: at 2048 rows the H200 took 11.0 ms for products that take 8.5 ms
# without the accumulator); and the slice's logits ``[n, rows]`` (input dtype) then stay no larger
# than the gathered hidden states ``[n, H]`` that the backward holds anyway, a third of its
# n-sized buffers (``[n, H]`` fp32 accumulator + ``[n, H]`` hidden states + ``[n, rows]`` logits).
MIN_SLICE_ROWS = 2048

# Bytes of one block when the fp32 hidden-gradient accumulator is rounded into the gradient.
ROUNDING_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class Head:
    """What a chunk's logits are: ``transform(hidden_chunk @ weight.T + bias)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float
    softcap: float | None
    backend_name: str
    ignore_index: int

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def inv_temperature(self) -> float:
        """``1 / temperature``, by which the logits and their gradient are multiplied (as fp32 in
        the kernels: the fused matmul's epilogue multiplies by the same number, so both paths
        form the same logits, bit for bit, whatever the device's division does)."""
        return 1.0 / self.temperature


def chunk_size(vocab_size: int, dtype: torch.dtype, softcap: float | None, chunk_tokens: int | None,
               budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk: ``chunk_tokens`` if given, else what fits ``budget`` bytes (the chunk's
    logits in the compute dtype, plus the fp32 temporaries of the softcap)."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    per_token = vocab_size * dtype.itemsize
    if softcap is not None:
        per_token += 2 * 4 * vocab_size  # tanh in fp32 and its derivative, kept for the backward
    tokens = max(1, budget // max(per_token, 1))
    return tokens - tokens % 128 if tokens >= 256 else tokens


def one_pass_chunk_size(vocab_size: int, dtype: torch.dtype, softcap: float | None, chunk_tokens: int | None) -> int:
    """Tokens per ``one_pass`` chunk (whole pairs; a larger pair is cut into pieces of this size):
    ``chunk_tokens`` if given, else what fits :data:`DEFAULT_ONE_PASS_CHUNK_BYTES`."""
    return chunk_size(vocab_size, dtype, softcap, chunk_tokens, DEFAULT_ONE_PASS_CHUNK_BYTES)


def split_chunk_size(vocab_size: int, hidden_size: int, dtype: torch.dtype, softcap: float | None,
                     chunk_tokens: int | None) -> int:
    """Tokens per ``split`` forward chunk at most (valid tokens in order, any pair boundaries; the
    fewest such chunks, of even sizes: :func:`token_chunks`): ``chunk_tokens`` if given, else what
    fits the larger of :data:`DEFAULT_ONE_PASS_CHUNK_BYTES` and the weight gradient's own size
    (``V x H`` in the input dtype: H tokens without a softcap). Why the latter: split's backward
    holds that gradient, the hidden gradient, the gathered valid rows and a slice of logits, while
    its forward holds the per-token fp32 hidden gradients ``u``, a chunk's logits and rows; a chunk
    of logits no larger than the weight gradient keeps the forward's peak near or below the
    backward's, and fewer, larger chunks mean larger matmuls and less fixed cost per chunk."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    weight_bytes = vocab_size * hidden_size * dtype.itemsize
    return chunk_size(vocab_size, dtype, softcap, None, max(DEFAULT_ONE_PASS_CHUNK_BYTES, weight_bytes))


class TokenCensus:
    """How many tokens each sequence scores (``label != ignore_index``): read on the host once, on
    first use, which is the one host sync of this path before its matmuls (it sizes the gather of
    the valid positions and the chunks). Every later need (the reference's positions, the policy's,
    ``auto``'s pair sizes, one_pass's chunks) reuses the read.

    ``vocab_size`` given (validation): the scored labels outside ``[0, vocab_size)`` are counted on
    the device in the same read, and ``on_bad_labels()`` is called when there is one (it raises
    with the position): the label check costs no sync of its own, and it still precedes every
    matmul, since every matmul needs the counts first."""

    def __init__(self, aligned: torch.Tensor, ignore_index: int, num_pairs: int, vocab_size: int | None = None,
                 on_bad_labels=None):
        self.aligned, self.ignore_index, self.num_pairs = aligned, ignore_index, num_pairs
        self.vocab_size, self.on_bad_labels = vocab_size, on_bad_labels
        self._seq_counts: list[int] | None = None

    def seq_counts(self) -> list[int]:
        """Scored tokens of each of the ``2P`` sequences (the sync, the first time)."""
        if self._seq_counts is None:
            scored = self.aligned != self.ignore_index
            read = scored.sum(-1)
            if self.vocab_size is not None:
                bad = scored & ((self.aligned < 0) | (self.aligned >= self.vocab_size))
                read = torch.cat([read, bad.sum().view(1)])
            values = read.tolist()  # the one host sync
            if self.vocab_size is not None:
                *values, bad_count = values
                if bad_count and self.on_bad_labels is not None:
                    self.on_bad_labels()
                if bad_count:
                    raise ValueError(f"{bad_count} scored label(s) outside [0, V={self.vocab_size})")
            self._seq_counts = values
        return self._seq_counts

    def pair_counts(self) -> list[int]:
        """Scored tokens of each pair (chosen + rejected sequence)."""
        counts, P = self.seq_counts(), self.num_pairs
        return [counts[p] + counts[P + p] for p in range(P)]

    def total(self) -> int:
        return sum(self.seq_counts())


def valid_positions(aligned: torch.Tensor, ignore_index: int, total: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the scored tokens, row-major. ``total`` (their number, e.g.
    :meth:`TokenCensus.total`) known: no host sync; else one."""
    return _true_positions(aligned != ignore_index, total)


def _true_positions(mask: torch.Tensor, total: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of a 2-D mask's True entries, row-major: ``nonzero_static`` when their
    number is known (no sync), else ``nonzero`` (one sync)."""
    if total is not None:
        try:
            idx = torch.nonzero_static(mask, size=total)
            return idx[:, 0], idx[:, 1]
        except (RuntimeError, NotImplementedError, AttributeError):  # a device without nonzero_static
            pass
    return mask.nonzero(as_tuple=True)


def _row_words(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` ``[B, T, H]`` as a ``[B * T, W]`` view whose elements are the widest words (8 or 4
    bytes) its rows allow, or ``None`` when its rows are not evenly spaced (then the gathers index
    it as it is). Why: a row gather or scatter moves one element per thread; 8-byte words move four
    bf16 values each, so the same rows take a quarter of the elements."""
    if x.dim() != 3:
        return None
    try:
        flat = x.detach().view(-1, x.shape[-1])
    except RuntimeError:
        return None
    for word in (torch.int64, torch.int32):
        if word.itemsize <= x.element_size():
            break
        try:
            return flat.view(word)
        except RuntimeError:
            continue
    return flat


def gather_rows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[rows, cols]`` (``[n, H]``, a copy) for ``x`` ``[B, T, H]``: an ``index_select`` of whole
    rows, reinterpreted as wide words where the layout allows (see :func:`_row_words`)."""
    words = _row_words(x)
    if words is None:
        return x.detach()[rows, cols]
    return words.index_select(0, torch.add(cols, rows, alpha=x.shape[1])).view(x.dtype)


def scatter_rows_(dst: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    """``dst[rows, cols] = values`` for ``dst`` ``[B, T, H]`` (each position at most once), as
    whole rows of wide words where the layout allows (see :func:`_row_words`)."""
    words = _row_words(dst)
    if words is not None and values.dtype == dst.dtype and words.dtype != dst.dtype:
        try:
            values = values.view(words.dtype)
        except RuntimeError:
            words = None
    if words is None or values.dtype != words.dtype:
        dst[rows, cols] = values
        return
    words.index_put_((torch.add(cols, rows, alpha=dst.shape[1]),), values)


# --------------------------------------------------------------------------------------------
# The three matmuls (module-level so tests can count the rows they see).


def logits_matmul(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden_chunk @ weight.T (+ bias)`` in the input dtype (the lm_head's own output)."""
    if bias is None:
        return torch.mm(hidden_chunk, weight.t())
    return torch.addmm(bias, hidden_chunk, weight.t())


def grad_hidden_matmul(grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad_logits @ weight``: one product per row (fp32 accumulation inside the matmul), in the
    input dtype: used where each token's hidden gradient is a single product over the whole
    vocabulary (``one_pass``; ``two_phase`` with one vocabulary slice)."""
    return torch.mm(grad_logits, weight)


# How ``acc(fp32) (+)= a @ b`` runs for half-precision ``a``/``b``, per (device type, dtype):
# "dtype_out" (cuBLAS writes/accumulates fp32 C directly: no product buffer), "product" (an fp32
# product then an add), or "upcast" (both operands upcast: the CPU). Decided once by a probe that
# checks the result, so an unsupported or mis-aliased path can never give a silent wrong answer.
_FP32_MM_PATH: dict[str, str] = {}


def _fp32_mm_candidates(a, b, out, accumulate):
    def dtype_out():
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)

    def product():
        p = torch.mm(a, b, out_dtype=torch.float32)
        out.add_(p) if accumulate else out.copy_(p)

    def upcast():
        if accumulate:
            out.addmm_(a.float(), b.float())
        else:
            torch.mm(a.float(), b.float(), out=out)

    return {"dtype_out": dtype_out, "product": product, "upcast": upcast}


def fp32_mm_path(device: torch.device, dtype: torch.dtype) -> str:
    """The path :func:`mm_fp32_into` takes for half-precision operands on ``device`` (probed once:
    a small product checked against float64, accumulating into an fp32 output that aliases C)."""
    key = f"{device.type}:{dtype}"
    if key not in _FP32_MM_PATH:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a64 = torch.randn(24, 40, dtype=torch.float64, generator=gen)
        b64 = torch.randn(40, 16, dtype=torch.float64, generator=gen)
        c64 = torch.randn(24, 16, dtype=torch.float64, generator=gen)
        a, b = a64.to(device, dtype), b64.to(device, dtype)
        want = (c64 + a.double().cpu() @ b.double().cpu())
        chosen = "upcast"
        for name in ("dtype_out", "product"):
            out = c64.to(device, torch.float32)
            try:
                _fp32_mm_candidates(a, b, out, True)[name]()
            except (RuntimeError, TypeError, NotImplementedError):
                continue
            if torch.allclose(out.double().cpu(), want, rtol=1e-5, atol=1e-5):
                chosen = name
                break
        _FP32_MM_PATH[key] = chosen
    return _FP32_MM_PATH[key]


def mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """``out = a @ b`` or ``out += a @ b`` (``accumulate``), fp32 accumulation; ``out`` is fp32 (fp64
    for fp64 operands) and contiguous, a view is fine. Half-precision operands are not upcast where
    the device's matmul takes an fp32 C (cuBLAS: the accumulation happens inside the GEMM's
    epilogue, no product buffer)."""
    if a.dtype in (torch.float32, torch.float64):
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    _fp32_mm_candidates(a, b, out, accumulate)[fp32_mm_path(a.device, a.dtype)]()
    return out


def grad_hidden_matmul_acc(acc: torch.Tensor, grad_logits: torch.Tensor, weight_slice: torch.Tensor,
                           accumulate: bool = True) -> None:
    """``acc (+)= grad_logits @ weight_slice`` with ``acc`` fp32 (fp64 for fp64 inputs): the hidden
    gradient summed over vocabulary slices (``two_phase`` with several slices; the first slice
    writes, the others add)."""
    mm_fp32_into(acc, grad_logits, weight_slice, accumulate=accumulate)


def grad_weight_matmul(out: torch.Tensor, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor,
                       accumulate: bool) -> torch.Tensor:
    """``out (+)= grad_logits.T @ hidden_chunk``: one GEMM with fp32 accumulation inside; ``out``
    is a contiguous block of rows, fp32 (an accumulator over token chunks) or the weight's own
    dtype (then rounded once by this product: a single token chunk, or ``one_pass``'s chunks)."""
    if out.dtype == grad_logits.dtype:
        return out.addmm_(grad_logits.t(), hidden_chunk) if accumulate else torch.mm(grad_logits.t(), hidden_chunk,
                                                                                      out=out)
    return mm_fp32_into(out, grad_logits.t(), hidden_chunk, accumulate)


# --------------------------------------------------------------------------------------------
# One chunk: logits, transform, kernel forward; gradient of the logits in place.


def _chunk_logits(head: Head, h: torch.Tensor, keep_derivative: bool, vocab: slice | None = None):
    """The transformed logits ``[n, V]`` (``[n, v1 - v0]`` for the vocabulary slice ``vocab``)
    and, with a softcap and ``keep_derivative``, its derivative ``1 - tanh^2`` (fp32) for the
    backward. The softcap and temperature are elementwise, so a slice's logits are exactly the
    corresponding columns of the full row's."""
    weight, bias = head.weight, head.bias
    if vocab is not None:
        weight = weight[vocab]
        bias = None if bias is None else bias[vocab]
    z = logits_matmul(h, weight, bias)
    dcap = None
    if head.softcap is not None:
        t = torch.tanh(z.to(accumulation_dtype(z.dtype)) / head.softcap)
        if keep_derivative:
            dcap = 1.0 - t * t
        z.copy_(t.mul_(head.softcap))  # one rounding to the logits dtype
        del t
    if head.temperature != 1.0:
        z.mul_(head.inv_temperature)
    return z, dcap


def _chunk_forward(head: Head, z: torch.Tensor, y: torch.Tensor, extras):
    backend = load_backend(head.backend_name)
    logp, lse, values = backend.token_logprobs_forward(z.unsqueeze(0), y.unsqueeze(0), head.ignore_index,
                                                      frozenset(extras))
    return logp[0], lse[0], {name: values[name][0] for name in extras}


def _chunk_forward_and_grad_(head: Head, z: torch.Tensor, y: torch.Tensor, extras, dcap: torch.Tensor | None):
    """:func:`_chunk_forward`'s results, and ``z`` overwritten with each token's gradient of its
    ``logp`` w.r.t. the raw logits (``split``'s forward: a coefficient of 1), through
    ``backends.forward_and_grad_`` (the forward kernel writes it where the Triton backend's
    ``config.fuse_forward_and_grad`` says so; else the backward follows the forward)."""
    backend = load_backend(head.backend_name)
    logp, lse, values = forward_and_grad_(backend, z.unsqueeze(0), y.unsqueeze(0), head.ignore_index,
                                          frozenset(extras))
    _to_raw_logits_grad_(head, z, dcap)
    return logp[0], lse[0], {name: values[name][0] for name in extras}


def _chunk_grad_logits_(head: Head, z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                        dcap: torch.Tensor | None, ignore_index: int | None = None) -> torch.Tensor:
    """Overwrites ``z`` with the gradient w.r.t. the raw (pre-transform) logits. ``z`` may be a
    vocabulary slice: then ``y`` is shifted into the slice (labels outside it are out of range and
    get no one-hot), ``lse`` is the full row's, and ``ignore_index`` one no shifted label can hit."""
    backend = load_backend(head.backend_name)
    backend.token_logprobs_backward(z.unsqueeze(0), y.unsqueeze(0), lse.unsqueeze(0),
                                    coef.to(accumulation_dtype(z.dtype)).unsqueeze(0).contiguous(),
                                    head.ignore_index if ignore_index is None else ignore_index, inplace=True)
    return _to_raw_logits_grad_(head, z, dcap)


def _logits_grad(head: Head, h: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 vocab: slice | None = None, ignore_index: int | None = None) -> torch.Tensor:
    """The gradient w.r.t. the raw logits of ``h``'s (vocabulary slice ``vocab`` of the) logits,
    for the per-token coefficients ``coef`` and the full rows' ``lse``, when the logits themselves
    are not needed (their forward ran earlier): the backward of ``two_phase`` and ``split``, and
    ``one_pass``'s pieces formed again. One matmul whose epilogue writes the gradient where the
    backend has one and takes it (``backends.fused_logits_grad_matmul``), else the logits
    (:func:`_chunk_logits`) and then :func:`_chunk_grad_logits_` over them in place: the same
    roundings, step for step."""
    fused = fused_logits_grad_matmul(load_backend(head.backend_name), h.dtype)
    if fused is None:
        z, dcap = _chunk_logits(head, h, keep_derivative=True, vocab=vocab)
        return _chunk_grad_logits_(head, z, y, lse, coef, dcap, ignore_index=ignore_index)
    weight, bias = head.weight, head.bias
    if vocab is not None:
        weight = weight[vocab]
        bias = None if bias is None else bias[vocab]
    return fused(h, weight, bias, y, lse, coef, head.ignore_index if ignore_index is None else ignore_index,
                 head.softcap, head.temperature)


def _to_raw_logits_grad_(head: Head, g: torch.Tensor, dcap: torch.Tensor | None) -> torch.Tensor:
    """The chain rule through the temperature and the softcap, in place: the gradient w.r.t. the
    transformed logits becomes the gradient w.r.t. the matmul's output."""
    if head.temperature != 1.0:
        g.mul_(head.inv_temperature)
    if dcap is not None:
        g.copy_(g.to(dcap.dtype).mul_(dcap))
    return g


class _Grads:
    """``one_pass``'s gradient buffers: hidden and weight in their input dtypes, bias fp32.

    The weight gradient lives in the weight's own dtype from the first chunk on: the first chunk's
    product is written into it (no zero fill), each later chunk's is added by the GEMM itself
    (``addmm_``: fp32 accumulation inside the product, one rounding of the sum per chunk). No
    fp32 ``[V, H]`` buffer: for a bf16 head that is 2 bytes per weight instead of 4 + 2."""

    def __init__(self, hidden, head: Head, need_hidden: bool, need_weight: bool, need_bias: bool):
        acc = accumulation_dtype(head.weight.dtype)
        self.hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        self.weight = torch.empty_like(head.weight, memory_format=torch.contiguous_format) if need_weight else None
        self.weight_started = False
        self.bias = (torch.zeros(head.bias.shape, dtype=acc, device=head.bias.device)
                     if need_bias and head.bias is not None else None)

    def add(self, head: Head, g: torch.Tensor, h: torch.Tensor, rows, cols) -> None:
        if self.hidden is not None:
            scatter_rows_(self.hidden, rows, cols, grad_hidden_matmul(g, head.weight))
        if self.weight is not None:
            grad_weight_matmul(self.weight, g, h, accumulate=self.weight_started)
            self.weight_started = True
        if self.bias is not None:
            self.bias.add_(g.sum(0, dtype=self.bias.dtype))

    def final(self, head: Head, scale: torch.Tensor | None = None):
        """The gradients times ``scale`` (the incoming gradient of the loss), in place in the
        hidden, weight and bias buffers (exact when ``scale`` is 1, else one more rounding).

        A backend with a device-side ``scale_`` (Triton) decides ``scale == 1`` on the device: no
        host synchronisation in the backward. Otherwise the scale is read once on the host (free
        for CPU tensors) and nothing runs when it is 1."""
        if self.weight is not None and not self.weight_started:
            self.weight.zero_()  # no valid token: no chunk ran
        bufs = [b for b in (self.hidden, self.weight, self.bias) if b is not None]
        if scale is not None and bufs:
            device_scale = getattr(load_backend(head.backend_name), "scale_", None)
            if device_scale is not None and scale.device == bufs[0].device:
                for buf in bufs:
                    device_scale(buf, scale)
            else:
                factor = float(scale)  # one host read for all three gradients
                for buf in bufs:
                    _scale_(buf, factor)
        return (self.hidden, None if self.weight is None else self.weight.to(head.weight.dtype),
                None if self.bias is None else self.bias.to(head.bias.dtype))


def _scale_(buf: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``buf *= scale`` in place, one pass, the product formed in the op-math precision (fp32 for
    bf16/fp16) and rounded once; nothing at all when ``scale`` is 1 (the usual ``loss.backward()``).
    Knowing that costs a host sync when ``scale`` is a device tensor (:meth:`_Grads.final` reads
    it once for all three gradients, where the backend has no device-side ``scale_``); it saves a
    read and a write of the weight gradient per step."""
    factor = float(scale)
    if factor != 1.0:
        buf.mul_(factor)  # a Python scalar: kept in fp32 by the kernel, never rounded to bf16
    return buf


def _scatter(values: torch.Tensor, rows, cols, shape) -> torch.Tensor:
    full = torch.zeros(shape, dtype=values.dtype, device=values.device)
    full[rows, cols] = values
    return full


# --------------------------------------------------------------------------------------------
# Forward only (the reference model, or no gradient needed).


def _token_results(n: int, acc: torch.dtype, extras, device) -> dict[str, torch.Tensor]:
    """Uninitialised ``[n]`` buffers for the valid tokens' logp, lse and extras (``lse`` in
    ``backends.lse_dtype``, the rest in the accumulation dtype)."""
    return {name: torch.empty(n, dtype=lse_dtype(device) if name == "lse" else acc, device=device)
            for name in ("logp", "lse", *extras)}


@torch.no_grad()
def forward_tokens(hidden: torch.Tensor, head: Head, aligned: torch.Tensor, extras=(), *, chunk_tokens: int,
                   positions=None, bounds=None, each_grad=None):
    """``(logp, lse, extras)`` as ``[2P, T]`` (0 on ignored tokens), chunked, no autograd.

    ``bounds``: the chunks ``(start, end)`` of the valid positions (default: ``chunk_tokens`` each,
    the last one smaller). ``each_grad(start, end, g)`` (``split``): called with each chunk's
    ``g = d logp / d (h @ weight.T + bias)`` ``[end - start, V]``, written over the chunk's logits
    (``backends.forward_and_grad_``: one kernel where the Triton rule takes it). The result buffers are made after the first matmul
    is queued (on a GPU their launches overlap it)."""
    rows, cols = valid_positions(aligned, head.ignore_index) if positions is None else positions
    n = rows.numel()
    if bounds is None:
        bounds = [(s, min(n, s + chunk_tokens)) for s in range(0, n, chunk_tokens)]
    acc = accumulation_dtype(hidden.dtype)
    results = None
    for s, e in bounds:
        r, c = rows[s:e], cols[s:e]
        z, dcap = _chunk_logits(head, gather_rows(hidden, r, c), keep_derivative=each_grad is not None)
        if results is None:
            results = _token_results(n, acc, extras, hidden.device)
        y = aligned[r, c]
        if each_grad is None:
            lp, ls, ex = _chunk_forward(head, z, y, extras)
        else:
            lp, ls, ex = _chunk_forward_and_grad_(head, z, y, extras, dcap)
        results["logp"][s:e], results["lse"][s:e] = lp, ls
        for name in extras:
            results[name][s:e] = ex[name]
        if each_grad is not None:
            each_grad(s, e, z)
        del z, dcap
    if results is None:  # no valid token
        results = _token_results(0, acc, extras, hidden.device)
    shape = aligned.shape
    return (_scatter(results["logp"], rows, cols, shape), _scatter(results["lse"], rows, cols, shape),
            {name: _scatter(results[name], rows, cols, shape) for name in extras})


def round_rows_into_grad(like: torch.Tensor, rows, cols, values: torch.Tensor,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """A gradient shaped like ``like`` (``[B, T, H]``, zero elsewhere) whose ``(rows, cols)`` rows
    are the fp32 ``values`` ``[n, H]`` (times ``scale`` ``[n, 1]``, in place), each rounded once to
    ``like``'s dtype, a block of rows at a time: the rounded temporary stays small beside
    ``values``."""
    grad = torch.zeros_like(like, memory_format=torch.contiguous_format)
    step = max(1, ROUNDING_BLOCK_BYTES // max(2 * like.shape[-1], 1))
    for s in range(0, rows.numel(), step):
        block = values[s:s + step]
        if scale is not None:
            block.mul_(scale[s:s + step])
        scatter_rows_(grad, rows[s:s + step], cols[s:s + step], block.to(like.dtype))
    return grad


# --------------------------------------------------------------------------------------------
# two_phase: an autograd.Function over the valid tokens.


# The forward and the backward are registered operators (the backward attached by
# ``register_autograd``): torch.compile sees two opaque ops with fake implementations, whose host
# sync (sizing the gather of the valid tokens) stays inside them, so a compiled training step
# traces the hidden-state path without a graph break; eager autograd runs the same two ops.
# ``rows``/``cols``: the valid positions when the caller has them (eager: from its one census
# read, shared with the reference); None (compiled) and each op finds them itself, one sync each.


def _positions(labels, rows, cols, ignore_index):
    return valid_positions(labels, ignore_index) if rows is None or cols is None else (rows, cols)


@torch.library.custom_op("dpo_kernels::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    rows: Optional[torch.Tensor],
    cols: Optional[torch.Tensor],
    temperature: float,
    softcap: Optional[float],
    backend: str,
    ignore_index: int,
    extras_mask: int,
    chunk_tokens: int,
    vocab_step: int,
    backward_chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp[B, T], lse[B, T], extras[K, B, T])`` of the logits ``transform(hidden @ weight.T +
    bias)`` (never formed whole: chunks of ``chunk_tokens`` valid tokens), labels ``[B, T]``
    aligned with the hidden rows ``[B, T, H]``. ``vocab_step``/``backward_chunk_tokens``: the
    backward's plan (:func:`backward_plan`). ``lse`` and ``extras`` are not differentiable."""
    head = Head(weight, bias, temperature, softcap, backend, ignore_index)
    names = extras_names(extras_mask)
    logp, lse, ext = forward_tokens(hidden, head, labels, names, chunk_tokens=chunk_tokens,
                                    positions=_positions(labels, rows, cols, ignore_index))
    stacked = torch.stack([ext[name] for name in names]) if names else empty_forward_outputs(hidden, 0)[2]
    return logp, lse, stacked


@linear_token_logprobs_op.register_fake
def _linear_token_logprobs_fake(hidden, weight, bias, labels, rows, cols, temperature, softcap, backend,
                                ignore_index, extras_mask, chunk_tokens, vocab_step, backward_chunk_tokens):
    # hidden [B, T, H] gives the [B, T] shapes and the accumulation dtype, as logits would.
    return empty_forward_outputs(hidden, extras_mask)


@torch.library.custom_op("dpo_kernels::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    rows: Optional[torch.Tensor],
    cols: Optional[torch.Tensor],
    temperature: float,
    softcap: Optional[float],
    backend: str,
    ignore_index: int,
    vocab_step: int,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of hidden, weight and bias (input dtypes) from ``dL/dlogp`` per token
    (:func:`two_phase_backward`); an empty tensor stands for a gradient not asked for."""
    head = Head(weight, bias, temperature, softcap, backend, ignore_index)
    r, c = _positions(labels, rows, cols, ignore_index)
    with autocast_off(hidden.device.type):  # a backward run inside an autocast region (the CPU's)
        grads = two_phase_backward(head, hidden, labels, r, c, lse, grad_logp, (vocab_step, chunk_tokens),
                                   (need_hidden, need_weight, need_bias and bias is not None))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _linear_token_logprobs_backward_fake(grad_logp, hidden, weight, bias, labels, lse, rows, cols, temperature,
                                         softcap, backend, ignore_index, vocab_step, chunk_tokens, need_hidden,
                                         need_weight, need_bias):
    def grad(like, needed):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else hidden.new_empty(0)

    return (grad(hidden, need_hidden), grad(weight, need_weight),
            grad(bias, need_bias) if bias is not None else hidden.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, rows, cols, temperature, softcap, backend, ignore_index, _mask, _chunk,
     vocab_step, backward_chunk_tokens) = inputs
    _logp, lse, extras = output
    ctx.save_for_backward(hidden, weight, bias, labels, rows, cols, lse)
    ctx.options = (temperature, softcap, backend, ignore_index, vocab_step, backward_chunk_tokens)
    ctx.mark_non_differentiable(lse, extras)


def _linear_backward(ctx, grad_logp, _grad_lse, _grad_extras):
    refuse_double_backward("fused_linear_dpo_loss")
    hidden, weight, bias, labels, rows, cols, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b = need_b and bias is not None
    grads = (None, None, None)
    if need_h or need_w or need_b:
        grads = linear_token_logprobs_backward_op(grad_logp.to(accumulation_dtype(hidden.dtype)), hidden, weight, bias,
                                                  labels, lse, rows, cols, *ctx.options, need_h, need_w, need_b)
        grads = tuple(g if needed else None for g, needed in zip(grads, (need_h, need_w, need_b)))
    return (*grads, None, None, None, None, None, None, None, None, None, None, None)


linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def two_phase_backward(head: Head, hidden, aligned, rows, cols, lse, grad_logp, plan, needs):
    """Gradients of hidden, weight and bias (input dtypes) from ``dL/dlogp`` per token.

    Vocabulary slices ``[v0, v1)`` outer, chunks of valid tokens inner. For each pair the slice's
    logits ``h @ weight[v0:v1].T (+ bias[v0:v1])`` are recomputed (softcap/temperature as in the
    forward) and overwritten in place by the kernel contract with ``coef * (onehot - exp(z - lse))``
    using the full row's ``lse`` saved by the forward (so each slice's softmax is exact), the labels
    shifted by ``-v0`` (a label outside the slice is out of range: no one-hot) and an
    ``ignore_index`` no shifted label can equal; where the backend takes it, one matmul whose
    epilogue writes that gradient does both, the logits never stored (:func:`_logits_grad`). Then
    ``grad_weight[v0:v1] = sum_chunks grad_slice.T @ h`` is accumulated in an fp32 ``[v1 - v0, H]``
    buffer (the matmul's own fp32 output for the first chunk) and rounded once into the weight
    gradient; ``grad_hidden`` sums ``grad_slice @ weight[v0:v1]`` over the slices in an fp32
    ``[N_valid, H]`` buffer, rounded once at the end (with a single slice there is nothing to sum:
    one product per chunk, in the input dtype, and no buffer). No ``[V, H]`` fp32 buffer exists.
    With several slices the ``[2P, T, H]`` hidden gradient is allocated only for that rounding,
    after the gathered hidden rows are freed: the two never coexist, and the peak of the loop is
    the weight gradient + the accumulator + the gathered rows + one slice's logits.
    Matmuls over valid tokens: the recomputed logits, grad hidden, grad weight (plus the forward's
    logits: four in all), each split into slices, not repeated.
    """
    vocab_step, chunk_tokens = plan
    need_h, need_w, need_b = needs
    V, H = head.weight.shape
    n = rows.numel()
    acc = accumulation_dtype(head.weight.dtype)
    sliced = vocab_step < V
    grad_weight = torch.empty_like(head.weight, memory_format=torch.contiguous_format) if need_w else None
    grad_bias = torch.empty_like(head.bias) if need_b else None
    if n == 0 or not (need_h or need_w or need_b):
        if grad_weight is not None:
            grad_weight.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return (torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None,
                grad_weight, grad_bias)
    # One slice: each chunk writes its rows of the hidden gradient directly. Several: the slices
    # sum into the fp32 accumulator, and the gradient is allocated at the end (see above).
    grad_hidden = (torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h and not sliced
                   else None)
    gh_acc = torch.empty((n, H), dtype=acc, device=hidden.device) if need_h and sliced else None
    coef = grad_logp[rows, cols]
    token_lse = lse[rows, cols]
    labels = aligned[rows, cols]
    bounds = [(s, min(n, s + chunk_tokens)) for s in range(0, n, chunk_tokens)]
    # The valid hidden rows, gathered once (not once per slice and chunk): N_valid x H.
    whole = gather_rows(hidden, rows, cols)
    no_label = -(V + 1)  # shifted labels lie in [-(V - 1), V - 1]: never equal to it
    # The weight gradient of a slice: with one token chunk the single product is written straight
    # into its rows (rounded once); with several, the chunks are summed in an fp32 buffer of the
    # slice (a view of the weight gradient itself when that is fp32) and rounded once at the end.
    one_chunk = len(bounds) == 1
    direct_weight = need_w and (one_chunk or grad_weight.dtype == acc)
    gw_buf = (torch.empty((min(V, vocab_step), H), dtype=acc, device=hidden.device)
              if need_w and not direct_weight else None)
    for v0 in range(0, V, vocab_step):
        v1 = min(V, v0 + vocab_step)
        vocab = slice(v0, v1) if sliced else None
        w_slice = head.weight[v0:v1]
        gw_out = None
        if need_w:
            gw_out = grad_weight[v0:v1] if direct_weight else gw_buf[: v1 - v0]
        gb_acc = torch.empty(v1 - v0, dtype=acc, device=hidden.device) if need_b else None
        for k, (s, e) in enumerate(bounds):
            h = whole[s:e]
            y = labels[s:e] - v0 if sliced else labels[s:e]
            g = _logits_grad(head, h, y, token_lse[s:e], coef[s:e], vocab, ignore_index=no_label if sliced else None)
            if need_h:
                if sliced:
                    grad_hidden_matmul_acc(gh_acc[s:e], g, w_slice, accumulate=v0 > 0)
                else:
                    scatter_rows_(grad_hidden, rows[s:e], cols[s:e], grad_hidden_matmul(g, head.weight))
            if need_w:
                grad_weight_matmul(gw_out, g, h, accumulate=k > 0)
            if need_b:  # the first chunk's sum is written in place: no temporary of the slice's size
                if k == 0:
                    torch.sum(g, 0, dtype=acc, out=gb_acc)
                else:
                    gb_acc.add_(g.sum(0, dtype=acc))
            del g
        if need_w and not direct_weight:
            grad_weight[v0:v1].copy_(gw_out)  # the one rounding of this slice
        if need_b:
            grad_bias[v0:v1].copy_(gb_acc)
        del gb_acc
    h = whole = None  # the gathered hidden rows are no longer needed: free them before the rounding
    if gh_acc is not None:
        grad_hidden = round_rows_into_grad(hidden, rows, cols, gh_acc)  # the one rounding
    return grad_hidden, grad_weight, grad_bias


def vocab_slice_size(vocab_size: int, hidden_size: int, vocab_chunk: int | None) -> int:
    """Vocabulary rows per slice of the ``two_phase`` backward: ``vocab_chunk`` if given, else the
    hidden size rounded down to a multiple of 128, at least :data:`MIN_SLICE_ROWS` (why: see
    there), never more than ``vocab_size``."""
    if vocab_chunk is not None:
        return max(1, min(int(vocab_chunk), vocab_size))
    rows = max(MIN_SLICE_ROWS, hidden_size - hidden_size % 128)
    return max(1, min(rows, vocab_size))


def backward_plan(head: Head, hidden_size: int, dtype: torch.dtype, chunk_tokens: int | None,
                  vocab_chunk: int | None, valid_tokens: int | None = None,
                  fused_slices: bool = False) -> tuple[int, int]:
    """``(vocabulary rows per slice, tokens per chunk)`` of the ``two_phase`` backward (and of
    ``split``'s, for the weight and bias). Tokens: ``chunk_tokens`` if given, else what keeps one
    slice's logits (plus the softcap's fp32 temporaries) within :data:`DEFAULT_CHUNK_BYTES`, as
    :func:`chunk_size` does for full rows. ``fused_slices``: the slices take the fused matmul
    (``backends.fused_logits_grad_matmul``), so a slice is its gradient alone, with no softcap
    temporaries (:meth:`Footprint.slice_grad_bytes`), and only its elements count. ``split``
    passes the rule in force (:func:`slices_take_fused_matmul`); ``two_phase`` plans inside
    torch.compile's trace, where a backend cannot be loaded, and budgets as if unfused (smaller
    chunks, never more memory).

    ``valid_tokens`` is passed by ``split``, which knows them before it plans its backward.
    ``two_phase`` does not pass them: inside torch.compile it plans before they are known, and
    it keeps that same plan in eager. With ``valid_tokens`` and both knobs left to their
    defaults, the slice is twice :func:`vocab_slice_size`'s when every valid token still fits
    one chunk of the wider slice. Why: split has no fp32 accumulator summed over slices, so a
    wider slice costs only its logits (bounded by the same budget), and the slices' GEMMs are
    the largest gap in its time. Run D (H200, 8 x 1024, H = 4096, docs/perf.md) measured 39.94 ms
    / 1.27 GB at 8192 rows against 40.68 / 1.22 at 4096; when the tokens do not fit (2 x 16384:
    24576 valid tokens) the wider slice would need several token chunks and an fp32
    ``[rows, H]`` buffer for its weight gradient, which no run has measured."""
    step = vocab_slice_size(head.vocab_size, hidden_size, vocab_chunk)
    softcap = None if fused_slices else head.softcap  # fused: tanh stays in the epilogue's registers
    if valid_tokens is not None and vocab_chunk is None and chunk_tokens is None:
        wide = min(head.vocab_size, 2 * step)
        if wide > step and chunk_size(wide, dtype, softcap, None) >= valid_tokens:
            step = wide
    return step, chunk_size(step, dtype, softcap, chunk_tokens)


def slices_take_fused_matmul(head: Head, dtype: torch.dtype) -> bool:
    """Whether the backward's vocabulary slices take the fused logits-gradient matmul under the
    rules in force now (``backends.fused_logits_grad_matmul``). Loads the backend: not inside a
    torch.compile trace."""
    return fused_logits_grad_matmul(load_backend(head.backend_name), dtype) is not None


def linear_token_logprobs(hidden, head: Head, aligned, extras=(), *, chunk_tokens: int, positions=None,
                          backward_chunk_tokens: int | None = None, vocab_chunk: int | None = None):
    """Per-token ``(logp, lse, extras)`` ``[B, T]`` of the rows of ``hidden`` ``[B, T, H]``, the
    log-probs differentiable in hidden, weight and bias (the two-phase backward): one call of the
    ``dpo_kernels::linear_token_logprobs`` operator. Under ``no_grad`` (the reference) it is the
    chunked forward alone.

    ``chunk_tokens``: the forward's tokens per chunk (full vocabulary rows).
    ``positions``: the valid ``(rows, cols)`` if the caller has them (else the operator finds them:
    one host sync, and one more in the backward; ``None`` while torch.compile traces).
    ``backward_chunk_tokens`` / ``vocab_chunk``: the backward's tokens per chunk and vocabulary
    rows per slice (default: from the memory budgets, see :func:`backward_plan`)."""
    rows, cols = (None, None) if positions is None else positions
    mask = extras_mask(extras)
    vocab_step, backward_tokens = backward_plan(head, hidden.shape[-1], hidden.dtype, backward_chunk_tokens,
                                                vocab_chunk)
    refuse_forward_ad("fused_linear_dpo_loss", hidden, head.weight, head.bias)
    logp, lse, stacked = linear_token_logprobs_op(
        hidden, head.weight, head.bias, aligned, rows, cols, float(head.temperature), head.softcap,
        head.backend_name, int(head.ignore_index), mask, int(chunk_tokens), vocab_step, backward_tokens,
    )
    return logp, lse, dict(zip(extras_names(mask), stacked.unbind(0)))


# --------------------------------------------------------------------------------------------
# one_pass: gradients during the forward, chunks of whole pairs.


def pair_positions(aligned: torch.Tensor, ignore_index: int, num_pairs: int, chunk_tokens: int,
                   census: TokenCensus | None = None):
    """The valid positions ``(rows, cols)`` pair by pair (chosen then rejected sequence of pair 0,
    then of pair 1, ...) and the ``(start, end)`` of each chunk: whole pairs, as many as fit
    ``chunk_tokens`` (at least one: :class:`OnePass` cuts a larger pair into pieces). Also returns
    the largest pair's token count.

    At most one host sync: the ``census``'s read, unless it was already read (a new census when
    none is given). The positions themselves come from ``nonzero_static`` with the total already
    known, in pair order by construction (the rows of the mask are visited pair-major): no sort,
    no other sync."""
    P = num_pairs
    census = TokenCensus(aligned, ignore_index, P) if census is None else census
    # The device work that needs no count is queued before the sync, so the sync finds it done
    # and the host has less left to do while the device waits for the first matmul.
    pair_major = torch.arange(2 * P, device=aligned.device).view(2, P).t().reshape(-1)  # 0, P, 1, P+1, ...
    mask = (aligned != ignore_index)[pair_major]
    counts = census.pair_counts()  # the sync, unless already read
    idx_rows, cols = _true_positions(mask, sum(counts))
    rows = pair_major[idx_rows]
    return rows, cols, pack_pairs(counts, chunk_tokens), max(counts, default=0)


def pack_pairs(pair_counts: list[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """``one_pass``'s chunks: the ``(start, end)`` of runs of whole pairs (in order, ``pair_counts``
    valid tokens each) holding as many pairs as fit ``chunk_tokens``, at least one (a larger pair
    is its own chunk, cut into pieces by :func:`pair_pieces`). Pairs without a valid token add
    nothing."""
    bounds, start, size = [], 0, 0
    for count in pair_counts:
        if size and size + count > chunk_tokens:
            bounds.append((start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        bounds.append((start, start + size))
    return bounds


# ``mode="auto"`` takes one_pass while at most this fraction of the valid tokens' logits would be
# formed twice (pairs larger than a chunk: all but the last piece), else split. Run D (H200, bf16,
# 2026-11-27, docs/perf.md): 4 x 2048, H = 3584, V = 152064 (pairs of 3072 in chunks of 2560: 17% formed again)
# one_pass 35.6 ms / 1.96 GB against split's 43.4 / 1.24; 2 x 16384 (pairs of 24576: 88%) one_pass
# 153.1 / 2.16 GB against split's 161.3 / 1.72: 5% faster there for 26% more memory.
AUTO_MAX_FORMED_AGAIN = 0.5


def formed_again(pair_counts: list[int], chunk_tokens: int) -> float:
    """The fraction of the valid tokens whose logits ``one_pass`` forms twice at this chunk size:
    a pair of ``m > chunk_tokens`` tokens is cut into pieces and all but its last (full) piece
    are formed again, ``m - chunk_tokens`` tokens; pairs that fit cost nothing more."""
    total = sum(pair_counts)
    again = sum(max(0, m - chunk_tokens) for m in pair_counts)
    return again / total if total else 0.0


# --------------------------------------------------------------------------------------------
# Memory: what each gradient mode holds at its peak, so that ``mode="auto"`` can check that
# one_pass fits before taking it (split needs the least).


@dataclass(frozen=True)
class Footprint:
    """The sizes that set a call's peak memory: the rows of ``hidden`` (``2P x T``, the hidden
    gradient's), the valid tokens among them (the gathers', the per-token buffers'), ``H``, ``V``,
    bytes per element of the hidden states (and logits), weight and bias (0: no bias), which
    gradients are wanted, whether a softcap runs, how many 4-byte words per token the forward's
    results take (logp 1, the fp64 lse 2, each extra 1), and whether the backward's slices take
    the fused matmul (``backends.fused_logits_grad_matmul``: each slice is then only its gradient,
    with no softcap temporaries)."""

    batch_tokens: int
    valid_tokens: int
    hidden_size: int
    vocab_size: int
    elem: int
    weight_elem: int
    bias_elem: int
    needs: tuple[bool, bool, bool]
    softcap: bool
    token_results: int = 3
    fused_logits_grad: bool = False

    def logits_bytes(self, rows: int, cols: int, derivative: bool = True) -> int:
        """A chunk of logits ``[rows, cols]`` while it is being formed: the input dtype, plus with
        a softcap three fp32 temporaries when its ``derivative`` is kept for the gradient
        (``tanh``, its square, ``1 - tanh^2``), else two (the scaled logits and their ``tanh``)."""
        return rows * cols * (self.elem + ((12 if derivative else 8) if self.softcap else 0))

    def slice_grad_bytes(self, rows: int, cols: int) -> int:
        """A backward slice ``[rows, cols]`` while its logits' gradient is being formed: written by
        the fused matmul's epilogue, the gradient alone; else the logits formed as in the forward
        (:meth:`logits_bytes`), then overwritten by their gradient."""
        return rows * cols * self.elem if self.fused_logits_grad else self.logits_bytes(rows, cols)

    def gradients_bytes(self, bias_sum_rows: int | None = None) -> int:
        """The gradients themselves, in their own dtypes, with the bias's fp32 sum of
        ``bias_sum_rows`` entries (default ``V``: ``one_pass``'s whole-vocabulary buffer)."""
        h, w, b = self.needs
        if not (b and self.bias_elem):
            bias = 0
        else:
            bias = self.vocab_size * self.bias_elem + 4 * (self.vocab_size if bias_sum_rows is None else bias_sum_rows)
        return ((self.batch_tokens * self.hidden_size * self.elem if h else 0)
                + (self.vocab_size * self.hidden_size * self.weight_elem if w else 0) + bias)

    def token_bytes(self) -> int:
        """The per-token results (``token_results`` 4-byte words each): chunk-ordered and scattered
        to ``[2P, T]``, and the loss's per-token coefficients (``[2P, T]``)."""
        return 4 * (self.token_results * (self.valid_tokens + self.batch_tokens) + 2 * self.batch_tokens)


def one_pass_peak_bytes(fp: Footprint, chunk_rows: int, alone: bool = False) -> int:
    """Bytes ``one_pass`` holds at its peak on a GPU: the gradients (formed during the forward,
    in their own dtypes) plus one chunk (or piece) of ``chunk_rows`` valid tokens: its logits
    (overwritten by their gradient), its gathered hidden rows and, with a hidden gradient, the
    ``[rows, H]`` product before the scatter. ``chunk_rows``: the largest chunk or piece
    (:func:`one_pass_chunk_rows`).

    ``alone``: the call is that one chunk, in one piece (every valid token fits a chunk). The
    token results and the gradients are made once the first chunk's matmul is queued
    (``OnePass._buffers``), so its softcap temporaries never coexist with them."""
    c, H, V = chunk_rows, fp.hidden_size, fp.vocab_size
    rows = c * H * fp.elem
    product = rows if fp.needs[0] else 0
    forming = fp.logits_bytes(c, V)
    # Held: the logits (+ the kept derivative) with the hidden-gradient product.
    held = c * V * (fp.elem + (4 if fp.softcap else 0)) + product
    resident = fp.gradients_bytes() + fp.token_bytes()
    if alone:
        return rows + max(forming, resident + held)
    return resident + rows + max(forming, held)


def one_pass_chunk_rows(pair_counts: list[int], chunk_tokens: int) -> int:
    """Valid tokens of ``one_pass``'s largest chunk (whole pairs, :func:`pack_pairs`) or piece
    (a pair larger than ``chunk_tokens`` is cut into pieces of at most that many)."""
    return max((min(e - s, chunk_tokens) for s, e in pack_pairs(pair_counts, chunk_tokens)), default=0)


def split_peak_bytes(fp: Footprint, chunk_rows: int, plan: tuple[int, int]) -> int:
    """Bytes ``split`` holds at its peak on a GPU, the largest of its three phases:

    - forward: one chunk of ``chunk_rows`` tokens' logits + its gathered rows or each valid
      token's fp32 ``u`` (``[n, H]``, made after the first matmul: with one chunk the two never
      coexist), or both from the second chunk on;
    - backward, hidden gradient: ``u`` + the hidden gradient + one rounding block;
    - backward, weight and bias: the gradients + the gathered valid rows ``[n, H]`` + one slice
      ``[tokens, rows]`` (``plan``: :func:`backward_plan`) of logits or, fused, of their gradient
      alone (:meth:`Footprint.slice_grad_bytes`) + the fp32 slice buffer
      when the valid tokens take several chunks of the slice; the bias's fp32 sum is one slice
      wide (two while a later chunk's sum is added to it).

    Without a weight or bias gradient the last phase does not run."""
    n, H, V = fp.valid_tokens, fp.hidden_size, fp.vocab_size
    need_h, need_w, need_b = fp.needs
    u = n * H * 4 if need_h else 0
    rows_bytes = chunk_rows * H * fp.elem
    # The forward keeps the softcap's derivative only for the hidden gradient it forms.
    forward = (fp.logits_bytes(chunk_rows, V, derivative=need_h)
               + (u + rows_bytes if n > chunk_rows else max(u, rows_bytes)))
    hidden_grad = fp.batch_tokens * H * fp.elem if need_h else 0
    rounding = min(n, max(1, ROUNDING_BLOCK_BYTES // max(2 * H, 1))) * H * fp.elem
    backward_hidden = u + hidden_grad + rounding if need_h else 0
    backward_weight = 0
    if need_w or (need_b and fp.bias_elem):
        step, tokens = plan
        rows, tokens = min(step, V), min(tokens, n)
        slice_buffer = rows * H * 4 if need_w and n > tokens and fp.weight_elem != 4 else 0
        # The bias's fp32 sum is the slice's, plus a second chunk's sum before it is added.
        bias_sum_rows = rows * (2 if n > tokens else 1)
        backward_weight = (fp.gradients_bytes(bias_sum_rows) + n * H * fp.elem + fp.slice_grad_bytes(tokens, rows)
                           + slice_buffer)
    return fp.token_bytes() + max(forward, backward_hidden, backward_weight)


def available_bytes(device: torch.device, enough: int | None = None) -> int | None:
    """Bytes this process may still allocate on ``device``: the device's free memory plus what
    PyTorch's caching allocator holds unused, capped by ``set_per_process_memory_fraction``.
    ``None`` off CUDA (the host's memory is not a limit ``auto`` plans around).

    ``enough``: when the device's free memory alone covers it (and no fraction caps the
    process), that free memory is returned without reading the allocator's statistics. This runs
    before the first matmul, while the device waits: one driver query is all it costs then."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if enough is not None and fraction >= 1.0 and free >= enough:
        return free
    # One read of the allocator's statistics, nested as it keeps them: memory_allocated() and
    # memory_reserved() each flatten and sort the whole table (~10^2 entries) on the host.
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    allocated = stats.get("allocated_bytes", {}).get("all", {}).get("current", 0)
    available = free + stats.get("reserved_bytes", {}).get("all", {}).get("current", 0) - allocated
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)


# ``mode="auto"`` takes one_pass only where its estimated peak (:func:`one_pass_peak_bytes`) is at
# most this fraction of :func:`available_bytes`: the rest is room for the allocator's rounding and
# fragmentation, which the estimate does not model.
AUTO_MEMORY_HEADROOM = 0.9


class _OnePassFunction(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward scales them.

    ``runner`` is a :class:`OnePass` (Python object: the loss closures and the results)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, runner):
        ctx.set_materialize_grads(False)
        loss, seq_logps, grads = runner.run(hidden)
        ctx.grads, ctx.head = grads, runner.head
        return loss, seq_logps

    @staticmethod
    def backward(ctx, grad_loss, grad_seq_logps):
        refuse_double_backward("fused_linear_dpo_loss")
        if grad_seq_logps is not None:
            raise RuntimeError(
                "fused_linear_dpo_loss(mode='one_pass'): chosen_logps/rejected_logps carry no gradient of "
                "their own (the gradients were formed from the loss alone, during the forward); use "
                "mode='split' or 'two_phase' to backpropagate through them"
            )
        if ctx.grads is False:
            raise RuntimeError("fused_linear_dpo_loss(mode='one_pass'): backward called twice (the gradient "
                               "buffers are released after the first); use mode='two_phase'")
        grads, ctx.grads = ctx.grads, False
        if grad_loss is None or grads is None:
            return None, None, None, None
        # Scaled in the accumulation dtype, then rounded once to each input's dtype.
        return (*grads.final(ctx.head, grad_loss.detach()), None)


def pair_pieces(start: int, end: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` (a chunk of ``one_pass``: whole pairs) cut into pieces of at most
    ``chunk_tokens`` tokens: itself when it fits, else a first piece of the remainder then full
    pieces, so the last piece (the one whose logits ``one_pass`` keeps) is the largest."""
    size = end - start
    if size <= chunk_tokens:
        return [(start, end)]
    full = chunk_tokens
    first = size - full * ((size - 1) // full)
    cuts = [start, *range(start + first, end + 1, full)]
    return list(zip(cuts[:-1], cuts[1:]))


class OnePass:
    """The one-pass loop. ``terms_fn(logp, lse, extras)`` (full ``[2P, T]`` tensors) returns
    ``(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)``, the loss and logps
    differentiable in ``logp``: run once per chunk for its tokens' coefficients (the loss), and
    once on the finished token results. Each pair's loss must depend on that pair only.

    A chunk holds whole pairs, as many as fit ``chunk_tokens``. A pair larger than that is cut
    into pieces of at most ``chunk_tokens`` (:func:`pair_pieces`): each piece's logits are formed
    and reduced in turn, only the last piece's are kept, and once the pair's coefficients are
    known the earlier pieces' logits are formed again for their gradient (the matmuls of a pair of
    m tokens whose last piece holds c: 3 m + (m - c) instead of two_phase's 4 m). So no logits
    beyond ``chunk_tokens`` rows ever exist."""

    def __init__(self, head: Head, aligned, extras, chunk_tokens, terms_fn, num_pairs, needs,
                 census: TokenCensus | None = None):
        self.needs = tuple(needs)  # gradients wanted for (hidden, weight, bias)
        self.head, self.aligned, self.extras = head, aligned, tuple(sorted(extras))
        self.chunk_tokens, self.terms_fn, self.num_pairs = chunk_tokens, terms_fn, num_pairs
        self.census = census  # the valid-token counts, read by the caller already or read here
        self.tokens = None  # (logp, lse, extras) [2P, T], after run()
        self.rewards = None  # (chosen_rewards, rejected_rewards), after run()

    def _buffers(self, hidden):
        """The token results (placeholders) and the gradient buffers. Made right after the first
        logits matmul is queued, so that on a GPU their launches overlap it instead of standing
        between the host sync and the first matmul, while the device idles."""
        head, shape = self.head, self.aligned.shape
        acc = accumulation_dtype(hidden.dtype)
        # Placeholders for the tokens not processed yet: -1 (a finite log-prob), so every pair's loss
        # stays finite; a pair's coefficients do not depend on the other pairs' values.
        logp = torch.where(self.aligned != head.ignore_index, -1.0, 0.0).to(acc)
        lse = torch.zeros(shape, dtype=lse_dtype(hidden.device), device=hidden.device)
        ext = {name: torch.zeros(shape, dtype=acc, device=hidden.device) for name in self.extras}
        grads = _Grads(hidden, head, *self.needs) if any(self.needs) else None
        return logp, lse, ext, grads

    def run(self, hidden):
        head, aligned = self.head, self.aligned
        forming = any(self.needs)  # the chunks' logits gradients are needed in the forward
        rows, cols, bounds, _ = pair_positions(aligned, head.ignore_index, self.num_pairs, self.chunk_tokens,
                                               self.census)
        logp = lse = ext = grads = None
        for s, e in bounds:
            pieces = pair_pieces(s, e, self.chunk_tokens)
            for k, (a, b) in enumerate(pieces):
                kept = forming and k == len(pieces) - 1
                r, c = rows[a:b], cols[a:b]
                h = gather_rows(hidden, r, c)
                z, dcap = _chunk_logits(head, h, keep_derivative=kept)
                if logp is None:
                    logp, lse, ext, grads = self._buffers(hidden)
                y = aligned[r, c]
                lp, ls, ex = _chunk_forward(head, z, y, self.extras)
                logp[r, c], lse[r, c] = lp, ls
                for name in self.extras:
                    ext[name][r, c] = ex[name]
                del ex
                if not kept:
                    del z, dcap  # an earlier piece of a pair larger than the chunk: formed again below
            if grads is None:
                continue
            with torch.enable_grad():
                leaf = logp.detach().requires_grad_(True)
                loss = self.terms_fn(leaf, lse, ext)[0]
                (coef,) = torch.autograd.grad(loss, leaf)
            # The last piece's logits are still here; the earlier pieces' are formed again.
            g = _chunk_grad_logits_(head, z, y, ls, coef[r, c], dcap)
            grads.add(head, g, h, r, c)
            del g, z, dcap
            for a, b in pieces[:-1]:
                r, c = rows[a:b], cols[a:b]
                h = gather_rows(hidden, r, c)
                g = _logits_grad(head, h, aligned[r, c], lse[r, c], coef[r, c])
                grads.add(head, g, h, r, c)
                del g
        if logp is None:  # no valid token: no chunk ran
            logp, lse, ext, grads = self._buffers(hidden)
        self.tokens = (logp, lse, ext)
        loss, chosen, rejected, chosen_rewards, rejected_rewards = self.terms_fn(logp, lse, ext)
        self.rewards = (chosen_rewards.detach(), rejected_rewards.detach())
        return loss.detach(), torch.cat([chosen, rejected]).detach(), grads


def token_chunks(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into the fewest chunks of at most ``chunk_tokens``, of equal sizes (within
    one token): the same number of matmuls as full chunks and a remainder, with a smaller peak."""
    if n == 0:
        return []
    count = -(-n // max(1, chunk_tokens))
    size = -(-n // count)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class _SplitFunction(torch.autograd.Function):
    """``split``: the forward forms the token results and each valid token's hidden gradient
    before the loss is known; the backward finds the per-token coefficients and forms the
    gradients (see :class:`Split`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, runner):
        ctx.set_materialize_grads(False)
        loss, seq_logps = runner.run(hidden)
        ctx.runner = runner
        # Version-checked: an in-place change of any of them before the backward raises there. The
        # labels too: without a shift they are the caller's own tensor, and the backward forms
        # each slice's gradient from them.
        ctx.save_for_backward(hidden, weight, bias, runner.aligned)
        return loss, seq_logps

    @staticmethod
    def backward(ctx, grad_loss, grad_seq_logps):
        refuse_double_backward("fused_linear_dpo_loss")
        runner, ctx.runner = ctx.runner, None
        if runner is None:
            raise RuntimeError("fused_linear_dpo_loss(mode='split'): backward called twice (its buffers are "
                               "released after the first); use mode='two_phase'")
        hidden, weight, bias, _labels = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        with autocast_off(hidden.device.type):  # a backward run inside an autocast region (the CPU's)
            return (*runner.gradients(hidden, weight, bias, grad_loss, grad_seq_logps, needs), None)


class Split:
    """The ``split`` mode (four matmuls, every gradient rounded once, least memory).

    A token's hidden gradient is ``coef_t * u_t`` with ``u_t = d logp_t / d h_t`` (the gradient
    of its logits ``onehot - softmax``, times the softcap's derivative and ``1 / temperature``,
    times the weight) and ``coef_t = dL / d logp_t`` a scalar: ``u_t`` needs no loss. So the
    forward takes chunks of valid tokens of any size (no whole pairs, no logits formed again for
    a pair larger than a chunk): logits, the kernel's forward, the logits' gradient for a
    coefficient of 1 in place, and ``u = grad @ weight`` written in fp32 into an ``[n_valid, H]``
    buffer (one product per token over the whole vocabulary, not rounded). The loss then runs
    once on the finished token results, and its small graph is kept.

    The backward takes the coefficients from that graph for the incoming gradients (the loss's
    and, if any, ``chosen_logps``/``rejected_logps``'s: both are supported), rounds
    ``coef_t * u_t`` once into the hidden gradient, frees ``u``, and forms the weight and bias
    gradients as :func:`two_phase_backward` does (vocabulary slices, the slice's logits formed
    again with the full rows' ``lse``; a bf16 weight gradient rounded once). No fp32 accumulator
    is summed over slices (two_phase's hidden gradient needs one; its GEMMs read and write it per
    slice). The ``[n_valid, H]`` fp32 buffer is written once and read once.

    Losses: every one, the batch-coupled ones (AOT) included: the loss runs once, on the whole
    batch's token results."""

    def __init__(self, head: Head, aligned, extras, chunk_tokens, terms_fn, needs, plan,
                 census: TokenCensus | None = None):
        self.head, self.aligned, self.extras = head, aligned, tuple(sorted(extras))
        self.chunk_tokens, self.terms_fn, self.needs, self.plan = chunk_tokens, terms_fn, tuple(needs), plan
        self.census = census
        self.tokens = None  # (logp, lse, extras) [2P, T], after run()
        self.rewards = None  # (chosen_rewards, rejected_rewards), after run()
        self._saved = None  # (rows, cols, u, leaf, loss, seq_logps) from the forward to the backward

    def run(self, hidden):
        head, aligned = self.head, self.aligned
        census = self.census or TokenCensus(aligned, head.ignore_index, aligned.shape[0] // 2)
        n = census.total()  # the host sync (unless the caller read it already)
        rows, cols = valid_positions(aligned, head.ignore_index, n)
        u = None

        def hidden_rows(s, e, g):
            """Each token's ``u``: the logits' gradient for a coefficient of 1, times the weight."""
            nonlocal u
            if u is None:  # after the first matmul is queued
                u = torch.empty((n, hidden.shape[-1]), dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
            grad_hidden_matmul_fp32(u[s:e], g, head.weight, self.plan[0])

        logp, lse, ext = forward_tokens(hidden, head, aligned, self.extras, chunk_tokens=self.chunk_tokens,
                                        positions=(rows, cols), bounds=token_chunks(n, self.chunk_tokens),
                                        each_grad=hidden_rows if self.needs[0] else None)
        self.tokens = (logp, lse, ext)
        # The loss's small graph, for the backward's coefficients, only where a gradient is wanted
        # (under inference_mode its tensors could not be saved for one).
        wanted = any(self.needs)
        with torch.set_grad_enabled(wanted):
            leaf = logp.detach().requires_grad_(wanted)
            loss, chosen, rejected, chosen_rewards, rejected_rewards = self.terms_fn(leaf, lse, ext)
            seq_logps = torch.cat([chosen, rejected])
        self.rewards = (chosen_rewards.detach(), rejected_rewards.detach())
        self._saved = (rows, cols, u, leaf, loss, seq_logps)
        return loss.detach(), seq_logps.detach()

    def gradients(self, hidden, weight, bias, grad_loss, grad_seq_logps, needs):
        """``(grad_hidden, grad_weight, grad_bias)`` for the incoming gradients (either may be None)."""
        rows, cols, u, leaf, loss, seq_logps = self._saved
        self._saved = None
        outputs = [(out, grad.detach()) for out, grad in ((loss, grad_loss), (seq_logps, grad_seq_logps))
                   if grad is not None]
        need_hidden, need_weight, need_bias = needs
        need_bias = need_bias and bias is not None
        if not outputs or not any((need_hidden, need_weight, need_bias)):
            return None, None, None
        with torch.enable_grad():
            (coef,) = torch.autograd.grad([o for o, _ in outputs], leaf, [g.to(o.dtype) for o, g in outputs],
                                          allow_unused=True)
        del leaf, loss, seq_logps
        if coef is None:  # the outputs do not depend on the log-probs
            coef = torch.zeros(self.aligned.shape, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
        grad_hidden = None
        if need_hidden:  # coef_t * u_t, rounded once
            grad_hidden = round_rows_into_grad(hidden, rows, cols, u, coef[rows, cols].unsqueeze(1))
        u = None  # freed before the weight gradient exists: the two never coexist
        grad_weight = grad_bias = None
        if need_weight or need_bias:
            head = replace(self.head, weight=weight, bias=bias)
            _, grad_weight, grad_bias = two_phase_backward(head, hidden, self.aligned, rows, cols, self.tokens[1],
                                                           coef, self.plan, (False, need_weight, need_bias))
        return grad_hidden, grad_weight, grad_bias


def grad_hidden_matmul_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, step: int) -> None:
    """``out = grad_logits @ weight`` in fp32, not rounded (``out`` fp32 ``[n, H]``, ``a``
    ``[n, V]``, ``b`` ``[V, H]``): split's per-token hidden gradient before its coefficient is
    known. Where the device forms fp32 results from half-precision operands only by upcasting
    them (the CPU), the vocabulary is taken ``step`` rows at a time, so no fp32 copy of the whole
    weight exists."""
    if a.dtype in (torch.float32, torch.float64) or fp32_mm_path(a.device, a.dtype) != "upcast":
        mm_fp32_into(out, a, b, accumulate=False)
        return
    V = b.shape[0]
    for v0 in range(0, V, max(1, step)):
        v1 = min(V, v0 + max(1, step))
        mm_fp32_into(out, a[:, v0:v1], b[v0:v1], accumulate=v0 > 0)


@torch.compiler.disable  # one_pass sizes its chunks of whole pairs on the host; two_phase traces whole
def one_pass(hidden, head: Head, runner: OnePass):
    """``(loss, seq_logps)``: the loss carries the precomputed gradients; ``seq_logps`` refuse one.

    Inside torch.compile this runs eagerly (a graph break: ``fullgraph=True`` refuses it);
    ``mode="auto"`` takes two_phase there."""
    return _OnePassFunction.apply(hidden, head.weight, head.bias, runner)


@torch.compiler.disable  # split sizes its chunks on the host, like one_pass; two_phase traces whole
def split(hidden, head: Head, runner: Split):
    """``(loss, seq_logps)`` of the ``split`` mode, both differentiable (see :class:`Split`).

    Inside torch.compile this runs eagerly (a graph break: ``fullgraph=True`` refuses it)."""
    return _SplitFunction.apply(hidden, head.weight, head.bias, runner)
