"""The C++ CPU backend (csrc/, ``dpo_kernels._C``) against the float64 oracle.

``test_contract.py`` runs the shared contract on every backend (this one included); the tests here
aim at what is specific to the C++ kernels: vocabularies that span several 2048-element chunks,
the contiguous / converted / gathered row paths, every CPU-capability build, thread-count
independence, 64-bit offsets, non-finite logits across chunk boundaries, the registered operators
(opcheck, fake impls) and the backend selection. Skipped when the extension is not built.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from oracle import IGNORE, assert_close_grad, token_logprobs

cpu = pytest.importorskip("dpo_kernels.backends.cpu", reason="C++ extension dpo_kernels._C not built")

import dpo_kernels.backends as backends  # noqa: E402
from dpo_kernels import token_logprobs as token_logprobs_autograd  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 7, 1000, 5003]  # 5003: three 2048-element chunks, the last one partial
OPS = torch.ops.dpo_kernels


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _labels(B, T, V, ignore_frac=0.3):
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = IGNORE
    labels[0, 0] = IGNORE
    return labels


def _oracle_grad(logits, labels, coef):
    z = logits.detach().double().requires_grad_(True)
    logp, _ = token_logprobs(z, labels)
    (logp * coef.double()).sum().backward()
    return z.grad


def _check_forward(logits, labels, logp, lse, logits_sum=None):
    dtype = logits.dtype
    tol = _tol(dtype)
    want_logp, want_lse = token_logprobs(logits, labels)
    assert logp.dtype == lse.dtype == _acc(dtype)
    assert logp.is_contiguous() and lse.is_contiguous() and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol * 10)
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all()
    if logits_sum is not None:
        V = logits.shape[-1]
        want_sum = torch.where(ignored, 0.0, logits.double().sum(-1))
        torch.testing.assert_close(logits_sum.double(), want_sum, rtol=tol, atol=tol * 10 * V**0.5)
        assert (logits_sum[ignored] == 0).all()


def _check_backward(logits, labels, coef, grad):
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert grad.stride() == torch.empty_like(logits).stride()
    assert_close_grad(grad, _oracle_grad(logits, labels, coef), logits.dtype)
    assert (grad[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_forward_backward_match_oracle(dtype, V):
    B, T = 3, 6
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = _labels(B, T, V)
    logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels, IGNORE, True)
    _check_forward(logits, labels, logp, lse, logits_sum)
    assert cpu.token_logprobs_forward(logits, labels, IGNORE, False)[2] is None
    coef = torch.randn(B, T, dtype=_acc(dtype))
    _check_backward(logits, labels, coef, cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False))


def _views(dtype):
    """Strided views of logits that the kernels must read in place; (name, logits, labels)."""
    V = 2500
    base = (torch.randn(4, 9, V + 40) * 3).to(dtype)
    full_labels = _labels(4, 9, V)
    yield "shifted logits[:, :-1]", base[:, :-1, :V], full_labels[:, 1:]
    yield "vocabulary slice", base[1:3, 2:7, 17 : 17 + V], _labels(2, 5, V)
    yield "vocabulary stride 2", base[:, :5, : 2 * (V // 2) : 2], _labels(4, 5, V // 2)
    yield "transposed [T, B, V]", base[:, :, :V].transpose(0, 1), _labels(9, 4, V)
    yield "vocabulary-major layout", base[:, :, :V].permute(2, 0, 1).contiguous().permute(1, 2, 0), _labels(4, 9, V)
    yield "expanded batch (stride 0)", base[:1, :3, :V].expand(3, 3, V), _labels(3, 3, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_strided_views(dtype):
    for name, logits, labels in _views(dtype):
        assert not logits.is_contiguous(), name
        logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels, IGNORE, True)
        _check_forward(logits, labels, logp, lse, logits_sum)
        coef = torch.randn(labels.shape, dtype=_acc(dtype))
        grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
        _check_backward(logits, labels, coef, grad)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_out_of_range_labels_give_nan_and_no_out_of_bounds_read(label_dtype):
    """The rows sit inside a NaN-filled buffer: a read outside a row would poison a finite row."""
    V = 2100  # two chunks
    buffer = torch.full((3, 4, V + 96), float("nan"))
    logits = buffer[:, :, 48 : 48 + V]
    logits.copy_(torch.randn(3, 4, V) * 3)
    labels = torch.randint(0, 200, (3, 4))
    bad = torch.zeros(3, 4, dtype=torch.bool)
    if label_dtype != torch.uint8:
        labels[0, 1] = V  # one past the end
        labels[1, 2] = -7  # negative, not ignore_index
        bad[0, 1] = bad[1, 2] = True
        labels[2, 0] = IGNORE
    if label_dtype == torch.int64:
        labels[2, 3] = 2**40  # would overflow a 32-bit offset
        bad[2, 3] = True
    if label_dtype == torch.uint8:
        labels[1, 1] = 255  # in range: V > 255
    labels_typed = labels.to(label_dtype)
    ignore = IGNORE if label_dtype != torch.uint8 else 250
    labels[labels_typed.long() == 250] = IGNORE  # what the oracle should ignore (uint8 only)
    logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels_typed[:, :], ignore, True)
    assert torch.isnan(logp[bad]).all()
    ok = ~bad
    want_logp, want_lse = token_logprobs(logits, torch.where(bad, 0, labels))
    torch.testing.assert_close(logp[ok].double(), want_logp[ok], rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)
    assert torch.isfinite(lse).all() and torch.isfinite(logits_sum).all()
    coef = torch.randn(3, 4)
    grad = cpu.token_logprobs_backward(logits, labels_typed, lse, coef, ignore, False)
    # A bad label has no true class in the row: its gradient is -coef * softmax.
    z = logits.double()
    want = _oracle_grad(logits, torch.where(bad, 0, labels), coef)
    want[bad] = (-coef.double()[..., None] * torch.softmax(z, -1))[bad]
    assert_close_grad(grad, want, torch.float32)
    in_place = buffer.clone()
    cpu.token_logprobs_backward(in_place[:, :, 48 : 48 + V], labels_typed, lse, coef, ignore, True)
    assert torch.equal(in_place[:, :, 48 : 48 + V], grad)
    for buf in (buffer, in_place):  # nothing written outside the view either
        assert torch.isnan(buf[:, :, :48]).all() and torch.isnan(buf[:, :, 48 + V :]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_out_of_place_bitwise(dtype):
    B, T, V = 2, 7, 3000
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = _labels(B, T, V)
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, False)
    coef = torch.randn(B, T, dtype=_acc(dtype))
    out_of_place = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
    _check_backward(logits, labels, coef, out_of_place)
    buffer = logits.clone()
    grad = cpu.token_logprobs_backward(buffer, labels, lse, coef, IGNORE, True)
    assert grad is buffer
    assert torch.equal(grad, out_of_place)
    # A strided in-place gradient (vocabulary stride 2) writes its own elements only.
    wide = torch.randn(B, T, 2 * V).to(dtype)
    view = wide[:, :, ::2]
    view.copy_(logits)
    between = wide[:, :, 1::2].clone()
    cpu.token_logprobs_backward(view, labels, lse, coef, IGNORE, True)
    assert torch.equal(view, out_of_place)
    assert torch.equal(wide[:, :, 1::2], between)  # untouched


def test_inplace_on_overlapping_logits_is_refused():
    logits = torch.randn(1, 3, 50).expand(2, 3, 50)
    labels = torch.randint(0, 50, (2, 3))
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, False)
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)
    with pytest.raises(RuntimeError, match="internal overlap"):
        cpu.token_logprobs_backward(logits, labels, lse, torch.ones(2, 3), IGNORE, True)


def test_results_do_not_depend_on_the_thread_count():
    B, T, V = 4, 48, 1500  # 192 rows: every thread count below splits them differently
    logits = (torch.randn(B, T, V) * 3).to(torch.bfloat16)
    labels = _labels(B, T, V)
    coef = torch.randn(B, T)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels, IGNORE, True)
            grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
            results.append((logp, lse, logits_sum, grad))
    finally:
        torch.set_num_threads(before)
    _check_forward(logits, labels, *results[0][:3])
    _check_backward(logits, labels, coef, results[0][3])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_non_finite_logits_across_chunks():
    V = 5003
    rows = torch.randn(6, V) * 3
    rows[0, :4500] = float("-inf")  # masked prefix: the running max starts at -inf for two chunks
    rows[1, :] = float("-inf")  # whole row masked: lse = -inf, never -inf - -inf inside
    rows[2, 4100] = float("inf")  # +inf in the last chunk: lse = +inf (torch.logsumexp)
    rows[3, 3000] = float("nan")  # NaN in the middle chunk
    rows[4] -= 200.0  # far below zero everywhere: exp(z) alone would underflow to 0
    rows[5, 4999] = 80.0  # the max arrives in the last chunk: the running sum is rescaled
    logits = rows[None]
    labels = torch.tensor([[4600, 3, 4100, 3, 17, 4999]])
    logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels, IGNORE, True)
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4, equal_nan=True)
    torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-4, equal_nan=True)
    assert lse[0, 1] == float("-inf") and lse[0, 2] == float("inf") and torch.isnan(lse[0, 3])
    assert torch.isfinite(logp[0, [0, 4, 5]]).all()
    torch.testing.assert_close(logits_sum.double(), logits.double().sum(-1), rtol=2e-5, atol=1e-2, equal_nan=True)
    coef = torch.randn(1, 6)
    grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
    want = _oracle_grad(logits, labels, coef)
    finite = [0, 4, 5]
    assert_close_grad(grad[0, finite], want[0, finite], torch.float32)
    assert torch.isnan(grad[0, 3]).all()  # NaN propagates as in torch.exp
    assert (grad[0, 0, :4500] == 0).all()


def test_offsets_beyond_two_to_the_31():
    """A [2, 2, V] view whose second sequence starts 2^31 + V elements into its buffer."""
    V = 3000
    stride_b = 2**31 + V + 32
    try:
        buffer = torch.empty(stride_b + 2 * V, dtype=torch.bfloat16)  # 4 GiB virtual, 4 rows touched
    except RuntimeError as exc:  # e.g. strict overcommit
        pytest.skip(f"cannot reserve 4 GiB of address space: {exc}")
    logits = buffer.as_strided((2, 2, V), (stride_b, V, 1))
    logits.copy_(torch.randn(2, 2, V) * 3)
    labels = torch.tensor([[5, 2999], [7, 1234]], dtype=torch.int32)
    logp, lse, logits_sum = cpu.token_logprobs_forward(logits, labels, IGNORE, True)
    _check_forward(logits, labels.long(), logp, lse, logits_sum)
    coef = torch.randn(2, 2)
    grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
    assert_close_grad(grad, _oracle_grad(logits, labels.long(), coef), torch.bfloat16)
    cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, True)
    assert torch.equal(logits, grad)


def test_gradcheck_float64_through_autograd():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = IGNORE
    labels[1, 3] = IGNORE

    def f(z):
        return token_logprobs_autograd(z, labels, backend="cpu", shift=True).logp

    assert torch.autograd.gradcheck(f, (logits,))
    logp = f(logits)
    torch.testing.assert_close(logp, token_logprobs(logits.detach(), torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE)], 1))[0], rtol=1e-12, atol=1e-12)
    strided = torch.randn(2, 5, 14, dtype=torch.float64)[..., ::2].requires_grad_(True)
    assert torch.autograd.gradcheck(f, (strided,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_every_operator(dtype):
    logits = (torch.randn(2, 5, 300) * 3).to(dtype)
    labels = _labels(2, 5, 300)
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, False)
    coef = torch.randn(2, 5, dtype=_acc(dtype))
    torch.library.opcheck(OPS.token_logprobs_fwd.default, (logits, labels, IGNORE, True))
    torch.library.opcheck(OPS.token_logprobs_fwd.default, (logits[:, 1:, ::2], labels[:, 1:].remainder(150), IGNORE, False))
    torch.library.opcheck(OPS.token_logprobs_bwd.default, (logits, labels, lse, coef, IGNORE))
    torch.library.opcheck(OPS.token_logprobs_bwd_.default, (logits.clone(), labels, lse, coef, IGNORE))
    # The operators themselves compute what the oracle says.
    logp, lse2, _ = OPS.token_logprobs_fwd(logits, labels, IGNORE, False)
    _check_forward(logits, labels, logp, lse2)
    _check_backward(logits, labels, coef, OPS.token_logprobs_bwd(logits, labels, lse, coef, IGNORE))


def test_compiles_with_torch_compile():
    logits = torch.randn(2, 4, 300)
    labels = _labels(2, 4, 300)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fwd(z, y):
        logp, lse, _ = OPS.token_logprobs_fwd(z, y, IGNORE, False)
        return logp.sum(), lse

    total, lse = fwd(logits, labels)
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(total.double(), want_logp.sum(), rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y.float(), IGNORE, False), "integer"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y.bool(), IGNORE, False), "integer"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z.int(), y, IGNORE, False), "float32, bfloat16"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z[0], y, IGNORE, False), r"\[B, T, V\]"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y[:, :3], IGNORE, False), "do not match"),
        (lambda z, y, l: OPS.token_logprobs_bwd(z, y, l[:, :3], l, IGNORE), "lse must be"),
        (lambda z, y, l: OPS.token_logprobs_bwd(z, y, l, l.long(), IGNORE), "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    logits = torch.randn(2, 4, 30)
    labels = torch.randint(0, 30, (2, 4))
    lse = torch.logsumexp(logits, -1)
    with pytest.raises(RuntimeError, match=match):
        call(logits, labels, lse)


def test_backend_selection(monkeypatch):
    cpu_device = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu_device) == "cpu"
    assert backends.resolve_backend("cpu", cpu_device) == "cpu"
    assert "cpu" in backends.available_backends(cpu_device)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backends.resolve_backend("cpu", torch.device("cuda"))
    # Without the extension, "auto" falls back to the reference backend with one warning.
    monkeypatch.setattr(backends, "cpu_extension_available", lambda: False)
    monkeypatch.setattr(backends, "_cpu_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve_backend("auto", cpu_device) == "reference"
        assert backends.resolve_backend("auto", cpu_device) == "reference"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]


_VARIANT_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import dpo_kernels.backends.cpu as cpu
from oracle import token_logprobs, assert_close_grad
print(cpu.cpu_capability())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    base = (torch.randn(3, 5, 4200) * 3).to(dtype)
    for z in (base[..., :4133], base[..., 1::2]):  # contiguous rows (with a tail) and stride 2
        y = torch.randint(0, z.shape[-1], (3, 5)); y[0, 0] = -100
        logp, lse, _ = cpu.token_logprobs_forward(z, y, -100, False)
        want, want_lse = token_logprobs(z, y)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(logp.double(), want, rtol=tol, atol=10 * tol)
        coef = torch.randn(3, 5, dtype=lse.dtype)
        grad = cpu.token_logprobs_backward(z, y, lse, coef, -100, False)
        zd = z.double().requires_grad_(True)
        (token_logprobs(zd, y)[0] * coef.double()).sum().backward()
        assert_close_grad(grad, zd.grad, dtype)
print("ok")
"""


@pytest.mark.skipif(
    not hasattr(torch.backends, "cpu") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="x86-64 capability builds only",
)
@pytest.mark.parametrize("capability, expected", [("default", "default"), ("avx2", "avx2")])
def test_every_capability_build_matches_oracle(capability, expected):
    """ATEN_CPU_CAPABILITY lowers the instruction set: the other builds run in a subprocess."""
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run(
        [sys.executable, "-c", _VARIANT_SCRIPT.format(tests=tests_dir)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [expected, "ok"]
