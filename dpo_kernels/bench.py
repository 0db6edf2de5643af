"""``python -m dpo_kernels bench``: check ``fused_dpo_loss`` against a float64 oracle, then time it.

On the device present (CUDA if available, else CPU) and a shape sized for it, this

1. checks the loss, the per-sequence log-probs and the logits gradient of ``fused_dpo_loss``
   (each timed backend) against a float64 PyTorch oracle on a smaller batch of the same vocabulary
   and dtype, and prints one ``PASS``/``FAIL`` line per backend with the largest errors;
2. times forward + backward (median of ``--iters`` runs after warm-up; CUDA events on a GPU,
   ``perf_counter`` on the CPU) of every available backend, with and without the in-place
   backward, beside an eager PyTorch implementation of the same loss, and measures the peak
   memory each one allocates beyond its inputs.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before; on the
CPU, the allocation timeline of ``torch.profiler`` (``profile_memory=True``): every tensor
allocation and free of the CPU allocator, in order, in one extra untimed run. The numbers include
the logits gradient each variant returns.

The helpers here (inputs, timing, peak memory, the eager loss, the oracle) are shared with
``benchmarks/`` so that the CLI, the pytest-benchmark suite and the GPU report measure alike.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ._argtypes import fraction, non_negative_int, positive_int

IGNORE_INDEX = -100
BETA = 0.1

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# Tolerances of the oracle check, per logits dtype: (rtol of per-sequence values and the loss,
# atol of the same, gradient error relative to each row's largest gradient entry). Forward
# results only differ by fp32 accumulation; the gradient is rounded once to the logits dtype.
_VALUE_RTOL, _VALUE_ATOL = 2e-5, 2e-4
_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-10}


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Shape:
    """``pairs`` preference pairs (``2 * pairs`` sequences) of ``seq`` tokens, vocabulary ``vocab``;
    the first ``prompt_frac`` of each sequence's tokens are ignored (the prompt)."""

    pairs: int
    seq: int
    vocab: int
    dtype: torch.dtype
    prompt_frac: float = 0.25

    @property
    def sequences(self) -> int:
        return 2 * self.pairs

    @property
    def prompt_tokens(self) -> int:
        return min(self.seq, int(self.seq * self.prompt_frac))

    @property
    def valid_fraction(self) -> float:
        return (self.seq - self.prompt_tokens) / self.seq

    @property
    def logits_bytes(self) -> int:
        return self.sequences * self.seq * self.vocab * _element_size(self.dtype)

    def describe(self) -> str:
        return (f"[{self.sequences}, {self.seq}, {self.vocab}] {dtype_name(self.dtype)} "
                f"({fmt_bytes(self.logits_bytes)} of logits, first {self.prompt_tokens / self.seq:.0%} of tokens ignored)")


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_batch(shape: Shape, device, seed: int = 0, scale: float = 2.0, requires_grad: bool = True):
    """Random logits ``[2B, T, V]`` drawn directly in the logits dtype (no fp32 temporary) and
    labels with the first ``prompt_frac`` of tokens set to ``IGNORE_INDEX``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(shape.sequences, shape.seq, shape.vocab, dtype=shape.dtype, device=device)
    logits.normal_(0.0, scale, generator=gen)
    labels = torch.randint(0, shape.vocab, (shape.sequences, shape.seq), device=device, generator=gen)
    labels[:, : shape.prompt_tokens] = IGNORE_INDEX
    return logits.requires_grad_(requires_grad), labels


def reference_logps(num_sequences: int, device, seed: int = 1) -> torch.Tensor:
    """Arbitrary reference-model per-sequence log-probs (timing only)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (-100.0 * torch.rand(num_sequences, generator=gen, dtype=torch.float32)).to(device)


# --------------------------------------------------------------------------------------------
# The eager implementation and the DPO sigmoid loss on per-sequence log-probs


def eager_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``log_softmax(logits.float()).gather(labels)`` summed per sequence: what people write."""
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def dpo_sigmoid_loss(seq_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Mean DPO sigmoid loss of ``2P`` per-sequence log-probs (chosen first) against a reference."""
    pairs = seq_logps.shape[0] // 2
    ratios = seq_logps - ref_logps.to(seq_logps.dtype)
    return -F.logsigmoid(beta * (ratios[:pairs] - ratios[pairs:])).mean()


