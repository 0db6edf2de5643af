"""The Triton backend's launch rules (``backends/triton/config.py``), decided on the host."""
import pytest
import torch

pytest.importorskip("triton")

from dpo_kernels.backends.triton import config  # noqa: E402


@pytest.fixture
def on_gpu_rules(monkeypatch):
    """The rules a GPU process sees (this process may be interpreting)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield
    config.set_forward_and_grad_fusion(None)


def test_forward_and_grad_is_one_kernel_only_for_rows_that_can_stay_in_l2(on_gpu_rules):
    assert config.fuse_forward_and_grad(32000, torch.bfloat16)  # 64 000 B rows
    assert config.fuse_forward_and_grad(32768, torch.float16)  # 64 KB exactly
    assert not config.fuse_forward_and_grad(32769, torch.bfloat16)
    assert not config.fuse_forward_and_grad(32000, torch.float32)  # 128 000 B
    assert not config.fuse_forward_and_grad(128256, torch.bfloat16)  # Llama-3: 256 KB rows


def test_forward_and_grad_override_wins_and_none_restores_the_rule(on_gpu_rules):
    config.set_forward_and_grad_fusion(True)
    assert config.fuse_forward_and_grad(128256, torch.bfloat16)
    config.set_forward_and_grad_fusion(False)
    assert not config.fuse_forward_and_grad(1000, torch.bfloat16)
    config.set_forward_and_grad_fusion(None)
    assert not config.fuse_forward_and_grad(128256, torch.bfloat16)


def test_the_interpreter_runs_the_one_kernel_so_the_cpu_tests_cover_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.fuse_forward_and_grad(128256, torch.bfloat16)
