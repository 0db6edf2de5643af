"""Hidden-state path, forward + backward: ours (``fused_linear_dpo_loss``, every mode) vs baselines.

Each case is one step of the DPO sigmoid loss from ``hidden [2B, T, H]`` and ``weight [V, H]``
to both gradients (``torch.autograd.grad(loss, (hidden, weight))``), timed by pytest-benchmark
(``pytest benchmarks/ --benchmark-only``; add ``--benchmark-json out.json`` to keep the numbers).
``extra_info`` records the shape, the number of valid tokens, the 3- and 4-matmul flop counts
over valid tokens, and the peak memory one step allocates beyond its inputs (both gradients
included). Variants whose package or device is missing are skipped with the reason; ours is
skipped while ``dpo_kernels`` has no ``fused_linear_dpo_loss``.

Shapes: on CUDA the design's reference ones (bf16; 8 x 1024 tokens with the first 25% ignored, H=4096,
V=128256; 4 x 2048, H=3584, V=152064; 2 x 16384, H=4096, V=128256, long context); on the CPU
4 x 256 tokens, H=256, V=32000 in fp32 and bf16 (the CPU suite takes about a minute on two cores).
"""
from __future__ import annotations

import pytest
import torch
from baselines import Unavailable
from baselines_hidden import HIDDEN_VARIANTS, HiddenShape, make_hidden_batch, near_reference_logps
from conftest import DEVICE, ON_CUDA, ROUNDS, WARMUP_ROUNDS, one_shape_at_a_time

from dpo_kernels.bench import dtype_name, peak_extra_bytes, release_memory

if ON_CUDA:
    SHAPES = [
        HiddenShape(pairs=4, seq=1024, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),
        HiddenShape(pairs=2, seq=2048, hidden=3584, vocab=152064, dtype=torch.bfloat16, prompt_frac=0.25),
        HiddenShape(pairs=1, seq=16384, hidden=4096, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),
    ]
else:
    SHAPES = [
        HiddenShape(pairs=2, seq=256, hidden=256, vocab=32000, dtype=torch.float32, prompt_frac=0.25),
        HiddenShape(pairs=2, seq=256, hidden=256, vocab=32000, dtype=torch.bfloat16, prompt_frac=0.25),
    ]

OOM_ERRORS = tuple(e for e in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)) if e)


class HiddenBatch:
    def __init__(self, shape: HiddenShape, device: torch.device):
        self.shape = shape
        self.hidden, self.weight, self.labels = make_hidden_batch(shape, device, seed=0)
        self.ref_logps = near_reference_logps(self.hidden, self.weight, self.labels)


@pytest.fixture(scope="module")
def hidden_batches():
    yield from one_shape_at_a_time(HiddenBatch)


@pytest.mark.parametrize("variant", HIDDEN_VARIANTS, ids=[v.id for v in HIDDEN_VARIANTS])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id() for s in SHAPES])
def test_hidden_path(benchmark, hidden_batches, shape, variant):
    try:
        variant.check(DEVICE)
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        batch = hidden_batches(shape)
    except OOM_ERRORS as exc:
        release_memory(DEVICE)
        pytest.skip(f"out of memory allocating the inputs: {str(exc).splitlines()[0]}")
    step = variant.step(batch.hidden, batch.weight, batch.labels, batch.ref_logps)

    def target():
        grads = step()
        if ON_CUDA:
            torch.cuda.synchronize(DEVICE)
        return grads

    try:
        peak = peak_extra_bytes(step, DEVICE)
    except OOM_ERRORS as exc:
        release_memory(DEVICE)
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
    benchmark.group = "hidden-" + shape.id()
    benchmark.extra_info.update({
        "variant": variant.description,
        "device": torch.cuda.get_device_name(DEVICE) if ON_CUDA else "cpu",
        "shape": {"sequences": shape.sequences, "seq": shape.seq, "hidden": shape.hidden, "vocab": shape.vocab},
        "dtype": dtype_name(shape.dtype),
        "prompt_frac": shape.prompt_frac,
        "valid_tokens": shape.valid_tokens,
        "matmul_flops_valid": shape.matmul_flops,
        "floor_matmuls": variant.floor_matmuls,
        "grads_bytes": shape.grads_bytes,
        "full_logits_bytes": shape.logits_bytes,
        "peak_extra_bytes": peak,
    })
    try:
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    except OOM_ERRORS as exc:
        release_memory(DEVICE)
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
    release_memory(DEVICE)
