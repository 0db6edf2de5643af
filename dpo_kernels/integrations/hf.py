"""DPO for a plain ``transformers.Trainer``, through its ``compute_loss_func`` hook.

    from dpo_kernels.integrations.hf import dpo_compute_loss_func

    trainer = transformers.Trainer(
        model=model, args=TrainingArguments(..., remove_unused_columns=False),
        train_dataset=dataset, data_collator=collate,
        compute_loss_func=dpo_compute_loss_func(beta=0.1, training_args=args),
    )

The Trainer pops ``batch["labels"]``, calls ``model(**batch)`` with everything else and hands the
outputs and the labels to the function, which returns ``fused_dpo_loss(outputs.logits, ...)``'s
loss. The model's logits are scored in place (``inplace_backward=True``): no logits-sized
temporary beyond the model's own output.

**Batch format** (what the data collator must return), for ``B`` preference pairs padded to ``T``:

- ``input_ids`` ``[2B, T]``: rows ``0..B-1`` are prompt + chosen completion, rows ``B..2B-1``
  prompt + rejected completion, pair ``i`` in rows ``i`` and ``B + i`` (TRL's layout);
- ``attention_mask`` ``[2B, T]``;
- ``labels``: either a LongTensor ``[2B, T]`` equal to ``input_ids`` with ``-100`` on the prompt
  and padding (the model's position ``t`` is scored on ``labels[:, t + 1]``, as a causal LM's
  own loss shifts), for reference-free losses (``simpo``, ``cpo``, ``orpo``, ``sft``) or
  ``reference_free=True``; or a dict ``{"labels": LongTensor [2B, T], "ref_logps": FloatTensor
  [2B]}`` with the reference model's per-sequence log-probs: SUMS over each row's completion
  tokens, chosen rows then rejected rows (what TRL's ``precompute_ref_log_probs`` stores, or
  ``out.chosen_logps``/``out.rejected_logps`` of a ``reference_free=True`` call on the reference's
  logits under ``torch.no_grad()``).

Set ``remove_unused_columns=False`` when the dataset rows carry other columns the collator needs.

**num_items_in_batch, gradient accumulation and several processes.** The Trainer passes
``num_items_in_batch``, the number of label tokens in the whole accumulated batch (``None`` when
``labels`` is a dict: it cannot count them). A DPO loss is a mean over pairs, not over tokens, so
the function does not normalize by it. Two things the Trainer does to a ``compute_loss_func``'s
loss are undone here, with the Trainer's ``training_args``:

- it does not divide it by the accumulation steps (it takes it as already scaled), so the
  function divides the pair mean by ``gradient_accumulation_steps`` whenever a gradient is being
  computed: summed over the steps, the gradient is that of the mean over all their pairs (equal
  micro-batch sizes). Evaluation losses (no gradient) are not divided. An epoch's last window with
  fewer micro-batches is still divided by the full count (the function cannot see how many there
  are): use ``dataloader_drop_last=True`` or a dataset size that divides evenly;
- when it counted tokens (``num_items_in_batch`` given) and ``average_tokens_across_devices`` is
  on (its default), it multiplies the loss by the number of data-parallel replicas (the
  processes over the tensor-parallel size; ``n_gpu`` under DataParallel), as a token sum over the
  global count would need; for a per-replica pair mean averaged by DDP that makes every step that
  many times too large, so the function divides by the same factor (:func:`trainer_loss_multiplier`).
  The Trainer reads the tensor-parallel size from the model first (``model.tp_size``, set by
  ``from_pretrained(..., tp_plan=...)``), which ``training_args`` do not hold: with such a model
  pass ``tp_size=model.tp_size``; DeepSpeed AutoTP's and accelerate's sizes are read from
  ``training_args`` (a parallelism config given only to the accelerate launcher is not: pass
  ``tp_size`` then).

Without ``training_args`` (``gradient_accumulation_steps`` alone, default 1) the function cannot
know that factor: with several processes or GPUs and a token count it raises rather than return
a loss the Trainer would scale.

The metrics of the last call (TRL's names, detached device scalars) are kept in
``loss_func.metrics`` for a callback to log.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .. import fused_dpo_loss
from ._forward import dry_run


class DPOComputeLoss:
    """The ``compute_loss_func`` made by :func:`dpo_compute_loss_func`: ``(outputs, labels,
    num_items_in_batch=None) -> loss``. ``metrics`` holds the last call's metrics."""

    def __init__(self, gradient_accumulation_steps: int, inplace_backward: bool, loss_kwargs: dict,
                 training_args: Any = None, tp_size: int | None = None):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.inplace_backward = inplace_backward
        self.loss_kwargs = loss_kwargs
        self.training_args = training_args
        self.tp_size = tp_size
        self.metrics: dict[str, torch.Tensor] = {}

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        token_labels, ref_logps = _split_labels(labels)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        kwargs = dict(self.loss_kwargs)
        if ref_logps is not None:
            kwargs["ref_logps"] = ref_logps.to(logits.device)
        divisor = self._trainer_multiplier(logits.device) if num_items_in_batch is not None else 1
        out = fused_dpo_loss(logits, token_labels.to(logits.device), shift=True,
                             inplace_backward=self.inplace_backward and logits.requires_grad, **kwargs)
        self.metrics = out.metrics
        if logits.requires_grad:
            divisor *= self.gradient_accumulation_steps
        return out.loss / divisor if divisor != 1 else out.loss

    def _trainer_multiplier(self, device: torch.device) -> int:
        """What the Trainer multiplies this loss by, having counted tokens (see the module docstring)."""
        if self.training_args is not None:
            return trainer_loss_multiplier(self.training_args, self.tp_size)
        processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        gpus = torch.cuda.device_count() if device.type == "cuda" and processes == 1 else 1
        if processes > 1 or gpus > 1:
            raise ValueError(
                f"dpo_compute_loss_func: the Trainer counted label tokens (num_items_in_batch) across {max(processes, gpus)} "
                "processes or GPUs and, with average_tokens_across_devices, multiplies the loss by their number, which "
                "a DPO pair mean must undo: pass training_args=args to dpo_compute_loss_func (or give labels as a "
                "dict {'labels', 'ref_logps'}: the Trainer then counts nothing)"
            )
        return 1


