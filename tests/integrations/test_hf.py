"""``dpo_compute_loss_func`` in a plain ``transformers.Trainer``: the loss it returns against a float64
oracle, training that lowers the loss, gradient accumulation that gives the same step as one large
batch, and clear errors for a malformed batch or bad options."""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dpo_kernels import fused_dpo_loss  # noqa: E402
from dpo_kernels.integrations.hf import dpo_compute_loss_func, trainer_loss_multiplier  # noqa: E402
from spawned_ranks import free_port, run_ranks  # noqa: E402
from tiny_world import make_models, make_rows, make_tokenizer, quiet_and_single_threaded  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def collate(examples, tokenizer=None):
    """The documented batch: [chosen rows; rejected rows], labels -100 off the completions, and the
    reference sums when the examples carry them."""
    tokenizer = tokenizer or make_tokenizer()
    sequences, completion_starts = [], []
    for key in ("chosen", "rejected"):
        for ex in examples:
            prompt = tokenizer(ex["prompt"])["input_ids"]
            completion = tokenizer(ex[key].strip())["input_ids"] + [tokenizer.eos_token_id]
            sequences.append(prompt + completion)
            completion_starts.append(len(prompt))
    T = max(map(len, sequences))
    input_ids = torch.full((len(sequences), T), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(sequences), T, dtype=torch.long)
    labels = torch.full((len(sequences), T), -100)
    for i, (seq, start) in enumerate(zip(sequences, completion_starts)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = torch.tensor(seq[start:])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "ref_chosen_logps" in examples[0]:
        ref = torch.tensor([ex["ref_chosen_logps"] for ex in examples] + [ex["ref_rejected_logps"] for ex in examples])
        batch["labels"] = {"labels": labels, "ref_logps": ref}
    return batch


def with_reference(rows, reference):
    """Each row with its reference sums, computed once (as TRL's precompute_ref_log_probs would)."""
    batch = collate(rows)
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = fused_dpo_loss(logits, batch["labels"], reference_free=True, shift=True)
    return [{**row, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
            for row, c, r in zip(rows, out.chosen_logps, out.rejected_logps)]


def oracle_sigmoid_loss(logits, labels, ref_logps, beta):
    """float64: summed completion log-probs (shifted), then -logsigmoid(beta * margin), mean over pairs."""
    z = logits.double()[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    logp = torch.log_softmax(z, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
    seq = logp.sum(-1) - ref_logps.double()
    chosen, rejected = seq.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def trainer_args(**kwargs):
    base = dict(output_dir=tempfile.mkdtemp(prefix="dpo_kernels_hf_"), report_to=[], use_cpu=True,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, save_strategy="no", disable_tqdm=True,
                remove_unused_columns=False, seed=0, lr_scheduler_type="constant")
    base.update(kwargs)
    return transformers.TrainingArguments(**base)


def make_trainer(model, rows, args, loss_func):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                                       compute_loss_func=loss_func)
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


@pytest.mark.parametrize("ga_steps", [1, 3])
def test_loss_matches_float64_oracle(ga_steps):
    """The training loss is the float64 sigmoid DPO loss divided by the accumulation steps; the
    evaluation loss (no gradient) is not divided."""
    policy, ref = make_models()
    rows = with_reference(make_rows(), ref)
    batch = collate(rows)
    loss_func = dpo_compute_loss_func(beta=0.3, gradient_accumulation_steps=ga_steps)
    outputs = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = oracle_sigmoid_loss(outputs.logits.detach(), batch["labels"]["labels"], batch["labels"]["ref_logps"], 0.3)
    loss = loss_func(outputs, batch["labels"], num_items_in_batch=torch.tensor(123))
    assert math.isclose(loss.item() * ga_steps, want.item(), rel_tol=1e-5)
    loss.backward()  # in place into the logits buffer
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        outputs = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert math.isclose(loss_func(outputs, batch["labels"]).item(), want.item(), rel_tol=1e-5)
    assert set(loss_func.metrics) >= {"rewards/accuracies", "rewards/margins", "logps/chosen"}


def test_trainer_trains_and_the_loss_falls():
    policy, ref = make_models()
    rows = with_reference(make_rows(), ref)
    args = trainer_args(max_steps=12, learning_rate=3e-3, optim="adamw_torch")
    trainer = make_trainer(policy, rows, args, dpo_compute_loss_func(beta=0.5))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert trainer.evaluate(rows)["eval_loss"] < losses[0]


def test_gradient_accumulation_equals_one_large_batch():
    """One step on 4 pairs equals one step on 2 x 2 pairs accumulated (SGD: the update is the gradient)."""
    policy, ref = make_models()
    rows = with_reference(make_rows(), ref)
    weights = []
    for batch_size, ga_steps in ((4, 1), (2, 2)):
        args = trainer_args(per_device_train_batch_size=batch_size, gradient_accumulation_steps=ga_steps,
                            optim="sgd", learning_rate=0.5)
        model = make_models()[0]
        trainer = make_trainer(model, rows, args, dpo_compute_loss_func(gradient_accumulation_steps=ga_steps))
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    moved = (weights[0]["lm_head.weight"] - policy.lm_head.weight).abs().max()
    assert moved > 1e-4
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_reference_free_losses_take_plain_labels():
    policy, _ = make_models()
    batch = collate(make_rows())
    outputs = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = dpo_compute_loss_func(loss_type="simpo")(outputs, batch["labels"])
    assert torch.isfinite(loss)


def test_malformed_batches_raise():
    policy, _ = make_models()
    batch = collate(make_rows())
    outputs = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss_func = dpo_compute_loss_func()
    with pytest.raises(ValueError, match="no reference"):  # sigmoid needs ref_logps
        loss_func(outputs, batch["labels"])
    with pytest.raises(ValueError, match="must hold 'labels'"):
        loss_func(outputs, {"label_ids": batch["labels"]})
    with pytest.raises(ValueError, match="no labels"):
        loss_func(outputs, None)
    with pytest.raises(ValueError, match="ref_logps"):  # wrong shape: names the argument
        loss_func(outputs, {"labels": batch["labels"], "ref_logps": torch.zeros(3)})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"loss_type": "nope"}, ValueError, "loss_type"),
    ({"gradient_accumulation_steps": 0}, ValueError, "gradient_accumulation_steps"),
    ({"training_args": {"gradient_accumulation_steps": 2}}, TypeError, "TrainingArguments"),
    ({"training_args": SimpleNamespace(gradient_accumulation_steps=2, average_tokens_across_devices=True),
      "gradient_accumulation_steps": 3}, ValueError, "disagrees"),
    ({"ref_logps": torch.zeros(2)}, ValueError, "from the batch"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"inplace_backward": "yes"}, TypeError, "inplace_backward"),
])
def test_bad_options_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        dpo_compute_loss_func(**kwargs)


