#!/usr/bin/env python
"""Where the host spends the time before the first lm_head matmul of ``fused_linear_dpo_loss``.

    python benchmarks/host_profile.py [--out DIR] [--smoke]

On a GPU that time is exposed: from the host sync that sizes the gather of the valid tokens (or,
in a benchmark loop, from the step's start) until the first matmul is queued the device idles
(``hidden_path_sweep.py``'s phases measured ~1.3 ms at 8 x 1024 on an H200). This stops each call
at its first matmul (a patched ``linear.logits_matmul`` raises) and reports, per mode, the median
host time to that point and a cProfile of it (the Python functions and the torch calls, with the
host sync inside whichever call reads the device). Writes ``host_profile.txt``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from baselines_hidden import HiddenShape, make_hidden_batch, near_reference_logps  # noqa: E402
from dpo_kernels import fused_linear_dpo_loss, linear  # noqa: E402
from dpo_kernels.bench import BETA, IGNORE_INDEX  # noqa: E402


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


def within_steps(call, hidden, weight, sync, reps: int) -> str:
    """The same host time, measured inside whole training steps (forward + backward, as the
    benchmarks time them) rather than in calls stopped at the first matmul: with Python's cyclic
    garbage collector on and off, and with and without a device sync between steps."""
    import gc

    rows = []
    for mode in ("one_pass", "split"):
        for collect in (True, False):
            for synced in (True, False):
                marks = []
                original = linear.logits_matmul

                def first_mark(*a, **k):
                    if len(marks) < len(starts):  # the first matmul of this step
                        marks.append(time.perf_counter())
                    return original(*a, **k)

                starts, steps = [], []
                linear.logits_matmul = first_mark
                (gc.enable if collect else gc.disable)()
                try:
                    for _ in range(reps // 2 + 3):
                        if synced:
                            sync()
                        starts.append(time.perf_counter())
                        grads = torch.autograd.grad(call(mode).loss, (hidden, weight))
                        steps.append(time.perf_counter() - starts[-1])
                        del grads
                    sync()
                finally:
                    linear.logits_matmul = original
                    gc.enable()
                pre = [(m - t) * 1e3 for m, t in zip(marks[3:], starts[3:])]
                rows.append(f"| {mode} | {'on' if collect else 'off'} | {'yes' if synced else 'no'} | "
                            f"{statistics.median(pre):.3f} | {min(pre):.3f} | {statistics.median(steps[3:]) * 1e3:.3f} |")
    return ("## Inside whole steps: host time from the call to its first matmul\n\n"
            "| mode | gc | device sync before each step | median ms | min ms | host ms per step |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("host_profile: no CUDA device (--smoke runs it on the CPU at a tiny shape)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = (HiddenShape(pairs=2, seq=32, hidden=64, vocab=1000, dtype=torch.bfloat16, prompt_frac=0.25) if args.smoke
             else HiddenShape(pairs=4, seq=1024, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25))
    hidden, weight, labels = make_hidden_batch(shape, device, seed=0)
    ref = near_reference_logps(hidden, weight, labels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = io.StringIO()
    out.write(f"# Host time before the first matmul ({shape.describe()}, {device})\n\n")

    def call(mode):
        return fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, beta=BETA, ignore_index=IGNORE_INDEX,
                                     mode=mode, validate=False)

    # auto beside one_pass (what it takes at the issue's shape): the difference is the cost of its
    # memory check (the driver's free memory and the allocator's statistics) on the host.
    for mode in ("one_pass", "auto", "split", "two_phase"):
        for _ in range(3):  # warm: caches, the allocator, cuBLAS handles
            torch.autograd.grad(call(mode).loss, (hidden, weight))
        sync()
        original = linear.logits_matmul
        linear.logits_matmul = _stop
        try:
            times = []
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                try:
                    call(mode)
                except _Stop:
                    pass
                times.append((time.perf_counter() - t0) * 1e3)
            prof = cProfile.Profile()
            for _ in range(args.reps):
                sync()
                prof.enable()
                try:
                    call(mode)
                except _Stop:
                    pass
                prof.disable()
        finally:
            linear.logits_matmul = original
        out.write(f"## {mode}: median {statistics.median(times):.3f} ms, min {min(times):.3f} ms "
                  f"(host, call start -> first matmul)\n\n")
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(22)
            text = buf.getvalue()
            out.write(f"### by {key} ({args.reps} calls)\n\n```\n{text[text.find('ncalls'):]}```\n\n")
    out.write(within_steps(call, hidden, weight, sync, args.reps))
    text = out.getvalue()
    print(text)
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "host_profile.txt"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