def trainer_loss_multiplier(training_args: Any, tp_size: int | None = None) -> int:
    """The factor ``transformers.Trainer.compute_loss`` multiplies a ``compute_loss_func``'s loss by
    when it counted label tokens (transformers 5.24): with ``average_tokens_across_devices`` on,
    ``n_gpu`` under DataParallel, else the number of processes over the tensor-parallel size (the
    ranks of a TP group see the same batch: :func:`trainer_tp_size`); 1 when it is off."""
    if not getattr(training_args, "average_tokens_across_devices", False):
        return 1
    n_gpu = int(getattr(training_args, "n_gpu", 1))
    if n_gpu > 1:
        return n_gpu
    processes = max(1, int(getattr(training_args, "world_size", 1)))
    tp = trainer_tp_size(training_args, tp_size)
    if processes % tp:
        raise ValueError(f"a tensor-parallel size of {tp} does not divide the {processes} processes")
    return processes // tp


def trainer_tp_size(training_args: Any, tp_size: int | None = None) -> int:
    """The tensor-parallel size the Trainer divides the process count by (``Trainer.get_tp_size``,
    in its order): ``tp_size`` standing for the model's own (``model.tp_size``), else DeepSpeed
    AutoTP's ``autotp_size``, else accelerate's ``parallelism_config.tp_size``, else 1."""
    if tp_size is not None:
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be an int >= 1 or None, got {tp_size!r}")
        return tp_size
    deepspeed = getattr(training_args, "hf_deepspeed_config", None)
    if getattr(training_args, "deepspeed", None) and deepspeed is not None:
        return int(deepspeed.config.get("tensor_parallel", {}).get("autotp_size", 1))
    parallelism = getattr(training_args, "parallelism_config", None)
    if parallelism is not None:
        return int(parallelism.tp_size)
    return 1