def _args(**kwargs):
    """What the loss function reads of ``TrainingArguments`` (its world_size is a property of the
    process group: a namespace stands in for other worlds)."""
    base = dict(gradient_accumulation_steps=1, average_tokens_across_devices=True, n_gpu=0, world_size=1)
    return SimpleNamespace(**{**base, **kwargs})


def _deepspeed_autotp(size):
    return dict(deepspeed="ds_config.json", hf_deepspeed_config=SimpleNamespace(
        config={"tensor_parallel": {"autotp_size": size}}))


@pytest.mark.parametrize("args, tp_size, factor", [
    (_args(world_size=4), None, 4), (_args(world_size=4, average_tokens_across_devices=False), None, 1),
    (_args(n_gpu=2), None, 2), (_args(n_gpu=1, world_size=3), None, 3), (_args(), None, 1),
    # tensor parallelism: the ranks of a TP group share a batch; the Trainer counts replicas
    (_args(world_size=8, parallelism_config=SimpleNamespace(tp_size=2)), None, 4),
    (_args(world_size=8, **_deepspeed_autotp(4)), None, 2),
    (_args(world_size=8, parallelism_config=SimpleNamespace(tp_size=2)), 8, 1),  # the model's own size first
    (_args(world_size=8, hf_deepspeed_config=_deepspeed_autotp(4)["hf_deepspeed_config"]), None, 8),  # DeepSpeed off
])
def test_the_trainers_multiplier_across_processes_is_undone(args, tp_size, factor):
    """``transformers.Trainer.compute_loss`` multiplies a compute_loss_func's loss by the number of
    data-parallel replicas (processes over the tensor-parallel size; ``n_gpu`` under DataParallel)
    when it counted tokens and averages them across devices: with ``training_args`` (and the
    model's ``tp_size``) the function divides by the same factor, only when a count was passed (a
    dict of labels gives none), and by the accumulation steps as before."""
    assert trainer_loss_multiplier(args, tp_size) == factor
    policy, _ = make_models()
    batch = collate(make_rows())
    outputs = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    args.gradient_accumulation_steps = 2
    loss_func = dpo_compute_loss_func(beta=0.5, reference_free=True, training_args=args, tp_size=tp_size)
    counted = loss_func(outputs, batch["labels"], num_items_in_batch=torch.tensor(50))
    uncounted = loss_func(outputs, batch["labels"])
    plain = fused_dpo_loss(outputs.logits.detach(), batch["labels"], beta=0.5, reference_free=True, shift=True).loss
    torch.testing.assert_close(counted * factor * 2, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(uncounted * 2, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("processes, model_tp", [(8, 2), (8, None), (4, 4)])
def test_the_real_trainers_scaling_is_undone_with_tensor_parallelism(monkeypatch, processes, model_tp):
    """The installed ``transformers.Trainer.compute_loss`` itself, in a world it cannot see here
    (faked: ``processes`` processes, a model that says it is tensor-parallel over ``model_tp``
    ranks): with ``training_args`` and ``tp_size=model.tp_size`` the loss it returns for a token
    count is the pair mean over the accumulation steps, as in one process."""
    policy, _ = make_models()
    args = trainer_args(gradient_accumulation_steps=2)
    monkeypatch.setattr(type(args), "world_size", property(lambda self: processes))
    trainer = make_trainer(policy, make_rows(), args, None)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
    monkeypatch.setattr(policy, "_tp_size", model_tp, raising=False)
    trainer.compute_loss_func = dpo_compute_loss_func(beta=0.5, reference_free=True, training_args=args,
                                                      tp_size=policy.tp_size)
    batch = collate(make_rows())
    loss = trainer.compute_loss(policy, dict(batch), num_items_in_batch=torch.tensor(50))
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = fused_dpo_loss(logits, batch["labels"], beta=0.5, reference_free=True, shift=True).loss
    torch.testing.assert_close(loss.detach() * 2, plain, rtol=1e-5, atol=0)


def test_a_tp_size_without_training_args_or_that_splits_no_world_raises():
    with pytest.raises(ValueError, match="tp_size goes with training_args"):
        dpo_compute_loss_func(beta=0.5, reference_free=True, tp_size=2)
    with pytest.raises(ValueError, match="does not divide the 6 processes"):
        dpo_compute_loss_func(beta=0.5, reference_free=True, training_args=_args(world_size=6), tp_size=4)
    for bad in (0, -2, "2", True, 2.0):  # also where the Trainer would not divide by it
        for args in (_args(world_size=6), _args(average_tokens_across_devices=False), _args(n_gpu=2)):
            with pytest.raises(ValueError, match="tp_size must be an int"):
                dpo_compute_loss_func(beta=0.5, reference_free=True, training_args=args, tp_size=bad)


# The same step under DDP: two processes (gloo, CPU) launched as torchrun would, each a Trainer on
# its half of the pairs, against one process on all of them.
DDP_WORLD = 2
DDP_TIMEOUT_S = 300


def _ddp_rows():
    g = torch.Generator().manual_seed(1)
    return [{"p": torch.randint(3, 50, (3,), generator=g), "c": torch.randint(3, 50, (2 + i % 2,), generator=g),
             "r": torch.randint(3, 50, (4,), generator=g)} for i in range(4)]


def _ddp_collate(rows):
    """Token-id rows (no tokenizer): [chosen; rejected], labels -100 on the prompt and padding."""
    seqs = [torch.cat([r["p"], r[k]]) for k in ("c", "r") for r in rows]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = seq
        labels[i, 3:len(seq)] = seq[3:]
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def _sgd_step_update(world: int, with_args: bool) -> torch.Tensor:
    """The lm_head's change after one SGD step (lr 1, no clipping) of a reference-free sigmoid DPO
    loss on plain tensor labels (so the Trainer counts tokens), 4 pairs over ``world`` processes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    before = model.lm_head.weight.detach().clone()
    args = trainer_args(per_device_train_batch_size=4 // world, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                        ddp_backend="gloo" if world > 1 else None)
    loss_func = dpo_compute_loss_func(beta=0.5, reference_free=True, training_args=args if with_args else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_ddp_rows(), data_collator=_ddp_collate,
                                       compute_loss_func=loss_func)
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return model.lm_head.weight.detach() - before


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(DDP_WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    result = {"update": _sgd_step_update(DDP_WORLD, with_args=True)}
    try:
        _sgd_step_update(DDP_WORLD, with_args=False)
        result["error"] = None
    except ValueError as exc:
        result["error"] = str(exc)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_step_equals_one_process_on_all_pairs(tmp_path):
    """Two processes with the Trainer's token count (tensor labels): with ``training_args`` the
    step is one process's step on all 4 pairs (the Trainer's x2 undone; before the fix it was
    twice as large); without them the function raises instead of returning a loss the Trainer
    would scale."""
    run_ranks(_ddp_worker, (free_port(), str(tmp_path)), DDP_WORLD, DDP_TIMEOUT_S)
    want = _sgd_step_update(1, with_args=True)
    assert want.abs().max() > 1e-4
    for rank in range(DDP_WORLD):
        result = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        torch.testing.assert_close(result["update"], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
        assert result["error"] is not None and "training_args=args" in result["error"]
