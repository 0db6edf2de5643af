"""Front door of the logits path: validate, call the core, assemble a :class:`DPOOutput`.

No kernel is launched here: per-token work goes through ``logprobs`` (which picks a backend),
losses come from the registry in ``losses``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .backends import autocast_dtype, autocast_off, fused_logits_grad_matmul, load_backend, resolve_backend
from .checks import (
    FLOAT_DTYPES,
    check_flags,
    check_ignore_index,
    check_inplace,
    check_labels,
    check_like,
    check_linear_options,
    check_logits_labels,
    is_number,
    python_scalars,
)
from .logprobs import (
    TokenLogprobs,
    align_labels,
    completion_lengths,
    functorch_transforms,
    fused_sigmoid_dpo,
    label_ids,
    ld_token_weights,
    sequence_logprobs,
    token_logprobs,
    under_vmap,
    wpo_weights,
)
from .losses import (
    LossOptions,
    PreferencePair,
    combined_loss,
    describe,
    loss_options,
    resolve_loss_types,
    resolve_loss_weights,
    rewards,
)

@dataclass
class DPOOutput:
    """Result of one DPO loss evaluation on ``P`` preference pairs.

    ``loss`` is the (weighted sum of the) mean over pairs (differentiable);
    ``chosen_logps``/``rejected_logps`` are the per-sequence policy log-probs ``[P]``
    (differentiable): sums over the completion tokens (LD-weighted with ``ld_alpha``, averages with
    ``average_log_prob``); rewards are ``beta * (pi - ref)`` (``ref`` = 0 without a reference),
    detached. ``metrics`` holds detached scalar tensors under TRL's names (no host sync), plus
    ``entropy`` and ``mean_token_accuracy`` with ``token_metrics=True``.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@python_scalars
def fused_dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logps: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ref_logits: torch.Tensor | None = None,
    reference_free: bool = False,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | None = None,
    simpo_gamma: float | None = None,
    cpo_alpha: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    average_log_prob: bool = False,
    token_metrics: bool = False,
    ignore_index: int = -100,
    shift: bool = False,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> DPOOutput:
    """DPO-family loss straight from the policy's logits, without a logits-sized temporary.

    Args:
        logits: ``[2B, T, V]`` floating (fp32, bf16, fp16, fp64), any strides. Rows ``0..B-1``
            are the chosen completions, rows ``B..2B-1`` the rejected ones (TRL's layout).
        labels: ``[2B, T]`` integer token ids (any integer dtype: one that cannot hold
            ``ignore_index`` is read as int64, see ``logprobs.label_ids``); ``ignore_index`` marks
            prompt and padding.
        ref_logps: reference per-sequence log-probs, ``[2B]`` or ``(chosen[B], rejected[B])``:
            SUMS over the completion tokens, as TRL's ``precompute_ref_log_probs`` stores them
            (averages when ``average_log_prob=True``; LD-weighted ``shared + ld_alpha * tail``
            when ``ld_alpha`` is given). Losses that want per-token averages divide internally.
        ref_logits: the reference model's ``[2B, T, V]`` logits instead (same labels, no grad).
        reference_free: use a zero reference (no ``ref_logps``/``ref_logits``). When every loss
            type is reference-free (``simpo``, ``cpo``, ``orpo``, ``sft``) the reference is
            optional: given, it enters only the rewards and metrics (as TRL's DPOTrainer does
            for ``sft``); absent, it is zero.
        beta: inverse temperature of the implicit reward, > 0 (IPO's tau, ORPO's lambda); 0 only for
            ``loss_type="sft"`` alone, where it scales just the logged rewards.
        loss_type: a name in ``dpo_kernels.losses.LOSSES`` or a list of names (summed with
            ``loss_weights``, e.g. MPO ``["sigmoid", "bco_pair", "sft"]``, RPO ``["sigmoid", "sft"]``).
        loss_weights: one weight per loss type (default 1.0 each).
        label_smoothing: in ``[0, 0.5)``: cDPO on ``sigmoid``, the flip rate of ``robust``, EXO's
            epsilon (``exo_pair``, must be > 0), and the smoothing of ``aot``, ``aot_unpaired``,
            ``simpo``, ``cpo``. It must apply to at least one of the loss types.
        f_divergence_type: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"``,
            ``"alpha_divergence"``: the scores replacing the log-ratios (f-DPO). A non-default one
            needs every loss type to be among sigmoid, sigmoid_norm, hinge, ipo, exo_pair,
            robust, discopop, sft (TRL's rule).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"`` (default 0.5); only with it.
        discopop_tau: DiscoPOP's temperature (default 0.05); only with ``"discopop"``.
        simpo_gamma: SimPO's target margin gamma (default 0.5, TRL's ``simpo_gamma``); only with
            ``"simpo"``.
        cpo_alpha: weight of the chosen NLL term of ``"cpo"`` (default 1.0) and ``"simpo"``
            (default 0.0; > 0 is CPO-SimPO).
        ld_alpha: LD-DPO's alpha in ``[0, 1]``: completion tokens past the shorter completion of
            each pair weigh ``alpha`` in the per-sequence sums of policy and reference (and
            every loss and metric sees those sums; ``sft`` uses the raw tokens). Not with
            ``average_log_prob``.
        use_weighting: WPO: multiply each pair's loss by the detached ``w_c * w_r``,
            ``w = exp(mean_t (logp_t - log sum_v p_v^2))``, computed in the same kernel pass.
            Not with ``aot``/``aot_unpaired`` (they sort the pairs).
        average_log_prob: every per-sequence log-prob (policy, reference, ``ref_logps`` given,
            outputs, rewards, metrics) is the per-token average instead of the sum; the losses
            that normalize by length (ipo, sigmoid_norm, simpo, orpo) then do not divide again.
        token_metrics: also compute TRL's ``entropy`` (mean over all completion tokens) and
            ``mean_token_accuracy`` (argmax == label over the chosen completion tokens) in the
            same kernel pass, into ``metrics``.
        ignore_index: label value of tokens that are not scored.
        shift: score ``logits[:, t]`` against ``labels[:, t + 1]`` (causal LM outputs as they come
            from the model); done through strides, the logits are never copied.
        inplace_backward: write the logits gradient into the logits buffer (saves one logits-sized
            allocation). Nothing else may need these logits in backward, and the graph can be
            backpropagated only once.
        validate: check labels range and non-finite logits on the host (one device sync per call).
            With ``validate=False`` a bad label yields NaN and NaN/inf logits propagate to the loss.
        backend: "auto" (Triton on CUDA, the C++ or PyTorch reference on CPU), "triton", "cpu",
            "reference".
        cu_seqlens: a packed (padding-free) batch instead of a padded one: int32/int64 ``[2B + 1]``
            offsets (``cu_seqlens[0] = 0``, non-decreasing, last = ``total``) of ``2B`` sequences
            laid back to back, the ``B`` chosen first, then the ``B`` rejected (pair ``i`` is
            sequences ``i`` and ``B + i``); flash-attention's varlen / TRL's ``padding_free``
            layout. ``logits`` is then ``[1, total, V]`` or ``[total, V]`` (any strides),
            ``labels`` ``[1, total]`` or ``[total]``, ``ref_logits`` like ``logits``. ``shift``
            shifts within each sequence (its last token has no target). The result equals the
            padded batch's exactly (an empty sequence is a padded row with every token ignored);
            the logits are never copied or padded, only ``[total]``-sized per-token results are
            moved into the ``[2B, Tmax]`` layout. Validation positions (``labels[0, p]``,
            ``logits[0, p]``) are packed token positions. Reading the offsets costs one host sync,
            unless ``max_seqlen`` is given.
        max_seqlen: with ``cu_seqlens``, the longest sequence's length (flash-attention's
            ``max_seqlen``; a larger value only widens the internal ``[2B, Tmax]`` layout). Then
            the offsets are read on the host only to validate them (``validate=True``, never inside
            a compiled region): with ``validate=False``, or compiled, the packed path has no host
            sync and no graph break. A value below the longest sequence raises a ``ValueError``
            with ``validate=True``; without validation the bounds check of the index that moves
            the results raises instead (an ``IndexError`` on the CPU, a device-side assert on CUDA).
    """
    specs, weights, opts = _loss_setup(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
        cpo_alpha=cpo_alpha,
    )
    check_flags(reference_free=reference_free, shift=shift, inplace_backward=inplace_backward, validate=validate)
    packing = None
    _check_max_seqlen_needs_offsets(cu_seqlens, max_seqlen)
    if cu_seqlens is None:
        num_pairs, vocab_size = _check_inputs(logits, labels, ignore_index)
    else:
        logits, labels, ref_logits = _as_packed(logits, 2), _as_packed(labels, 1), _as_packed(ref_logits, 2)
        _, vocab_size = check_logits_labels(logits, labels, ignore_index,
                                             layout="[1, total, V] or [total, V] (a packed batch: cu_seqlens given)")
        packing = _check_packing(cu_seqlens, logits, "logits", max_seqlen, validate)
        num_pairs = packing.num_pairs
    _check_token_options(specs, ld_alpha, use_weighting, average_log_prob, token_metrics)
    check_inplace(inplace_backward, logits)
    ref_given = _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs, specs)
    backend_name = resolve_backend(backend, logits.device)
    labels = label_ids(labels, ignore_index)  # int64 where the dtype cannot hold ignore_index

    if packing is None:
        input_labels, token_labels, token_shift = labels, labels, shift
    else:
        # The kernel scores the packed rows on labels already shifted within each sequence.
        input_labels, aligned, token_labels = packing.labels(labels, ignore_index, shift)
        token_shift = False
    policy = token_logprobs(
        logits, token_labels, ignore_index=ignore_index, shift=token_shift, backend=backend_name,
        extras=policy_extras(use_weighting, token_metrics), inplace_backward=inplace_backward,
    )
    checks = [(policy, vocab_size, "logits")]  # checked with the reference's results: one sync
    if packing is not None:
        policy = packing.padded_tokens(policy, aligned)
    objective = Objective.build(
        specs, weights, opts, input_labels, policy.labels, ignore_index=ignore_index, shift=shift,
        ld_alpha=ld_alpha, use_weighting=use_weighting, average_log_prob=average_log_prob,
        token_metrics=token_metrics, fused_sigmoid=backend_name == "triton",
    )
    ref_seq = _reference_logps(ref_given, policy.labels, ignore_index, objective.average, backend_name,
                               num_pairs, logits.device, checks, objective.token_weights, packing)
    if validate:
        _check_token_results(checks, ignore_index, _sequence_failures(objective, policy.labels, ref_given))
    return objective.output(policy, ref_seq, vocab_size)


