"""The one dispatch point: backend names, availability, and clear refusals."""
import pytest
import torch

from dpo_kernels import backends

CPU = torch.device("cpu")


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'"):
        backends.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.load_backend("nope")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    # Import the Triton kernels while interpreting (conftest's setting): @triton.jit reads
    # TRITON_INTERPRET at import, and the first import under "0" below would leave compiled-mode
    # kernels for every later test in the process (on a CPU: "0 active drivers").
    backends.load_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve_backend("triton", CPU)
    assert "triton" not in backends.available_backends(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve_backend("triton", CPU) == "triton"


def test_reference_is_always_available_and_auto_never_picks_the_interpreter():
    assert "reference" in backends.available_backends(CPU)
    assert backends.resolve_backend("auto", CPU) in ("cpu", "reference")


def test_every_backend_exposes_the_contract():
    for name in backends.available_backends(CPU):
        module = backends.load_backend(name)
        assert callable(module.token_logprobs_forward) and callable(module.token_logprobs_backward)
