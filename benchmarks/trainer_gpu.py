#!/usr/bin/env python
"""One DPO training step, stock TRL ``DPOTrainer`` vs ``FusedDPOTrainer`` (logits path and fused lm head).

    python benchmarks/trainer_gpu.py [--pythonpath DIR] [--out DIR]      # on a CUDA machine
    python benchmarks/trainer_gpu.py --smoke --out /tmp/trainer_gpu        # CPU, tiny shapes

A Llama-like model built from a config (no download; default vocabulary 128256, hidden 2048, 2
layers, bf16) and one synthetic preference batch (default 8 pairs x 1024 tokens, the first 25% of
each sequence the shared prompt, some padding). For each variant, from the same initial weights:
the trainer's own ``training_step`` (forward + backward through its ``compute_loss``) plus its
optimizer's step, timed with CUDA events (median after warm-up), peak memory during the timed steps
(``torch.cuda.max_memory_allocated``, absolute and above what was allocated before the step), and
the first step's loss and reward margin (same weights, same batch: they must agree).

Variants: ``trl`` (TRL 1.16's default path: its own chunked Triton lm-head kernel), ``ours-logits``
(``FusedDPOTrainer``: the model's logits scored in place by ``fused_dpo_loss``), ``ours-fused``
(``FusedDPOTrainer(use_fused_lm_head=True)``: ``fused_linear_dpo_loss`` on the hidden states, no
logits). The reference is a separate reference model (TRL's default) or, with
``--reference precomputed``, per-sequence log-probs in the batch.

Writes ``<out>/trainer_gpu.md`` and ``<out>/trainer_gpu.json`` (rewritten after each variant, so an
interrupted run keeps what it measured); a variant that fails becomes a row saying why. ``--out``
defaults to ``$OUT``, else the current directory. TRL and ``datasets`` can live in a
``pip install --no-deps --target DIR`` directory: pass it with ``--pythonpath DIR``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VARIANTS = ("trl", "ours-logits", "ours-fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pythonpath", action="append", default=[], metavar="DIR",
                   help="directory prepended to sys.path (e.g. a pip --target dir with trl, datasets); repeatable")
    p.add_argument("--out", default=None, help="output directory (default $OUT, else .)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32 (exercises every code path)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="start no new variant after this many seconds (default 480)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {VARIANTS}")
    p.add_argument("--reference", choices=("model", "precomputed"), default="model",
                   help="a reference model run every step (TRL's default) or precomputed log-probs in the batch")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke 32)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 128256; smoke 515)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 2048; smoke 64)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant (default 5; smoke 2)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {"pairs": (8, 2), "seq": (1024, 32), "vocab": (128256, 515), "hidden": (2048, 64), "layers": (2, 2),
                "warmup": (2, 1), "iters": (5, 2)}
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if smoke else gpu)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose among {VARIANTS}")
    args.out = args.out or os.environ.get("OUT") or "."
    return args


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------------------------
# The model, the tokenizer (only for the trainers' construction) and the batch


def model_config(args, transformers):
    heads = max(1, args.hidden // 128)
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64 or 128,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max(2048, args.seq), pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False, attn_implementation="eager" if args.smoke else "sdpa",
    )


def tokenizer(transformers):
    import tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(64)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def make_batch(args, torch, device):
    """[chosen rows; rejected rows]: pair i shares its prompt (the first 25% of the tokens); every
    fourth sequence ends with 10% padding."""
    g = torch.Generator().manual_seed(0)
    P, T = args.pairs, args.seq
    prompt = max(1, T // 4)
    input_ids = torch.randint(3, args.vocab, (2 * P, T), generator=g)
    input_ids[P:, :prompt] = input_ids[:P, :prompt]
    attention_mask = torch.ones(2 * P, T, dtype=torch.long)
    completion_mask = torch.ones(2 * P, T, dtype=torch.long)
    completion_mask[:, :prompt] = 0
    for row in range(0, 2 * P, 4):
        pad = max(1, T // 10)
        attention_mask[row, -pad:] = 0
        completion_mask[row, -pad:] = 0
        input_ids[row, -pad:] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "completion_mask": completion_mask.to(device)}


def initial_states(args, mods, device, dtype) -> dict:
    """The policy's initial weights and the reference's: the policy moved by a little noise, so that the
    first step's log-ratios (and so its loss) depend on the log-probs the variants compute."""
    torch, transformers = mods["torch"], mods["transformers"]
    torch.manual_seed(0)
    with torch.device(device):
        reference = transformers.LlamaForCausalLM(model_config(args, transformers)).to(dtype).state_dict()
    g = torch.Generator(device=device).manual_seed(1)
    policy = {k: v + 0.002 * torch.randn(v.shape, generator=g, device=device, dtype=torch.float32).to(dtype)
              for k, v in reference.items()}
    return {"policy": policy, "reference": reference}