# The lm_head tensors of fused_linear_dpo_loss that autocast would cast, as it casts F.linear's.
_LM_HEAD_TENSORS = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")


def _lm_head_under_autocast(fn):
    """``fn`` (:func:`fused_linear_dpo_loss`) as autocast would run the model's own lm_head: under an
    enabled ``torch.autocast`` for ``hidden``'s device, the lm_head tensors that autocast would
    cast (floating, not float64, not already in its dtype) are cast to its dtype, differentiably
    (the gradients flow back to their own dtypes, as through autocast's cast), and the path runs
    with autocast off, since its own fp32 accumulation (the weight gradient's, split's ``u``)
    must not be re-cast. Outside autocast nothing changes and nothing is bound."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden")
        device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        dtype = None if device_type is None else autocast_dtype(device_type)
        if dtype is None:
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        for name in _LM_HEAD_TENSORS:
            t = bound.arguments.get(name)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
                bound.arguments[name] = t.to(dtype)
        with autocast_off(device_type):
            return fn(*bound.args, **bound.kwargs)

    return wrapper


@python_scalars
@_lm_head_under_autocast
def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logps: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    reference_free: bool = False,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | None = None,
    simpo_gamma: float | None = None,
    cpo_alpha: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    average_log_prob: bool = False,
    token_metrics: bool = False,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    shift: bool = False,
    mode: str = "auto",
    chunk_tokens: int | None = None,
    validate: bool = True,
    backend: str = "auto",
    vocab_chunk: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> DPOOutput:
    """DPO-family loss from the policy's last hidden states and lm_head, never forming the logits.

    The logits ``logit_softcap * tanh((hidden @ weight.T + bias) / logit_softcap) / temperature``
    are formed a chunk of valid tokens at a time (ignored tokens cost nothing), reduced by the
    kernel contract of ``backend`` and dropped (see ``dpo_kernels.linear``). Same loss options,
    outputs and metrics as :func:`fused_dpo_loss` on those logits; ``logits/chosen|rejected``
    and ``entropy``/``mean_token_accuracy`` are of the softcapped, tempered logits (what the loss
    sees). Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: ``[2B, T, H]`` floating: chosen sequences then rejected ones (TRL's layout).
        weight: the lm_head weight ``[V, H]``, same dtype and device as ``hidden``.
        labels: ``[2B, T]`` integer token ids (any integer dtype, as in ``fused_dpo_loss``), ``ignore_index`` on
            prompt and padding.
        bias: optional lm_head bias ``[V]``.
        ref_logps: reference per-sequence log-probs as in :func:`fused_dpo_loss`.
        ref_hidden: the reference model's hidden states ``[2B, T, H_ref]`` instead; with
            ``ref_weight`` ``[V, H_ref]`` (default: the policy's ``weight`` and ``bias``) and
            ``ref_bias``. Computed chunked under ``no_grad`` with the same softcap/temperature.
        logit_softcap: Gemma-2's final logit soft-capping ``s * tanh(z / s)`` (``s > 0``), applied
            before ``temperature``.
        temperature: the logits are divided by it (``> 0``), after the softcap.
        mode: ``"one_pass"`` (three matmuls: the gradients are formed during the forward, chunks
            hold whole pairs; a pair larger than ``chunk_tokens`` is cut into pieces and the
            earlier pieces' logits are formed again for their gradient, 3 to 4 matmuls; not for
            batch-coupled losses; the returned ``chosen_logps``/``rejected_logps`` carry no
            gradient of their own: a backward through them raises; a bf16/fp16 weight gradient is
            rounded once per chunk or piece), ``"split"`` (four matmuls, the least memory, every
            gradient rounded once, any loss: the forward forms each token's hidden gradient before
            its loss coefficient is known, the backward finds the coefficients for the incoming
            gradients, ``chosen_logps``'s included, and forms the weight and bias gradients by
            vocabulary slices as two_phase does; one backward), ``"two_phase"`` (four matmuls: the
            backward recomputes the logits; any loss, any number of backwards, traced whole by
            torch.compile), or ``"auto"``: one_pass when the loss is pair-local and a gradient is
            needed, unless pairs larger than its chunk would have more than half of their logits
            formed again (then split; split for batch-coupled losses too). On a GPU it also
            checks one_pass's estimated peak (:func:`estimate_linear_memory`) against 90% of the
            memory the device has left. If it does not fit, it uses a smaller chunk that does,
            or split when that needs less; two_phase without a
            gradient and inside torch.compile (two registered operators: no graph break). one_pass
            and split run eagerly inside torch.compile, in a graph break.
        chunk_tokens: tokens per chunk (default: a budget of chunk logits in the input dtype,
            256 MiB, or 768 MiB for one_pass's chunks of whole pairs, and for split's the larger
            of 768 MiB and the weight gradient's size, H tokens, which keeps its forward's peak
            below its backward's); no chunk of logits larger than this ever exists, in any mode:
            memory does not grow with the sequence length. In the ``two_phase`` and ``split``
            backward it applies to the vocabulary slices (default: a 256 MiB budget of
            ``tokens x slice`` logits).
        validate: check the labels' range before the matmuls (on the path's one read of the
            valid-token counts: no sync of its own) and, after the policy's forward, non-finite
            log-probs of the policy and the reference together (one host sync).
        backend: the kernel contract's backend, as in :func:`fused_dpo_loss`.
        vocab_chunk: vocabulary rows per slice of the ``two_phase`` and ``split`` backward, whose
            weight gradient is formed one slice at a time: one product written into the gradient when
            one token chunk holds all valid tokens, else summed in an fp32 ``[vocab_chunk, H]``
            buffer (default: the hidden size H rounded down to a multiple of 128, at least 2048
            rows; the whole vocabulary when smaller; split takes twice that when every valid
            token fits one chunk of the wider slice).
        cu_seqlens: a packed (padding-free) batch, as in :func:`fused_dpo_loss`: ``hidden``
            ``[1, total, H]`` or ``[total, H]``, ``labels`` ``[1, total]`` or ``[total]``,
            ``ref_hidden`` like ``hidden``; the ``B`` chosen sequences first, then the ``B``
            rejected. Equal to the padded batch's result. ``two_phase`` (and the reference) run
            on the packed rows as they are; ``one_pass`` (whose chunks hold whole pairs) and
            ``split`` (whose loss runs on the padded token results) gather the hidden states into
            the padded ``[2B, Tmax, H]`` layout first (a
            differentiable index: ``H`` wide, small beside the ``V``-wide logits that are never
            formed).
        max_seqlen: with ``cu_seqlens``, as in :func:`fused_dpo_loss` (it saves the read of the
            offsets; this path still has its own host sync for the valid tokens).

    Every other argument is as in :func:`fused_dpo_loss`.
    """
    from . import linear

    specs, weights, opts = _loss_setup(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
        cpo_alpha=cpo_alpha,
    )
    check_flags(reference_free=reference_free, shift=shift, validate=validate)
    packing = None
    _check_max_seqlen_needs_offsets(cu_seqlens, max_seqlen)
    if cu_seqlens is None:
        num_pairs, vocab_size = _check_linear_inputs(hidden, weight, labels, bias, ignore_index)
    else:
        hidden, labels, ref_hidden = _as_packed(hidden, 2), _as_packed(labels, 1), _as_packed(ref_hidden, 2)
        vocab_size = _check_linear_tensors(hidden, weight, labels, bias, ignore_index,
                                           layout="[1, total, H] or [total, H] (a packed batch: cu_seqlens given)")
        packing = _check_packing(cu_seqlens, hidden, "hidden", max_seqlen, validate)
        num_pairs = packing.num_pairs
    _check_token_options(specs, ld_alpha, use_weighting, average_log_prob, token_metrics)
    softcap, temperature = check_linear_options(logit_softcap, temperature, mode, chunk_tokens, vocab_chunk)
    ref_given = _check_linear_reference(hidden, weight, bias, ref_logps, ref_hidden, ref_weight, ref_bias,
                                        reference_free, num_pairs, specs)
    backend_name = resolve_backend(backend, hidden.device)
    labels = label_ids(labels, ignore_index)  # int64 where the dtype cannot hold ignore_index
    # aligned: [2B, T] labels of the padded layout; token_labels: those of hidden's own rows.
    if packing is None:
        input_labels, aligned = labels, align_labels(labels, ignore_index, shift)
        token_labels = aligned
    else:
        input_labels, aligned, token_labels = packing.labels(labels, ignore_index, shift)
    # One host sync before the matmuls: the valid tokens per sequence, read once, on first need
    # (the positions of the gathers, auto's pair sizes, one_pass's chunks), with the label check.
    census = linear.TokenCensus(
        aligned, ignore_index, num_pairs, vocab_size if validate and not _validation_skipped(aligned) else None,
        on_bad_labels=lambda: _check_label_range(token_labels, ignore_index, vocab_size),
    )
    positions = None  # the row-major valid positions of token_labels, shared by the reference and two_phase
    compiling = torch.compiler.is_compiling()
    vmapped = under_vmap()

    def valid_positions():
        """None while torch.compile traces: the operators then find them inside, opaque to it."""
        nonlocal positions
        if positions is None and not compiling:
            positions = linear.valid_positions(token_labels, ignore_index, census.total())
        return positions

    checks = []  # (tokens, vocab size, name): the non-finite check after the policy's forward, one sync
    objective = Objective.build(
        specs, weights, opts, input_labels, aligned, ignore_index=ignore_index, shift=shift, ld_alpha=ld_alpha,
        use_weighting=use_weighting, average_log_prob=average_log_prob, token_metrics=token_metrics,
        fused_sigmoid=backend_name == "triton",
    )
    head = linear.Head(weight, bias, temperature, softcap, backend_name, ignore_index)
    chunk = linear.chunk_size(vocab_size, hidden.dtype, softcap, chunk_tokens)

    # Reference first: under no_grad, its chunks are freed before the policy's forward.
    kind, value = ref_given
    if kind == "none":
        ref_seq = torch.zeros(2 * num_pairs, dtype=torch.float32, device=hidden.device)
    elif kind == "logps":
        ref_seq = value
    else:
        r_hidden, r_weight, r_bias = value
        ref_head = linear.Head(r_weight.detach(), None if r_bias is None else r_bias.detach(), temperature, softcap,
                               backend_name, ignore_index)
        r_chunk = linear.chunk_size(vocab_size, r_hidden.dtype, softcap, chunk_tokens)
        with torch.no_grad():
            r_logp, r_lse, _ = linear.linear_token_logprobs(r_hidden.detach(), ref_head, token_labels,
                                                            chunk_tokens=r_chunk, positions=valid_positions())
        checks.append((TokenLogprobs(r_logp, r_lse, {}, token_labels), vocab_size, "ref_hidden @ ref_weight.T"))
        if packing is not None:
            r_logp = packing.to_padded(r_logp[0])
        ref_seq = sequence_logprobs(r_logp, aligned, ignore_index, objective.average, objective.token_weights)

    extras = policy_extras(use_weighting, token_metrics)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    # Autograd records nothing under inference_mode, even with grad mode turned back on inside it.
    # (Dynamo cannot trace that query, a fundamental graph break: compiled, grad mode decides.)
    recording = torch.is_grad_enabled() and (compiling or not torch.is_inference_mode_enabled())
    needs = tuple(n and recording for n in needs)
    one_pass_chunk, split_chunk, split_plan = _chunk_plan(linear, head, hidden, softcap, chunk_tokens, vocab_chunk,
                                                          needs)
    # auto: the pairs' token counts decide the mode (the census's read; one_pass reuses it for its
    # chunks), unless every pair fits one one_pass chunk whatever its count (2 T tokens at most):
    # then one_pass reads the census itself, after queuing the work that needs no count.
    may_exceed = 2 * aligned.shape[-1] > one_pass_chunk

    def one_pass_memory() -> int | None:
        return _one_pass_chunk_for_memory(linear, hidden, weight, bias, aligned, census, extras, needs, softcap,
                                          backend_name, one_pass_chunk, split_chunk, split_plan,
                                          chunk_tokens is not None)

    chosen_mode, one_pass_chunk = _pick_mode(mode, objective, census if may_exceed else None, one_pass_chunk,
                                             any(needs), compiling, vmapped, one_pass_memory)
    if chosen_mode == "two_phase":
        logp, lse, ext = linear.linear_token_logprobs(hidden, head, token_labels, extras, chunk_tokens=chunk,
                                                      positions=valid_positions(), backward_chunk_tokens=chunk_tokens,
                                                      vocab_chunk=vocab_chunk)
        policy = TokenLogprobs(logp, lse, ext, token_labels)
        if validate:
            _check_token_results([*checks, (policy, vocab_size, "hidden @ weight.T")], ignore_index,
                                 _sequence_failures(objective, aligned, ref_given))
        if packing is not None:
            policy = packing.padded_tokens(policy, aligned)
        return objective.output(policy, ref_seq, vocab_size)

    if packing is not None:
        # one_pass chunks whole pairs of the [2B, T] layout and split's loss runs on it: gather the
        # hidden states into it (H wide, small beside the V-wide logits; its backward gathers the
        # gradient back).
        hidden = packing.to_padded(hidden[0])

    # one_pass runs the loss once per chunk (for its tokens' coefficients) and once at the end
    # (split: once, at the end): with the Triton backend the default sigmoid loss is its
    # one-kernel form (a few launches instead of ~50 small ones per chunk, which on a GPU cost more
    # than the loss's arithmetic).
    def terms_fn(logp, lse, ext):
        return objective.loss_terms(TokenLogprobs(logp, lse, ext, aligned), ref_seq)

    # split: the hidden gradient's per-token part in the forward, every gradient in the backward
    # (linear.Split), its chunks from _chunk_plan.
    # No gradient wanted (none required, or autograd not recording: inference_mode, even with grad
    # mode turned back on inside it): no graph node either, as a torch op would record none.
    with contextlib.nullcontext() if any(needs) else torch.no_grad():
        if chosen_mode == "split":
            runner = linear.Split(head, aligned, extras, split_chunk, terms_fn, needs, split_plan(census.total()),
                                  census=census)
            loss, seq_logps = linear.split(hidden, head, runner)
        else:
            runner = linear.OnePass(head, aligned, extras, one_pass_chunk, terms_fn, num_pairs, needs,
                                    census=census)
            loss, seq_logps = linear.one_pass(hidden, head, runner)
    logp, lse, ext = runner.tokens
    policy = TokenLogprobs(logp, lse, ext, aligned)
    if validate:
        _check_token_results([*checks, (policy, vocab_size, "hidden @ weight.T")], ignore_index,
                             _sequence_failures(objective, aligned, ref_given))
    chosen_rewards, rejected_rewards = runner.rewards
    return objective.output(policy, ref_seq, vocab_size, terms=(loss, seq_logps[:num_pairs], seq_logps[num_pairs:],
                                                               chosen_rewards, rejected_rewards))


def _pick_mode(mode, objective, census, chunk, grad_needed, compiling=False, vmapped=False,
               one_pass_memory=None) -> tuple[str, int]:
    """``(mode, one_pass's tokens per chunk)``. ``census``: the valid tokens per sequence
    (:class:`linear.TokenCensus`), read by ``auto`` when a gradient is wanted and a pair may
    exceed ``chunk`` (``None``: every pair fits). ``compiling``: ``auto`` takes two_phase, the mode
    torch.compile traces whole (one_pass and split size their chunks on the host: they run
    eagerly, a graph break). ``vmapped`` (inside ``torch.func.vmap``): ``auto`` takes two_phase,
    the one mode whose custom operators vmap batches; one_pass and split read counts on the host
    and fill buffers in place, which a batched tensor cannot do, so asking for them raises.
    ``one_pass_memory``: called by ``auto`` before it takes one_pass,
    returns the chunk one_pass fits the device's memory with, or None when it does not fit
    (:func:`_one_pass_chunk_for_memory`; ``None``: ``chunk`` fits).

    ``auto``: one_pass (three matmuls; its memory is bounded by its chunk whatever the pairs'
    sizes) when the loss is pair-local, pairs larger than a chunk would have at most
    :data:`linear.AUTO_MAX_FORMED_AGAIN` of the logits formed again, and it fits the memory
    (with a smaller chunk if need be); else split (four matmuls, the least memory, any loss);
    two_phase when no gradient is wanted (the chunked forward alone) or inside torch.compile or
    torch.func.vmap."""
    if vmapped and mode in ("one_pass", "split"):
        raise NotImplementedError(
            f"dpo_kernels: fused_linear_dpo_loss's mode={mode!r} does not run under torch.func.vmap "
            "(it reads token counts on the host and fills its gradients in place); use mode='two_phase' "
            "or 'auto', which takes it there"
        )
    if mode == "one_pass":  # it finds each pair's coefficients right after that pair's forward
        reasons = objective.coupling()
        if reasons:
            raise ValueError(
                f"mode='one_pass' needs each pair's gradient to depend on that pair only; here "
                f"{'; '.join(reasons)}: use mode='split', 'two_phase' or 'auto'"
            )
        return mode, chunk
    if mode in ("two_phase", "split"):
        return mode, chunk
    if not grad_needed or compiling or vmapped:
        return "two_phase", chunk
    if objective.batch_coupled:
        return "split", chunk
    from . import linear

    if census is not None and linear.formed_again(census.pair_counts(), chunk) > linear.AUTO_MAX_FORMED_AGAIN:
        return "split", chunk
    fitted = chunk if one_pass_memory is None else one_pass_memory()
    return ("split", chunk) if fitted is None else ("one_pass", fitted)


def _one_pass_chunk_for_memory(linear, hidden, weight, bias, aligned, census, extras, needs, softcap, backend_name,
                               one_pass_chunk, split_chunk, split_plan, chunk_given) -> int | None:
    """The tokens per chunk with which ``auto`` takes one_pass for memory, or None (then split).

    one_pass fits when its estimated peak (:func:`linear.one_pass_peak_bytes`) is within
    :data:`linear.AUTO_MEMORY_HEADROOM` of what the device has left (:func:`linear.available_bytes`;
    off CUDA, always). The check is first made from bounds that need no count (every token
    valid, the largest chunk full), so it costs no host sync. Only when those do not fit is it
    made from the census's counts (the path's one sync, which one_pass and split make anyway).

    When the default chunk does not fit, it looks for the largest chunk that does (the peak grows
    linearly with the chunk's rows). It only shrinks a chunk it chose: a given ``chunk_tokens`` is
    kept. In order, it takes:

    1. one_pass with that chunk, if at most :data:`linear.AUTO_MAX_FORMED_AGAIN` of the logits
       would be formed again. Why not split straight away: on the H200 (run D, 8 x 1024),
       one_pass with one pair per chunk took 31.1 ms at 1.54 GB, and with 768-token pieces (half
       the logits formed again) 37.8 ms at 1.33 GB; split took 39.9-40.7 ms.
    2. split, if it fits.
    3. one_pass with that chunk, however much is formed again: memory before time.
    4. Nothing fits: the smaller of split and one_pass at its default chunk."""
    footprint = _footprint(linear, hidden, weight, bias, aligned, extras, needs, softcap, backend_name)
    bound = linear.one_pass_peak_bytes(footprint(aligned.numel()), min(one_pass_chunk, aligned.numel()),
                                       alone=aligned.numel() <= one_pass_chunk)
    available = linear.available_bytes(hidden.device, enough=math.ceil(bound / linear.AUTO_MEMORY_HEADROOM))
    if available is None:
        return one_pass_chunk
    budget = linear.AUTO_MEMORY_HEADROOM * available
    if bound <= budget:
        return one_pass_chunk
    fp = footprint(census.total())
    peaks = _mode_peaks(linear, fp, census.pair_counts(), one_pass_chunk, split_chunk, split_plan)
    if peaks["one_pass"] <= budget:
        return one_pass_chunk
    rows = 0
    if not chunk_given:
        base = linear.one_pass_peak_bytes(fp, 0)
        per_row = linear.one_pass_peak_bytes(fp, 1) - base
        rows = int((budget - base) // per_row) if budget > base else 0
        if rows >= 1 and linear.formed_again(census.pair_counts(), rows) <= linear.AUTO_MAX_FORMED_AGAIN:
            return rows
    if peaks["split"] <= budget:
        return None
    if rows >= 1:
        return rows
    return one_pass_chunk if peaks["split"] >= peaks["one_pass"] else None


def _chunk_plan(linear, head, hidden, softcap, chunk_tokens, vocab_chunk, needs):
    """``(one_pass's tokens per chunk, split's forward tokens per chunk, valid tokens -> split's
    backward plan)``: split's forward chunks may be as large as the weight gradient, which its
    backward holds anyway (:func:`linear.split_chunk_size`); with a frozen head, one_pass's. Its
    backward's slices depend on the valid tokens (:func:`linear.backward_plan`)."""
    V, H = head.vocab_size, hidden.shape[-1]
    one_pass_chunk = linear.one_pass_chunk_size(V, hidden.dtype, softcap, chunk_tokens)
    split_chunk = linear.split_chunk_size(V, H, hidden.dtype, softcap, chunk_tokens) if needs[1] else one_pass_chunk

    def split_plan(valid_tokens: int) -> tuple[int, int]:
        return linear.backward_plan(head, H, hidden.dtype, chunk_tokens, vocab_chunk, valid_tokens,
                                    fused_slices=linear.slices_take_fused_matmul(head, hidden.dtype))

    return one_pass_chunk, split_chunk, split_plan


def _footprint(linear, hidden, weight, bias, aligned, extras, needs, softcap, backend_name):
    """``valid_tokens -> linear.Footprint`` of this call on ``backend_name`` (which decides
    whether the backward's slices take the fused matmul, under the rules in force now)."""
    fused = fused_logits_grad_matmul(load_backend(backend_name), hidden.dtype) is not None

    def footprint(valid: int):
        return linear.Footprint(
            batch_tokens=aligned.numel(), valid_tokens=valid, hidden_size=hidden.shape[-1],
            vocab_size=weight.shape[0], elem=hidden.element_size(), weight_elem=weight.element_size(),
            bias_elem=0 if bias is None else bias.element_size(), needs=tuple(needs),
            softcap=softcap is not None, token_results=3 + len(extras), fused_logits_grad=fused)

    return footprint


def _mode_peaks(linear, fp, pair_counts, one_pass_chunk, split_chunk, split_plan) -> dict[str, int]:
    """Estimated peak bytes of one_pass and split (gradients included) for the footprint ``fp``
    of the counted valid tokens and the pairs' counts."""
    first = linear.token_chunks(fp.valid_tokens, split_chunk)[:1]
    alone = 0 < fp.valid_tokens <= one_pass_chunk  # one chunk holds every pair, in one piece
    return {"one_pass": linear.one_pass_peak_bytes(fp, linear.one_pass_chunk_rows(pair_counts, one_pass_chunk), alone),
            "split": linear.split_peak_bytes(fp, first[0][1] if first else 0, split_plan(fp.valid_tokens))}


@python_scalars
def estimate_linear_memory(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    shift: bool = False,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    use_weighting: bool = False,
    token_metrics: bool = False,
    chunk_tokens: int | None = None,
    vocab_chunk: int | None = None,
    backend: str = "auto",
) -> dict[str, int]:
    """Estimated peak bytes that one forward + backward of :func:`fused_linear_dpo_loss` (padded
    batch, these options) adds on a GPU in ``mode="one_pass"`` and ``mode="split"``, the
    gradients included: what ``mode="auto"`` compares with the free memory. The gradients wanted
    are those of the inputs that require one. One host read (the valid tokens per sequence).

    The model counts every buffer of each mode's peak (``linear.one_pass_peak_bytes``,
    ``linear.split_peak_bytes``); on an H200 it reproduced the measured peaks of both modes at
    issue 5's three shapes to 0.01 GB, and on the CPU (fp32) the allocator's peak to 2%. It leaves
    out the allocator's rounding and the reference model's forward (which runs first, a chunk
    of at most 256 MiB of logits by default, and is freed before the policy's).

    ``backend``: as :func:`fused_linear_dpo_loss`'s. Where the backward's slices take the fused
    matmul (``backends.fused_logits_grad_matmul``, under the rules in force when this is called)
    a slice holds its gradient alone, without the softcap's fp32 temporaries."""
    from . import linear

    check_flags(shift=shift, use_weighting=use_weighting, token_metrics=token_metrics)
    num_pairs, vocab_size = _check_linear_inputs(hidden, weight, labels, bias, ignore_index)
    softcap, _ = check_linear_options(logit_softcap, 1.0, "auto", chunk_tokens, vocab_chunk)
    aligned = align_labels(labels, ignore_index, shift)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    backend_name = resolve_backend(backend, hidden.device)
    head = linear.Head(weight, bias, 1.0, softcap, backend_name, ignore_index)
    one_pass_chunk, split_chunk, split_plan = _chunk_plan(linear, head, hidden, softcap, chunk_tokens, vocab_chunk,
                                                          needs)
    footprint = _footprint(linear, hidden, weight, bias, aligned, policy_extras(use_weighting, token_metrics),
                           needs, softcap, backend_name)
    census = linear.TokenCensus(aligned, ignore_index, num_pairs)
    return _mode_peaks(linear, footprint(census.total()), census.pair_counts(), one_pass_chunk, split_chunk,
                       split_plan)


def _loss_setup(loss_type, loss_weights, **options):
    """Loss specs, their weights and validated :class:`LossOptions` (both front doors)."""
    specs = resolve_loss_types(loss_type)
    weights = resolve_loss_weights(specs, loss_weights)
    return specs, weights, loss_options(specs, **options)


def policy_extras(use_weighting: bool, token_metrics: bool) -> tuple[str, ...]:
    """Same-pass extras the loss and metrics read from the policy's forward pass."""
    extras = {"logits_sum"}
    if use_weighting:
        extras.add("log_sum_p2")
    if token_metrics:
        extras.update(("entropy", "accuracy"))
    return tuple(sorted(extras))


@dataclass(frozen=True)
class Objective:
    """From per-token results to a :class:`DPOOutput`: the one assembly both front doors use.

    ``fused_dpo_loss`` feeds it the token results of the logits, ``fused_linear_dpo_loss`` those
    of its chunked lm_head (and, in its one-pass mode, calls :meth:`loss_terms` per chunk to get
    the per-token loss coefficients by autograd). Built from the labels only, so everything it
    holds (LD weights, completion lengths) is known before any logits exist.
    """

    specs: tuple
    weights: tuple
    opts: LossOptions
    num_pairs: int
    ignore_index: int
    average: bool
    use_weighting: bool
    token_metrics: bool
    lengths: torch.Tensor  # TRL DPOTrainer's completion lengths [2P] (input labels): ipo, sigmoid_norm
    scored_lengths: torch.Tensor  # the scored tokens [2P] (labels after the shift): simpo, orpo
    token_weights: torch.Tensor | None  # LD-DPO weights [2P, T] or None
    fused_sigmoid: bool  # the Triton backend's one-kernel sigmoid loss may be used

    @classmethod
    def build(cls, specs, weights, opts, labels, aligned_labels, *, ignore_index, shift, ld_alpha, use_weighting,
              average_log_prob, token_metrics, fused_sigmoid):
        token_weights = None if ld_alpha is None else ld_token_weights(aligned_labels, ignore_index, ld_alpha)
        # The lengths the length-normalized losses divide by, each its TRL trainer's: DPOTrainer's
        # completion_mask.sum() (ipo, sigmoid_norm), which with shift=True counts the input labels
        # (a completion token at position 0, i.e. an empty prompt, counts although nothing
        # predicts it); the CPO and ORPO trainers' loss_mask.sum() (simpo, orpo): the scored tokens.
        scored_lengths = completion_lengths(aligned_labels, ignore_index)
        lengths = completion_lengths(labels, ignore_index) if shift else scored_lengths
        return cls(tuple(specs), tuple(weights), opts, labels.shape[0] // 2, ignore_index, bool(average_log_prob),
                   use_weighting, token_metrics, lengths, scored_lengths, token_weights, fused_sigmoid)

    def coupling(self) -> list[str]:
        """Why a pair's gradient depends on other pairs' log-probs (empty: each pair's is its own,
        what ``one_pass``'s per-chunk coefficients rely on)."""
        reasons = [f"loss_type {spec.name!r} sorts the pairs across the batch" for spec in self.specs
                   if spec.batch_coupled]
        nll = [spec.name for spec in self.specs if spec.adds_batch_nll(self.opts)]
        if self.use_weighting and nll:
            reasons.append(f"use_weighting=True multiplies the batch's mean chosen NLL (loss_type "
                           f"{nll[0] if len(nll) == 1 else nll!r}) by every pair's WPO weight, so each token's "
                           "gradient holds the batch's mean weight")
        return reasons

    @property
    def batch_coupled(self) -> bool:
        """Some pair's gradient depends on other pairs (:meth:`coupling` says why)."""
        return bool(self.coupling())

    def loss_terms(self, policy: TokenLogprobs, ref_seq: torch.Tensor):
        """``(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)``; ``loss`` and
        the logps carry gradients back to ``policy.logp``."""
        P, ignore_index = self.num_pairs, self.ignore_index
        specs = self.specs
        # Not under torch.func.vmap: the one-kernel form launches on raw pointers, which a
        # batched tensor does not have (the generic path batches through the custom operators).
        use_fused = (
            self.fused_sigmoid and len(specs) == 1 and specs[0].name == "sigmoid"
            and self.opts.f_divergence_type == "reverse_kl" and self.token_weights is None
            and not self.use_weighting and policy.logp.dtype == torch.float32
            and not under_vmap()
        )
        if use_fused:
            loss, seq_logps, chosen_rewards, rejected_rewards, _ = fused_sigmoid_dpo(
                policy.logp, policy.labels, ref_seq, ignore_index=ignore_index, beta=self.opts.beta,
                label_smoothing=self.opts.label_smoothing, average=self.average,
            )
            return loss, seq_logps[:P], seq_logps[P:], chosen_rewards, rejected_rewards
        seq_logps = sequence_logprobs(policy.logp, policy.labels, ignore_index, self.average, self.token_weights)
        ref_seq = ref_seq.to(seq_logps.dtype)
        lengths, scored = self.lengths.to(seq_logps.dtype), self.scored_lengths.to(seq_logps.dtype)
        chosen, rejected = slice(0, P), slice(P, 2 * P)
        pair = PreferencePair(
            seq_logps[chosen], seq_logps[rejected], ref_seq[chosen], ref_seq[rejected],
            chosen_lengths=lengths[chosen], rejected_lengths=lengths[rejected],
            chosen_scored=scored[chosen], rejected_scored=scored[rejected],
            chosen_token_logps=policy.logp[chosen], chosen_mask=policy.labels[chosen] != ignore_index,
            averaged=self.average,
        )
        pair_weights = None
        if self.use_weighting:
            seq_weights = wpo_weights(policy, ignore_index).to(seq_logps.dtype)
            pair_weights = seq_weights[chosen] * seq_weights[rejected]
        loss = combined_loss(pair, specs, self.weights, self.opts, pair_weights)
        chosen_rewards, rejected_rewards = rewards(pair, self.opts.beta)
        return loss, pair.chosen_logps, pair.rejected_logps, chosen_rewards, rejected_rewards

    def output(self, policy: TokenLogprobs, ref_seq: torch.Tensor, vocab_size: int, *, terms=None) -> DPOOutput:
        """The :class:`DPOOutput` of ``policy``'s token results against the reference ``ref_seq``.

        ``terms``: :meth:`loss_terms`' result when the caller already has it (the one-pass mode
        computed it with its own differentiable loss and logps, whose gradients it already formed);
        else it is computed here.
        """
        if terms is None:
            terms = self.loss_terms(policy, ref_seq)
        loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = terms
        metrics = _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, policy,
                           self.ignore_index, vocab_size, self.num_pairs, self.token_metrics)
        return DPOOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, metrics)


# --------------------------------------------------------------------------------------------
# Packed (padding-free) batches: cu_seqlens.


@dataclass(frozen=True)
class Packing:
    """Where each token of a packed batch sits in the padded ``[2B, Tmax]`` layout.

    A packed batch lays its ``2B`` sequences back to back along one token axis of length
    ``total``: sequence ``s`` is tokens ``cu_seqlens[s]:cu_seqlens[s + 1]``, the ``B`` chosen
    first, then the ``B`` rejected. The kernels run on the packed rows as they are; only the
    ``[total]``-sized per-token results move into the padded layout, by an index
    (:meth:`to_padded`, differentiable), so everything downstream is the padded batch's code.
    """

    seq: torch.Tensor  # [total] int64: the sequence of each packed token
    pos: torch.Tensor  # [total] int64: its position within that sequence
    num_seqs: int  # 2B
    max_len: int  # Tmax; at least 1, so an all-empty batch is one fully ignored column

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, total: int, max_len: int) -> "Packing":
        """From offsets on the device, the packed length and the padded width: device work only
        (``repeat_interleave`` is told its output size), no host sync."""
        device = cu_seqlens.device
        starts = cu_seqlens.to(torch.int64)
        lengths = starts[1:] - starts[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
        pos = torch.arange(total, device=device) - starts[seq]
        return cls(seq, pos, lengths.numel(), max(int(max_len), 1))

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2

    def to_padded(self, packed: torch.Tensor, fill=0) -> torch.Tensor:
        """``[total, ...]`` -> ``[2B, Tmax, ...]``, ``fill`` past each sequence's end.

        Differentiable in ``packed``: the backward gathers the gradient back (each packed token
        has exactly one padded slot, so nothing is summed)."""
        padded = packed.new_full((self.num_seqs, self.max_len, *packed.shape[1:]), fill)
        return padded.index_put((self.seq, self.pos), packed)

    def to_packed(self, padded: torch.Tensor) -> torch.Tensor:
        """``[2B, Tmax, ...]`` -> ``[total, ...]``."""
        return padded[self.seq, self.pos]

    def labels(self, packed_labels: torch.Tensor, ignore_index: int, shift: bool):
        """``(input, aligned, packed_aligned)``: the padded input labels ``[2B, Tmax]``, the padded
        labels each row is scored on (with ``shift``, shifted WITHIN each sequence: its last token
        gets ``ignore_index``, never the next sequence's first label), and those aligned labels
        back in the packed layout ``[1, total]``, for the kernels."""
        padded = self.to_padded(packed_labels[0].to(torch.int64), fill=ignore_index)
        aligned = align_labels(padded, ignore_index, shift)
        return padded, aligned, self.to_packed(aligned).unsqueeze(0)

    def padded_tokens(self, packed: TokenLogprobs, aligned: torch.Tensor) -> TokenLogprobs:
        """Per-token results of the packed rows ``[1, total]`` in the padded layout (0 past the
        ends, like ignored tokens), scored on the padded ``aligned`` labels."""
        return TokenLogprobs(
            self.to_padded(packed.logp[0]), self.to_padded(packed.lse[0]),
            {name: self.to_padded(value[0]) for name, value in packed.extras.items()}, aligned,
        )


def _as_packed(tensor, token_dims: int):
    """A packed tensor given without its batch dim (``[total, ...]``, ``token_dims`` dims) as the
    view ``[1, total, ...]``; anything else unchanged (validation names what is wrong with it)."""
    if isinstance(tensor, torch.Tensor) and tensor.dim() == token_dims:
        return tensor.unsqueeze(0)
    return tensor


def _check_max_seqlen_needs_offsets(cu_seqlens, max_seqlen) -> None:
    if max_seqlen is not None and cu_seqlens is None:
        raise ValueError("max_seqlen describes a packed batch: pass it with cu_seqlens (a padded batch needs neither)")


def _check_packing(cu_seqlens, packed: torch.Tensor, name: str, max_seqlen: int | None = None,
                   validate: bool = True) -> Packing:
    """``packed`` (``[1, total, ...]``, already checked against its labels) and its ``cu_seqlens``.

    Reads the offsets to the host once, to check them and to size the padded layout; with
    ``max_seqlen`` given, only to check them (``validate``, outside a compiled region)."""
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be an int >= 0 (the longest sequence's length), got {max_seqlen!r}")
    if packed.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens describes one packed row: {name} must be [1, total, ...] or [total, ...], got a batch "
            f"dim of {packed.shape[0]} (shape {tuple(packed.shape)}); pass a padded batch without cu_seqlens instead"
        )
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [2B + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != packed.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {packed.device}")
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs < 2 or num_seqs % 2:
        raise ValueError(
            f"cu_seqlens must hold 2B + 1 offsets of 2B > 0 sequences (B chosen then B rejected), got "
            f"{cu_seqlens.numel()} offsets, i.e. {num_seqs} sequences"
        )
    total = packed.shape[1]
    if max_seqlen is not None and (not validate or _validation_skipped(cu_seqlens)):
        return Packing.build(cu_seqlens, total, max_seqlen)
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {offsets[0]}")
    for s in range(num_seqs):
        if offsets[s + 1] < offsets[s]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing: cu_seqlens[{s + 1}] = {offsets[s + 1]} < "
                f"cu_seqlens[{s}] = {offsets[s]}"
            )
    if offsets[-1] != total:
        raise ValueError(
            f"cu_seqlens[-1] = {offsets[-1]} must equal the number of packed tokens: {name} has total = {total}"
        )
    longest = max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        s = next(s for s in range(num_seqs) if offsets[s + 1] - offsets[s] == longest)
        raise ValueError(
            f"max_seqlen = {max_seqlen} is below the longest sequence: sequence {s} has "
            f"cu_seqlens[{s + 1}] - cu_seqlens[{s}] = {longest} tokens"
        )
    return Packing.build(cu_seqlens, total, longest if max_seqlen is None else max_seqlen)


# --------------------------------------------------------------------------------------------
# Validation: every message names the argument at fault.


def _check_inputs(logits, labels, ignore_index) -> tuple[int, int]:
    """The paired batch of ``fused_dpo_loss``; returns ``(P, V)``."""
    rows, vocab_size = check_logits_labels(
        logits, labels, ignore_index, layout="[2B, T, V] (chosen rows then rejected rows)"
    )
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logits batch must be 2B > 0 sequences (B chosen then B rejected), got {rows}"
        )
    return rows // 2, vocab_size