def _split_labels(labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(labels, torch.Tensor):
        return labels, None
    if isinstance(labels, dict):
        unknown = sorted(set(labels) - {"labels", "ref_logps"})
        if "labels" not in labels or unknown:
            raise ValueError(
                "batch['labels'] as a dict must hold 'labels' ([2B, T] token ids, -100 off the completions) and "
                f"optionally 'ref_logps' ([2B] reference sums); got keys {sorted(labels)}"
            )
        return labels["labels"], labels.get("ref_logps")
    if labels is None:
        raise ValueError(
            "compute_loss_func got no labels: the batch must have 'labels' (a [2B, T] tensor, or a dict with "
            "'labels' and 'ref_logps'), see dpo_kernels.integrations.hf"
        )
    raise TypeError(f"batch['labels'] must be a tensor or a dict, got {type(labels).__name__}")


def dpo_compute_loss_func(
    *,
    training_args: Any = None,
    gradient_accumulation_steps: int | None = None,
    inplace_backward: bool = True,
    tp_size: int | None = None,
    **loss_kwargs,
) -> DPOComputeLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer`` computing ``fused_dpo_loss`` on the
    model's logits (batch format, gradient accumulation and several processes: see the module
    docstring).

    Args:
        training_args: the Trainer's ``TrainingArguments``: its ``gradient_accumulation_steps``,
            and the factor the Trainer multiplies the loss by across processes
            (:func:`trainer_loss_multiplier`), both undone here. Recommended.
        gradient_accumulation_steps: without ``training_args``, the accumulation steps (default
            1); the training loss is divided by it (the Trainer does not divide a
            compute_loss_func's loss). With ``training_args`` it must be left out or agree.
        inplace_backward: the logits buffer becomes its own gradient (no logits-sized temporary);
            set False if something else needs the model's logits in backward.
        tp_size: with ``training_args``, the model's tensor-parallel size (``model.tp_size``) for a
            model loaded with a ``tp_plan``: the Trainer reads it from the model, which
            ``training_args`` do not hold (see :func:`trainer_tp_size`). Default: from
            ``training_args``.
        **loss_kwargs: every option of :func:`dpo_kernels.fused_dpo_loss` except those the batch
            gives (``logits``, ``labels``, ``ref_logps``, ``shift``): ``beta``, ``loss_type``,
            ``loss_weights``, ``label_smoothing``, ``ld_alpha``, ``use_weighting``,
            ``reference_free``, ``token_metrics``, ``backend``, ...
    """
    if training_args is not None:
        from_args = getattr(training_args, "gradient_accumulation_steps", None)
        if from_args is None or not hasattr(training_args, "average_tokens_across_devices"):
            raise TypeError("training_args must be the Trainer's transformers.TrainingArguments, got "
                            f"{type(training_args).__name__}")
        if gradient_accumulation_steps is not None and gradient_accumulation_steps != from_args:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r} disagrees with "
                             f"training_args.gradient_accumulation_steps={from_args!r}: leave it out")
        gradient_accumulation_steps = from_args
    elif gradient_accumulation_steps is None:
        gradient_accumulation_steps = 1
    if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
            or gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be an int >= 1, got {gradient_accumulation_steps!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if tp_size is not None:
        if training_args is None:
            raise ValueError("tp_size goes with training_args (the Trainer's multiplier it corrects): pass both")
        trainer_tp_size(training_args, tp_size)  # a clear error now for a bad size,
        trainer_loss_multiplier(training_args, tp_size)  # and for one that divides no world
    given = sorted(set(loss_kwargs) & {"logits", "labels", "ref_logps", "ref_logits", "shift"})
    if given:
        raise ValueError(f"{given} come from the batch (see dpo_kernels.integrations.hf), not from dpo_compute_loss_func")
    dry_run(loss_kwargs)
    return DPOComputeLoss(gradient_accumulation_steps, inplace_backward, loss_kwargs, training_args, tp_size)