# --------------------------------------------------------------------------------------------
# One variant


def build_trainer(variant, args, states, mods, device, dtype, *, ref_model=True):
    """A trainer on a fresh model with the initial weights: with a reference model, or (``ref_model=False``)
    with ``precompute_ref_log_probs=True`` so that each step reads the reference from the batch."""
    torch, transformers, trl, datasets = mods["torch"], mods["transformers"], mods["trl"], mods["datasets"]
    from dpo_kernels.integrations.trl import FusedDPOTrainer

    config = model_config(args, transformers)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(states["policy"])
    ref = None
    if ref_model:
        ref = copy.deepcopy(model).eval()
        ref.load_state_dict(states["reference"])
        for p in ref.parameters():
            p.requires_grad_(False)
    dpo_args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trainer_gpu_"), report_to=[], save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=args.pairs, gradient_checkpointing=False, max_length=None, seed=0,
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu", learning_rate=1e-6,
        precompute_ref_log_probs=not ref_model,
    )
    rows = [{"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}] * max(2, args.pairs)
    cls, extra = trl.DPOTrainer, {}
    if variant.startswith("ours"):
        cls, extra = FusedDPOTrainer, {"use_fused_lm_head": variant == "ours-fused"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model, ref_model=ref, args=dpo_args, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=tokenizer(transformers), **extra)


class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self.t0)
        return False


def run_variant(variant, args, states, batch, mods, device, dtype) -> dict:
    torch = mods["torch"]
    row = {"variant": variant}
    trainer = build_trainer(variant, args, states, mods, device, dtype, ref_model=args.reference == "model")
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its steps
    model = trainer.model
    times, peaks, above = [], [], []
    for step in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        trainer._metrics["train"].clear()
        with Timer(torch, device) as timer:
            loss = trainer.training_step(model, dict(batch))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step == 0:  # same weights, same batch on every variant
            row["loss"] = float(loss)
            row["margin"] = trainer._metrics["train"]["rewards/margins"][-1]
            row["logps_chosen"] = trainer._metrics["train"]["logps/chosen"][-1]
        if step >= args.warmup:
            times.append(timer.ms)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated())
                above.append(torch.cuda.max_memory_allocated() - before)
    row["median_ms"] = statistics.median(times)
    row["min_ms"] = min(times)
    row["peak_bytes"] = max(peaks) if peaks else None
    row["peak_above_bytes"] = max(above) if above else None
    del trainer, optimizer, model
    return row


def reference_logps(args, states, batch, mods, device, dtype):
    """Precomputed reference sums for --reference precomputed (with TRL's own method)."""
    torch = mods["torch"]
    trainer = build_trainer("trl", args, states, mods, device, dtype)
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, dict(batch))
    del trainer
    return chosen.float(), rejected.float()