# --------------------------------------------------------------------------------------------
# Timing and peak memory


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, iters: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls (CUDA events on a
    GPU). What ``fn`` returns is dropped after the measurement of its call ends."""
    device = torch.device(device)
    for _ in range(warmup):
        out = fn()
        del out
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            del out
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            del out
    return times


def release_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_extra_bytes(fn: Callable[[], object], device) -> int | None:
    """Largest amount of memory allocated during one call of ``fn`` beyond what existed before,
    its returned value included. ``None`` when it cannot be observed."""
    device = torch.device(device)
    if device.type == "cuda":
        release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    return _cpu_peak_extra_bytes(fn)


def _cpu_peak_extra_bytes(fn) -> int | None:
    """Peak of the CPU allocator's running total during ``fn``, from the profiler's allocation
    events (each carries the allocator's total after it), relative to the total before."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with _quiet_stderr():  # the profiler's library logs each start and stop on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    allocations = []

    def walk(event):
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if str(fields.device).startswith("cpu"):
                allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in event.children:
            walk(child)

    try:
        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
    except Exception:  # a private API: give no number rather than a wrong one
        return None
    if not allocations:
        return 0
    allocations.sort(key=lambda a: a[0])
    _, first_size, first_total = allocations[0]
    base = first_total - first_size
    return max(0, max(total for _, _, total in allocations) - base)


@contextlib.contextmanager
def _quiet_stderr():
    """Drop the profiler's own ``USDT:``/``STAGE:`` log lines from fd 2, pass everything else."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not line.startswith(("USDT:", "STAGE:")):
                    print(line, file=sys.stderr)


def _chosen_backends(text: str, device: torch.device) -> list[str]:
    """``--backends``' names, each once, in order: every one a backend this device runs (refused
    before anything is checked or timed)."""
    from .backends import BACKEND_NAMES, available_backends

    concrete = [n for n in BACKEND_NAMES if n != "auto"]
    names = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    if not names or any(n not in concrete for n in names):
        raise SystemExit(f"bench: --backends takes comma-separated names among {concrete}, got {text!r}")
    available = available_backends(device)
    unavailable = [n for n in names if n not in available]
    if unavailable:
        raise SystemExit(f"bench: --backends {unavailable} cannot run on {device.type} here (available: "
                         f"{available})")
    return names


def _timing_backends(device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to time, backends left out with why)."""
    from .backends import available_backends
    from .backends.triton.config import interpreting

    names, left_out = [], []
    for name in available_backends(device):
        if name == "triton" and device.type == "cpu" and interpreting():
            left_out.append("triton (Triton's CPU interpreter, not a performance path)")
            continue
        if name == "reference" and device.type == "cuda":
            left_out.append("reference (the plain PyTorch fallback; `--backends reference` to time it)")
            continue
        names.append(name)
    return names, left_out


# --------------------------------------------------------------------------------------------
# Float64 oracle


@dataclass
class CheckResult:
    backend: str
    passed: bool
    loss_err: float
    logps_err: float
    grad_err: float  # max over rows of max |g - g_ref| / max |g_ref| of the row
    grad_abs_err: float
    detail: str = ""

    def line(self, shape: Shape) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} fused_dpo_loss[{self.backend}] vs float64 oracle on {shape.describe()}: "
                f"loss err {self.loss_err:.2e}, logps err {self.logps_err:.2e}, "
                f"grad err {self.grad_abs_err:.2e} ({self.grad_err:.2e} of the row's largest entry)"
                + (f" -- {self.detail}" if self.detail else ""))


def oracle_dpo(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, beta: float = BETA,
               ignore_index: int = IGNORE_INDEX):
    """float64 (loss, per-sequence logps, d loss / d logits) of the DPO sigmoid loss, by autograd."""
    z = logits.detach().double().requires_grad_(True)
    mask = labels != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    seq = torch.where(mask, target - lse, torch.zeros_like(lse)).sum(-1)
    loss = dpo_sigmoid_loss(seq, ref_logps.double(), beta)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), seq.detach(), grad


