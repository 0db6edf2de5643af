#!/usr/bin/env python
"""The whole GPU check of the logits path and the hidden-state path in one process, as a markdown report.

    python benchmarks/gpu_report.py [--pythonpath DIR] [--out DIR]      # on a CUDA machine
    python benchmarks/gpu_report.py --smoke --out /tmp/report             # CPU, tiny shapes

Writes ``<out>/gpu_report.md`` (rewritten after every row, so an interrupted run keeps what it
measured) and ``<out>/gpu_report.json``, and prints the report at the end. ``--out`` defaults to
``$OUT``, else the current directory.

1. Environment: GPU, torch, triton, CUDA, versions and locations of the anchors (trl,
   liger-kernel), git commit.
2. Ceilings measured in this process: device-to-device ``copy_`` bandwidth (bytes read + written
   / time) and the bf16 matmul rate.
3. Correctness of ours (``fused_dpo_loss``, sigmoid, in place and not) in bf16 and fp32 at the
   design shapes against float64: per-sequence log-probs and the loss exactly (fp64 in row
   chunks, never an fp64 copy of the logits), and the gradient on a subset of rows (some
   prompt rows, the first and last completion rows, random rows, rows whose label holds ~88% of
   the probability), plus a check that every ignored row's gradient is exactly zero.
4. Timing (CUDA events, median after warm-up) of forward + backward of the DPO sigmoid loss from
   bf16 logits: ours (token path in place or not, full ``fused_dpo_loss``), TRL's Triton kernel,
   Liger's cross-entropy, TRL's older per-row loop and eager; each with its extra peak memory and
   its time as a multiple of the floor ``(2 x valid fraction + 1) x logits bytes / copy bandwidth``.

Every variant that fails (import error, OOM, a kernel error) becomes a row saying so. A CUDA error
that poisons the context ends the measurements; the rows not run say why. The anchors can live in a
``pip install --no-deps --target DIR`` directory: pass it with ``--pythonpath DIR``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def index_list(text: str) -> list[int]:
    """``--shapes 0,2``: comma-separated shape indices (their range is checked once the shapes are
    known, before anything runs)."""
    try:
        indices = [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated shape indices such as 0,2, got {text!r}") from None
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"shape indices are >= 0, got {text!r}")
    return indices


def select_shapes(shapes: list, indices: list[int] | None, flag: str) -> list:
    """The shapes ``indices`` picks (all for None); an index past the list exits with the choices."""
    if indices is None:
        return shapes
    if max(indices) >= len(shapes):
        raise SystemExit(f"gpu_report: {flag} indices run from 0 to {len(shapes) - 1} "
                         f"({'; '.join(f'{i}: {s.describe()}' for i, s in enumerate(shapes))}), got {indices}")
    return [shapes[i] for i in indices]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pythonpath", action="append", default=[], metavar="DIR",
                   help="directory prepended to sys.path (e.g. a pip --target dir with trl, liger-kernel); repeatable")
    p.add_argument("--out", default=None, help="output directory (default $OUT, else .)")
    p.add_argument("--smoke", action="store_true",
                   help="run every code path on the CPU with tiny shapes (ours through backend='reference')")
    p.add_argument("--iters", type=int, default=None, help="timed runs per variant (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per variant (default 3; smoke 1)")
    p.add_argument("--shapes", type=index_list, default=None, help="comma-separated indices of the shapes to run (default all)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness section")
    p.add_argument("--no-timing", action="store_true", help="skip the timing section")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting new measurements after this many seconds (default 540)")
    p.add_argument("--commit", default=None, help="git commit to record when the checkout has no .git")
    p.add_argument("--sections", default="logits,hidden",
                   help="comma-separated parts to run: logits (the logits path), hidden (the hidden-state "
                        "path: fused lm_head + DPO); default both")
    p.add_argument("--hidden-shapes", type=index_list, default=None,
                   help="comma-separated indices of the hidden-path shapes to run (default all)")
    args = p.parse_args(argv)
    args.sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = args.sections - {"logits", "hidden"}
    if unknown or not args.sections:
        p.error(f"--sections takes logits and/or hidden, got {sorted(unknown) or 'nothing'}")
    return args


ARGS = parse_args()
for _path in reversed(ARGS.pythonpath):
    sys.path.insert(0, os.path.abspath(_path))
sys.path.insert(0, REPO)  # the checkout, installed or not
sys.path.insert(0, HERE)  # baselines

import torch  # noqa: E402

import baselines  # noqa: E402
import baselines_hidden  # noqa: E402
from baselines import Unavailable, logits_path_variants  # noqa: E402
from baselines_hidden import HIDDEN_VARIANTS, HiddenShape, make_hidden_batch, near_reference_logps  # noqa: E402
from dpo_kernels.bench import (  # noqa: E402
    BETA,
    IGNORE_INDEX,
    Shape,
    compare,
    dtype_name,
    fmt_bytes,
    make_batch,
    markdown_table,
    peak_extra_bytes,
    reference_logps,
    release_memory,
    time_ms,
)

OOM_ERRORS = tuple(e for e in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)) if e)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class Report:
    """Markdown sections plus raw records, rewritten to disk after every change."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.md_path = os.path.join(out_dir, "gpu_report.md")
        self.json_path = os.path.join(out_dir, "gpu_report.json")
        self.blocks: list[tuple[str, object]] = []  # ("text", str) | ("table", (header, rows))
        self.records: dict = {"env": {}, "ceilings": {}, "checks": [], "timings": [],
                              "hidden_checks": [], "hidden_timings": []}

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))
        self.write()

    def table(self, header: list[str]) -> list[list[str]]:
        rows: list[list[str]] = []
        self.blocks.append(("table", (header, rows)))
        return rows

    def render(self) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "text":
                parts.append(value)
            else:
                header, rows = value
                if rows:
                    parts.append(markdown_table(header, rows))
        return "\n\n".join(parts) + "\n"

    def write(self) -> None:
        with open(self.md_path, "w") as f:
            f.write(self.render())
        with open(self.json_path, "w") as f:
            json.dump(self.records, f, indent=1, default=str)


