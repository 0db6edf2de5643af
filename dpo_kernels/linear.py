"""The chunked lm_head + logprob path: per-token log-probs from hidden states, never the full logits.

``logits = hidden @ weight.T (+ bias)`` is formed a chunk of tokens at a time (a torch matmul:
cuBLAS on the GPU), transformed in place (Gemma-2 ``logit_softcap``, then ``temperature``), and
handed to the kernel contract of the chosen backend (``token_logprobs_forward`` /
``token_logprobs_backward(..., inplace=True)``, so the logits gradient overwrites the chunk). Only
the valid tokens (label != ignore_index after the shift) are gathered into chunks: ignored tokens
cost no matmul and no vocabulary pass. Sizing that gather takes one host sync (``nonzero``).

Two exact modes (no gradient filtering in either):

- ``two_phase`` (low memory): the forward keeps per-token ``lse`` and references to the inputs;
  the backward receives ``dL/dlogp`` per token (any loss, any extra use of the per-sequence
  log-probs) and loops over vocabulary slices ``[v0, v1)`` (outer) and chunks of valid tokens
  (inner): it recomputes the slice's logits ``h @ weight[v0:v1].T (+ bias[v0:v1])`` (softcap and
  temperature are elementwise), and the kernel contract turns them in place into
  ``coef * (onehot - exp(z - lse))`` with the full row's ``lse`` from the forward (each slice's
  softmax is exact) and the labels shifted into the slice (a label outside it is out of range:
  no one-hot). Four matmuls over the valid tokens (logits, recompute, grad hidden, grad weight),
  each split into slices, none repeated. Slice size: ``vocab_chunk`` or what keeps the slice's
  fp32 weight-gradient accumulator within :data:`DEFAULT_SLICE_BYTES` (64 MiB: 4096 rows at
  H = 4096); tokens per backward chunk: ``chunk_tokens`` or what keeps ``tokens x slice`` logits
  within :data:`DEFAULT_CHUNK_BYTES`.
- ``one_pass`` (three matmuls): when each pair's loss depends on that pair only (every loss but
  the batch-coupled ``aot``/``aot_unpaired``; the batch-mean NLL of ``sft``/``cpo``/``orpo`` is
  linear so its per-token coefficient is a constant), chunks hold whole pairs, the per-token
  coefficients are computed right after each chunk's forward (autograd on the tiny per-pair
  loss) and the gradients of hidden, weight and bias are accumulated during the forward
  (Liger-style); the backward only scales them by the incoming gradient. It keeps, from its
  forward to its backward, an fp32 ``[V, H]`` weight-gradient accumulator (fp64 for fp64 inputs;
  2.1 GB for a Llama-3 head), an fp32 ``[V]`` bias one, and the hidden gradient ``[2P, T, H]`` in
  the input dtype (plus the ``[2P, T]`` token results).

Precision of the products (all with fp32 accumulation, fp32 output:
``torch.mm(..., out_dtype=torch.float32)`` where the device supports it, otherwise both
chunk-sized operands upcast to fp32); the only roundings are the one of ``grad_logits`` to the
input dtype (by the kernel, once) and one final rounding of each gradient to its input's dtype:

- ``two_phase``: ``grad_weight[v0:v1] = sum_chunks grad_slice.T @ h`` in an fp32 ``[v1 - v0, H]``
  buffer (the first chunk's product itself), rounded once into the weight gradient: no
  ``[V, H]`` fp32 buffer. ``grad_hidden = sum_slices grad_slice @ weight[v0:v1]`` in an fp32
  ``[N_valid, H]`` buffer rounded once at the end (one slice: a single product per token in the
  input dtype, no buffer). Bias likewise per slice.
- ``one_pass``: the weight gradient is summed over chunks in the fp32 ``[V, H]`` buffer and
  rounded (after the scaling by the incoming gradient) once; each token's hidden gradient is one
  product ``grad_logits @ weight`` (fp32 accumulation inside the matmul).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import load_backend
from .logprobs import refuse_double_backward

MODES = ("auto", "one_pass", "two_phase")

# Default memory budget of one chunk's logits (chunk_tokens x V in the compute dtype).
DEFAULT_CHUNK_BYTES = 256 << 20

# Default bound of the fp32 weight-gradient accumulator of one vocabulary slice (``two_phase``
# backward): 64 MiB is 4096 rows at H = 4096.
DEFAULT_SLICE_BYTES = 64 << 20


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


def chunk_size(vocab_size: int, dtype: torch.dtype, softcap: float | None, chunk_tokens: int | None) -> int:
    """Tokens per chunk: ``chunk_tokens`` if given, else what fits :data:`DEFAULT_CHUNK_BYTES`
    (the chunk's logits in the compute dtype, plus the fp32 temporaries of the softcap)."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    per_token = vocab_size * torch.empty((), dtype=dtype).element_size()
    if softcap is not None:
        per_token += 2 * 4 * vocab_size  # tanh in fp32 and its derivative, kept for the backward
    tokens = max(1, DEFAULT_CHUNK_BYTES // max(per_token, 1))
    return tokens - tokens % 128 if tokens >= 256 else tokens


def valid_positions(aligned: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the scored tokens, row-major: the one host sync of this path."""
    return (aligned != ignore_index).nonzero(as_tuple=True)


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


_OUT_DTYPE_MM: dict[str, bool] = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 without upcasting the operands where the device
    supports ``out_dtype`` (CUDA bf16/fp16); else both (chunk-sized) operands are upcast."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return torch.mm(a, b)
    key = f"{a.device.type}:{a.dtype}"
    if _OUT_DTYPE_MM.get(key, a.device.type == "cuda"):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_MM[key] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[key] = False
    return torch.mm(a.float(), b.float())


def grad_hidden_matmul_acc(acc: torch.Tensor, grad_logits: torch.Tensor, weight_slice: torch.Tensor) -> None:
    """``acc += grad_logits @ weight_slice`` with ``acc`` fp32 (fp64 for fp64 inputs): the hidden
    gradient summed over vocabulary slices (``two_phase`` with several slices)."""
    acc.add_(_mm_fp32(grad_logits, weight_slice))


def grad_weight_matmul(acc: torch.Tensor | None, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor) -> torch.Tensor:
    """``acc += grad_logits.T @ hidden_chunk`` with ``acc`` fp32 (fp64 for fp64 inputs); returns
    ``acc``. With ``acc=None`` returns the fp32 product itself (the first token chunk of a slice:
    no zero-filled buffer, no extra add)."""
    product = _mm_fp32(grad_logits.t(), hidden_chunk)
    if acc is None:
        return product
    return acc.add_(product)


# --------------------------------------------------------------------------------------------
# One chunk: logits, transform, kernel forward; gradient of the logits in place.


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        t = torch.tanh(z.to(_acc_dtype(z.dtype)) / head.softcap)
        if keep_derivative:
            dcap = 1.0 - t * t
        z.copy_(t.mul_(head.softcap))  # one rounding to the logits dtype
        del t
    if head.temperature != 1.0:
        z.div_(head.temperature)
    return z, dcap


def _chunk_forward(head: Head, z: torch.Tensor, y: torch.Tensor, extras):
    backend = load_backend(head.backend_name)
    logp, lse, values = backend.token_logprobs_forward(z.unsqueeze(0), y.unsqueeze(0), head.ignore_index,
                                                      frozenset(extras))
    return logp[0], lse[0], {name: values[name][0] for name in extras}


def _chunk_grad_logits_(head: Head, z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                        dcap: torch.Tensor | None, ignore_index: int | None = None) -> torch.Tensor:
    """Overwrites ``z`` with the gradient w.r.t. the raw (pre-transform) logits. ``z`` may be a
    vocabulary slice: then ``y`` is shifted into the slice (labels outside it are out of range and
    get no one-hot), ``lse`` is the full row's, and ``ignore_index`` one no shifted label can hit."""
    backend = load_backend(head.backend_name)
    backend.token_logprobs_backward(z.unsqueeze(0), y.unsqueeze(0), lse.unsqueeze(0),
                                    coef.to(lse.dtype).unsqueeze(0).contiguous(),
                                    head.ignore_index if ignore_index is None else ignore_index, inplace=True)
    if head.temperature != 1.0:
        z.div_(head.temperature)
    if dcap is not None:
        z.copy_(z.to(dcap.dtype).mul_(dcap))
    return z


class _Grads:
    """Gradient buffers of hidden (input dtype), weight and bias (fp32 accumulators)."""

    def __init__(self, hidden, head: Head, need_hidden: bool, need_weight: bool, need_bias: bool):
        acc = _acc_dtype(head.weight.dtype)
        self.hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        self.weight = torch.zeros(head.weight.shape, dtype=acc, device=head.weight.device) if need_weight else None
        self.bias = (torch.zeros(head.bias.shape, dtype=acc, device=head.bias.device)
                     if need_bias and head.bias is not None else None)

    def add(self, head: Head, g: torch.Tensor, h: torch.Tensor, rows, cols) -> None:
        if self.hidden is not None:
            self.hidden[rows, cols] = grad_hidden_matmul(g, head.weight)
        if self.weight is not None:
            self.weight = grad_weight_matmul(self.weight, g, h)
        if self.bias is not None:
            self.bias.add_(g.sum(0, dtype=self.bias.dtype))

    def final(self, head: Head, scale: torch.Tensor | None = None):
        out = []
        for buf, like in ((self.hidden, None), (self.weight, head.weight), (self.bias, head.bias)):
            if buf is None:
                out.append(None)
                continue
            if scale is not None:
                buf = (buf.to(_acc_dtype(buf.dtype)) * scale.to(_acc_dtype(buf.dtype))).to(buf.dtype)
            out.append(buf if like is None else buf.to(like.dtype))
        return tuple(out)


def _scatter(values: torch.Tensor, rows, cols, shape) -> torch.Tensor:
    full = torch.zeros(shape, dtype=values.dtype, device=values.device)
    full[rows, cols] = values
    return full


# --------------------------------------------------------------------------------------------
# Forward only (the reference model, or no gradient needed).


@torch.no_grad()
def forward_tokens(hidden: torch.Tensor, head: Head, aligned: torch.Tensor, extras=(), *, chunk_tokens: int,
                   positions=None):
    """``(logp, lse, extras)`` as ``[2P, T]`` (0 on ignored tokens), chunked, no autograd."""
    rows, cols = valid_positions(aligned, head.ignore_index) if positions is None else positions
    n = rows.numel()
    acc = _acc_dtype(hidden.dtype)
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    ext = {name: torch.empty(n, dtype=acc, device=hidden.device) for name in extras}
    for s in range(0, n, chunk_tokens):
        e = min(n, s + chunk_tokens)
        r, c = rows[s:e], cols[s:e]
        z, _ = _chunk_logits(head, hidden[r, c], keep_derivative=False)
        lp, ls, ex = _chunk_forward(head, z, aligned[r, c], extras)
        logp[s:e], lse[s:e] = lp, ls
        for name in extras:
            ext[name][s:e] = ex[name]
        del z
    shape = aligned.shape
    return (_scatter(logp, rows, cols, shape), _scatter(lse, rows, cols, shape),
            {name: _scatter(v, rows, cols, shape) for name, v in ext.items()})


# --------------------------------------------------------------------------------------------
# two_phase: an autograd.Function over the valid tokens.


class _TwoPhaseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, aligned, rows, cols, head, extras, chunk_tokens, plan):
        logp, lse, ext = forward_tokens(hidden, head, aligned, extras, chunk_tokens=chunk_tokens,
                                        positions=(rows, cols))
        ctx.save_for_backward(hidden, weight, bias, aligned, rows, cols, lse)
        ctx.head, ctx.plan = head, plan
        ext_values = tuple(ext[name] for name in extras)
        ctx.mark_non_differentiable(lse, *ext_values)
        return (logp, lse, *ext_values)

    @staticmethod
    def backward(ctx, grad_logp, *_):
        refuse_double_backward("fused_linear_dpo_loss")
        hidden, weight, bias, aligned, rows, cols, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if grad_logp is None:
            grads = (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None,
                     torch.zeros_like(bias) if need_b else None)
        else:
            grads = two_phase_backward(ctx.head, hidden, aligned, rows, cols, lse, grad_logp, ctx.plan,
                                       (need_h, need_w, need_b))
        return (*grads, None, None, None, None, None, None, None)


def two_phase_backward(head: Head, hidden, aligned, rows, cols, lse, grad_logp, plan, needs):
    """Gradients of hidden, weight and bias (input dtypes) from ``dL/dlogp`` per token.

    Vocabulary slices ``[v0, v1)`` outer, chunks of valid tokens inner. For each pair the slice's
    logits ``h @ weight[v0:v1].T (+ bias[v0:v1])`` are recomputed (softcap/temperature as in the
    forward) and overwritten in place by the kernel contract with ``coef * (onehot - exp(z - lse))``
    using the full row's ``lse`` saved by the forward (so each slice's softmax is exact), the labels
    shifted by ``-v0`` (a label outside the slice is out of range: no one-hot) and an
    ``ignore_index`` no shifted label can equal. Then
    ``grad_weight[v0:v1] = sum_chunks grad_slice.T @ h`` is accumulated in an fp32 ``[v1 - v0, H]``
    buffer (the matmul's own fp32 output for the first chunk) and rounded once into the weight
    gradient; ``grad_hidden`` sums ``grad_slice @ weight[v0:v1]`` over the slices in an fp32
    ``[N_valid, H]`` buffer, rounded once at the end (with a single slice there is nothing to sum:
    one product per chunk, in the input dtype, and no buffer). No ``[V, H]`` fp32 buffer exists.
    Matmuls over valid tokens: the recomputed logits, grad hidden, grad weight (plus the forward's
    logits: four in all), each split into slices, not repeated.
    """
    vocab_step, chunk_tokens = plan
    need_h, need_w, need_b = needs
    V, H = head.weight.shape
    n = rows.numel()
    acc = _acc_dtype(head.weight.dtype)
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    grad_weight = torch.empty_like(head.weight, memory_format=torch.contiguous_format) if need_w else None
    grad_bias = torch.empty_like(head.bias) if need_b else None
    if n == 0 or not (need_h or need_w or need_b):
        if grad_weight is not None:
            grad_weight.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return grad_hidden, grad_weight, grad_bias
    sliced = vocab_step < V
    gh_acc = torch.zeros((n, H), dtype=acc, device=hidden.device) if need_h and sliced else None
    coef = grad_logp[rows, cols]
    token_lse = lse[rows, cols]
    labels = aligned[rows, cols]
    bounds = [(s, min(n, s + chunk_tokens)) for s in range(0, n, chunk_tokens)]
    # One chunk: gather the valid hidden rows once, not once per slice.
    whole = hidden[rows, cols] if len(bounds) == 1 else None
    no_label = -(V + 1)  # shifted labels lie in [-(V - 1), V - 1]: never equal to it
    for v0 in range(0, V, vocab_step):
        v1 = min(V, v0 + vocab_step)
        vocab = slice(v0, v1) if sliced else None
        w_slice = head.weight[v0:v1]
        gw_acc, gb_acc = None, (torch.zeros(v1 - v0, dtype=acc, device=hidden.device) if need_b else None)
        for s, e in bounds:
            h = whole if whole is not None else hidden[rows[s:e], cols[s:e]]
            z, dcap = _chunk_logits(head, h, keep_derivative=True, vocab=vocab)
            y = labels[s:e] - v0 if sliced else labels[s:e]
            g = _chunk_grad_logits_(head, z, y, token_lse[s:e], coef[s:e], dcap,
                                    ignore_index=no_label if sliced else None)
            del dcap
            if need_h:
                if sliced:
                    grad_hidden_matmul_acc(gh_acc[s:e], g, w_slice)
                else:
                    grad_hidden[rows[s:e], cols[s:e]] = grad_hidden_matmul(g, head.weight)
            if need_w:
                gw_acc = grad_weight_matmul(gw_acc, g, h)
            if need_b:
                gb_acc.add_(g.sum(0, dtype=acc))
            del z, g
        if need_w:
            grad_weight[v0:v1].copy_(gw_acc)  # the one rounding of this slice
        if need_b:
            grad_bias[v0:v1].copy_(gb_acc)
        del gw_acc, gb_acc
    if gh_acc is not None:
        grad_hidden[rows, cols] = gh_acc.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def vocab_slice_size(vocab_size: int, hidden_size: int, vocab_chunk: int | None) -> int:
    """Vocabulary rows per slice of the ``two_phase`` backward: ``vocab_chunk`` if given, else as
    many as keep the slice's fp32 weight-gradient accumulator within :data:`DEFAULT_SLICE_BYTES`
    (a multiple of 128 from 256 rows up), never more than ``vocab_size``."""
    if vocab_chunk is not None:
        return max(1, min(int(vocab_chunk), vocab_size))
    rows = max(1, DEFAULT_SLICE_BYTES // max(4 * hidden_size, 1))
    rows = rows - rows % 128 if rows >= 256 else rows
    return max(1, min(rows, vocab_size))


def backward_plan(head: Head, hidden_size: int, dtype: torch.dtype, chunk_tokens: int | None,
                  vocab_chunk: int | None) -> tuple[int, int]:
    """``(vocabulary rows per slice, tokens per chunk)`` of the ``two_phase`` backward. Tokens:
    ``chunk_tokens`` if given, else what keeps one slice's logits (plus the softcap's fp32
    temporaries) within :data:`DEFAULT_CHUNK_BYTES`, as :func:`chunk_size` does for full rows."""
    step = vocab_slice_size(head.vocab_size, hidden_size, vocab_chunk)
    return step, chunk_size(step, dtype, head.softcap, chunk_tokens)


def linear_token_logprobs(hidden, head: Head, aligned, extras=(), *, chunk_tokens: int, positions=None,
                          backward_chunk_tokens: int | None = None, vocab_chunk: int | None = None):
    """Differentiable per-token ``(logp, lse, extras)`` ``[2P, T]`` through the two-phase Function.

    ``chunk_tokens``: the forward's tokens per chunk (full vocabulary rows).
    ``backward_chunk_tokens`` / ``vocab_chunk``: the backward's tokens per chunk and vocabulary
    rows per slice (default: from the memory budgets, see :func:`backward_plan`)."""
    rows, cols = valid_positions(aligned, head.ignore_index) if positions is None else positions
    extras = tuple(sorted(extras))
    plan = backward_plan(head, hidden.shape[-1], hidden.dtype, backward_chunk_tokens, vocab_chunk)
    logp, lse, *values = _TwoPhaseFunction.apply(hidden, head.weight, head.bias, aligned, rows, cols, head, extras,
                                                 chunk_tokens, plan)
    return logp, lse, dict(zip(extras, values))


# --------------------------------------------------------------------------------------------
# one_pass: gradients during the forward, chunks of whole pairs.


def pair_chunks(rows: torch.Tensor, cols: torch.Tensor, num_pairs: int, T: int, chunk_tokens: int):
    """Valid positions reordered pair by pair, and the ``(start, end)`` of each chunk: whole pairs,
    as many as fit ``chunk_tokens`` (at least one). Also returns the largest pair's token count."""
    pair = rows % num_pairs
    order = torch.argsort(pair * (2 * T) + (rows // num_pairs) * T + cols, stable=True)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(pair, minlength=num_pairs).tolist()
    bounds, start, size = [], 0, 0
    for count in counts:
        if size and size + count > chunk_tokens:
            bounds.append((start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        bounds.append((start, start + size))
    return rows, cols, bounds, max(counts, default=0)


def largest_pair(aligned: torch.Tensor, ignore_index: int) -> int:
    """Valid tokens of the largest pair (one host sync)."""
    P = aligned.shape[0] // 2
    per_seq = (aligned != ignore_index).sum(-1)
    return int((per_seq[:P] + per_seq[P:]).max().item()) if P else 0


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
                "their own (the gradients were formed during the forward from the loss alone); use "
                "mode='two_phase' to backpropagate through them"
            )
        if ctx.grads is False:
            raise RuntimeError("fused_linear_dpo_loss(mode='one_pass'): backward called twice (the gradient "
                               "buffers are released after the first); use mode='two_phase'")
        grads, ctx.grads = ctx.grads, False
        if grad_loss is None or grads is None:
            return None, None, None, None
        # Scaled in the accumulation dtype, then rounded once to each input's dtype.
        return (*grads.final(ctx.head, grad_loss.detach()), None)


class OnePass:
    """The one-pass loop. ``loss_fn(logp, lse, extras)`` (full ``[2P, T]`` tensors) returns the
    loss, differentiable in ``logp``; ``final_fn(logp, lse, extras)`` returns ``(loss, seq_logps)``
    of the finished (detached) token results. Each pair's loss must depend on that pair only."""

    def __init__(self, head: Head, aligned, extras, chunk_tokens, loss_fn, final_fn, num_pairs, needs):
        self.needs = tuple(needs)  # gradients wanted for (hidden, weight, bias)
        self.head, self.aligned, self.extras = head, aligned, tuple(sorted(extras))
        self.chunk_tokens, self.loss_fn, self.final_fn, self.num_pairs = chunk_tokens, loss_fn, final_fn, num_pairs
        self.tokens = None

    def run(self, hidden):
        head, aligned = self.head, self.aligned
        shape = aligned.shape
        rows, cols = valid_positions(aligned, head.ignore_index)
        rows, cols, bounds, _ = pair_chunks(rows, cols, self.num_pairs, shape[1], self.chunk_tokens)
        acc = _acc_dtype(hidden.dtype)
        scored = aligned != head.ignore_index
        # Placeholders for the tokens not processed yet: -1 (a finite log-prob), so every pair's loss
        # stays finite; a pair's coefficients do not depend on the other pairs' values.
        logp = torch.where(scored, -1.0, 0.0).to(acc)
        lse = torch.zeros(shape, dtype=acc, device=hidden.device)
        ext = {name: torch.zeros(shape, dtype=acc, device=hidden.device) for name in self.extras}
        grads = _Grads(hidden, head, *self.needs) if any(self.needs) else None
        for s, e in bounds:
            r, c = rows[s:e], cols[s:e]
            h = hidden[r, c]
            z, dcap = _chunk_logits(head, h, keep_derivative=grads is not None)
            lp, ls, ex = _chunk_forward(head, z, aligned[r, c], self.extras)
            logp[r, c], lse[r, c] = lp, ls
            for name in self.extras:
                ext[name][r, c] = ex[name]
            if grads is not None:
                with torch.enable_grad():
                    leaf = logp.detach().requires_grad_(True)
                    loss = self.loss_fn(leaf, lse, ext)
                    (coef,) = torch.autograd.grad(loss, leaf)
                g = _chunk_grad_logits_(head, z, aligned[r, c], ls, coef[r, c], dcap)
                grads.add(head, g, h, r, c)
                del g
            del z, dcap
        self.tokens = (logp, lse, ext)
        loss, seq_logps = self.final_fn(logp, lse, ext)
        return loss.detach(), seq_logps.detach(), grads


def one_pass(hidden, head: Head, runner: OnePass):
    """``(loss, seq_logps)``: the loss carries the precomputed gradients; ``seq_logps`` refuse one."""
    return _OnePassFunction.apply(hidden, head.weight, head.bias, runner)
