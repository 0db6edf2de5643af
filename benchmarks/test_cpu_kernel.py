"""The C++ CPU backend, forward + backward, against eager, the reference backend and the exp floor.

    pytest benchmarks/test_cpu_kernel.py --benchmark-only [--benchmark-json out.json]

One step = per-token log-probs of ``N = 2048`` tokens (``[2, 1024, V]`` logits, every token
scored) and their gradient ``torch.autograd.grad(logp, logits, coef)``, for V = 32000 and 128256,
fp32 and bf16. Variants (same inputs, same process, one group per shape):

- ``exp_floor``: ``torch.exp`` over ``2 * N * V`` fp32 elements (two ``torch.exp(x, out=y)`` over
  an ``N x V`` buffer): the two exponentials per logit an exact forward + backward needs, at
  ATen's own exp throughput (and with its read and write of the data), measured in the same run;
- ``eager``: ``torch.log_softmax(logits.float(), -1).gather(...)`` and autograd's backward;
- ``reference``: ``dpo_kernels.token_logprobs(..., backend="reference")``;
- ``cpu`` / ``cpu_inplace``: ``dpo_kernels.token_logprobs(..., backend="cpu")``, with the
  in-place backward off / on (the in-place rounds start from restored logits, outside the timing);
- ``cpu_extras``: ``cpu`` with every same-pass extra (``backends.EXTRAS``: logits sum, entropy,
  argmax == label, logsumexp(2z)) computed by the forward: the price of the extras.

``extra_info`` records the shape, dtype, threads, the logits size, the peak extra memory of one
step (RSS high-water mark growth, Linux: ``/proc/self/clear_refs`` + ``VmHWM``; allocations here
are large enough to be fresh mmaps, so RSS growth is allocation), for ours the extra memory its
known outputs account for, and for ours the ratios to the variants timed before it (the ratios use
the minimum round time: the box is shared, the minimum is the least disturbed). A summary table is
printed at the end of the module. Skipped when ``dpo_kernels._C`` is not built.
"""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from dpo_kernels import token_logprobs
from dpo_kernels.backends import EXTRAS

try:
    from dpo_kernels.backends import cpu as _cpu_backend
except ImportError:  # extension not built
    _cpu_backend = None

N_TOKENS = 2048
SHAPES = [(V, dtype) for V in (32000, 128256) for dtype in (torch.float32, torch.bfloat16)]
VARIANTS = ["exp_floor", "eager", "reference", "cpu", "cpu_inplace", "cpu_extras"]  # ours last: ratios need the others
ROUNDS = 5
WARMUP_ROUNDS = 1

_results: dict[tuple[int, str], dict[str, dict]] = {}  # (V, dtype) -> variant -> stats


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rss_bytes() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
    except (OSError, ValueError):
        return None


