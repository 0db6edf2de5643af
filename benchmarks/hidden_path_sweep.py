#!/usr/bin/env python
"""Tuning sweep of the hidden-state path (``fused_linear_dpo_loss``) at one shape, on a GPU.

    python benchmarks/hidden_path_sweep.py [--out DIR] [--pythonpath DIR]   # CUDA
    python benchmarks/hidden_path_sweep.py --smoke --out /tmp/sweep          # CPU, tiny shape

What ``gpu_report.py`` measures with the defaults, this measures across the knobs the defaults are
chosen from, so a change of default is backed by a number:

1. which way an fp32 result is formed from bf16 operands on this device
   (:func:`dpo_kernels.linear.fp32_mm_path`);
2. correctness of the multi-chunk code paths against float64 at a reduced batch (one_pass with one
   pair per chunk; two_phase with several token chunks per vocabulary slice, so the fp32 slice
   accumulator runs), as gpu_report.py's check does for the defaults;
3. forward + backward time (CUDA events, median) and extra peak memory of ``one_pass`` per
   ``chunk_tokens`` and of ``two_phase`` and ``split`` per ``vocab_chunk`` (and split with its
   forward-and-gradient forced to one kernel), beside the 3- and 4-matmul floors at
   the bf16 matmul rate measured in the same process;
4. where the time goes: ``torch.profiler`` CUDA time by kernel for the default of each mode
   (GEMMs vs our kernels vs the rest).

Writes ``hidden_path_sweep.md`` to ``--out`` (default ``$OUT``, else ``.``), rewritten after every row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pythonpath", action="append", default=[], metavar="DIR")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (exercises every code path)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new rows after this many seconds")
    return p.parse_args(argv)


ARGS = parse_args()
for _path in reversed(ARGS.pythonpath):
    sys.path.insert(0, os.path.abspath(_path))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from baselines_hidden import HiddenShape, make_hidden_batch, near_reference_logps  # noqa: E402
import baselines_hidden  # noqa: E402
from dpo_kernels import fused_linear_dpo_loss, linear  # noqa: E402
from dpo_kernels.backends.triton.config import (set_forward_and_grad_fusion, set_logits_grad_fusion,  # noqa: E402
                                                set_matmul_config_override)
from dpo_kernels.bench import BETA, IGNORE_INDEX, fmt_bytes, markdown_table, peak_extra_bytes, release_memory, time_ms  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Doc:
    def __init__(self, path: str):
        self.path, self.parts = path, []

    def add(self, text: str) -> None:
        self.parts.append(text)
        with open(self.path, "w") as f:
            f.write("\n\n".join(self.parts) + "\n")


def matmul_tflops(device, smoke: bool) -> float | None:
    if smoke:
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = statistics.median(time_ms(lambda: a @ b, device, iters=10, warmup=3))
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


# Not an argument of fused_linear_dpo_loss: a variant with this knob runs with the Triton
# backend's forward-and-gradient forced to one kernel (True) or two (False), whatever
# config.fuse_forward_and_grad's rule would take at this vocabulary (split's forward).
ONE_KERNEL = "one_kernel_forward_and_grad"
# Likewise: the backward's slice logits turned into their gradient by the fused Triton matmul
# (True; at the tile baselines_hidden.swept_matmul_config names, if any) or by cuBLAS and the
# backward kernel (False), whatever config.fuse_logits_grad says.
FUSED_MATMUL = "fused_logits_grad_matmul"


def loss_fn(mode: str, **knobs):
    one_kernel = knobs.pop(ONE_KERNEL, None)
    fused_matmul = knobs.pop(FUSED_MATMUL, None)

    def fn(hidden, weight, labels, ref):
        # Every call sets both (None restores the rule). They stay set after the return, since
        # the backward (after it) reads the second: reset_rules() ends a variant.
        set_forward_and_grad_fusion(one_kernel)
        set_logits_grad_fusion(fused_matmul)
        # At the token sweep's fastest tile when gpu_checks.sh passes one (else the default).
        set_matmul_config_override(baselines_hidden.swept_matmul_config() if fused_matmul else None,
                                   dtypes=(torch.bfloat16, torch.float16))
        return fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, beta=BETA, ignore_index=IGNORE_INDEX,
                                     mode=mode, validate=False, **knobs).loss
    return fn


def reset_rules() -> None:
    """The Triton backend's own rules again, after a variant that forced them."""
    set_forward_and_grad_fusion(None)
    set_logits_grad_fusion(None)
    set_matmul_config_override(None)


