"""``python -m dpo_kernels demo``: DPO-train a tiny causal LM with ``FusedDPOTrainer``, beside TRL.

Nothing is downloaded. The model is a small Llama built from a config (random weights), the
tokenizer a word-level ``tokenizers`` tokenizer built from the data, the data the preference pairs
shipped in ``dpo_kernels/data/preferences.jsonl`` (small arithmetic and comparison questions: the
chosen answer is right, the rejected one a near miss, so the preference can be learned). The
reference log-probs are precomputed (``precompute_ref_log_probs=True``).

The run trains with ``dpo_kernels.integrations.trl.FusedDPOTrainer`` (the hidden-state path by
default, ``--logits`` for the logits path) for ``--steps`` steps with a progress bar, printing
reward accuracy and margins as they rise; then (unless ``--no-compare``) repeats the same run
(same seed, data and initial weights) with TRL's stock ``DPOTrainer``; then evaluates both on
held-out pairs, prints a table of step time and peak memory, and saves the curves as a PNG.

Measurements:
- step time: wall clock of each optimizer step (forward, backward, optimizer), the median over
  the steps after the first 5 (``torch.cuda.synchronize`` first on a GPU);
- peak memory, GPU: ``torch.cuda.max_memory_allocated()`` during ``train()`` minus what was
  allocated before (model, data, optimizer states once created);
- peak memory, CPU: the process's peak resident set size during ``train()`` (Linux ``VmHWM``,
  reset through ``/proc/self/clear_refs`` before each run) minus the resident size before it.
  It counts every allocation of the process (Python, the allocator's caching), so on a tiny
  model it is a coarse number; where the reset is not possible it is reported as unavailable.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources

from ._argtypes import positive_float, positive_int, seed

DEFAULT_STEPS = 300
SMOOTH = 20  # moving-average window of the printed and plotted curves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--out", default="dpo_kernels_demo",
                        help="directory for demo.png and demo.json (default ./dpo_kernels_demo)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available, else CPU")
    parser.add_argument("--no-compare", action="store_true", help="skip the stock TRL DPOTrainer run")
    parser.add_argument("--logits", action="store_true",
                        help="our logits path (fused_dpo_loss on the model's logits) instead of the fused lm head")
    parser.add_argument("--batch", type=positive_int, default=16, help="preference pairs per step (default 16)")
    parser.add_argument("--vocab", type=positive_int, default=8192,
                        help="the model's vocabulary size (the tokenizer uses ~40 of them; default 8192)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (default 3e-3)")
    parser.add_argument("--beta", type=positive_float, default=0.1, help="DPO beta (default 0.1)")
    parser.add_argument("--seed", type=seed, default=0, help="seeds the model's weights and the runs (default 0)")
    parser.add_argument("--print-every", type=positive_int, default=50,
                        help="print a progress line every N steps (default 50)")


# --------------------------------------------------------------------------------------------
# Data, tokenizer, model


def load_rows() -> list[dict]:
    """The shipped preference pairs: dicts with prompt, chosen, rejected, split."""
    text = resources.files("dpo_kernels").joinpath("data/preferences.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(rows):
    """A word-level tokenizer over the words of the data (whitespace-split), built in code."""
    import tokenizers
    import transformers

    words = sorted({w for row in rows for key in ("prompt", "chosen", "rejected") for w in row[key].split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def build_model(vocab_size: int, seed: int):
    """A 2-layer Llama with random weights (hidden 64), from a config."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------
# Measurement