def _check_token_options(specs, ld_alpha, use_weighting, average_log_prob, token_metrics) -> None:
    """Options that change the per-token work, against the loss types they combine with."""
    desc = describe(specs)
    check_flags(use_weighting=use_weighting, average_log_prob=average_log_prob, token_metrics=token_metrics)
    if ld_alpha is not None:
        if not is_number(ld_alpha) or not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be a number in [0, 1] (or None), got {ld_alpha!r}")
        if average_log_prob:
            raise ValueError(
                "ld_alpha does not combine with average_log_prob=True: LD-DPO weights the summed "
                f"log-probs (loss_type={desc})"
            )
        if all(spec.name == "sft" for spec in specs):
            raise ValueError(
                f"ld_alpha={ld_alpha} does not apply to loss_type={desc}: sft uses the raw per-token log-probs"
            )
    if use_weighting:
        coupled = [spec.name for spec in specs if spec.batch_coupled]
        if coupled:
            raise ValueError(
                f"use_weighting=True does not apply to loss_type {coupled!r}: these losses sort the pairs "
                "across the batch, which would misalign WPO's per-pair weights (as in TRL)"
            )


def _check_float_tensor(value, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, bf16, fp16, fp64), got {value.dtype}")


def _check_head(hidden, weight, bias, *, hidden_name, weight_name, bias_name, vocab_size=None) -> int:
    """An lm_head ``weight [V, H]`` (and ``bias [V]``) for ``hidden [.., .., H]``; returns V."""
    _check_float_tensor(weight, weight_name)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be the lm_head weight [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{weight_name} shape {tuple(weight.shape)} does not match {hidden_name} shape {tuple(hidden.shape)}: "
            f"{weight_name} must be [V, H] with H = {hidden.shape[2]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} has an empty vocabulary dimension (V = 0)")
    if vocab_size is not None and weight.shape[0] != vocab_size:
        raise ValueError(f"{weight_name} has V = {weight.shape[0]} rows but the policy's weight has V = {vocab_size}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must equal {hidden_name} dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {hidden_name} is on {hidden.device}")
    if bias is not None:
        _check_float_tensor(bias, bias_name)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} dtype {bias.dtype} must equal {weight_name} dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"{bias_name} is on {bias.device} but {weight_name} is on {weight.device}")
    return weight.shape[0]


