"""``FusedDPOTrainer`` against TRL's own ``DPOTrainer``: a few real training steps each, same seed, data
and initial weights, then the same per-step loss and logged metrics, the same evaluation metrics and
the same trained weights.

Tolerances (fp32): the two sides compute the same math with different kernels and reduction orders,
so they agree to float32 rounding, which three SGD steps (lr 0.1; SGD so that weights differ only as
much as the gradients do) carry into the weights:

- loss and every logged metric, every step: ``rtol=1e-5, atol=1e-6`` (observed <= 2e-7 relative);
- weights after training: ``rtol=1e-5, atol=1e-6`` per element. A wrong gradient moves weights by
  lr x its error and is caught; the test also checks that training moved the weights by much more
  than the tolerance.

bf16 under CPU autocast (mixed precision) rounds the logits to bf16 on both sides at different
points: there the bound is ``rtol=atol=2e-2`` on the first step's loss and metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402
from tiny_world import build_trainer, dpo_config, make_models, make_rows, quiet_and_single_threaded, train  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6
# log_history entries that are timings, not results
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second", "total_flos"}


@dataclass(frozen=True)
class Case:
    id: str
    config: dict = field(default_factory=dict)  # DPOConfig fields
    ours: dict = field(default_factory=dict)  # FusedDPOTrainer keyword arguments
    arch: str = "llama"
    evaluate: bool = False
    peft: str | None = None  # "new": peft_config; "pretrained": a PeftModel with a trained adapter


FUSED = {"use_fused_lm_head": True}
CASES = [
    Case("sigmoid-ref_model-logits"),
    Case("sigmoid-ref_model-fused_lm_head", ours=FUSED, evaluate=True),
    Case("ipo-precomputed-ga2-logits", {"loss_type": ["ipo"], "precompute_ref_log_probs": True,
                                        "gradient_accumulation_steps": 2}, evaluate=True),
    Case("mpo-ga2-fused_lm_head", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0],
                                   "gradient_accumulation_steps": 2}, FUSED),
    Case("robust-ls0.1-precomputed-fused_lm_head", {"loss_type": ["robust"], "label_smoothing": 0.1,
                                                    "precompute_ref_log_probs": True}, FUSED, evaluate=True),
    Case("aot-ls0.1-fused_lm_head", {"loss_type": ["aot"], "label_smoothing": 0.1}, FUSED),
    Case("sigmoid-js-ld0.5-wpo-precomputed-logits", {"f_divergence_type": "js_divergence", "ld_alpha": 0.5,
                                                     "use_weighting": True, "precompute_ref_log_probs": True}),
    Case("hinge-alpha0.3-two_phase", {"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence",
                                      "f_alpha_divergence_coef": 0.3, "beta": 0.5},
         {"use_fused_lm_head": True, "fused_lm_head_options": {"mode": "two_phase"}}),
    Case("apo_zero-one_pass-small_chunks", {"loss_type": ["apo_zero"]},
         {"use_fused_lm_head": True, "fused_lm_head_options": {"mode": "one_pass", "chunk_tokens": 20}}),
    Case("ipo-ga2-split-small_slices", {"loss_type": ["ipo"], "gradient_accumulation_steps": 2},
         {"use_fused_lm_head": True, "fused_lm_head_options": {"mode": "split", "vocab_chunk": 48}}),
    Case("sigmoid_norm-ld0.3-precomputed-fused_lm_head", {"loss_type": ["sigmoid_norm"], "ld_alpha": 0.3,
                                                          "precompute_ref_log_probs": True}, FUSED),
    Case("discopop-gradient_checkpointing-fused_lm_head", {"loss_type": ["discopop"], "discopop_tau": 0.3,
                                                           "gradient_checkpointing": True}, FUSED),
    Case("exo_pair-not_inplace-logits", {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
         {"inplace_backward": False}),
    Case("sigmoid+sft-sigmoid_ls_ignored-logits", {"loss_type": ["sigmoid", "sft"], "label_smoothing": 0.2}),
    Case("moe-logits", arch="mixtral"),
    Case("moe-fused_lm_head", arch="mixtral", ours=FUSED),
    Case("gemma2-softcap-fused_lm_head", arch="gemma2", ours=FUSED),
    Case("cohere-logit_scale-fused_lm_head", arch="cohere", ours=FUSED),
    Case("peft-new_adapter-logits", peft="new"),
    Case("peft-new_adapter-fused_lm_head", ours=FUSED, peft="new", evaluate=True),
    Case("peft-pretrained_adapter-fused_lm_head", ours=FUSED, peft="pretrained"),
]


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")


def _models(case: Case):
    policy, ref = make_models(case.arch)
    kwargs = {"policy": policy, "ref": ref}  # with precompute_ref_log_probs TRL precomputes with ref
    if case.peft == "new":  # TRL wraps the policy; the reference is the adapter disabled
        kwargs.update(policy=ref, ref=None, peft_config=_lora())
    elif case.peft == "pretrained":  # a trained adapter: TRL copies it as the frozen "ref" adapter
        torch.manual_seed(5)
        model = peft.get_peft_model(ref, _lora())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        kwargs.update(policy=model, ref=None)
    return kwargs


_RUNS: dict[tuple, dict] = {}


def _run(case: Case, side: str) -> dict:
    """Train one side for the case's steps (once per session)."""
    key = (case.id, side)
    if key not in _RUNS:
        cls, extra = (FusedDPOTrainer, case.ours) if side == "ours" else (trl.DPOTrainer, {})
        trainer = build_trainer(cls, config=dpo_config(**case.config), eval_rows=make_rows(11) if case.evaluate else None,
                                **_models(case), **extra)
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        train(trainer)
        log = list(trainer.state.log_history)  # evaluate() appends to it
        _RUNS[key] = {
            "log": log,
            "eval": trainer.evaluate() if case.evaluate else None,
            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "initial": initial,
            "ref_logps": (trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"])
            if case.config.get("precompute_ref_log_probs") else None,
        }
    return _RUNS[key]


def _assert_metrics_close(ours: dict, theirs: dict, where: str, rtol=METRIC_RTOL, atol=METRIC_ATOL):
    ours = {k: v for k, v in ours.items() if k not in TIMING_KEYS}
    theirs = {k: v for k, v in theirs.items() if k not in TIMING_KEYS}
    assert set(ours) == set(theirs), f"{where}: logged keys differ: ours only {sorted(set(ours) - set(theirs))}, " \
                                     f"TRL only {sorted(set(theirs) - set(ours))}"
    for name, want in theirs.items():
        got = ours[name]
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), (
            f"{where}: {name} = {got!r}, TRL {want!r} (diff {got - want:.3g}, rtol={rtol}, atol={atol})"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_training_matches_trl(case):
    ours, theirs = _run(case, "ours"), _run(case, "trl")
    assert len(ours["log"]) == len(theirs["log"]) == case.config.get("max_steps", 3) + 1
    for step, (a, b) in enumerate(zip(ours["log"], theirs["log"]), start=1):
        _assert_metrics_close(a, b, f"{case.id}, log entry {step}")
    if case.evaluate:
        _assert_metrics_close(ours["eval"], theirs["eval"], f"{case.id}, evaluate()")
        assert "eval_rewards/accuracies" in ours["eval"]

    assert set(ours["weights"]) == set(theirs["weights"])
    moved = max((ours["weights"][n] - ours["initial"][n]).abs().max().item() for n in ours["weights"])
    assert moved > 100 * WEIGHT_ATOL, f"{case.id}: training barely moved the weights ({moved:.2g})"
    for name, want in theirs["weights"].items():
        torch.testing.assert_close(ours["weights"][name], want, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda m: f"{case.id}: trained {name}: {m}")

    if ours["ref_logps"] is not None:  # precomputed by our kernels, then by TRL's
        for got, want in zip(ours["ref_logps"], theirs["ref_logps"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_the_world_is_not_degenerate():
    """Margins of both signs and non-zero rewards from the first step, so the metrics compare something."""
    first = _run(CASES[0], "trl")["log"][0]
    assert 0.0 < first["rewards/accuracies"] < 1.0
    assert abs(first["rewards/chosen"]) > 1e-3 and abs(first["rewards/margins"]) > 1e-3


def test_moe_logs_aux_loss():
    case = next(c for c in CASES if c.id == "moe-fused_lm_head")
    assert _run(case, "ours")["log"][0]["aux_loss"] > 0


def test_precomputed_reference_matches_float64():
    """``precompute_ref_log_probs`` through our kernels (hidden-state path, LD weights) against float64
    sums of the reference model's log-softmax, computed here from its logits."""
    case = next(c for c in CASES if c.id == "sigmoid_norm-ld0.3-precomputed-fused_lm_head")
    trainer = build_trainer(FusedDPOTrainer, config=dpo_config(**case.config), **_models(case), **case.ours)
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["input_ids"][:, 1:]
    scored = batch["completion_mask"][:, 1:].bool()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * scored
    # LD-DPO: tokens past the shorter completion of the pair weigh ld_alpha
    position = scored.cumsum(1)
    lengths = scored.sum(1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)
    weight = torch.where(position > shared[:, None], case.config["ld_alpha"], 1.0)
    want = (token * weight).sum(1)
    got = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", ["ours", "trl"])
@pytest.mark.parametrize("use_fused_lm_head", [False, True])
def test_a_deep_copy_of_a_trained_model_is_its_own_reference(first, use_fused_lm_head):
    """Iterative DPO: the policy trained in round 1 (by our trainer or TRL's) is deep-copied as round
    2's reference. TRL's fused lm head patch (``add_fused_lm_head``) makes the model's plain forward
    call the forward it captured, bound to the model it patched: on the copy that is the original.
    The reference must score with the copy's own weights (zeroed here: every log-prob is
    ``-log V``), on both paths, whatever trained round 1."""
    import copy

    from tiny_world import VOCAB

    policy, ref = make_models()
    cls = FusedDPOTrainer if first == "ours" else trl.DPOTrainer
    round_1 = train(build_trainer(cls, policy=policy, ref=ref, config=dpo_config(max_steps=1)))
    model = round_1.model
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
    trainer = FusedDPOTrainer(model=model, ref_model=copied, args=dpo_config(max_steps=1),
                              train_dataset=round_1.train_dataset, processing_class=round_1.processing_class,
                              use_fused_lm_head=use_fused_lm_head)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    got = trainer._reference_logps(dict(kwargs, use_cache=False), labels)
    want = -(labels[:, 1:] != -100).sum(1) * math.log(VOCAB)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-4)


def test_bf16_autocast_matches_trl():
    """Mixed precision (``bf16=True`` on the CPU: accelerate runs the forward under autocast): the
    hidden-state path casts hidden and weight to bf16 as the model's lm_head would."""
    for extra in ({}, FUSED):
        logs = []
        for cls, kwargs in ((FusedDPOTrainer, extra), (trl.DPOTrainer, {})):
            policy, ref = make_models()
            trainer = build_trainer(cls, policy=policy, ref=ref, config=dpo_config(bf16=True, max_steps=1), **kwargs)
            logs.append(train(trainer).state.log_history[0])
        _assert_metrics_close(logs[0], logs[1], f"bf16 autocast {extra}", rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# What it refuses, at construction (before the dataset is processed)


def _vision_rows():
    return [{"images": [], **row} for row in make_rows()]


REFUSED = [
    ("unknown_loss_type", {"loss_type": ["simpo"]}, {}, ValueError, "not a loss type of TRL"),
    ("sigmoid_mixed_with_label_smoothing", {"loss_type": ["sigmoid", "robust"], "label_smoothing": 0.1}, {},
     ValueError, "cDPO"),
    ("robust_label_smoothing_0.5", {"loss_type": ["robust"], "label_smoothing": 0.5}, {}, ValueError,
     "label_smoothing"),
    ("ld_alpha_with_sft_only", {"loss_type": ["sft"], "ld_alpha": 0.5}, {}, ValueError, "ld_alpha"),
    ("exo_pair_without_label_smoothing", {"loss_type": ["exo_pair"]}, {}, ValueError, "exo"),
    ("wpo_with_aot", {"loss_type": ["aot"], "use_weighting": True}, {}, ValueError, "use_weighting"),
    ("f_divergence_on_nca_pair", {"loss_type": ["nca_pair"], "f_divergence_type": "js_divergence"}, {}, ValueError,
     "f_divergence_type"),
    ("ld_alpha_out_of_range", {"ld_alpha": 1.5}, {}, ValueError, "ld_alpha"),
    ("torch_compile", {"torch_compile": True}, {}, NotImplementedError, "torch_compile"),
    ("fused_lm_head_options_without_fused_lm_head", {}, {"fused_lm_head_options": {"mode": "one_pass"}},
     ValueError, "use_fused_lm_head"),
    ("unknown_fused_lm_head_option", {}, {"use_fused_lm_head": True, "fused_lm_head_options": {"chunk": 4}},
     ValueError, "fused_lm_head_options"),
    ("use_fused_lm_head_not_bool", {}, {"use_fused_lm_head": "yes"}, TypeError, "use_fused_lm_head"),
    ("unknown_mode", {}, {"use_fused_lm_head": True, "fused_lm_head_options": {"mode": "fast"}},
     ValueError, r"mode must be one of \('auto', 'one_pass', 'two_phase', 'split'\), got 'fast'"),
    ("chunk_tokens_zero", {}, {"use_fused_lm_head": True, "fused_lm_head_options": {"chunk_tokens": 0}},
     ValueError, "chunk_tokens must be an int >= 1"),
    ("unknown_backend", {}, {"backend": "gpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("config, ours, error, match", [pytest.param(*r[1:], id=r[0]) for r in REFUSED])
def test_unsupported_options_raise_at_construction(config, ours, error, match, monkeypatch):
    policy, ref = make_models()
    prepared = []
    monkeypatch.setattr(trl.DPOTrainer, "_prepare_dataset", lambda self, *a, **k: prepared.append(1))
    with pytest.raises(error, match=match):
        build_trainer(FusedDPOTrainer, policy=policy, ref=ref, config=dpo_config(**config), **ours)
    assert not prepared, "the error must come before TRL processes the dataset"


def test_vision_datasets_are_refused():
    policy, ref = make_models()
    with pytest.raises(NotImplementedError, match="vision"):
        build_trainer(FusedDPOTrainer, policy=policy, ref=ref, rows=_vision_rows())


def test_fused_lm_head_refuses_sharded_lm_head(monkeypatch):
    """FSDP / ZeRO-3 shard the lm_head weight the hidden-state path reads (checked on the config)."""
    from dpo_kernels.integrations.trl import check_config

    config = dpo_config()
    monkeypatch.setattr(config, "fsdp", ["full_shard"], raising=False)
    with pytest.raises(NotImplementedError, match="FSDP"):
        check_config(config, use_fused_lm_head=True)
    check_config(config, use_fused_lm_head=False)  # the logits path reads nothing sharded


def test_num_tokens_is_counted_exactly_past_fp32s_integers():
    """The logged num_tokens adds each step's attention_mask.sum() exactly, as TRL does (int64):
    the metrics went to the host as one fp32 stack, which rounds a count past 2^24 (a step of
    256 ranks x 8 sequences x 8k tokens) to fp32's grid. Here one step's mask holds 2^24 + 3."""
    pol, ref = make_models()
    trainer = build_trainer(FusedDPOTrainer, policy=pol, ref=ref, config=dpo_config(max_steps=1))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert trainer._total_train_tokens == int(batch["attention_mask"].sum())
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    request = trainer._request(labels, loss_kwargs={**trainer._loss_kwargs,
                                                    "ref_logps": trainer._reference_logps(model_kwargs, labels)})
    result = trainer.model(**model_kwargs, dpo_kernels=request)
    before, n = trainer._total_train_tokens, 2 ** 24 + 3
    trainer._log_dpo_metrics("train", result, dict(batch, attention_mask=torch.ones(1, n, dtype=torch.long)),
                             batch["completion_mask"])
    assert trainer._total_train_tokens - before == n
    assert trainer._metrics["train"]["num_tokens"] == [before + n]