def _proc_status_kib(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` in KiB (``VmHWM``, ``VmRSS``); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak memory above the starting level during a ``with`` block (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.bytes: int | None = None
        self.how = ""

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated above the start"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._base = _proc_status_kib("VmRSS")
            self.how = "peak RSS (VmHWM) above the start"
        except OSError:
            self._base = None
            self.how = "unavailable (cannot reset the peak RSS here)"
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            peak = _proc_status_kib("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._base) * 1024
        return False


@dataclass
class RunResult:
    name: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    peak_how: str = ""
    eval_metrics: dict = field(default_factory=dict)

    @property
    def median_step_ms(self) -> float:
        times = self.step_seconds[5:] or self.step_seconds
        return 1e3 * statistics.median(times) if times else float("nan")


def _moving_average(values, window=SMOOTH):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _progress_callback(result: RunResult, total: int, print_every: int, device):
    """A TrainerCallback: progress bar, per-step timing and metrics into ``result``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total, desc=result.name, unit="step", dynamic_ncols=True, leave=True)

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            result.step_seconds.append(time.perf_counter() - self.t0)
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "rewards/accuracies" not in logs or "loss" not in logs:
                return
            result.steps.append(state.global_step)
            result.loss.append(float(logs["loss"]))
            result.accuracy.append(float(logs["rewards/accuracies"]))
            result.margin.append(float(logs["rewards/margins"]))
            acc, margin = _moving_average(result.accuracy)[-1], _moving_average(result.margin)[-1]
            self.bar.set_postfix(loss=f"{result.loss[-1]:.3f}", acc=f"{acc:.2f}", margin=f"{margin:.2f}")
            if state.global_step % print_every == 0 or state.global_step == 1:
                self.bar.write(
                    f"  {result.name:<28} step {state.global_step:4d}  loss {_moving_average(result.loss)[-1]:.4f}  "
                    f"reward accuracy {acc:.2f}  reward margin {margin:+.3f}  (mean of the last {SMOOTH} steps)"
                )

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


# --------------------------------------------------------------------------------------------
# One run


def _quiet():
    """Silence the libraries' info logs and the datasets progress bars for the runs."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)


def run_one(name: str, trainer_cls, extra: dict, *, model, tokenizer, train_rows, eval_rows, args, device,
            workdir: str) -> RunResult:
    import datasets
    import torch
    import transformers
    import trl

    config = trl.DPOConfig(
        output_dir=workdir, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1,
        max_steps=args.steps, per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", beta=args.beta, seed=args.seed,
        precompute_ref_log_probs=True, gradient_checkpointing=False, max_length=64,
        use_cpu=device.type == "cpu", bf16=device.type == "cuda", fp16=False,
    )
    result = RunResult(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter of transformers/TRL, not ours to fix
        trainer = trainer_cls(
            model=copy.deepcopy(model), args=config, processing_class=copy.deepcopy(tokenizer),
            train_dataset=datasets.Dataset.from_list(train_rows), eval_dataset=datasets.Dataset.from_list(eval_rows),
            callbacks=[_progress_callback(result, args.steps, args.print_every, device)], **extra,
        )
        trainer.remove_callback(transformers.PrinterCallback)  # our progress bar prints instead
        with PeakMemory(device) as peak:
            trainer.train()
        result.peak_bytes, result.peak_how = peak.bytes, peak.how
        result.eval_metrics = trainer.evaluate()
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------------
# Report


def _fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def summary_table(results: list[RunResult]) -> str:
    head = "| | " + " | ".join(r.name for r in results) + " |"
    rule = "|---|" + "---|" * len(results)
    rows = [
        ("step time (median)", [f"{r.median_step_ms:.1f} ms" for r in results]),
        (f"peak memory ({results[0].peak_how})", [_fmt_bytes(r.peak_bytes) for r in results]),
        (f"reward accuracy, last {SMOOTH} steps", [f"{_moving_average(r.accuracy)[-1]:.2f}" if r.accuracy else "n/a"
                                                   for r in results]),
        (f"reward margin, last {SMOOTH} steps", [f"{_moving_average(r.margin)[-1]:+.3f}" if r.margin else "n/a"
                                                 for r in results]),
        ("held-out reward accuracy", [f"{r.eval_metrics.get('eval_rewards/accuracies', float('nan')):.2f}"
                                      for r in results]),
    ]
    return "\n".join([head, rule] + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows])


def loss_agreement(ours: RunResult, theirs: RunResult) -> dict:
    """Largest |loss difference| over the first 10 steps and over the whole run, and the first step
    where it passes 1e-3 (float32 rounding differences grow as training goes on, as between any two
    implementations)."""
    diffs = [abs(a - b) for a, b in zip(ours.loss, theirs.loss)]
    apart = next((step for step, d in zip(ours.steps, diffs) if d > 1e-3), None)
    return {"first_10_steps": max(diffs[:10], default=float("nan")), "all_steps": max(diffs, default=float("nan")),
            "first_step_apart_1e-3": apart}


def save_plot(results: list[RunResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("loss", "DPO loss"), ("accuracy", "reward accuracy"), ("margin", "reward margin (chosen - rejected)"))
    for ax, (attr, title) in zip(axes, panels):
        for r, style in zip(results, ("-", "--")):
            values = getattr(r, attr)
            line, = ax.plot(r.steps, values, style, alpha=0.25, linewidth=0.8)
            ax.plot(r.steps, _moving_average(values), style, color=line.get_color(), linewidth=2,
                    label=f"{r.name} ({SMOOTH}-step mean)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    times = ", ".join(f"{r.name}: {r.median_step_ms:.1f} ms/step, peak {_fmt_bytes(r.peak_bytes)}" for r in results)
    fig.suptitle(f"DPO on a tiny Llama ({times})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def main(args: argparse.Namespace) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: exists and is not a directory (demo.png and demo.json go in it)")
    device = _device(args.device)
    _quiet()
    import trl

    from .integrations.trl import FusedDPOTrainer

    rows = load_rows()
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    tokenizer = build_tokenizer(rows)
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab must be at least the tokenizer's {len(tokenizer)} tokens")
    model = build_model(args.vocab, args.seed)
    path = "logits path" if args.logits else "fused lm head"
    print(f"DPO demo: a 2-layer Llama (hidden 64, vocabulary {args.vocab}), {len(train_rows)} preference pairs "
          f"({len(eval_rows)} held out), {args.steps} steps of {args.batch} pairs on {device.type}")

    os.makedirs(args.out, exist_ok=True)
    runs = [(f"dpo_kernels ({path})", FusedDPOTrainer, {"use_fused_lm_head": not args.logits})]
    if not args.no_compare:
        runs.append(("TRL DPOTrainer", trl.DPOTrainer, {}))
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo_kernels_demo_") as workdir:
        for name, cls, extra in runs:
            results.append(run_one(name, cls, extra, model=model, tokenizer=tokenizer, train_rows=train_rows,
                                   eval_rows=eval_rows, args=args, device=device, workdir=workdir))

    print()
    print(summary_table(results))
    report = {"device": device.type, "steps": args.steps, "batch": args.batch, "vocab": args.vocab,
              "runs": [{"name": r.name, "median_step_ms": r.median_step_ms, "peak_bytes": r.peak_bytes,
                        "peak_memory": r.peak_how, "loss": r.loss, "reward_accuracy": r.accuracy,
                        "reward_margin": r.margin, "eval": r.eval_metrics} for r in results]}
    if len(results) == 2:
        agreement = loss_agreement(results[0], results[1])
        report["loss_agreement"] = agreement
        apart = agreement["first_step_apart_1e-3"]
        print(f"\nSame loss as TRL: largest |difference| {agreement['first_10_steps']:.2e} over the first 10 steps"
              + (f"; the runs drift more than 1e-3 apart from step {apart} on (rounding differences grow as "
                 "training goes on)." if apart else f", {agreement['all_steps']:.2e} over all {args.steps}."))
        ratio = results[1].median_step_ms / results[0].median_step_ms
        print(f"Step time: TRL / dpo_kernels = {ratio:.2f}x on {device.type}.")
    png = os.path.join(args.out, "demo.png")
    save_plot(results, png)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"Curves: {png}; numbers: {os.path.join(args.out, 'demo.json')}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.demo",
                                     description=__doc__.split("\n")[0].split(": ", 1)[-1].replace("``", ""))
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