def _check_linear_inputs(hidden, weight, labels, bias, ignore_index) -> tuple[int, int]:
    """``hidden [2B, T, H]``, ``weight [V, H]``, ``labels [2B, T]``, ``bias [V]``; returns ``(P, V)``."""
    vocab_size = _check_linear_tensors(hidden, weight, labels, bias, ignore_index)
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"hidden batch must be 2B > 0 sequences (B chosen then B rejected), got {rows}")
    return rows // 2, vocab_size


def _check_linear_tensors(hidden, weight, labels, bias, ignore_index,
                          layout="[2B, T, H] (chosen rows then rejected rows)") -> int:
    """Types, shapes and devices of ``hidden [R, T, H]``, its head and ``labels [R, T]``; returns V."""
    _check_float_tensor(hidden, "hidden")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be {layout}, got shape {tuple(hidden.shape)}")
    vocab_size = _check_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias")
    check_labels(labels, hidden, rows_name="hidden", layout=layout, rows_are="is")
    if labels.device.type == "meta":
        raise NotImplementedError(
            "fused_linear_dpo_loss does not run on meta tensors: it reads the labels to gather the valid "
            "tokens before the matmuls (their number sizes every chunk), and meta tensors hold no values"
        )
    check_ignore_index(ignore_index)
    return vocab_size


