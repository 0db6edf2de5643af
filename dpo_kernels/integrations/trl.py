"""A drop-in for TRL's ``DPOTrainer`` whose loss runs on dpo_kernels' fused kernels.

    from dpo_kernels.integrations.trl import FusedDPOTrainer   # instead of trl's DPOTrainer

    trainer = FusedDPOTrainer(model=model, args=DPOConfig(...), train_dataset=dataset,
                              processing_class=tokenizer, use_fused_lm_head=True)
    trainer.train()

``FusedDPOTrainer`` is TRL 1.16's ``DPOTrainer`` (same data pipeline, reference handling,
precomputation, PEFT, logging, evaluation, checkpoints) with one method replaced: the loss
(``_compute_loss``, and ``compute_ref_log_probs`` for ``precompute_ref_log_probs``). It computes
the same loss and logs the same metrics (``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``,
``mean_token_accuracy``, ``num_tokens``, ``aux_loss``) under the same names:

- ``use_fused_lm_head=False`` (default): the **logits path**. The model's own forward makes the
  logits; ``fused_dpo_loss`` scores them in three passes, writing the gradient into the logits
  buffer (``inplace_backward=True``): no logits-sized temporary beyond the model's output.
- ``use_fused_lm_head=True``: the **hidden-state path**. Only the backbone runs;
  ``fused_linear_dpo_loss`` takes its last hidden states and ``model.get_output_embeddings()``
  (weight and bias, with the config's logit scale and final soft-capping, as TRL reads them)
  and never forms the ``[N, V]`` logits.

The reference is computed first, without a graph, the same way (a separate ``ref_model``, the
PEFT model with its adapter disabled or its ``"ref"`` adapter, or TRL's precomputed
``ref_chosen_logps``/``ref_rejected_logps``), so its logits are gone before the policy's exist.

DPOConfig options, one by one (a field not named here is TRL's or transformers' own code path,
untouched by this class):

- supported, with TRL's semantics: ``loss_type`` (TRL's 15 loss types; a list is combined with
  ``loss_weights``), ``beta``, ``label_smoothing`` (read by robust, exo_pair, aot, aot_unpaired,
  as TRL reads it: TRL's ``sigmoid`` ignores it, and so does ours here), ``f_divergence_type``,
  ``f_alpha_divergence_coef``, ``discopop_tau``, ``ld_alpha``, ``use_weighting``,
  ``precompute_ref_log_probs``/``precompute_ref_batch_size`` (computed by our kernels),
  ``router_aux_loss_coef`` (MoE), ``sync_ref_model`` and its two parameters,
  ``disable_dropout``, ``activation_offloading``, ``gradient_checkpointing``, the data options
  (``max_length``, ``truncation_mode``, ``pad_to_multiple_of``, ``dataset_num_proc``,
  ``padding_free``, which TRL 1.16 itself turns off), model loading (``model_init_kwargs``,
  ``trust_remote_code``), gradient accumulation, evaluation, bf16/fp16 mixed precision.
- refused at construction (ValueError / NotImplementedError, before any data is processed):
  a loss type TRL's DPOTrainer does not define; ``label_smoothing > 0`` when ``sigmoid`` is
  combined with a loss that reads it (our ``sigmoid`` would apply it as cDPO, TRL's ignores it);
  option values the loss zoo rejects (``label_smoothing`` outside ``[0, 0.5)`` for robust, which
  TRL only warns about; ``ld_alpha`` with ``sft`` alone; ...); ``torch_compile=True``
  (untested); vision-language models and datasets (untested); with ``use_fused_lm_head=True``,
  FSDP and DeepSpeed ZeRO-3 (they shard the lm_head weight the hidden-state path reads).

Extra keyword arguments: ``use_fused_lm_head``, ``backend`` (``"auto"``, ``"triton"``,
``"cpu"``, ``"reference"``), ``inplace_backward`` (logits path), ``fused_lm_head_options``
(``mode``, ``chunk_tokens``, ``vocab_chunk`` of ``fused_linear_dpo_loss``), ``validate`` (the
host-side checks of labels and non-finite log-probs, one device sync per call).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import is_peft_model
from transformers import ProcessorMixin
from transformers.modeling_outputs import CausalLMOutput
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..backends import check_backend_name
from ..checks import check_flags, check_linear_options, python_scalar
from ._forward import Request, dry_run, patch_forward

# The loss types of TRL 1.16's DPOTrainer (its _compute_loss), all registered in dpo_kernels.losses.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# The loss types whose TRL implementation reads label_smoothing.
TRL_LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
_LINEAR_OPTIONS = ("mode", "chunk_tokens", "vocab_chunk")


def loss_kwargs_from_config(args) -> dict:
    """``fused_dpo_loss`` keyword arguments that compute what TRL computes for this DPOConfig."""
    loss_types = list(args.loss_type)
    kwargs = {"beta": args.beta, "loss_type": loss_types[0] if len(loss_types) == 1 else loss_types}
    if args.loss_weights is not None:
        kwargs["loss_weights"] = list(args.loss_weights)
    if args.label_smoothing and any(name in TRL_LABEL_SMOOTHING_LOSSES for name in loss_types):
        kwargs["label_smoothing"] = args.label_smoothing
    if args.f_divergence_type != "reverse_kl":
        kwargs["f_divergence_type"] = args.f_divergence_type
        if args.f_divergence_type == "alpha_divergence":
            kwargs["f_alpha_divergence_coef"] = args.f_alpha_divergence_coef
    if "discopop" in loss_types:
        kwargs["discopop_tau"] = args.discopop_tau
    if args.ld_alpha is not None:
        kwargs["ld_alpha"] = args.ld_alpha
    if args.use_weighting:
        kwargs["use_weighting"] = True
    return kwargs


def check_config(args, *, use_fused_lm_head: bool) -> dict:
    """Raise for a DPOConfig this trainer does not compute as TRL does; returns the loss kwargs."""
    loss_types = list(args.loss_type)
    unknown = [name for name in loss_types if name not in TRL_LOSS_TYPES]
    if unknown:
        raise ValueError(
            f"DPOConfig.loss_type {unknown!r} is not a loss type of TRL's DPOTrainer (one of {list(TRL_LOSS_TYPES)}); "
            "for simpo, cpo or orpo call dpo_kernels.fused_dpo_loss directly"
        )
    smoothed = [name for name in loss_types if name in TRL_LABEL_SMOOTHING_LOSSES]
    if args.label_smoothing and "sigmoid" in loss_types and smoothed:
        raise ValueError(
            f"DPOConfig.label_smoothing={args.label_smoothing} with loss_type {loss_types!r}: TRL applies it to "
            f"{smoothed} but not to 'sigmoid', while dpo_kernels' sigmoid would apply it (cDPO); this mix is not "
            "supported: use the losses in separate runs, or label_smoothing=0"
        )
    if getattr(args, "torch_compile", False):
        raise NotImplementedError("FusedDPOTrainer does not support torch_compile=True (untested): set it to False")
    if use_fused_lm_head:
        if getattr(args, "fsdp", None):
            raise NotImplementedError(
                "use_fused_lm_head=True with FSDP is not supported: FSDP shards the lm_head weight that the "
                "hidden-state path multiplies by; use the logits path (use_fused_lm_head=False)"
            )
        plugin = getattr(args, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            raise NotImplementedError(
                "use_fused_lm_head=True with DeepSpeed ZeRO-3 is not supported: ZeRO-3 partitions the lm_head "
                "weight that the hidden-state path multiplies by; use the logits path (use_fused_lm_head=False)"
            )
    kwargs = loss_kwargs_from_config(args)
    dry_run({**kwargs, "token_metrics": True}, context="DPOConfig not supported by FusedDPOTrainer")
    return kwargs


def _check_text_only(train_dataset, processing_class) -> None:
    if isinstance(processing_class, ProcessorMixin):
        raise NotImplementedError(
            "FusedDPOTrainer does not support vision-language models yet (processing_class is a "
            f"{type(processing_class).__name__}): use trl.DPOTrainer"
        )
    if train_dataset is not None:
        sample = next(iter(train_dataset))
        if "image" in sample or "images" in sample:
            raise NotImplementedError(
                "FusedDPOTrainer does not support vision datasets yet (the dataset has an 'image'/'images' "
                "column): use trl.DPOTrainer"
            )


class FusedDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with its loss on dpo_kernels' fused kernels (see the module docstring).

    Every argument of ``trl.DPOTrainer`` is accepted as is. Extra keyword arguments:

    Args:
        use_fused_lm_head: the hidden-state path (``fused_linear_dpo_loss`` on the backbone's last
            hidden states and the lm_head weight; the logits never exist). Default: the logits path.
        backend: the kernel backend, as in ``fused_dpo_loss`` (``"auto"``: Triton on CUDA, C++ on CPU).
        inplace_backward: logits path: the model's logits buffer becomes its own gradient
            (saves a logits-sized allocation). Set False if something else needs the logits in
            backward (autograd then raises "modified by an inplace operation").
        fused_lm_head_options: ``mode``, ``chunk_tokens``, ``vocab_chunk`` of
            ``fused_linear_dpo_loss``.
        validate: host-side checks of labels and non-finite log-probs (one device sync per call).
    """

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, *, use_fused_lm_head: bool = False,
                 backend: str = "auto", inplace_backward: bool = True, fused_lm_head_options: dict | None = None,
                 validate: bool = True):
        check_flags(use_fused_lm_head=use_fused_lm_head, inplace_backward=inplace_backward, validate=validate)
        check_backend_name(backend)
        options = {name: python_scalar(value) for name, value in (fused_lm_head_options or {}).items()}
        unknown = sorted(set(options) - set(_LINEAR_OPTIONS))
        if unknown:
            raise ValueError(f"fused_lm_head_options accepts {list(_LINEAR_OPTIONS)}, got {unknown}")
        if options and not use_fused_lm_head:
            raise ValueError("fused_lm_head_options apply only with use_fused_lm_head=True")
        # Their values too, here rather than at the first step (after the reference's precompute).
        check_linear_options(None, 1.0, options.get("mode", "auto"), options.get("chunk_tokens"),
                             options.get("vocab_chunk"))
        if args is not None:
            check_config(args, use_fused_lm_head=use_fused_lm_head)
        _check_text_only(train_dataset, processing_class)
        # Set before TRL's __init__: with precompute_ref_log_probs it calls compute_ref_log_probs.
        self.use_fused_lm_head = use_fused_lm_head
        self._kernel_options = {"backend": backend, "validate": validate, "inplace_backward": inplace_backward,
                                "linear_options": options}
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        self._loss_kwargs = check_config(self.args, use_fused_lm_head=use_fused_lm_head)
        # Below accelerate's mixed-precision wrapper, which train() installs on the policy later;
        # TRL already prepared the reference model, whose wrapper patch_forward takes off.
        patch_forward(self._patch_target(self.model))
        if self.ref_model is not None:
            patch_forward(self._patch_target(self.ref_model), below_accelerate=True)

    # ----------------------------------------------------------------------------------------
    # The loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_logps = self._reference_logps(model_kwargs, labels)

        keep_logits = return_outputs and not self.use_fused_lm_head
        request = self._request(labels, loss_kwargs={**self._loss_kwargs, "ref_logps": ref_logps},
                                keep_logits=keep_logits)
        result = model(**model_kwargs, dpo_kernels=request)
        loss = result.dpo.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * result.aux_loss
        self._log_dpo_metrics(mode, result, inputs, completion_mask)

        if not return_outputs:
            return loss
        if result.logits is not None:
            return loss, CausalLMOutput(loss=loss, logits=result.logits)
        warnings.warn(
            "return_outputs=True with use_fused_lm_head=True: the fused lm head does not build the logits, so "
            "they are recomputed with an extra forward pass (as in TRL).",
            stacklevel=2,
        )
        with torch.no_grad():
            return loss, model(**model_kwargs)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's per-sequence log-probs of one padded batch (``precompute_ref_log_probs``),
        through our kernels, as TRL's method returns them: ``(chosen[B], rejected[B])``, sums
        (LD-weighted with ``ld_alpha``)."""
        patch_forward(self._patch_target(model), below_accelerate=True)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            adapter = self._reference_adapter()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            result = model(**model_kwargs, dpo_kernels=self._request(labels, reference=True))
        return result.ref_logps.chunk(2, dim=0)

    def _reference_logps(self, model_kwargs, labels) -> torch.Tensor:
        """``[2B]`` reference log-probs of the batch, without a graph (before the policy's forward)."""
        # The frozen reference needs no MoE router logits.
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        request = self._request(labels, reference=True)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            if self.ref_model is None and is_peft_model(self.model):
                with self._reference_adapter():
                    return self.model(**ref_kwargs, dpo_kernels=request).ref_logps
            return self.ref_model(**ref_kwargs, dpo_kernels=request).ref_logps

    def _reference_adapter(self):
        """PEFT: the adapter disabled (a new adapter), or the frozen ``"ref"`` copy TRL made of it."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _request(self, labels, *, reference=False, loss_kwargs=None, keep_logits=False) -> Request:
        opts = self._kernel_options
        return Request(
            labels, fused_lm_head=self.use_fused_lm_head, reference=reference,
            loss_kwargs={"ld_alpha": self.ld_alpha} if loss_kwargs is None else loss_kwargs,
            inplace_backward=opts["inplace_backward"], keep_logits=keep_logits,
            linear_options=opts["linear_options"], backend=opts["backend"], validate=opts["validate"],
        )

    def _patch_target(self, model):
        """The ``PreTrainedModel`` whose forward gets the request keyword (under DDP/DeepSpeed and PEFT)."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    # ----------------------------------------------------------------------------------------
    # Metrics, as TRL's _compute_loss logs them (same names, same cross-process reductions),
    # read back from the device in one transfer.

    def _log_dpo_metrics(self, mode, result, inputs, completion_mask) -> None:
        out = result.dpo
        acc = self.accelerator
        scored = completion_mask[..., 1:]
        chosen_scored, rejected_scored = scored.chunk(2, dim=0)
        n_all, n_chosen, n_rejected = scored.sum(), chosen_scored.sum(), rejected_scored.sum()
        m = out.metrics

        def token_mean(mean, count):
            # TRL: sums and token counts gathered over processes, then divided (0 without tokens).
            total = acc.gather_for_metrics(mean * count).sum()
            count = acc.gather_for_metrics(count).sum()
            return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

        values = {}
        if self.aux_loss_enabled:
            values["aux_loss"] = acc.gather_for_metrics(result.aux_loss.detach()).float().mean()
        values["entropy"] = token_mean(m["entropy"], n_all)
        if mode == "train":
            values["num_tokens"] = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum()
        values["logits/chosen"] = token_mean(m["logits/chosen"], n_chosen)
        values["logits/rejected"] = token_mean(m["logits/rejected"], n_rejected)
        values["mean_token_accuracy"] = token_mean(m["mean_token_accuracy"], n_chosen)
        chosen_rewards, rejected_rewards = out.chosen_rewards.float(), out.rejected_rewards.float()
        per_pair = torch.stack([
            chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
            chosen_rewards - rejected_rewards, out.chosen_logps.detach().float(), out.rejected_logps.detach().float(),
        ], dim=1)
        means = acc.gather(per_pair).mean(dim=0)
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected")
        values.update(zip(names, means))

        # One transfer for every value. fp64, not fp32: num_tokens is an integer count, exact in
        # fp64 to 2^53 but rounded in fp32 past 2^24 (a step of 256 ranks x 8 x 8k tokens); the
        # fp32 metrics are unchanged by the widening.
        host = dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist()))
        if "num_tokens" in host:
            self._total_train_tokens += int(host.pop("num_tokens")) // self._tp_size
        for name, value in host.items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