def check_paths(doc: Doc, shape: HiddenShape, device) -> None:
    """Multi-chunk paths against float64 (the loss, valid hidden rows, weight rows of the labels)."""
    hidden, weight, labels = make_hidden_batch(shape, device, seed=5)
    ref = near_reference_logps(hidden, weight, labels, seed=6)
    mask = labels != IGNORE_INDEX
    wrows = torch.unique(labels[mask])[:256]
    loss64, gh64, gw64 = baselines_hidden.float64_oracle(hidden, weight, labels, ref, wrows)
    per_pair = int(mask.view(2, shape.pairs, -1).sum((0, 2)).max())
    cases = [
        ("eager (materialized bf16 logits)", baselines_hidden.eager),
        ("one_pass, default chunk", loss_fn("one_pass")),
        ("one_pass, one pair per chunk", loss_fn("one_pass", chunk_tokens=per_pair)),
        (f"one_pass, pieces of {max(1, per_pair // 3)} tokens (earlier pieces' logits formed again)",
         loss_fn("one_pass", chunk_tokens=max(1, per_pair // 3))),
        ("two_phase, default", loss_fn("two_phase")),
        (f"two_phase, {max(1, per_pair // 3)} tokens per backward chunk (fp32 slice accumulator)",
         loss_fn("two_phase", chunk_tokens=max(1, per_pair // 3))),
        ("split, default", loss_fn("split")),
        ("split, backward slices' logits gradient in the fused Triton matmul", loss_fn("split", **{FUSED_MATMUL: True})),
        ("two_phase, backward slices' logits gradient in the fused Triton matmul",
         loss_fn("two_phase", **{FUSED_MATMUL: True})),
        (f"split, forward and backward chunks of {max(1, per_pair // 3)} tokens",
         loss_fn("split", chunk_tokens=max(1, per_pair // 3))),
    ]
    rows = []
    for name, fn in cases:
        try:
            loss = fn(hidden, weight, labels, ref) if fn is not baselines_hidden.eager else fn(hidden, weight, labels,
                                                                                                 ref, BETA)
            gh, gw = torch.autograd.grad(loss, (hidden, weight))
            rows.append([name, f"{abs(float(loss) - float(loss64)):.2e}", f"{baselines_hidden.row_rel_err(gh[mask], gh64[mask]):.2e}",
                         f"{baselines_hidden.row_rel_err(gw[wrows], gw64):.2e}", str(int((gh[~mask] != 0).any(-1).sum()))])
        except Exception as exc:  # a row saying why, never an aborted sweep
            log(traceback.format_exc(limit=4))
            rows.append([name, f"raised {type(exc).__name__}: {str(exc)[:200]}", "", "", ""])
        finally:
            reset_rules()
    doc.add(f"## Multi-chunk paths against float64 ({shape.describe()})\n\n"
            + markdown_table(["variant", "loss err", "grad hidden err (rel to row)", "grad weight err (rel to row)",
                              "ignored rows != 0"], rows))


def sweep(doc: Doc, shape: HiddenShape, device, tflops, iters, warmup, budget_s) -> None:
    hidden, weight, labels = make_hidden_batch(shape, device, seed=0)
    ref = near_reference_logps(hidden, weight, labels)
    per_pair = int((labels != IGNORE_INDEX).view(2, shape.pairs, -1).sum((0, 2)).max())
    flops = shape.matmul_flops
    floor = {k: k * flops / (tflops * 1e12) * 1e3 if tflops else None for k in (3, 4)}
    # one_pass: the default budget (768 MiB: two pairs here), one pair per chunk (512 MiB's, the
    # default before run D), every pair in one chunk.
    variants = [("one_pass", {}), ("one_pass", {"chunk_tokens": per_pair}),
                ("one_pass", {"chunk_tokens": shape.pairs * per_pair})]
    # one_pass below a pair (pieces; the low-memory trade-off: logits formed again for the
    # earlier pieces of each pair).
    variants += [("one_pass", {"chunk_tokens": 768})]
    # two_phase's default slice is the hidden size (4096 here).
    variants += [("two_phase", {})] + [("two_phase", {"vocab_chunk": 8192})]
    # The backward's slice logits turned into their gradient in the fused Triton matmul's epilogue
    # (config.fuse_logits_grad: on a GPU not until timed), split and two_phase at their defaults.
    # Early in the list, so the budget never cuts them; split's default beside them.
    variants += [("split", {}), ("split", {FUSED_MATMUL: True}), ("two_phase", {FUSED_MATMUL: True})]
    # split: no fp32 accumulator across slices, so wider slices cost only their logits; smaller
    # forward chunks (its forward's peak) cost matmul efficiency. Its default slice is 2 H where
    # every valid token fits one chunk of it (8192 rows here), else H: H and 4 H beside it.
    variants += [("split", {"vocab_chunk": v}) for v in (shape.hidden, 4 * shape.hidden)]
    variants += [("split", {"chunk_tokens": 2048})]
    # split's forward-and-gradient in the forward kernel (one kernel) at this vocabulary, beside
    # the rule's choice above (config.fuse_forward_and_grad: two kernels at Llama-3's 256 KB rows).
    variants += [("split", {ONE_KERNEL: True})]
    if shape.vocab < 8192:  # smoke
        variants = [("one_pass", {}), ("one_pass", {"chunk_tokens": 1}), ("one_pass", {"chunk_tokens": 7}),
                    ("two_phase", {}), ("two_phase", {"vocab_chunk": 300}), ("split", {}),
                    ("split", {"vocab_chunk": 300}), ("split", {ONE_KERNEL: False}),
                    ("split", {FUSED_MATMUL: False}), ("two_phase", {FUSED_MATMUL: False})]
    rows = []
    header = ["mode", "knobs", "median ms", "min ms", "x floor (3 mm)", "x floor (4 mm)", "extra peak memory", "note"]
    title = (f"## Time and memory ({shape.describe()}; the gradients themselves: {fmt_bytes(shape.grads_bytes)}; "
             f"floors 3 mm {floor[3] or 0:.2f} ms, 4 mm {floor[4] or 0:.2f} ms at {tflops or 0:.0f} TFLOP/s)")
    for mode, knobs in variants:
        label = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "defaults"
        if time.perf_counter() - T0 > budget_s:
            rows.append([mode, label, "", "", "", "", "", "not run: budget spent"])
            continue
        fn = loss_fn(mode, **knobs)

        def step():
            return torch.autograd.grad(fn(hidden, weight, labels, ref), (hidden, weight))

        try:
            times = time_ms(step, device, iters, warmup)
            peak = peak_extra_bytes(step, device)
            med = statistics.median(times)
            rows.append([mode, label, f"{med:.3f}", f"{min(times):.3f}",
                         f"{med / floor[3]:.2f}x" if floor[3] else "n/a", f"{med / floor[4]:.2f}x" if floor[4] else "n/a",
                         fmt_bytes(peak) + (f" ({peak / shape.grads_bytes:.2f}x grads)" if peak else ""), ""])
        except Exception as exc:
            log(traceback.format_exc(limit=4))
            rows.append([mode, label, "", "", "", "", "", f"raised {type(exc).__name__}: {str(exc)[:200]}"])
        reset_rules()
        release_memory(device)
        log(f"{mode} {label}: {rows[-1][2]} ms")
        doc.parts = [p for p in doc.parts if not p.startswith("## Time and memory")]
        doc.add(title + "\n\n" + markdown_table(header, rows))
    profile(doc, hidden, weight, labels, ref, device)


def profile(doc: Doc, hidden, weight, labels, ref, device) -> None:
    """Kernel time of one step of each mode's default, by kernel and grouped, beside the step's
    wall time: the difference is time the device sat idle (host work, launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for mode in ("one_pass", "two_phase", "split"):
        fn = loss_fn(mode)
        try:
            torch.autograd.grad(fn(hidden, weight, labels, ref), (hidden, weight))
            with torch_profile(activities=activities) as prof:
                t0 = time.perf_counter()
                with torch.profiler.record_function("sweep_step"):
                    torch.autograd.grad(fn(hidden, weight, labels, ref), (hidden, weight))
                    if cuda:
                        torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - t0) * 1e3
            want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
            kernels: dict[str, list[float]] = {}
            for e in prof.events():
                if e.device_type != want or (not cuda and not e.name.startswith(("aten::", "dpo_kernels::"))):
                    continue
                if cuda and _is_annotation(e):  # the GPU track of record_function: not a kernel
                    continue
                if not cuda and e.cpu_parent is not None and e.cpu_parent.name != "sweep_step":  # CPU: top-level ops
                    continue
                kernels.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
            items = sorted(((k, len(v), sum(v)) for k, v in kernels.items()), key=lambda x: -x[2])
            total = sum(t for _, _, t in items)
            groups = {"GEMM": 0.0, "ours (token kernels)": 0.0, "other": 0.0}
            for name, _, t in items:
                low = name.lower()
                g = ("GEMM" if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm"))
                     else "ours (token kernels)" if "logprob" in low else "other")
                groups[g] += t
            grows = [[g, f"{t:.3f}"] for g, t in groups.items()]
            grows += [["sum of kernels", f"{total:.3f}"], ["wall time of the step (profiled)", f"{wall_ms:.3f}"],
                      ["device idle (wall - kernels)", f"{wall_ms - total:.3f}"]]
            rows = [[k[:100], str(n), f"{t:.3f}"] for k, n, t in items[:16]]
            gaps = idle_gaps(prof, want) if cuda else ""
            doc.add(f"## Profile of one `{mode}` step (defaults; {'CUDA kernels' if cuda else 'CPU top-level ops'})\n\n"
                    + markdown_table(["", "ms"], grows) + "\n\n" + markdown_table(["kernel", "calls", "ms"], rows)
                    + gaps + phases(fn, hidden, weight, labels, ref, device))
        except Exception as exc:
            log(traceback.format_exc(limit=4))
            doc.add(f"## Profile of one `{mode}` step: raised {type(exc).__name__}: {str(exc)[:200]}")


def _is_annotation(event) -> bool:
    """A ``record_function`` range mirrored on the GPU track (it spans the kernels launched inside
    it: counted as a kernel it hides every gap and doubles the kernel time)."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name == "sweep_step"


def phases(fn, hidden, weight, labels, ref, device, reps: int = 5) -> str:
    """Without the profiler (whose own start-up shows up as idle time): CUDA events at the step's
    start, just before the first lm_head matmul is queued, between forward and backward and at
    the end, beside the host's clock at the same points. The device's time to its first matmul is
    the step's fixed cost before the GEMMs (host work, the host sync, small kernels)."""
    if device.type != "cuda":
        return ""
    original = linear.logits_matmul
    rows = {k: [] for k in ("host: start -> first matmul queued", "device: start -> first matmul starts",
                            "device: first matmul -> end of forward", "device: backward", "device: whole step",
                            "host: whole step (until the backward returned)")}
    for _ in range(reps):
        marks = {}

        def first_mark(*args, **kwargs):
            if "mm" not in marks:
                marks["mm_host"] = time.perf_counter()
                marks["mm"] = torch.cuda.Event(enable_timing=True)
                marks["mm"].record()
            return original(*args, **kwargs)

        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        linear.logits_matmul = first_mark
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            events[0].record()
            loss = fn(hidden, weight, labels, ref)
            events[1].record()
            grads = torch.autograd.grad(loss, (hidden, weight))
            events[2].record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
        finally:
            linear.logits_matmul = original
        del grads, loss
        if "mm" not in marks:
            return "\n\nPhases: the first matmul was not seen (no valid token?)."
        rows["host: start -> first matmul queued"].append((marks["mm_host"] - t0) * 1e3)
        rows["device: start -> first matmul starts"].append(events[0].elapsed_time(marks["mm"]))
        rows["device: first matmul -> end of forward"].append(marks["mm"].elapsed_time(events[1]))
        rows["device: backward"].append(events[1].elapsed_time(events[2]))
        rows["device: whole step"].append(events[0].elapsed_time(events[2]))
        rows["host: whole step (until the backward returned)"].append((t1 - t0) * 1e3)
    table = [[k, f"{statistics.median(v):.3f}", f"{min(v):.3f}"] for k, v in rows.items()]
    return ("\n\nPhases without the profiler (CUDA events and the host clock, median / min of "
            f"{reps}):\n\n" + markdown_table(["", "median ms", "min ms"], table))


def idle_gaps(prof, kernel_type, top: int = 10) -> str:
    """Where the device sat idle inside the profiled step: before its first kernel, between kernels
    (the largest gaps) and after its last, each with the host ops that were running meanwhile.
    (The profiler's own start-up lands before the first kernel: ``phases`` measures without it.)"""
    events = list(prof.events())
    kernels = sorted((e for e in events if e.device_type == kernel_type and not _is_annotation(e)),
                     key=lambda e: e.time_range.start)
    steps = [e for e in events if e.name == "sweep_step" and e.device_type == torch.autograd.DeviceType.CPU]
    if not kernels or not steps:
        return ""
    step = steps[0].time_range
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name != "sweep_step"]
    spans, end = [("before the first kernel", step.start, kernels[0].time_range.start, kernels[0].name)], None
    for k in kernels:
        if end is not None and k.time_range.start > end:
            spans.append(("between kernels", end, k.time_range.start, k.name))
        end = k.time_range.end if end is None else max(end, k.time_range.end)
    spans.append(("after the last kernel", end, step.end, ""))
    total = sum(b - a for _, a, b, _ in spans) / 1e3
    spans.sort(key=lambda x: -(x[2] - x[1]))
    rows = []
    for where, a, b, nxt in spans[:top]:
        busy = sorted({e.name for e in host if e.time_range.start < b and e.time_range.end > a
                       and (min(b, e.time_range.end) - max(a, e.time_range.start)) > 0.5 * (b - a)})
        rows.append([where, f"{(b - a) / 1e3:.3f}", nxt[:60], ", ".join(busy)[:220]])
    return (f"\n\nDevice idle inside the step: {total:.3f} ms in {len(spans)} spans; the largest:\n\n"
            + markdown_table(["where", "ms", "next kernel", "host ops covering most of the span"], rows))


def main() -> int:
    args = ARGS
    if not args.smoke and not torch.cuda.is_available():
        # The full shapes are an H200's: on a CPU one row alone takes hours (and --budget-s cannot
        # stop a row that has started).
        print("hidden_path_sweep: no CUDA device (--smoke runs it on the CPU at tiny shapes)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    doc = Doc(os.path.join(out_dir, "hidden_path_sweep.md"))
    iters = args.iters or (2 if args.smoke else 10)
    warmup = args.warmup or (1 if args.smoke else 2)
    if args.smoke:
        shape = HiddenShape(pairs=2, seq=32, hidden=64, vocab=1000, dtype=torch.bfloat16, prompt_frac=0.25)
        check = shape
    else:
        shape = HiddenShape(pairs=4, seq=1024, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25)
        check = shape.replace(pairs=2, seq=128)
    tflops = matmul_tflops(device, args.smoke)
    doc.add(f"# Hidden-path sweep\n\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
            f"torch {torch.__version__}; fp32 product path for bf16 operands: "
            f"`{linear.fp32_mm_path(device, torch.bfloat16)}`; bf16 matmul "
            + (f"{tflops:.1f} TFLOP/s" if tflops else "not measured"))
    check_paths(doc, check, device)
    release_memory(device)
    sweep(doc, shape, device, tflops, iters, warmup, args.budget_s)
    print("\n\n".join(doc.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