def peak_extra_rss(fn) -> int | None:
    """Growth of the resident-set high-water mark during ``fn()`` (its result kept alive)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_bytes()
    if before is None:
        return None
    out = fn()
    after = _rss_bytes()
    del out
    return max(0, after["VmHWM"] - before["VmRSS"])


class _Case:
    def __init__(self, V: int, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        self.V, self.dtype = V, dtype
        self.pristine = (torch.randn(2, N_TOKENS // 2, V, generator=gen) * 3).to(dtype)
        self.labels = torch.randint(0, V, (2, N_TOKENS // 2), generator=gen)
        self.coef = torch.randn(2, N_TOKENS // 2, generator=gen)
        self.logits = self.pristine.clone().requires_grad_(True)

    @property
    def logits_bytes(self) -> int:
        return self.pristine.numel() * self.pristine.element_size()

    def restore(self) -> None:
        with torch.no_grad():
            self.logits.copy_(self.pristine)

    def step(self, variant: str):
        labels, coef, leaf = self.labels, self.coef, self.logits
        if variant == "exp_floor":
            x = torch.randn(N_TOKENS * self.V)
            y = torch.empty_like(x)

            def floor():
                torch.exp(x, out=y)
                torch.exp(x, out=y)
                return y

            return floor
        if variant == "eager":

            def eager():
                logp = torch.log_softmax(leaf.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                return torch.autograd.grad(logp, leaf, coef)[0]

            return eager
        backend = "cpu" if variant.startswith("cpu") else variant
        inplace = variant == "cpu_inplace"
        extras = EXTRAS if variant == "cpu_extras" else ()

        def ours():
            logp = token_logprobs(leaf, labels, backend=backend, inplace_backward=inplace, extras=extras).logp
            return torch.autograd.grad(logp, leaf, coef)[0]

        return ours


@pytest.fixture(scope="module")
def cases(request):
    cache: dict = {}

    def get(V, dtype):
        if (V, dtype) not in cache:
            cache.clear()
            gc.collect()
            cache[(V, dtype)] = _Case(V, dtype)
        return cache[(V, dtype)]

    yield get
    cache.clear()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and _results:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            for line in summary_lines():
                reporter.write_line(line)


def summary_lines() -> list[str]:
    lines = [
        "",
        f"CPU backend, forward + backward, N={N_TOKENS} tokens, {torch.get_num_threads()} threads "
        "(min of rounds, ms; ratios = other / ours, floor ratio = ours / floor)",
        "| V | dtype | exp floor | eager | reference | cpu | cpu in place | cpu all extras | eager / cpu "
        "| reference / cpu | cpu / floor | cpu in place / floor | cpu all extras / cpu "
        "| extra mem cpu / in place (x logits) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (V, dtype_name), res in _results.items():
        t = {k: v["min_ms"] for k, v in res.items()}
        if "cpu" not in t:
            continue

        def ratio(a, b):
            return f"{t[a] / t[b]:.2f}x" if a in t and b in t else "-"

        def mem(k):
            m = res.get(k, {}).get("peak_extra_over_logits")
            return "-" if m is None else f"{m:.2f}"

        lines.append(
            f"| {V} | {dtype_name} | " + " | ".join(f"{t[k]:.1f}" if k in t else "-" for k in VARIANTS)
            + f" | {ratio('eager', 'cpu')} | {ratio('reference', 'cpu')} | {ratio('cpu', 'exp_floor')} "
            f"| {ratio('cpu_inplace', 'exp_floor')} | {ratio('cpu_extras', 'cpu')} "
            f"| {mem('cpu')} / {mem('cpu_inplace')} |"
        )
    return lines


@pytest.mark.parametrize(
    "V, dtype, variant",
    [(V, dtype, variant) for V, dtype in SHAPES for variant in VARIANTS],
    ids=[f"V{V}-{_dtype_name(dtype)}-{variant}" for V, dtype in SHAPES for variant in VARIANTS],
)
def test_cpu_kernel(benchmark, cases, V, dtype, variant):
    if _cpu_backend is None:
        pytest.skip("dpo_kernels._C is not built: pip install --no-build-isolation -e .")
    case = cases(V, dtype)
    step = case.step(variant)
    inplace = variant == "cpu_inplace"
    benchmark.group = f"cpu-N{N_TOKENS}-V{V}-{_dtype_name(dtype)}"

    case.restore()
    peak = peak_extra_rss(step)
    case.restore()
    info = {
        "variant": variant,
        "shape": [2, N_TOKENS // 2, V],
        "dtype": _dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels_isa": _cpu_backend.cpu_capability(),
        "logits_bytes": case.logits_bytes,
        "peak_extra_rss_bytes": peak,
        "peak_extra_over_logits": None if peak is None else peak / case.logits_bytes,
    }
    if variant.startswith("cpu"):
        # What ours must allocate: the gradient (none in place), three [N] fp32 vectors and the extras.
        n_vectors = 3 + (len(EXTRAS) if variant == "cpu_extras" else 0)
        expected = (0 if inplace else case.logits_bytes) + n_vectors * N_TOKENS * 4
        info["expected_extra_bytes"] = expected
        info["expected_extra_over_logits"] = expected / case.logits_bytes
    benchmark.extra_info.update(info)

    benchmark.pedantic(step, setup=case.restore if inplace else None, rounds=ROUNDS,
                       warmup_rounds=WARMUP_ROUNDS, iterations=1)

    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    res = _results.setdefault((V, _dtype_name(dtype)), {})
    res[variant] = {"min_ms": stats.stats.min * 1e3, "median_ms": stats.stats.median * 1e3,
                    "peak_extra_over_logits": info["peak_extra_over_logits"]}
    if variant.startswith("cpu"):
        mine = res[variant]["min_ms"]
        for other in ("exp_floor", "eager", "reference"):
            if other in res:
                benchmark.extra_info[f"speedup_vs_{other}"] = res[other]["min_ms"] / mine
        if "exp_floor" in res:
            benchmark.extra_info["over_exp_floor"] = mine / res["exp_floor"]["min_ms"]