def _check_linear_reference(hidden, weight, bias, ref_logps, ref_hidden, ref_weight, ref_bias, reference_free,
                            num_pairs, specs):
    """``("logps", [2B])``, ``("hidden", (ref_hidden, ref_weight, ref_bias))`` or ``("none", None)``."""
    if ref_hidden is None:
        stray = [name for name, v in (("ref_weight", ref_weight), ("ref_bias", ref_bias)) if v is not None]
        if stray:
            raise ValueError(f"{' and '.join(stray)} given without ref_hidden (the reference's hidden states)")
        if ref_logps is None and not reference_free and any(spec.needs_reference for spec in specs):
            raise ValueError("no reference: pass ref_logps or ref_hidden, or reference_free=True")
        return _check_reference(hidden, ref_logps, None, reference_free, num_pairs, specs, rows_name="hidden is")
    if reference_free:
        raise ValueError("reference_free=True conflicts with ref_hidden")
    if ref_logps is not None:
        raise ValueError("pass either ref_logps or ref_hidden, not both")
    _check_float_tensor(ref_hidden, "ref_hidden")
    if ref_hidden.dim() != 3 or ref_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden must be [2B, T, H_ref] with [2B, T] = {tuple(hidden.shape[:2])}, got {tuple(ref_hidden.shape)}"
        )
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if ref_weight is None:
        ref_weight = weight
        ref_bias = bias if ref_bias is None else ref_bias
    _check_head(ref_hidden, ref_weight, ref_bias, hidden_name="ref_hidden",
                weight_name="ref_weight" if ref_weight is not weight else "weight (the default ref_weight)",
                bias_name="ref_bias", vocab_size=weight.shape[0])
    return ("hidden", (ref_hidden, ref_weight, ref_bias))


