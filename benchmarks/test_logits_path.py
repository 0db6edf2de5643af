"""Logits path, forward + backward: ours (every available non-interpreter backend) vs baselines.

Each case is one step of the DPO sigmoid loss from ``[2B, T, V]`` logits to their gradient
(``torch.autograd.grad``), timed by pytest-benchmark (``pytest benchmarks/ --benchmark-only``;
add ``--benchmark-json out.json`` to keep the numbers). ``extra_info`` records the shape, dtype,
the fraction of scored tokens and the peak memory one step allocates beyond its inputs (the
gradient included). Baselines whose package or device is missing are skipped with the reason.

Shapes: on CUDA the design's reference ones (bf16; 8x1024x128256 with the first 25% of tokens ignored,
the same with none ignored, 4x4096x151936 where N*V > 2^31); on the CPU small ones so that the
whole suite takes a few minutes on two cores.
"""
from __future__ import annotations

import pytest
import torch
from baselines import Unavailable, logits_path_variants, ours_backends
from conftest import DEVICE, ON_CUDA, run_case, shape_id

from dpo_kernels.bench import Shape

if ON_CUDA:
    SHAPES = [
        Shape(pairs=4, seq=1024, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.25),
        Shape(pairs=4, seq=1024, vocab=128256, dtype=torch.bfloat16, prompt_frac=0.0),
        Shape(pairs=2, seq=4096, vocab=151936, dtype=torch.bfloat16, prompt_frac=0.25),
    ]
else:
    SHAPES = [
        Shape(pairs=2, seq=128, vocab=32000, dtype=torch.float32, prompt_frac=0.25),
        Shape(pairs=2, seq=128, vocab=32000, dtype=torch.bfloat16, prompt_frac=0.25),
    ]

VARIANTS = logits_path_variants(ours_backends(DEVICE))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_logits_path(benchmark, batches, shape, variant):
    batch = batches(shape)
    try:
        step = variant.step(batch.logits, batch.labels, batch.ref_logps)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = shape_id(shape)
    run_case(benchmark, batch, step, variant.description, variant.inplace)
