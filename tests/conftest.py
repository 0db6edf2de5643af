"""Test configuration: Triton runs through its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module defining a @triton.jit kernel is imported (the
decorator reads it), hence at the very top, before dpo_kernels is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dpo_kernels.backends import triton_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Every backend of the kernel contract runs the same suite.
BACKENDS = ["reference"] + (["triton"] if triton_available() else []) + (["cpu"] if DEVICE.type == "cpu" and __import__("dpo_kernels.backends", fromlist=["_"]).cpu_extension_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def small_block():
    """Force a 256-wide vocabulary block so that small test vocabularies span several blocks."""
    from dpo_kernels.backends.triton.config import set_block_override

    set_block_override(256)
    yield 256
    set_block_override(None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