def _check_label_range(aligned, ignore_index, vocab_size) -> None:
    """One host sync, before any matmul: every scored label is a token id in [0, V).

    A no-op while torch.compile traces (see :func:`_validation_skipped`)."""
    if _validation_skipped(aligned):
        return
    bad = (aligned != ignore_index) & ((aligned < 0) | (aligned >= vocab_size))
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels[{b}, {t}] (as aligned with the hidden rows) = {aligned[b, t].item()} is outside "
            f"[0, V={vocab_size}) and is not ignore_index={ignore_index}"
        )


def _check_reference(logits, ref_logps, ref_logits, reference_free, num_pairs, specs, rows_name="logits are"):
    """Returns ``("logps", tensor[2B])``, ``("logits", tensor)`` or ``("none", None)``. ``logits``:
    the policy's input (``rows_name`` names it in the messages: ``"hidden is"`` for the hidden path)."""
    given = [name for name, value in (("ref_logps", ref_logps), ("ref_logits", ref_logits)) if value is not None]
    if reference_free:
        if given:
            raise ValueError(f"reference_free=True conflicts with {' and '.join(given)}")
        return ("none", None)
    if not given:
        if not any(spec.needs_reference for spec in specs):
            return ("none", None)  # reference-free losses: rewards are beta * logps
        raise ValueError("no reference: pass ref_logps or ref_logits, or reference_free=True")
    if len(given) == 2:
        raise ValueError("pass either ref_logps or ref_logits, not both")
    if ref_logits is not None:
        check_like("ref_logits", ref_logits, logits)
        return ("logits", ref_logits)
    if isinstance(ref_logps, (tuple, list)):
        if len(ref_logps) != 2 or not all(isinstance(t, torch.Tensor) for t in ref_logps):
            raise TypeError("ref_logps as a pair must be (ref_chosen_logps[B], ref_rejected_logps[B])")
        for name, t in zip(("ref_logps[0] (chosen)", "ref_logps[1] (rejected)"), ref_logps):
            if t.shape != (num_pairs,):
                raise ValueError(f"{name} must have shape [B] = ({num_pairs},), got {tuple(t.shape)}")
        ref_logps = torch.cat([ref_logps[0], ref_logps[1]])
    if not isinstance(ref_logps, torch.Tensor):
        raise TypeError(f"ref_logps must be a tensor [2B] or a pair of tensors [B], got {type(ref_logps).__name__}")
    if ref_logps.shape != (2 * num_pairs,):
        raise ValueError(f"ref_logps must have shape [2B] = ({2 * num_pairs},), got {tuple(ref_logps.shape)}")
    if not ref_logps.dtype.is_floating_point:
        raise TypeError(f"ref_logps must be floating, got {ref_logps.dtype}")
    if ref_logps.device != logits.device:
        raise ValueError(f"ref_logps are on {ref_logps.device} but {rows_name} on {logits.device}")
    return ("logps", ref_logps.detach())