class Context:
    """Device state: a CUDA error that poisons the context ends all later measurements."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device = device
        self.budget_s = budget_s
        self.lost: str | None = None

    def stop_reason(self) -> str | None:
        if self.lost:
            return f"not run: the CUDA context was lost ({self.lost})"
        if time.perf_counter() - T0 > self.budget_s:
            return f"not run: time budget of {self.budget_s:.0f} s spent"
        return None

    def after_error(self, exc: BaseException, where: str) -> None:
        """Decide whether the device still works after ``exc``."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
            torch.zeros(1, device=self.device).add_(1).item()
        except Exception as sticky:
            self.lost = f"after {where}: {first_line(sticky)}"
            log(f"CUDA context lost: {self.lost}")


# --------------------------------------------------------------------------------------------
# 1. Environment


def _git_commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + (" (with uncommitted changes)" if dirty else "")
    except Exception:
        pass
    return os.environ.get("GIT_COMMIT", "unknown (no .git here; pass --commit)")


def _module_location(name: str) -> str:
    try:
        import importlib.util

        spec = importlib.util.find_spec(name)
        return os.path.dirname(spec.origin) if spec and spec.origin else "not found"
    except Exception as exc:
        return f"not found ({first_line(exc)})"


def environment(device: torch.device, args) -> dict:
    import dpo_kernels

    env = {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "mode": "SMOKE (CPU, tiny shapes; numbers mean nothing)" if args.smoke else "GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch build)": str(torch.version.cuda),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({first_line(exc)})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["GPU"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            env["driver"] = driver[0] if driver else "unknown"
        except Exception:
            env["driver"] = "unknown"
    else:
        env["device"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    env["dpo_kernels"] = f"{dpo_kernels.__version__} at {os.path.dirname(dpo_kernels.__file__)}"
    env["git commit"] = _git_commit(args.commit)
    for dist, version in baselines.package_versions().items():
        module = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}.get(dist, dist)
        env[dist] = version if version == "not installed" else f"{version} at {_module_location(module)}"
    if args.pythonpath:
        env["--pythonpath"] = ", ".join(args.pythonpath)
    try:
        fn = baselines._load_trl_kernel()
        env["TRL Triton kernel"] = f"{fn.__module__}.{fn.__name__}"
    except Unavailable as exc:
        env["TRL Triton kernel"] = f"unavailable: {exc}"
    try:
        baselines._load_liger()
        env["Liger CE kernel"] = "liger_kernel.ops.cross_entropy.LigerCrossEntropyFunction"
    except Unavailable as exc:
        env["Liger CE kernel"] = f"unavailable: {exc}"
    if "hidden" in args.sections:
        try:
            _, notes = baselines_hidden.load_trl_chunked()
            env["TRL fused lm head"] = "ChunkedLogProbFunction: " + "; ".join(notes)
        except Unavailable as exc:
            env["TRL fused lm head"] = f"unavailable: {exc}"
        env["fused_linear_dpo_loss"] = ("present" if baselines_hidden.has_ours()
                                        else "not available (dpo_kernels has no fused_linear_dpo_loss)")
        env["ours_split_fused_mm's tile"] = baselines_hidden.swept_matmul_label()
        tuning = baselines_hidden.Tuning.load()
        env["the tuned variants apply"] = ("nothing: no token-sweep tuning given" if tuning is None
                                           else tuning.describe())
    return env


# --------------------------------------------------------------------------------------------
# 2. Ceilings


def measure_ceilings(device: torch.device, smoke: bool) -> dict:
    out = {}
    nbytes = (16 << 20) if smoke else (1 << 30)
    try:
        src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        times = time_ms(lambda: dst.copy_(src), device, iters=10 if smoke else 50, warmup=3)
        ms = statistics.median(times)
        out["copy_bytes"] = 2 * nbytes
        out["copy_ms"] = ms
        out["copy_GBps"] = 2 * nbytes / (ms / 1e3) / 1e9
        del src, dst
    except Exception as exc:
        out["copy_error"] = first_line(exc)
    release_memory(device)
    n = 256 if smoke else 8192
    try:
        a = torch.randn(n, n, device=device).to(torch.bfloat16)
        b = torch.randn(n, n, device=device).to(torch.bfloat16)
        times = time_ms(lambda: a @ b, device, iters=5 if smoke else 20, warmup=2)
        ms = statistics.median(times)
        out["matmul_n"] = n
        out["matmul_ms"] = ms
        out["matmul_TFLOPs"] = 2 * n**3 / (ms / 1e3) / 1e12
        del a, b
    except Exception as exc:
        out["matmul_error"] = first_line(exc)
    release_memory(device)
    return out


# --------------------------------------------------------------------------------------------
# 3. Correctness against float64, memory-cheap


def _oracle_seq_logps(logits: torch.Tensor, labels: torch.Tensor, max_chunk_bytes: int = 512 << 20) -> torch.Tensor:
    """float64 per-sequence sums of log softmax(z)[y], computed a chunk of rows at a time."""
    S, T, V = logits.shape
    rows = max(1, max_chunk_bytes // (V * 8))
    out = torch.zeros(S, dtype=torch.float64, device=logits.device)
    with torch.no_grad():
        for s in range(S):
            for t0 in range(0, T, rows):
                y = labels[s, t0:t0 + rows]
                mask = y != IGNORE_INDEX
                if not bool(mask.any()):
                    continue
                z = logits[s, t0:t0 + rows].double()
                lp = z.gather(-1, torch.where(mask, y, 0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
                out[s] += torch.where(mask, lp, 0.0).sum()
                del z
    return out


def _subset_rows(shape: Shape, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, token) indices: prompt rows, the first and last completion rows, random rows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seqs, toks = [], []
    P = shape.prompt_tokens
    for s in range(shape.sequences):
        picks = {shape.seq - 1, P if P < shape.seq else shape.seq - 1}
        if P > 0:
            picks |= {0, P - 1}
        picks |= set(torch.randint(0, shape.seq, (4,), generator=gen).tolist())
        for t in sorted(picks):
            seqs.append(s)
            toks.append(t)
    return torch.tensor(seqs, device=device), torch.tensor(toks, device=device)


def check_correctness(shape: Shape, backend: str, device, ctx: Context, seed: int = 7, offset: float = 0.0,
                      inplace_ways=(False, True)) -> list[dict]:
    """fused_dpo_loss (validated) not in place then in place, against the float64 oracle. With
    ``offset`` every logit is shifted by it first (the softmax does not change; the kernels' fp64
    lse and max-relative statistics must keep every digit: one fp32 lse would cost 6e-3 at 1e5)."""
    from dpo_kernels import fused_dpo_loss

    results = []
    logits, labels = make_batch(shape, device, seed=seed)
    if offset:
        with torch.no_grad():
            logits.add_(offset)
    rs, rt = _subset_rows(shape, seed, device)
    y = labels[rs, rt]
    valid = y != IGNORE_INDEX
    with torch.no_grad():
        # Make every other scored subset row's label hold ~88% of its row's probability (the
        # true-class gradient 1 - p_y is where bf16 cancellation bites).
        boost = valid & (torch.arange(len(rs), device=device) % 2 == 0)
        if bool(boost.any()):
            bs, bt, by = rs[boost], rt[boost], y[boost]
            lse = torch.logsumexp(logits[bs, bt].float(), -1)
            logits[bs, bt, by] = (lse + 2.0).to(logits.dtype)
    seq64 = _oracle_seq_logps(logits, labels)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    ref_logps = (seq64 + 5.0 * torch.randn(seq64.shape, generator=gen, dtype=torch.float64).to(device)).float()
    s = seq64.clone().requires_grad_(True)
    pairs = shape.pairs
    ratios = s - ref_logps.double()
    loss64 = -torch.nn.functional.logsigmoid(BETA * (ratios[:pairs] - ratios[pairs:])).mean()
    (coef,) = torch.autograd.grad(loss64, s)
    with torch.no_grad():
        z = logits[rs, rt].double()  # [k, V], the only fp64 copy of logits rows
        grad64 = -torch.softmax(z, -1) * coef[rs].unsqueeze(-1)
        hit = torch.where(valid, y, 0).unsqueeze(-1)
        grad64.scatter_add_(-1, hit, coef[rs].unsqueeze(-1).expand_as(hit).clone())
        grad64[~valid] = 0.0
        del z

    for inplace in inplace_ways:
        name = f"fused_dpo_loss[{backend}]" + (" in place" if inplace else "") + (f" logits +{offset:g}" if offset else "")
        record = {"shape": shape.describe(), "dtype": dtype_name(shape.dtype), "variant": name}
        try:
            out = fused_dpo_loss(logits, labels, ref_logps=ref_logps, beta=BETA, backend=backend,
                                 inplace_backward=inplace, validate=True)
            (grad,) = torch.autograd.grad(out.loss, logits)
            seq = torch.cat([out.chosen_logps, out.rejected_logps]).detach()
            rows = grad[rs, rt]
            # every ignored row's gradient must be exactly zero (one sequence at a time)
            ignored_nonzero = 0
            for si in range(shape.sequences):
                ig = labels[si] == IGNORE_INDEX
                if bool(ig.any()):
                    ignored_nonzero += int((grad[si][ig] != 0).any(-1).sum())
            res = compare(name, shape.dtype, out.loss.detach(), seq, rows, loss64.detach(), seq64, grad64)
            record.update(passed=res.passed and ignored_nonzero == 0, loss_err=res.loss_err,
                          logps_err=res.logps_err, logps_rel_err=res.logps_err / float(seq64.abs().max().clamp(min=1)),
                          grad_err=res.grad_err, grad_abs_err=res.grad_abs_err, ignored_rows_nonzero=ignored_nonzero,
                          subset_rows=len(rs), inplace_aliases=bool(grad.data_ptr() == logits.data_ptr()) if inplace else None,
                          detail=res.detail + ("; ignored rows with a nonzero gradient" if ignored_nonzero else ""))
            del out, grad, rows
        except Exception as exc:
            record.update(passed=False, detail=f"raised {first_line(exc)}")
            log(traceback.format_exc(limit=3))
            ctx.after_error(exc, name)
        results.append(record)
        if ctx.lost:
            break
    del logits, labels
    release_memory(device)
    return results


# --------------------------------------------------------------------------------------------
# 4. Timing


def measure_step(step, device, iters: int, warmup: int, record: dict, ctx, name: str) -> None:
    """Time ``step`` and its extra peak memory into ``record``; an OOM or an error becomes its
    status (and a CUDA error that poisons the context is noted in ``ctx``), never a crash."""
    log(f"timing {name}")
    try:
        times = time_ms(step, device, iters=iters, warmup=warmup)
        peak = peak_extra_bytes(step, device)
        record.update(status="ok", times_ms=times, median_ms=statistics.median(times), min_ms=min(times),
                      peak_extra_bytes=peak)
    except OOM_ERRORS as exc:
        record["status"] = f"out of memory: {first_line(exc)}"
    except Exception as exc:
        record["status"] = f"error: {first_line(exc)}"
        log(traceback.format_exc(limit=4))
        ctx.after_error(exc, name.split(" on ")[0])


def step_or_row(record: dict, ctx, on_row, make_step: Callable[[], Callable]):
    """The variant's step, or ``None`` after emitting ``record`` with the reason it is not timed:
    the run is stopping (budget, lost context) or the variant is unavailable here."""
    reason = ctx.stop_reason()
    if reason:
        record["status"] = reason
        on_row(record)
        return None
    try:
        return make_step()
    except Unavailable as exc:
        record["status"] = f"unavailable: {exc}"
        on_row(record)
        return None


def run_shape(shape, variants, device, ctx, on_row, where: str, timed: Callable[[], None]) -> None:
    """Run one shape's timing section: rows saying why when the run is stopping, and an OOM or
    error while setting the shape up becomes a row, never a crash."""
    if ctx.stop_reason():
        for v in variants:
            on_row({"shape": shape.describe(), "variant": v.id, "description": v.description,
                    "status": ctx.stop_reason()})
        return
    try:
        timed()
    except OOM_ERRORS as exc:
        on_row({"shape": shape.describe(), "variant": "-", "description": "(inputs)",
                "status": f"out of memory allocating the inputs: {first_line(exc)}"})
        release_memory(device)
    except Exception as exc:
        on_row({"shape": shape.describe(), "variant": "-", "description": "(shape)",
                "status": f"error: {first_line(exc)}"})
        log(traceback.format_exc(limit=4))
        ctx.after_error(exc, where)
    if not ctx.lost:
        release_memory(device)


def refill(logits: torch.Tensor, seed: int) -> None:
    with torch.no_grad():
        logits.normal_(0.0, 2.0, generator=torch.Generator(device=logits.device).manual_seed(seed))


def time_shape(shape: Shape, backends: list[str], device, ctx: Context, iters: int, warmup: int,
               copy_GBps: float | None, on_row) -> None:
    logits, labels = make_batch(shape, device, seed=0)
    ref = reference_logps(shape.sequences, device)
    floor_bytes = (2 * shape.valid_fraction + 1) * shape.logits_bytes
    floor_ms = floor_bytes / (copy_GBps * 1e9) * 1e3 if copy_GBps else None
    for variant in logits_path_variants(backends):
        record = {"shape": shape.describe(), "variant": variant.id, "description": variant.description,
                  "floor_ms": floor_ms, "logits_bytes": shape.logits_bytes}
        step = step_or_row(record, ctx, on_row, lambda: variant.step(logits, labels, ref))
        if step is None:
            continue
        measure_step(step, device, iters, warmup, record, ctx, f"{variant.id} on {shape.describe()}")
        step = None
        if variant.inplace and not ctx.lost:
            try:
                refill(logits, seed=0)  # the next variant starts from logits again, not gradients
            except Exception as exc:
                ctx.after_error(exc, "refill")
        if not ctx.lost:
            release_memory(device)
        on_row(record)
    del logits, labels


def timing_row(r: dict) -> list[str]:
    if r.get("status") != "ok":
        return [r["description"], "", "", "", "", r.get("status", "")]
    x_floor = f"{r['median_ms'] / r['floor_ms']:.2f}x" if r.get("floor_ms") else "n/a"
    peak = r.get("peak_extra_bytes")
    mem = fmt_bytes(peak) + (f" ({peak / r['logits_bytes']:.2f}x logits)" if peak is not None else "")
    return [r["description"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", x_floor, mem, ""]


# --------------------------------------------------------------------------------------------
# 5. The hidden-state path: fused lm_head + DPO


HIDDEN_CHECK_VARIANTS = ("ours_one_pass", "ours_two_phase", "ours_split", "ours_split_fused_mm", "ours_split_tuned",
                         "ours_one_pass_tuned", "ours_one_pass_160mib", "eager")
# Base tolerances of the hidden-path check per dtype: (loss abs, gradient rows rel to the row's
# largest entry). Ours passes when each error is within max(base, 2 x eager's error in the same
# dtype): no worse than materializing the logits in that dtype.
_HIDDEN_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-2, 2e-2), torch.float16: (1e-3, 5e-3)}


def logits_shapes(smoke: bool) -> list[Shape]:
    """The logits path's shapes (``--shapes`` picks among them)."""
    if smoke:
        return [
            Shape(pairs=2, seq=16, vocab=1000, dtype=torch.bfloat16, prompt_frac=0.25),
            Shape(pairs=2, seq=16, vocab=1000, dtype=torch.bfloat16, prompt_frac=0.0),
            Shape(pairs=1, seq=32, vocab=3000, dtype=torch.bfloat16, prompt_frac=0.25),
        ]
    return [
        Shape(pairs=4, seq=1024, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),
        Shape(pairs=4, seq=1024, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.0),
        Shape(pairs=2, seq=4096, vocab=151936, dtype=torch.bfloat16, prompt_frac=0.25),  # N*V > 2^31
    ]


def hidden_shapes(smoke: bool) -> list[HiddenShape]:
    if smoke:
        return [
            HiddenShape(pairs=2, seq=32, hidden=64, vocab=1000, dtype=torch.bfloat16, prompt_frac=0.25),
            HiddenShape(pairs=1, seq=64, hidden=64, vocab=3000, dtype=torch.bfloat16, prompt_frac=0.25),
        ]
    return [
        HiddenShape(pairs=4, seq=1024, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),
        HiddenShape(pairs=2, seq=2048, hidden=3584, vocab=152064, dtype=torch.bfloat16, prompt_frac=0.25),
        HiddenShape(pairs=1, seq=16384, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),  # long
    ]


def check_hidden(shape: HiddenShape, device, ctx: Context, seed: int = 11) -> list[dict]:
    """Ours (every variant of :data:`HIDDEN_CHECK_VARIANTS`) and eager at ``shape`` against a float64 oracle (materialized fp64
    logits by autograd): the loss, every hidden-gradient row (ignored rows must be exactly 0)
    and a slice of weight-gradient rows (the rows of the labels present, plus random rows)."""
    hidden, weight, labels = make_hidden_batch(shape, device, seed=seed)
    ref = near_reference_logps(hidden, weight, labels, seed=seed + 1)
    mask = labels != IGNORE_INDEX
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    label_rows = torch.unique(labels[mask])[:256]
    random_rows = torch.randint(0, shape.vocab, (64,), generator=gen).to(device)
    wrows = torch.unique(torch.cat([label_rows, random_rows]))
    loss64, gh64, gw64 = baselines_hidden.float64_oracle(hidden, weight, labels, ref, wrows)
    release_memory(device)
    results, eager_errs = [], None
    order = ["eager"] + [v for v in HIDDEN_CHECK_VARIANTS if v != "eager"]
    for vid in order:
        variant = baselines_hidden.HIDDEN_BY_ID[vid]
        record = {"shape": shape.describe(), "dtype": dtype_name(shape.dtype), "variant": vid,
                  "description": variant.description}
        reason = ctx.stop_reason()
        if reason:
            record.update(passed=None, detail=reason)
            results.append(record)
            continue
        try:
            variant.check(device)
        except Unavailable as exc:
            record.update(passed=None, detail=f"unavailable: {exc}")
            results.append(record)
            continue
        try:
            with variant.rules():
                loss = variant.fn(hidden, weight, labels, ref, BETA)
                gh, gw = torch.autograd.grad(loss, (hidden, weight))
            errs = {
                "loss_err": abs(float(loss) - float(loss64)),
                "grad_hidden_err": baselines_hidden.row_rel_err(gh[mask], gh64[mask]),
                "grad_weight_err": baselines_hidden.row_rel_err(gw[wrows], gw64),
            }
            ignored_nonzero = int((gh[~mask] != 0).any(-1).sum())
            record.update(errs, ignored_rows_nonzero=ignored_nonzero, weight_rows_checked=int(wrows.numel()))
            if vid == "eager":
                eager_errs = errs
                record.update(passed=None, detail="reference: materialized logits in this dtype")
            else:
                base_loss, base_grad = _HIDDEN_TOL.get(shape.dtype, (1e-4, 1e-3))
                e = eager_errs or {}
                tol = {"loss_err": max(base_loss, 2 * e.get("loss_err", 0.0)),
                       "grad_hidden_err": max(base_grad, 2 * e.get("grad_hidden_err", 0.0)),
                       "grad_weight_err": max(base_grad, 2 * e.get("grad_weight_err", 0.0))}
                bad = [k for k in tol if not errs[k] <= tol[k]]
                if ignored_nonzero:
                    bad.append("ignored hidden rows with a nonzero gradient")
                record.update(passed=not bad, tolerances=tol,
                              detail=("out of tolerance: " + ", ".join(bad)) if bad else "")
            del loss, gh, gw
        except OOM_ERRORS as exc:
            record.update(passed=False, detail=f"out of memory: {first_line(exc)}")
        except Exception as exc:
            record.update(passed=False, detail=f"raised {first_line(exc)}")
            log(traceback.format_exc(limit=4))
            ctx.after_error(exc, f"hidden check {vid}")
        results.append(record)
        if ctx.lost:
            break
        release_memory(device)
    del hidden, weight, labels, gh64, gw64
    release_memory(device)
    return results


def hidden_check_row(r: dict) -> list[str]:
    if "loss_err" not in r:
        verdict = r.get("detail", "")
        return [r["shape"], r["variant"], "", "", "", "", ("FAIL " + verdict) if r.get("passed") is False else verdict]
    verdict = r.get("detail", "") if r.get("passed") is None else ("PASS" if r["passed"] else "FAIL " + r["detail"])
    return [r["shape"], r["variant"], f"{r['loss_err']:.2e}", f"{r['grad_hidden_err']:.2e}",
            f"{r['grad_weight_err']:.2e} ({r['weight_rows_checked']} rows)", str(r["ignored_rows_nonzero"]), verdict]


def time_hidden_shape(shape: HiddenShape, device, ctx: Context, iters: int, warmup: int,
                      tflops: float | None, on_row) -> None:
    hidden, weight, labels = make_hidden_batch(shape, device, seed=0)
    ref = near_reference_logps(hidden, weight, labels)
    floors = {k: k * shape.matmul_flops / (tflops * 1e12) * 1e3 if tflops else None for k in (3, 4)}
    for variant in HIDDEN_VARIANTS:
        record = {"shape": shape.describe(), "variant": variant.id, "description": variant.description,
                  "floor3_ms": floors[3], "floor4_ms": floors[4], "grads_bytes": shape.grads_bytes}
        step = step_or_row(record, ctx, on_row,
                           lambda: variant.check(device) or variant.step(hidden, weight, labels, ref))
        if step is None:
            continue
        measure_step(step, device, iters, warmup, record, ctx, f"{variant.id} on {shape.describe()}")
        step = None
        if not ctx.lost:
            release_memory(device)
        on_row(record)
    del hidden, weight, labels, ref


def hidden_timing_row(r: dict) -> list[str]:
    if r.get("status") != "ok":
        return [r["description"], "", "", "", "", "", r.get("status", "")]
    x3 = f"{r['median_ms'] / r['floor3_ms']:.2f}x" if r.get("floor3_ms") else "n/a"
    x4 = f"{r['median_ms'] / r['floor4_ms']:.2f}x" if r.get("floor4_ms") else "n/a"
    peak = r.get("peak_extra_bytes")
    mem = fmt_bytes(peak) + (f" ({peak / r['grads_bytes']:.2f}x the gradients)" if peak is not None else "")
    return [r["description"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", x3, x4, mem, ""]


# Issue 5's targets at its shape (the first of hidden_shapes): (name, ms at most, extra bytes at
# most, times faster than TRL's fused lm head at least, or None).
ISSUE5_TARGETS = (("fast mode", 30.0, 2.0e9, 1.4), ("low-memory mode", 38.0, 1.3e9, None))


def target_rows(records: list[dict], targets=ISSUE5_TARGETS) -> list[list[str]]:
    """For each of our variants timed at one shape, whether it meets each target (time, extra
    memory, and the speed-up over ``trl_chunked`` in the same run where the target asks for one):
    the verdict the issue asks for, read off the same records as the table above it."""
    by_id = {r["variant"]: r for r in records if r.get("status") == "ok"}
    trl = by_id.get("trl_chunked")
    rows = []
    for r in records:
        if not r["variant"].startswith("ours_") or r.get("status") != "ok":
            continue
        speedup = trl["median_ms"] / r["median_ms"] if trl else None
        for name, max_ms, max_bytes, min_speedup in targets:
            misses = []
            if r["median_ms"] > max_ms:
                misses.append(f"time {r['median_ms']:.1f} > {max_ms:g} ms")
            peak = r.get("peak_extra_bytes")
            if peak is None or peak > max_bytes:
                misses.append(f"memory {fmt_bytes(peak)} > {fmt_bytes(max_bytes)}")
            if min_speedup is not None and (speedup is None or speedup < min_speedup):
                misses.append("no TRL time in this run" if speedup is None
                              else f"{speedup:.2f}x TRL < {min_speedup:g}x")
            rows.append([r["variant"], name, f"{r['median_ms']:.2f}", fmt_bytes(peak),
                         "n/a" if speedup is None else f"{speedup:.2f}x",
                         "MET" if not misses else "missed: " + "; ".join(misses)])
    return rows


def auto_mode_note(shape: HiddenShape) -> str:
    """Which mode ``mode="auto"`` takes at this shape for the sigmoid loss (from the labels alone,
    by the API's rule: one_pass unless pairs larger than its chunk would have more than
    ``linear.AUTO_MAX_FORMED_AGAIN`` of their logits formed again, then split; and only where
    one_pass fits the free memory, which it does here), and the peaks ``estimate_linear_memory``
    predicts for one_pass and split (auto's memory check), to compare with the measured rows."""
    try:
        from dpo_kernels import estimate_linear_memory, linear
        _, _, labels = make_hidden_batch(shape.replace(hidden=1, vocab=2), "cpu", seed=0)
        counts = linear.TokenCensus(labels, IGNORE_INDEX, labels.shape[0] // 2).pair_counts()
        budget = linear.one_pass_chunk_size(shape.vocab, shape.dtype, None, None)
        again = linear.formed_again(counts, budget)
        mode = "one_pass" if again <= linear.AUTO_MAX_FORMED_AGAIN else "split"
        # Sizes only: torch.empty on the host touches no page of these.
        hidden = torch.empty(*labels.shape, shape.hidden, dtype=shape.dtype, requires_grad=True)
        weight = torch.empty(shape.vocab, shape.hidden, dtype=shape.dtype, requires_grad=True)
        peaks = estimate_linear_memory(hidden, weight, labels, ignore_index=IGNORE_INDEX)
    except Exception as exc:  # an older checkout without these helpers
        return f"; mode='auto': unknown ({type(exc).__name__})"
    return (f"; `mode='auto'` takes **{mode}** here (largest pair {max(counts, default=0)} valid tokens, one_pass "
            f"chunk budget {budget} tokens: {again:.0%} of the logits formed again); estimated peaks "
            f"(`estimate_linear_memory`): one_pass {fmt_bytes(peaks['one_pass'])}, split {fmt_bytes(peaks['split'])}")


def run_hidden_section(report: Report, args, device, ctx: Context, ceil: dict, iters: int, warmup: int) -> int:
    """The hidden-state path: correctness at reduced shapes, then timing per shape. Returns the
    number of correctness failures."""
    smoke = args.smoke
    shapes = select_shapes(hidden_shapes(smoke), args.hidden_shapes, "--hidden-shapes")
    tflops = ceil.get("matmul_TFLOPs")
    failures = 0
    report.text("# Hidden-state path: fused lm_head + DPO sigmoid loss\n\n"
                "`loss(hidden[2B, T, H], weight[V, H], labels, ref_logps)` -> `torch.autograd.grad(loss, "
                "(hidden, weight))`; no bias, no shift; per-sequence summed log-probs, first half chosen. "
                + ("`fused_linear_dpo_loss` is present." if baselines_hidden.has_ours() else
                   "**`fused_linear_dpo_loss` is not available in this checkout: its rows say so.**"))
    if not args.no_check:
        report.text("## Hidden-state path: correctness against float64\n\n"
                    "At a reduced batch (2 pairs x 128 tokens, same H, V; smoke: the tiny shapes) in bf16 and fp32: "
                    "the loss (abs error), every valid hidden-gradient row and the weight-gradient rows of the "
                    "labels present plus 64 random rows (each row's max error relative to its largest entry), "
                    "against float64 autograd through materialized fp64 logits of the same inputs; every ignored "
                    "hidden row's gradient must be exactly 0. Eager (materialized logits in the same dtype) is the "
                    "yardstick: ours passes within max(base tolerance, 2x eager's error); base tolerances "
                    "(loss, grad rows): fp32 1e-4, 1e-3; bf16 1e-2, 2e-2.")
        rows = report.table(["shape", "variant", "loss err", "grad hidden err (rel to row)",
                             "grad weight err (rel to row)", "ignored rows != 0", "verdict"])
        seen = set()
        for shape in shapes:
            for dtype in (torch.bfloat16, torch.float32):
                reduced = shape.replace(dtype=dtype) if smoke else shape.replace(pairs=2, seq=128, dtype=dtype)
                key = (reduced.pairs, reduced.seq, reduced.hidden, reduced.vocab, dtype)
                if key in seen:
                    continue
                seen.add(key)
                reason = ctx.stop_reason()
                if reason:
                    rows.append([reduced.describe(), "(all)", "", "", "", "", reason])
                    report.write()
                    continue
                log(f"hidden check on {reduced.describe()}")
                try:
                    results = check_hidden(reduced, device, ctx)
                except OOM_ERRORS as exc:
                    results = [{"shape": reduced.describe(), "variant": "(oracle)", "passed": False,
                                "detail": f"out of memory in the check: {first_line(exc)}"}]
                    release_memory(device)
                except Exception as exc:
                    results = [{"shape": reduced.describe(), "variant": "(oracle)", "passed": False,
                                "detail": f"check raised {first_line(exc)}"}]
                    log(traceback.format_exc(limit=4))
                    ctx.after_error(exc, "hidden correctness check")
                for r in results:
                    report.records["hidden_checks"].append(r)
                    failures += r.get("passed") is False
                    rows.append(hidden_check_row(r))
                report.write()

    if not args.no_timing:
        report.text(f"## Hidden-state path: forward + backward\n\n"
                    f"{'perf_counter' if smoke else 'CUDA events'}, median of {iters} after {warmup} warm-up. "
                    "Floors: 3 and 4 matmuls over the valid tokens only (2 x N_valid x H x V flops each) at the "
                    "bf16 matmul rate measured above"
                    + (f" ({tflops:.1f} TFLOP/s)" if tflops else " (not measured: no floors)")
                    + ". Extra peak memory: what one step allocates beyond its inputs (hidden, weight, labels, "
                    "reference log-probs), both gradients included. Reference log-probs sit within ~5 nats of "
                    "the policy's (unsaturated margins). Liger takes no precomputed reference: it runs with a "
                    "zero reference (same work). TRL: log-probs only, valid tokens only, chunk 32768.")
        for shape in shapes:
            floor_text = (f"floors: 3 matmuls {3 * shape.matmul_flops / (tflops * 1e12) * 1e3:.3f} ms, "
                          f"4 matmuls {4 * shape.matmul_flops / (tflops * 1e12) * 1e3:.3f} ms "
                          f"({shape.matmul_flops / 1e12:.3f} TFLOP each); the gradients themselves: "
                          f"{fmt_bytes(shape.grads_bytes)}" if tflops else "floors: n/a")
            report.text(f"### {shape.describe()}\n\n{floor_text}{auto_mode_note(shape)}")
            rows = report.table(["variant", "median ms", "min ms", "x floor (3 mm)", "x floor (4 mm)",
                                 "extra peak memory", "note"])

            def on_row(record, rows=rows):
                report.records["hidden_timings"].append(record)
                rows.append(hidden_timing_row(record))
                report.write()

            log(f"hidden timing on {shape.describe()}")
            first = len(report.records["hidden_timings"])
            run_shape(shape, HIDDEN_VARIANTS, device, ctx, on_row, "hidden timing setup",
                      lambda: time_hidden_shape(shape, device, ctx, iters, warmup, tflops, on_row))
            if shape == hidden_shapes(smoke)[0]:  # the issue's shape: its targets, read off the rows above
                report.text("Issue-5 targets at this shape (fast: <= 30 ms, <= 2.0 GB extra, >= 1.4x faster "
                            "than TRL's fused lm head in this run; low memory: <= 38 ms, <= 1.3 GB extra):")
                verdicts = report.table(["variant", "target", "median ms", "extra peak memory", "vs TRL", "verdict"])
                verdicts.extend(target_rows(report.records["hidden_timings"][first:]))
                report.write()
    return failures


# --------------------------------------------------------------------------------------------


def main(args) -> int:
    smoke = args.smoke
    if smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_report: no CUDA device; use --smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
    out_dir = args.out or os.environ.get("OUT") or "."
    report = Report(out_dir)
    ctx = Context(device, args.budget_s)
    iters = args.iters or (3 if smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)

    shapes = select_shapes(logits_shapes(smoke), args.shapes, "--shapes")
    select_shapes(hidden_shapes(smoke), args.hidden_shapes, "--hidden-shapes")  # checked before anything runs
    if smoke:
        backends = ["reference"]
    else:
        from dpo_kernels.backends import resolve_backend

        backends = [resolve_backend("auto", device)]  # Triton on CUDA

    report.text("# dpo_kernels GPU report: " + " and ".join(
        name for key, name in (("logits", "logits path"), ("hidden", "hidden-state path")) if key in args.sections)
        + (" (SMOKE RUN on CPU)" if smoke else ""))
    env = environment(device, args)
    report.records["env"] = env
    report.text("## Environment\n\n" + markdown_table(["", ""], [[k, str(v)] for k, v in env.items()]))
    log("environment recorded")

    ceil = measure_ceilings(device, smoke)
    report.records["ceilings"] = ceil
    copy_GBps = ceil.get("copy_GBps")
    lines = []
    if copy_GBps:
        lines.append(f"- copy bandwidth: {copy_GBps / 1e3:.3f} TB/s ({fmt_bytes(ceil['copy_bytes'])} read + written "
                     f"by `dst.copy_(src)`, median {ceil['copy_ms']:.3f} ms)")
    else:
        lines.append(f"- copy bandwidth: failed ({ceil.get('copy_error')}); no floors below")
    if "matmul_TFLOPs" in ceil:
        n = ceil["matmul_n"]
        lines.append(f"- bf16 matmul: {ceil['matmul_TFLOPs']:.1f} TFLOP/s ({n}x{n}x{n}, median {ceil['matmul_ms']:.3f} ms)")
    else:
        lines.append(f"- bf16 matmul: failed ({ceil.get('matmul_error')})")
    report.text("## Ceilings measured in this process\n\n" + "\n".join(lines))
    log("ceilings: " + "; ".join(lines))

    failures = 0
    if "logits" in args.sections and not args.no_check:
        report.text("## Correctness against float64\n\n"
                    "Per-sequence log-probs and the loss against float64 sums over every row (computed in "
                    "row chunks); the gradient on a subset of rows per sequence (prompt rows, the first and "
                    "last completion rows, random rows; every other scored one with its label at p~0.88), "
                    "error relative to each row's largest entry; every ignored row's gradient must be 0. "
                    "Sigmoid loss, beta=0.1, reference log-probs within ~5 nats of the policy's. fp32 also "
                    "with every logit shifted by 1e5 (`logits +1e+05`: the same softmax, which the fp64 lse "
                    "must keep to fp32 precision).")
        rows = report.table(["shape", "variant", "loss err", "logps err (rel)", "grad err (rel to row)",
                             "ignored rows != 0", "verdict"])
        for shape in shapes:
            for dtype in (torch.bfloat16, torch.float32):
                s = Shape(shape.pairs, shape.seq, shape.vocab, dtype, shape.prompt_frac)
                # fp32 also with every logit shifted by 1e5 (not in place: the same kernels)
                offsets = (0.0, 1e5) if dtype == torch.float32 else (0.0,)
                for backend, offset in ((b, o) for b in backends for o in offsets):
                    reason = ctx.stop_reason()
                    if reason:
                        rows.append([s.describe(), f"fused_dpo_loss[{backend}]", "", "", "", "", reason])
                        report.write()
                        continue
                    log(f"checking {backend} on {s.describe()}")
                    try:
                        results = check_correctness(s, backend, device, ctx, offset=offset,
                                                    inplace_ways=(False, True) if not offset else (False,))
                    except OOM_ERRORS as exc:
                        results = [{"shape": s.describe(), "variant": f"fused_dpo_loss[{backend}]", "passed": False,
                                    "detail": f"out of memory in the check: {first_line(exc)}"}]
                        release_memory(device)
                    except Exception as exc:
                        results = [{"shape": s.describe(), "variant": f"fused_dpo_loss[{backend}]", "passed": False,
                                    "detail": f"check raised {first_line(exc)}"}]
                        log(traceback.format_exc(limit=4))
                        ctx.after_error(exc, "correctness check")
                    for r in results:
                        report.records["checks"].append(r)
                        failures += not r.get("passed")
                        if "loss_err" in r:
                            rows.append([r["shape"], r["variant"], f"{r['loss_err']:.2e}",
                                         f"{r['logps_err']:.2e} ({r['logps_rel_err']:.1e})",
                                         f"{r['grad_err']:.2e}", str(r["ignored_rows_nonzero"]),
                                         ("PASS" if r["passed"] else "FAIL " + r.get("detail", ""))])
                        else:
                            rows.append([r["shape"], r["variant"], "", "", "", "", "FAIL " + r.get("detail", "")])
                    report.write()

    if "logits" in args.sections and not args.no_timing:
        report.text(f"## Forward + backward of the DPO sigmoid loss from the logits\n\n"
                    f"{'perf_counter' if smoke else 'CUDA events'}, median of {iters} after {warmup} warm-up; "
                    "`torch.autograd.grad(loss, logits)`. Extra peak memory: "
                    + ("the CPU allocator's peak (torch.profiler)" if smoke else
                       "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`")
                    + " minus what was allocated before (logits, labels), the gradient included. "
                    "Floor = (2 x valid-token fraction + 1) x logits bytes / measured copy bandwidth.")
        for shape in shapes:
            floor_ms = ((2 * shape.valid_fraction + 1) * shape.logits_bytes / (copy_GBps * 1e9) * 1e3
                        if copy_GBps else None)
            title = (f"### {shape.sequences} x {shape.seq}, V={shape.vocab}, {dtype_name(shape.dtype)}, "
                     f"first {shape.prompt_frac:.0%} of tokens ignored ({fmt_bytes(shape.logits_bytes)} of logits"
                     + (", N*V > 2^31" if shape.sequences * shape.seq * shape.vocab > 2**31 else "") + ")")
            floor_text = (f"floor: ({shape.valid_fraction:.2f} + {shape.valid_fraction:.2f} reads + 1.0 write) x "
                          f"{fmt_bytes(shape.logits_bytes)} at {copy_GBps / 1e3:.3f} TB/s = {floor_ms:.3f} ms"
                          if floor_ms else "floor: n/a (no copy bandwidth)")
            report.text(title + "\n\n" + floor_text)
            rows = report.table(["variant", "median ms", "min ms", "x floor", "extra peak memory", "note"])

            def on_row(record, rows=rows):
                report.records["timings"].append(record)
                rows.append(timing_row(record))
                report.write()

            run_shape(shape, logits_path_variants(backends), device, ctx, on_row, "timing setup",
                      lambda: time_shape(shape, backends, device, ctx, iters, warmup, copy_GBps, on_row))

    if "hidden" in args.sections:
        try:
            failures += run_hidden_section(report, args, device, ctx, ceil, iters, warmup)
        except Exception as exc:  # never lose what was measured
            report.text(f"hidden-state section stopped: {first_line(exc)}")
            log(traceback.format_exc(limit=6))
            failures += 1

    summary = (f"Done in {time.perf_counter() - T0:.0f} s; correctness failures: {failures}"
               + (f"; CUDA context lost {ctx.lost}" if ctx.lost else ""))
    report.text("---\n\n" + summary)
    log(summary)
    print(report.render())
    print(f"wrote {report.md_path} and {report.json_path}", file=sys.stderr)
    return 1 if failures or ctx.lost else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
