"""Element offsets beyond 2^31 (issue 7): a [2B, T, V] view whose last rows start past 2^31
elements into its buffer, so any 32-bit offset arithmetic in a kernel reads the wrong row.

The buffer is reserved with ``torch.empty`` (4+ GiB of address space, pages never touched but for
the few real rows), so RSS stays small. The C++ kernels' own test of this is
``tests/backends/test_cpu.py::test_offsets_beyond_two_to_the_31``; here: the token-level contract
of the other backends, and ``fused_dpo_loss`` end to end on every backend (cpu included).
"""
import pytest
import torch

import oracle
from conftest import BACKENDS
from dpo_kernels import fused_dpo_loss
from dpo_kernels.logprobs import token_logprobs
from oracle import IGNORE, assert_close_grad, assert_close_values

V = 3000
TWO31 = 2**31
RSS_GROWTH_LIMIT_MB = 512  # the real rows are a few KB; touching the 4 GiB buffer would show


def _rss_mb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


@pytest.fixture
def huge_view(layout):
    """``(logits [2, 2, V] bf16 view, rss_before)``; the last row starts past 2^31 elements."""
    if layout == "batch_stride":  # the rejected sequence starts at 2^31 + V + 32
        strides = (TWO31 + V + 32, V, 1)
    else:  # each sequence's second token row starts past 2^31 (a huge T stride)
        strides = (2 * V + 64, TWO31 + 3 * V, 1)
    numel = max(strides[0], strides[1]) + strides[0] + strides[1] + V
    rss_before = _rss_mb()
    try:
        buffer = torch.empty(numel, dtype=torch.bfloat16)  # 4 GiB of address space, a few pages touched
    except (RuntimeError, MemoryError) as exc:  # e.g. strict overcommit or a small address space
        pytest.skip(f"cannot reserve {numel * 2 / 2**30:.1f} GiB of address space: {exc}")
    logits = buffer.as_strided((2, 2, V), strides)
    assert logits.storage_offset() + (1 * strides[0] + 1 * strides[1]) >= TWO31
    logits.copy_(torch.randn(2, 2, V) * 3)  # fresh random values, never zeros
    yield logits, rss_before
    del logits, buffer


def _check_rss(rss_before):
    if rss_before >= 0:
        grown = _rss_mb() - rss_before
        assert grown < RSS_GROWTH_LIMIT_MB, f"RSS grew by {grown} MB: the huge buffer was touched or copied"


LABELS = [[5, 2999], [7, 1234]]
TOKEN_BACKENDS = [b for b in BACKENDS if b != "cpu"]  # cpu: tests/backends/test_cpu.py


@pytest.mark.parametrize("layout", ["batch_stride", "seq_stride"])
@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_token_logprobs_and_gradient_past_two_to_the_31(backend, huge_view):
    logits, rss_before = huge_view
    labels = torch.tensor(LABELS)
    leaf = logits.detach().requires_grad_(True)
    tok = token_logprobs(leaf, labels, backend=backend, extras=("logits_sum", "entropy"))
    want_logp, want_lse = oracle.token_logprobs(logits.detach(), labels)
    assert_close_values(tok.logp, want_logp, torch.bfloat16, "logp")
    assert_close_values(tok.lse, want_lse, torch.bfloat16, "lse")
    assert_close_values(tok.extras["logits_sum"], logits.detach().double().sum(-1), torch.bfloat16, "logits_sum")
    coef = torch.randn(2, 2)
    (tok.logp * coef).sum().backward()
    z = logits.detach().double().requires_grad_(True)
    (oracle.token_logprobs(z, labels)[0] * coef.double()).sum().backward()
    assert_close_grad(leaf.grad, z.grad, torch.bfloat16)
    _check_rss(rss_before)


@pytest.mark.parametrize("layout,inplace", [
    ("batch_stride", False), ("batch_stride", True), ("seq_stride", False),
    ("seq_stride", True),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_past_two_to_the_31(backend, huge_view, inplace):
    logits, rss_before = huge_view
    values = logits.detach().clone()
    labels = torch.tensor(LABELS)
    labels[1, 0] = IGNORE
    ref = torch.randn(2) * 5
    leaf = logits.detach().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend, inplace_backward=inplace,
                         token_metrics=True, shift=False)
    out.loss.backward()
    want = oracle.dpo(values, labels, ref_logps=ref, token_metrics=True)
    oracle.assert_matches_oracle(out, want, leaf.grad, torch.bfloat16)
    if inplace:
        assert torch.equal(logits, leaf.grad)  # written through the huge strides, in place
    _check_rss(rss_before)