def _reference_logps(ref_given, aligned_labels, ignore_index, average, backend_name, num_pairs, device, checks,
                     token_weights, packing=None):
    """The reference's per-sequence log-probs ``[2B]``; for reference logits, their token results
    are appended to ``checks`` (validated with the policy's, one sync)."""
    kind, value = ref_given
    if kind == "none":
        return torch.zeros(2 * num_pairs, dtype=torch.float32, device=device)
    if kind == "logps":
        return value
    # aligned_labels are already shifted: score the reference rows on them as they are (packed
    # reference logits: on the same labels in the packed layout).
    token_labels = aligned_labels if packing is None else packing.to_packed(aligned_labels).unsqueeze(0)
    with torch.no_grad():
        ref = token_logprobs(value, token_labels, ignore_index=ignore_index, shift=False, backend=backend_name)
    checks.append((ref, value.shape[-1], "ref_logits"))
    logp = ref.logp if packing is None else packing.to_padded(ref.logp[0])
    return sequence_logprobs(logp, aligned_labels, ignore_index, average, token_weights)


def _validation_skipped(*tensors: torch.Tensor) -> bool:
    """``validate=True`` does nothing inside a torch.compile'd region: its host sync (a
    data-dependent branch) would break the graph, which ``fullgraph=True`` refuses. Compiled, a bad
    label gives a NaN log-prob and NaN/inf logits reach the loss, as with ``validate=False``.
    Likewise on ``meta`` tensors (shape propagation: there are no values to check) and under
    ``torch.func.vmap`` (a batched tensor has no single storage to read on the host)."""
    return (torch.compiler.is_compiling() or any(t.device.type == "meta" for t in tensors)
            or bool(functorch_transforms()))