# --------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def render(env, args, rows) -> str:
    lines = [
        "# One DPO training step: TRL DPOTrainer vs FusedDPOTrainer",
        "",
        f"{env['when']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {env['trl']}, triton {env['triton']}, commit {env['commit']}.",
        "",
        f"Model: Llama, vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers, {env['dtype']}; "
        f"batch {args.pairs} pairs x {args.seq} tokens (25% prompt); reference: {args.reference}. One step = "
        f"the trainer's training_step (forward + backward) + its optimizer's step; median of {args.iters} "
        f"after {args.warmup} warm-up (CUDA events on a GPU). Peak = torch.cuda.max_memory_allocated during "
        "the step (absolute, and above what was allocated before it). Loss and reward margin: the first step, "
        "same weights and batch for every variant.",
        "",
        "| variant | median step | min step | peak memory | peak above start | loss (step 1) | |loss - TRL| "
        "| reward margin (step 1) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in rows if r["variant"] == "trl" and "loss" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | | | | | | {r['error']} |")
            continue
        diff = "" if base is None or r is base else f"{abs(r['loss'] - base['loss']):.2e}"
        speed = ""
        if base is not None and r is not base:
            speed = f"{base['median_ms'] / r['median_ms']:.2f}x TRL's speed"
            if r["peak_above_bytes"] and base["peak_above_bytes"]:
                speed += f", {r['peak_above_bytes'] / base['peak_above_bytes']:.2f}x its step memory"
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.2f} ms | {r['min_ms']:.2f} ms | {fmt_bytes(r['peak_bytes'])} "
            f"| {fmt_bytes(r['peak_above_bytes'])} | {r['loss']:.6f} | {diff} | {r['margin']:.5f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def environment(mods, device, dtype) -> dict:
    torch = mods["torch"]

    def version(name):
        try:
            return __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - an absent package is a fact of the report
            return f"unavailable ({type(exc).__name__})"

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "torch": torch.__version__, "transformers": version("transformers"), "trl": version("trl"),
        "triton": version("triton"), "python": platform.python_version(), "commit": commit,
        "dtype": str(dtype).replace("torch.", ""),
    }


def write(out_dir, env, args, rows) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "trainer_gpu.md"), "w") as f:
        f.write(render(env, args, rows))
    with open(os.path.join(out_dir, "trainer_gpu.json"), "w") as f:
        json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1, default=str)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path in reversed(args.pythonpath):
        sys.path.insert(0, os.path.abspath(path))
    sys.path.insert(0, REPO)  # the checkout, installed or not
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    mods = {"torch": torch, "transformers": transformers, "trl": trl, "datasets": datasets}
    env = environment(mods, device, dtype)
    log(f"{env['device']}: torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}")

    states = initial_states(args, mods, device, dtype)
    batch = make_batch(args, torch, device)
    rows = []
    if args.reference == "precomputed":
        try:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference_logps(
                args, states, batch, mods, device, dtype)
        except Exception as exc:  # noqa: BLE001 - the report says why, the run goes on
            rows.append({"variant": "reference", "error": f"precomputing the reference failed: {first_line(exc)}"})
            write(args.out, env, args, rows)
            return 1
    for variant in args.variants:
        if time.perf_counter() - T0 > args.budget_s:
            rows.append({"variant": variant, "error": f"skipped: the {args.budget_s:.0f} s budget was spent"})
            write(args.out, env, args, rows)
            continue
        log(f"{variant} ...")
        try:
            rows.append(run_variant(variant, args, states, batch, mods, device, dtype))
            log(f"{variant}: {rows[-1]['median_ms']:.2f} ms, peak {fmt_bytes(rows[-1]['peak_bytes'])}, "
                f"loss {rows[-1]['loss']:.6f}")
        except Exception as exc:  # noqa: BLE001 - one failing variant (OOM, ...) becomes a row
            traceback.print_exc()
            rows.append({"variant": variant, "error": first_line(exc)})
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(args.out, env, args, rows)
    print(render(env, args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
