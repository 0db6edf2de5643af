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
  log-probs), recomputes each chunk's logits and forms the gradients: four matmuls over the
  valid tokens (logits, recompute, grad hidden, grad weight).
- ``one_pass`` (three matmuls): when each pair's loss depends on that pair only (every loss but
  the batch-coupled ``aot``/``aot_unpaired``; the batch-mean NLL of ``sft``/``cpo``/``orpo`` is
  linear so its per-token coefficient is a constant), chunks hold whole pairs, the per-token
  coefficients are computed right after each chunk's forward (autograd on the tiny per-pair
  loss) and the gradients of hidden, weight and bias are accumulated during the forward
  (Liger-style); the backward only scales them by the incoming gradient.

Weight gradient: accumulated in an fp32 ``[V, H]`` buffer; each chunk's product
``grad_logits.T @ hidden_chunk`` is computed by the matmul with fp32 accumulation and fp32
output (``torch.mm(..., out_dtype=torch.float32)`` where the device supports it, otherwise both
chunk-sized operands upcast to fp32), so the only roundings are the one of ``grad_logits`` to the
input dtype (by the kernel, once) and the final one of the sum to the weight dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import load_backend

MODES = ("auto", "one_pass", "two_phase")

# Default memory budget of one chunk's logits (chunk_tokens x V in the compute dtype).
DEFAULT_CHUNK_BYTES = 256 << 20


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
    """``grad_logits @ weight``: one product per row (fp32 accumulation inside the matmul)."""
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


def grad_weight_matmul(acc: torch.Tensor, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
    """``acc += grad_logits.T @ hidden_chunk`` with ``acc`` fp32 (fp64 for fp64 inputs)."""
    acc.add_(_mm_fp32(grad_logits.t(), hidden_chunk))


# --------------------------------------------------------------------------------------------
# One chunk: logits, transform, kernel forward; gradient of the logits in place.


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(head: Head, h: torch.Tensor, keep_derivative: bool):
    """The transformed logits ``[n, V]`` and, with a softcap and ``keep_derivative``, its
    derivative ``1 - tanh^2`` (fp32) for the backward."""
    z = logits_matmul(h, head.weight, head.bias)
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
                        dcap: torch.Tensor | None) -> torch.Tensor:
    """Overwrites ``z`` with the gradient w.r.t. the raw (pre-transform) logits."""
    backend = load_backend(head.backend_name)
    backend.token_logprobs_backward(z.unsqueeze(0), y.unsqueeze(0), lse.unsqueeze(0),
                                    coef.to(lse.dtype).unsqueeze(0).contiguous(), head.ignore_index, inplace=True)
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
            grad_weight_matmul(self.weight, g, h)
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
    def forward(ctx, hidden, weight, bias, aligned, rows, cols, head, extras, chunk_tokens):
        logp, lse, ext = forward_tokens(hidden, head, aligned, extras, chunk_tokens=chunk_tokens,
                                        positions=(rows, cols))
        ctx.save_for_backward(hidden, weight, bias, aligned, rows, cols, lse)
        ctx.head, ctx.chunk_tokens = head, chunk_tokens
        ext_values = tuple(ext[name] for name in extras)
        ctx.mark_non_differentiable(lse, *ext_values)
        return (logp, lse, *ext_values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, aligned, rows, cols, lse = ctx.saved_tensors
        head = ctx.head
        grads = _Grads(hidden, head, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       bias is not None and ctx.needs_input_grad[2])
        if grad_logp is not None:
            for s in range(0, rows.numel(), ctx.chunk_tokens):
                r, c = rows[s:s + ctx.chunk_tokens], cols[s:s + ctx.chunk_tokens]
                h = hidden[r, c]
                z, dcap = _chunk_logits(head, h, keep_derivative=True)
                g = _chunk_grad_logits_(head, z, aligned[r, c], lse[r, c], grad_logp[r, c], dcap)
                grads.add(head, g, h, r, c)
                del z, g, dcap
        return (*grads.final(head), None, None, None, None, None, None)


def linear_token_logprobs(hidden, head: Head, aligned, extras=(), *, chunk_tokens: int, positions=None):
    """Differentiable per-token ``(logp, lse, extras)`` ``[2P, T]`` through the two-phase Function."""
    rows, cols = valid_positions(aligned, head.ignore_index) if positions is None else positions
    extras = tuple(sorted(extras))
    logp, lse, *values = _TwoPhaseFunction.apply(hidden, head.weight, head.bias, aligned, rows, cols, head, extras,
                                                 chunk_tokens)
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
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_seq_logps):
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