def lse_precision_limit(dtype: torch.dtype) -> float:
    """The ``|lse|`` past which rounding a row's lse, kept in ``dtype``, costs more than bf16's
    precision (2^-9) in every softmax probability of the backward: 2^44 for the fp64 lse (logits
    near 1.8e13, a diverged model), 2^15 for an fp32 one (``backends.lse_dtype`` on MPS). The
    log-probs themselves stay exact (``(z_y - max) - log S``)."""
    return 2.0 ** -9 / (torch.finfo(dtype).eps / 2)


def _check_token_results(checks, ignore_index: int, more=()) -> None:
    """One host sync for all of ``checks`` (``(tokens, vocab_size, name)``, optionally with the
    name of their labels, default ``"labels"``: a policy's and its reference's token results):
    bad labels, non-finite log-probs of scored tokens, and scored rows whose lse is past
    :func:`lse_precision_limit`; then ``more`` (``(mask, message)`` pairs of any shape, e.g.
    :func:`_sequence_failures`', ``message`` taking the index of the first True entry). The first
    failure in that order raises. Not when compiling: :func:`_validation_skipped`."""
    checks = [(*check, "labels") if len(check) == 3 else tuple(check) for check in checks]
    if not checks or _validation_skipped(*(t for tokens, *_ in checks for t in (tokens.labels, tokens.logp))):
        return
    failures = []  # (mask of failing tokens, message of its first token), in the order they are reported
    for tokens, vocab_size, name, labels_name in checks:
        labels, lse = tokens.labels, tokens.lse
        scored = labels != ignore_index
        bad_label = scored & ((labels < 0) | (labels >= vocab_size))
        finite = torch.isfinite(lse) & torch.isfinite(tokens.logp.detach())
        failures += [
            (bad_label, lambda b, t, labels=labels, vocab_size=vocab_size, labels_name=labels_name: (
                f"{labels_name}[{b}, {t}] (as aligned with the logits rows) = {labels[b, t].item()} is outside "
                f"[0, V={vocab_size}) and is not ignore_index={ignore_index}")),
            (scored & ~bad_label & ~finite, lambda b, t, name=name: (
                f"{name}[{b}, {t}] gives a non-finite log-probability for its label (NaN or inf in the "
                "logits, a row of -inf, or a label whose logit is -inf); pass validate=False to let it "
                "propagate to the loss instead")),
            (scored & ~bad_label & finite & (lse.abs() >= lse_precision_limit(lse.dtype)),
             lambda b, t, name=name, lse=lse: (
                f"{name}[{b}, {t}]: the row's log-sum-exp is {lse[b, t].item():.6g}, past "
                f"+-{lse_precision_limit(lse.dtype):.6g}: rounding it ({lse.dtype}) would cost more than bf16's "
                "precision in every probability of the row's gradient (logits that large usually mean a "
                "diverged model); subtract a per-row constant first (the log-softmax does not change), or "
                "pass validate=False to score it anyway")),
        ]
    failures += list(more)
    flags = torch.stack([mask.any() for mask, _ in failures]).tolist()  # the one sync
    for (mask, message), failed in zip(failures, flags):
        if failed:
            raise ValueError(message(*mask.nonzero()[0].tolist()))


def reference_failures(name: str, ref_logps: torch.Tensor | None) -> list:
    """``_check_token_results``' ``more`` for given reference log-probs: a non-finite one (a
    precomputed reference is where a NaN most likely comes from) would make its pair's loss so."""
    if ref_logps is None:
        return []
    return [(~torch.isfinite(ref_logps), lambda i: (
        f"{name}[{i}] = {ref_logps[i].item()} is not finite: its pair's loss would not be either; "
        "pass validate=False to let it propagate"))]


def _sequence_failures(objective: "Objective", labels: torch.Tensor, ref_given) -> list:
    """Per-sequence inputs that make the loss non-finite, for ``validate=True``: a non-finite
    given reference log-prob, and for ORPO a rejected completion with no scored token (its average
    log-prob 0 is a probability of 1, whose odds ``p / (1 - p)`` are infinite: the pair's loss is
    inf; an empty chosen completion is finite)."""
    kind, value = ref_given
    failures = reference_failures("ref_logps", value if kind == "logps" else None)
    if any(spec.name == "orpo" for spec in objective.specs):
        P = objective.num_pairs
        empty = (labels[P:] != objective.ignore_index).sum(-1) == 0
        failures.append((empty, lambda p: (
            f"loss_type='orpo': the rejected completion of pair {p} has no scored token: its average "
            "log-prob 0 is a probability of 1, whose odds are infinite, so the loss would be inf; leave "
            "the pair out of the batch, or pass validate=False")))
    return failures


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, policy: TokenLogprobs,
             ignore_index, vocab_size, num_pairs, token_metrics) -> dict[str, torch.Tensor]:
    """TRL's logged metrics, as detached device scalars."""
    scored = policy.labels != ignore_index
    lengths = scored.sum(-1)
    # Mean over completion tokens of the per-token vocabulary-mean logit.
    logits_per_seq = policy.extras["logits_sum"].sum(-1) / vocab_size

    def token_mean(rows: slice) -> torch.Tensor:
        return logits_per_seq[rows].sum() / lengths[rows].sum().clamp(min=1)

    chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logits/chosen": token_mean(chosen),
        "logits/rejected": token_mean(rejected),
    }
    if token_metrics:
        # Extras are 0 on ignored tokens; TRL reports 0 when there is no completion token.
        metrics["entropy"] = policy.extras["entropy"].sum() / lengths.sum().clamp(min=1)
        metrics["mean_token_accuracy"] = policy.extras["accuracy"][chosen].sum() / lengths[chosen].sum().clamp(min=1)
    return metrics
