"""Shared setup of the benchmark suites (``pytest benchmarks/ --benchmark-only``).

TRITON_INTERPRET is deliberately NOT set here: on a CPU-only machine the Triton backend runs only
through its interpreter, which is not a performance path, so the suites leave it out. The device
is CUDA when available, else the CPU; shapes are sized for it (see ``test_logits_path.py``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import baselines`

from dpo_kernels.bench import (  # noqa: E402
    Shape,
    dtype_name,
    make_batch,
    peak_extra_bytes,
    reference_logps,
    release_memory,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# Timed rounds per case, after warm-up rounds (the first GPU round also compiles kernels).
ROUNDS = 20 if ON_CUDA else 5
WARMUP_ROUNDS = 3 if ON_CUDA else 1


def shape_id(shape: Shape) -> str:
    return f"{shape.sequences}x{shape.seq}x{shape.vocab}-{dtype_name(shape.dtype)}-prompt{int(round(shape.prompt_frac * 100))}"


class Batch:
    """Logits (a leaf that requires grad), labels and reference log-probs of one shape, and a
    pristine copy for variants that overwrite the logits (restored outside the timed region)."""

    def __init__(self, shape: Shape, device: torch.device):
        self.shape = shape
        self.device = device
        self.logits, self.labels = make_batch(shape, device, seed=0)
        self.ref_logps = reference_logps(shape.sequences, device)
        self._pristine = None

    def keep_pristine(self) -> None:
        if self._pristine is None:
            self._pristine = self.logits.detach().clone()

    def restore(self) -> None:
        if self._pristine is not None:
            with torch.no_grad():
                self.logits.copy_(self._pristine)


def one_shape_at_a_time(build):
    """A module fixture's body: ``get(shape)`` returns ``build(shape, DEVICE)``, built on first use
    and kept while the same shape is asked for; one shape's inputs at a time (GPU shapes are GBs),
    released when the module is done."""
    cache: dict = {}

    def get(shape):
        if shape not in cache:
            cache.clear()
            release_memory(DEVICE)
            cache[shape] = build(shape, DEVICE)
        return cache[shape]

    yield get
    cache.clear()
    release_memory(DEVICE)


@pytest.fixture(scope="module")
def batches():
    """One :class:`Batch` per shape, built on first use and kept for the module."""
    yield from one_shape_at_a_time(Batch)


def run_case(benchmark, batch: Batch, step, description: str, inplace: bool) -> None:
    """Peak memory of one call (untimed), then the pedantic timing; both land in extra_info."""
    shape = batch.shape
    if inplace:
        batch.keep_pristine()

    def target():
        grad = step()
        if ON_CUDA:
            torch.cuda.synchronize(DEVICE)
        return grad

    def setup():
        batch.restore()  # in-place variants start from the same logits every round

    try:
        batch.restore()
        peak = peak_extra_bytes(step, DEVICE)
    except torch.cuda.OutOfMemoryError as exc:
        release_memory(DEVICE)
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
    benchmark.extra_info.update({
        "variant": description,
        "device": torch.cuda.get_device_name(DEVICE) if ON_CUDA else "cpu",
        "shape": [shape.sequences, shape.seq, shape.vocab],
        "dtype": dtype_name(shape.dtype),
        "prompt_frac": shape.prompt_frac,
        "valid_token_fraction": shape.valid_fraction,
        "logits_bytes": shape.logits_bytes,
        "peak_extra_bytes": peak,
        "peak_extra_over_logits": None if peak is None else peak / shape.logits_bytes,
    })
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    release_memory(DEVICE)