def compare(backend: str, dtype: torch.dtype, loss, seq, grad, ref_loss, ref_seq, ref_grad,
            beta: float = BETA) -> CheckResult:
    """Errors of (loss, per-sequence logps, gradient rows) against their float64 oracle.

    Per-sequence sums are fp32 by design, so their error grows with their size; the loss and the
    gradient inherit it through the log-ratio margin (both are ``beta``-Lipschitz in it, the
    gradient relatively): the loss may be off by ``beta * 2 * (logps tolerance)`` and every
    gradient row by ``beta * 2 * (measured logps error)`` of its scale, on top of the rounding of
    the logits dtype.
    """
    # (an in-place gradient is the logits buffer itself, a leaf that requires grad)
    loss, seq, grad, ref_loss, ref_seq, ref_grad = (t.detach() for t in (loss, seq, grad, ref_loss, ref_seq, ref_grad))
    loss_err = abs(float(loss) - float(ref_loss))
    seq_err = (seq.double() - ref_seq.double()).abs()
    logps_err = float(seq_err.max())
    seq_tol = _VALUE_ATOL + _VALUE_RTOL * ref_seq.double().abs()
    g, e = grad.double().reshape(-1, grad.shape[-1]), ref_grad.double().reshape(-1, ref_grad.shape[-1])
    diff = (g - e).abs().amax(-1)
    scale = e.abs().amax(-1)
    rel = torch.where(scale > 0, diff / scale.clamp(min=1e-300), torch.where(diff > 0, math.inf, 0.0))
    grad_err, grad_abs_err = float(rel.max()), float(diff.max())
    problems = []
    loss_tol = _VALUE_ATOL + _VALUE_RTOL * abs(float(ref_loss)) + beta * 2 * float(seq_tol.max())
    if not loss_err <= loss_tol:
        problems.append("loss")
    if not bool((seq_err <= seq_tol).all()):
        problems.append("per-sequence logps")
    if not grad_err <= _GRAD_TOL[dtype] + beta * 2 * logps_err:
        problems.append("gradient")
    detail = ("out of tolerance: " + ", ".join(problems)) if problems else ""
    return CheckResult(backend, not problems, loss_err, logps_err, grad_err, grad_abs_err, detail)


def check_backend(backend: str, shape: Shape, device, seed: int = 2) -> CheckResult:
    """``fused_dpo_loss`` (validated, no in-place) of ``backend`` against the float64 oracle."""
    from .api import fused_dpo_loss

    logits, labels = make_batch(shape, device, seed=seed)
    oracle_device = logits.device
    ref_loss, ref_seq, ref_grad = None, None, None
    # Reference log-probs near the policy's so that the margins, and the loss, are O(1).
    with torch.no_grad():
        z = logits.double()
        mask = labels != IGNORE_INDEX
        seq0 = torch.where(mask, z.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
                           - torch.logsumexp(z, -1), 0.0).sum(-1)
        del z
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    ref_logps = (seq0 + 5.0 * torch.randn(seq0.shape, generator=gen, dtype=torch.float64).to(oracle_device)).float()
    ref_loss, ref_seq, ref_grad = oracle_dpo(logits, labels, ref_logps.double())
    try:
        out = fused_dpo_loss(logits, labels, ref_logps=ref_logps, beta=BETA, backend=backend, validate=True)
        (grad,) = torch.autograd.grad(out.loss, logits)
        seq = torch.cat([out.chosen_logps, out.rejected_logps]).detach()
    except Exception as exc:  # report it as a failure, with the reason
        return CheckResult(backend, False, math.nan, math.nan, math.nan, math.nan, f"raised {type(exc).__name__}: {exc}")
    return compare(backend, shape.dtype, out.loss.detach(), seq, grad, ref_loss, ref_seq, ref_grad)


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The CLI's work


def default_shape(device: torch.device) -> Shape:
    if device.type == "cuda":
        return Shape(pairs=4, seq=1024, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25)
    return Shape(pairs=2, seq=256, vocab=32000, dtype=torch.float32, prompt_frac=0.25)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"bench: --device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"bench: --device must be auto, cpu, cuda or cuda:N, got {name!r} (no kernel of ours "
                         f"runs on {device.type})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda requested but CUDA is not available")
    return device


@dataclass
class Measurement:
    name: str
    times_ms: list[float] | None
    peak_bytes: int | None
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


