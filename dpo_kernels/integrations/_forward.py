"""The model side of the integrations: DPO computed inside the model's own ``forward``.

A trainer never calls our loss on tensors taken out of the model. It calls
``model(**batch, dpo_kernels=request)``, and the request runs inside the model's ``forward``:

- the **logits path** runs the model's own forward and scores its logits with ``fused_dpo_loss``;
- the **hidden-state path** runs only the backbone (``model.base_model``) and scores its last
  hidden states against ``model.get_output_embeddings()`` with ``fused_linear_dpo_loss``: the
  ``[N, V]`` logits never exist;
- a **reference** request returns the per-sequence reference log-probs (sums, LD-weighted with
  ``ld_alpha``), computed the same way without a graph.

Why inside ``forward`` (as TRL does for its own fused lm head): every wrapper of the model
sees one ordinary forward call. DDP registers its gradient hooks, accelerate's mixed-precision
wrapper puts the backbone under autocast (and converts only our small fp32 results, never a
logits-sized tensor), and PEFT routes the call through its adapters.

:func:`patch_forward` gives a model the ``dpo_kernels=`` keyword; it is idempotent and keeps the
original signature (``generate`` validates its kwargs against it).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass

import torch

from .. import DPOOutput, fused_dpo_loss, fused_linear_dpo_loss
from ..backends import autocast_dtype, autocast_off

_MARK = "_dpo_kernels_forward"

# Keywords a wrapper may pass that the backbone must not see (PEFT passes labels=None explicitly).
_NOT_FOR_BACKBONE = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep")


@dataclass
class ForwardResult:
    """What a request returns from ``forward`` (a dataclass: DDP finds the tensors in it).

    ``dpo`` is the :class:`~dpo_kernels.DPOOutput` of a policy request (None for a reference
    request), ``ref_logps`` the ``[2B]`` reference log-probs of a reference request, ``aux_loss``
    the MoE load-balancing loss when router logits were asked for, ``logits`` the model's
    logits when the request kept them (logits path only).
    """

    dpo: DPOOutput | None = None
    ref_logps: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Request:
    """One ``model(..., dpo_kernels=request)`` call (a plain class: wrappers pass it through as is).

    Args:
        labels: ``[2B, T]`` token ids aligned with ``input_ids`` (``-100`` off the completions);
            the model's position ``t`` is scored on ``labels[:, t + 1]``.
        fused_lm_head: the hidden-state path (else the logits path).
        reference: return the reference log-probs (no loss, no graph).
        loss_kwargs: options of ``fused_dpo_loss``/``fused_linear_dpo_loss`` (loss type, beta,
            ``ref_logps``, ``ld_alpha``...); for a reference request only ``ld_alpha`` is read.
        inplace_backward: logits path: the logits buffer becomes its own gradient.
        keep_logits: logits path: return the model's logits in the result.
        linear_options: hidden-state path: ``mode``, ``chunk_tokens``, ``vocab_chunk``.
    """

    __slots__ = ("labels", "fused_lm_head", "reference", "loss_kwargs", "inplace_backward", "keep_logits",
                 "linear_options", "backend", "validate")

    def __init__(self, labels, *, fused_lm_head, reference=False, loss_kwargs=None, inplace_backward=False,
                 keep_logits=False, linear_options=None, backend="auto", validate=True):
        self.labels = labels
        self.fused_lm_head = fused_lm_head
        self.reference = reference
        self.loss_kwargs = dict(loss_kwargs or {})
        self.inplace_backward = inplace_backward
        self.keep_logits = keep_logits
        self.linear_options = dict(linear_options or {})
        self.backend = backend
        self.validate = validate

    def run(self, model, previous_forward, args, kwargs) -> ForwardResult:
        for name in _NOT_FOR_BACKBONE:
            kwargs.pop(name, None)
        kwargs["use_cache"] = False
        if self.fused_lm_head:
            return self._run_hidden(model, args, kwargs)
        return self._run_logits(model, previous_forward, args, kwargs)

    # The reference: per-sequence sums (LD-weighted with ld_alpha) of a reference_free call.
    def _reference_kwargs(self) -> dict:
        kwargs = {"reference_free": True, "shift": True}
        if self.loss_kwargs.get("ld_alpha") is not None:
            kwargs["ld_alpha"] = self.loss_kwargs["ld_alpha"]
        return kwargs

    def _run_logits(self, model, previous_forward, args, kwargs) -> ForwardResult:
        outputs = previous_forward(model, *args, **kwargs)
        # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the real positions.
        logits = outputs.logits[:, -self.labels.shape[1]:]
        aux_loss = getattr(outputs, "aux_loss", None)
        if self.reference:
            with torch.no_grad():
                out = fused_dpo_loss(logits, self.labels, backend=self.backend, validate=self.validate,
                                     **self._reference_kwargs())
            return ForwardResult(ref_logps=torch.cat([out.chosen_logps, out.rejected_logps]))
        inplace = self.inplace_backward and logits.requires_grad and not self.keep_logits
        out = fused_dpo_loss(logits, self.labels, shift=True, token_metrics=True, inplace_backward=inplace,
                             backend=self.backend, validate=self.validate, **self.loss_kwargs)
        return ForwardResult(dpo=out, aux_loss=aux_loss, logits=outputs.logits if self.keep_logits else None)

    def _run_hidden(self, model, args, kwargs) -> ForwardResult:
        backbone_outputs = model.base_model(*args, **kwargs)
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        # A model split across devices (device_map) can end its backbone on another device than the head.
        hidden = backbone_outputs.last_hidden_state[:, -self.labels.shape[1]:].to(weight.device)
        labels = self.labels.to(weight.device)
        scale, softcap = head_transform(model.config)
        aux_loss = router_aux_loss(model, backbone_outputs, kwargs)
        with _lm_head_precision(hidden) as dtype:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            if scale != 1.0:  # (h W^T + b) * s == (s h) W^T + s b
                hidden = hidden * scale
                bias = None if bias is None else bias * scale
            common = {"logit_softcap": softcap, "backend": self.backend, "validate": self.validate,
                      **self.linear_options}
            if self.reference:
                # No gradient: "auto" runs the forward alone, whatever mode the policy uses.
                common["mode"] = "auto"
                with torch.no_grad():
                    out = fused_linear_dpo_loss(hidden, weight, labels, bias, **common, **self._reference_kwargs())
                return ForwardResult(ref_logps=torch.cat([out.chosen_logps, out.rejected_logps]))
            out = fused_linear_dpo_loss(hidden, weight, labels, bias, shift=True, token_metrics=True, **common,
                                        **self.loss_kwargs)
        return ForwardResult(dpo=out, aux_loss=aux_loss)


@contextlib.contextmanager
def _lm_head_precision(hidden: torch.Tensor):
    """The dtype the model's own lm_head would run in, with autocast off inside.

    Under autocast (mixed precision) the model's ``lm_head`` matmul runs in the autocast dtype;
    the hidden-state path casts hidden and weight to it explicitly (a differentiable cast, as
    autocast's) and turns autocast off so that its own fp32 accumulation is not re-cast.
    """
    device_type = hidden.device.type
    dtype = autocast_dtype(device_type)
    with autocast_off(device_type):
        yield hidden.dtype if dtype is None else dtype


def head_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, final_logit_softcapping)`` the model applies to ``h W^T + b``, read from its
    config as TRL's fused lm head reads them (``trl.trainer.utils.add_fused_lm_head``): Cohere's
    ``logit_scale``, ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, Granite/MiniCPM3's
    ``1 / logits_scaling`` (HyperCLOVA X multiplies by it), Gemma-2's final soft-capping."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        logits_scaling = text_config.logits_scaling
        scale = logits_scaling if text_config.model_type == "hyperclovax" else 1 / logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def router_aux_loss(model, backbone_outputs, kwargs) -> torch.Tensor | None:
    """The MoE load-balancing loss of a backbone call made with ``output_router_logits=True``
    (Mixtral's, which every MoE family of transformers uses; as TRL's fused lm head computes it)."""
    if not kwargs.get("output_router_logits") or getattr(backbone_outputs, "router_logits", None) is None:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = model.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(model, "num_experts")
    top_k = getattr(text_config, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok")
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, kwargs.get("attention_mask"))


def patch_forward(model: torch.nn.Module, *, below_accelerate: bool = False) -> None:
    """Give ``model.forward`` the ``dpo_kernels=`` keyword (idempotent).

    Without the keyword the call goes to whatever ``forward`` the model had (its class's, or a
    wrapper installed earlier such as TRL's fused lm head). With ``below_accelerate=True`` a
    mixed-precision wrapper that accelerate has already installed is removed first: the
    integration then calls this model only under its own ``accelerator.autocast()``, and the
    wrapper would otherwise cast the model's logits to an fp32 copy before our kernel sees them.
    """
    if getattr(model, _MARK, False):
        return
    if below_accelerate and "_original_forward" in vars(model):
        model.forward = model._original_forward
    previous = _previous_forward(model)

    @functools.wraps(type(model).forward)
    def forward(self, *args, dpo_kernels: Request | None = None, **kwargs):
        if dpo_kernels is None:
            return previous(self, *args, **kwargs)
        return dpo_kernels.run(self, previous, args, kwargs)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)


def _previous_forward(model):
    """The model's current forward as a function of ``(self, *args, **kwargs)``.

    Taken unbound where possible, so that a deep copy of the model (which rebinds its instance
    methods to the copy) calls the copy's weights, not the original's; TRL's fused lm head wrapper
    is made so too (:func:`_rebindable`).
    """
    current = vars(model).get("forward")
    if current is None:
        return type(model).forward
    if isinstance(current, types.MethodType) and current.__self__ is model:
        return _rebindable(current.__func__)
    return lambda self, *args, **kwargs: current(*args, **kwargs)


def _closure_value(func, name: str):
    """The value ``func``'s closure holds for the free variable ``name``, or None."""
    code, cells = getattr(func, "__code__", None), getattr(func, "__closure__", None)
    if code is None or not cells or name not in code.co_freevars:
        return None
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return None


def _rebindable(func):
    """``func``, a forward of ``(self, ...)``, as one that runs on ``self`` whatever model it was
    made for.

    TRL's ``add_fused_lm_head`` (``trl.trainer.utils``) patches ``model.forward`` with a function
    whose ``fused_lm_head=True`` branch uses ``self``, but whose plain branch calls the forward it
    captured, bound to the model it patched. After a deep copy (iterative DPO: the trained policy
    copied as the next round's reference) that plain branch still runs the original model, and
    the logits path would score the reference with the policy's live weights. So that wrapper is
    replaced by one that takes the fused branch from TRL's function and the plain one from the
    captured forward's own function, called on ``self`` (recursively: it may be such a wrapper
    too). A captured forward that is not a method (another library's closure) is left as it is."""
    captured = _closure_value(func, "original_forward")
    try:
        fused = "fused_lm_head" in inspect.signature(func, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        fused = False
    if not fused or not isinstance(captured, types.MethodType):
        return func
    plain = _rebindable(captured.__func__)

    @functools.wraps(func)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if fused_lm_head:
            return func(self, *args, fused_lm_head=True, **kwargs)
        return plain(self, *args, **kwargs)

    return forward


def dry_run(loss_kwargs: dict, *, context: str | None = None) -> None:
    """Run a combination of loss options through ``fused_dpo_loss`` on a tiny random batch (the
    reference backend), so that a bad one raises when the trainer or the loss function is built,
    not at its first step, after the reference precompute. ``context`` prefixes the message."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.randint(0, 5, (2, 4), generator=g)
    labels[:, 0] = -100
    kwargs = {**loss_kwargs, "backend": "reference"}
    if not kwargs.get("reference_free"):
        kwargs["ref_logps"] = torch.zeros(2)
    try:
        fused_dpo_loss(logits, labels, shift=True, **kwargs)
    except (ValueError, TypeError) as err:
        if context is None:
            raise
        raise type(err)(f"{context}: {err}") from err