def measure(name: str, fn: Callable[[], object], device, iters: int, warmup: int) -> Measurement:
    try:
        times = time_ms(fn, device, iters, warmup)
        peak = peak_extra_bytes(fn, device)
    except Exception as exc:
        release_memory(device)
        return Measurement(name, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    release_memory(device)
    return Measurement(name, times, peak)


def run_bench(args) -> int:
    from .api import fused_dpo_loss

    device = resolve_device(args.device)
    base = default_shape(device)
    dtype = DTYPES[args.dtype] if args.dtype else base.dtype
    shape = Shape(
        pairs=args.batch or base.pairs,
        seq=args.seq or base.seq,
        vocab=args.vocab or base.vocab,
        dtype=dtype,
        prompt_frac=base.prompt_frac if args.prompt_frac is None else args.prompt_frac,
    )
    iters = args.iters or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)

    if args.backends:
        backends, left_out = _chosen_backends(args.backends, device), []
    else:
        backends, left_out = _timing_backends(device)

    print(f"dpo_kernels bench on {_device_name(device)}; torch {torch.__version__}, python {platform.python_version()}")
    print(f"shape: {shape.describe()}")
    if left_out:
        print("not timed: " + "; ".join(left_out))

    # 1. correctness on a smaller batch of the same vocabulary and dtype
    check_shape = Shape(pairs=min(shape.pairs, 2), seq=min(shape.seq, 128 if device.type == "cuda" else 64),
                        vocab=shape.vocab, dtype=shape.dtype, prompt_frac=shape.prompt_frac)
    all_passed = True
    for name in backends:
        result = check_backend(name, check_shape, device, seed=args.seed + 2)
        all_passed &= result.passed
        print(result.line(check_shape))
        release_memory(device)
    if not backends:
        print("FAIL no backend to check on this device")
        all_passed = False

    # 2. timing and memory; every variant gets the same fresh inputs (in-place variants overwrite
    # the logits with their gradient on every call: the timing does not depend on the values)
    def ours(name, inplace):
        def make(logits, labels, ref):
            def step():
                out = fused_dpo_loss(logits, labels, ref_logps=ref, beta=BETA, backend=name,
                                     inplace_backward=inplace, validate=False)
                return torch.autograd.grad(out.loss, logits)[0]
            return step
        return make

    def eager(logits, labels, ref):
        def step():
            loss = dpo_sigmoid_loss(eager_sequence_logps(logits, labels), ref)
            return torch.autograd.grad(loss, logits)[0]
        return step

    variants = [("eager (log_softmax(logits.float()).gather + autograd)", eager)]
    for name in backends:
        variants.append((f"fused_dpo_loss[{name}]", ours(name, False)))
        variants.append((f"fused_dpo_loss[{name}], inplace_backward", ours(name, True)))
    ref = reference_logps(shape.sequences, device)
    results = []
    for label, make in variants:
        logits, labels = make_batch(shape, device, seed=args.seed)
        results.append(measure(label, make(logits, labels, ref), device, iters, warmup))
        del logits, labels
        release_memory(device)

    eager_ms = results[0].median_ms
    rows = []
    for r in results:
        if r.error:
            rows.append([r.name, "error", "", "", r.error])
            continue
        speedup = f"{eager_ms / r.median_ms:.2f}x" if eager_ms and r.median_ms else ""
        rel_mem = f"{r.peak_bytes / shape.logits_bytes:.2f}x logits" if r.peak_bytes is not None else ""
        rows.append([r.name, f"{r.median_ms:.2f}", f"{min(r.times_ms):.2f}",
                     f"{fmt_bytes(r.peak_bytes)} ({rel_mem})" if rel_mem else fmt_bytes(r.peak_bytes), speedup])
    timer = "CUDA events" if device.type == "cuda" else "perf_counter"
    print()
    print(f"forward+backward, median of {iters} after {warmup} warm-up ({timer}); "
          "peak extra memory includes the logits gradient")
    print(markdown_table(["variant", "median ms", "min ms", "peak extra memory", "speed-up vs eager"], rows))
    if any(r.error for r in results):
        all_passed = False
    return 0 if all_passed else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {threads} torch threads)"


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="preference pairs B (the logits hold 2B sequences); default 2 on CPU, 4 on CUDA")
    parser.add_argument("--seq", type=positive_int, default=None, help="tokens per sequence (default 256 CPU, 1024 CUDA)")
    parser.add_argument("--vocab", type=positive_int, default=None, help="vocabulary size (default 32000 CPU, 128256 CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="logits dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--prompt-frac", type=fraction, default=None,
                        help="fraction of each sequence's first tokens that are ignored (default 0.25)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed runs per variant (default 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed runs first (default 1 CPU, 3 CUDA)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to check and time (default: every available one)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the inputs (default 0)")


def main(args) -> int:
    code = run_bench(args)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.bench", description=__doc__.split("\n")[0].split(": ", 1)[-1].replace("``", ""))
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
