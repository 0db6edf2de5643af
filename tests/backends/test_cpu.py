"""The C++ CPU backend (csrc/, ``dpo_kernels._C``) against the float64 oracle.

``test_contract.py`` runs the shared contract on every backend (this one included); the tests here
aim at what is specific to the C++ kernels: vocabularies that span several 2048-element chunks,
the contiguous / converted / gathered row paths, the same-pass extras (every flag combination of
the kernel, ties and non-finite logits across chunk boundaries), every CPU-capability build,
thread-count independence, 64-bit offsets, the registered operators (opcheck, fake impls) and the
backend selection. Skipped when the extension is not built.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from oracle import IGNORE, assert_close_grad, token_extras, token_logprobs

cpu = pytest.importorskip("dpo_kernels.backends.cpu", reason="C++ extension dpo_kernels._C not built")

import dpo_kernels.backends as backends  # noqa: E402
from dpo_kernels.backends import EXTRAS  # noqa: E402
from dpo_kernels import token_logprobs as token_logprobs_autograd  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 7, 1000, 5003]  # 5003: three 2048-element chunks, the last one partial
OPS = torch.ops.dpo_kernels
ALL = frozenset(EXTRAS)
NONE = frozenset()


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


def _check_forward(logits, labels, logp, lse, extras=None, equal_nan=False):
    dtype = logits.dtype
    tol = _tol(dtype)
    want_logp, want_lse = token_logprobs(logits, labels)
    assert logp.dtype == _acc(dtype) and lse.dtype == torch.float64
    assert logp.is_contiguous() and lse.is_contiguous() and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10, equal_nan=equal_nan)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol * 10, equal_nan=equal_nan)
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all()
    want = token_extras(logits, labels)
    V = logits.shape[-1]
    for name, value in (extras or {}).items():
        assert value.dtype == logp.dtype and value.shape == labels.shape and value.is_contiguous(), name
        atol = tol * 10 * (V**0.5 if name == "logits_sum" else 1)
        if name == "accuracy":
            assert torch.equal(value.double(), want[name]), (value, want[name])
        else:
            torch.testing.assert_close(value.double(), want[name], rtol=tol, atol=atol, equal_nan=equal_nan,
                                       msg=name)
        assert (value[ignored] == 0).all(), name


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
    labels = torch.where(torch.rand(B, T) < 0.5, logits.double().argmax(-1), labels)  # some hits
    labels[0, 0] = IGNORE
    logp, lse, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
    assert set(extras) == ALL
    _check_forward(logits, labels, logp, lse, extras)
    assert cpu.token_logprobs_forward(logits, labels, IGNORE, NONE)[2] == {}
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
        logp, lse, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
        _check_forward(logits, labels, logp, lse, extras)
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
    logp, lse, extras = cpu.token_logprobs_forward(logits, labels_typed[:, :], ignore, ALL)
    assert torch.isnan(logp[bad]).all()
    ok = ~bad
    want_logp, want_lse = token_logprobs(logits, torch.where(bad, 0, labels))
    torch.testing.assert_close(logp[ok].double(), want_logp[ok], rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)
    assert torch.isfinite(lse).all() and all(torch.isfinite(v).all() for v in extras.values())
    assert (extras["accuracy"][bad] == 0).all()  # a label outside the row is never the argmax
    want = token_extras(logits, labels)
    for name in ("logits_sum", "entropy", "log_sum_p2"):
        torch.testing.assert_close(extras[name].double(), want[name], rtol=2e-5, atol=2e-3, msg=name)
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
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, NONE)
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
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, NONE)
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
            logp, lse, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
            grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
            results.append((logp, lse, *(extras[name] for name in EXTRAS), grad))
    finally:
        torch.set_num_threads(before)
    _check_forward(logits, labels, *results[0][:2], dict(zip(EXTRAS, results[0][2:-1])))
    _check_backward(logits, labels, coef, results[0][-1])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_non_finite_logits_across_chunks():
    V = 5003
    rows = torch.randn(10, V) * 3
    rows[0, :4500] = float("-inf")  # masked prefix: the running max starts at -inf for two chunks
    rows[1, :] = float("-inf")  # whole row masked: lse = -inf, never -inf - -inf inside
    rows[2, 4100] = float("inf")  # +inf in the last chunk: lse = +inf (torch.logsumexp)
    rows[3, 3000] = float("nan")  # NaN in the middle chunk
    rows[4] -= 200.0  # far below zero everywhere: exp(z) alone would underflow to 0
    rows[5, 4999] = 80.0  # the max arrives in the last chunk: the running sums are rescaled
    rows[6, 100] = float("inf")  # +inf, then a NaN two chunks later: NaN wins, as in torch
    rows[6, 4500] = float("nan")
    rows[7, [10, 2047, 4000]] = float("inf")  # several +inf (argmax: the first), and a -inf
    rows[7, 20] = float("-inf")
    rows[8, [2100, 4000]] = float("nan")  # argmax: the first NaN
    rows[9, 3] = float("-inf")  # one masked entry: no 0 * -inf in the entropy
    logits = rows[None]
    labels = torch.tensor([[4600, 3, 4100, 3000, 17, 4999, 4500, 10, 2100, 5]])
    logp, lse, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4, equal_nan=True)
    torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-4, equal_nan=True)
    assert lse[0, 1] == float("-inf") and lse[0, 2] == float("inf") and torch.isnan(lse[0, 3])
    assert torch.isnan(lse[0, 6]) and lse[0, 7] == float("inf") and torch.isnan(lse[0, 8])
    assert torch.isfinite(logp[0, [0, 4, 5, 9]]).all()
    want = token_extras(logits, labels)
    for name in ("entropy", "log_sum_p2"):
        torch.testing.assert_close(extras[name].double(), want[name], rtol=2e-5, atol=2e-4, equal_nan=True,
                                   msg=name)
    torch.testing.assert_close(extras["logits_sum"].double(), want["logits_sum"], rtol=2e-5, atol=1e-2,
                               equal_nan=True)
    assert torch.equal(extras["accuracy"].double(), want["accuracy"])
    assert extras["accuracy"][0, [2, 3, 6, 7, 8]].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert extras["entropy"][0, 2] == float("inf") and extras["entropy"][0, 1] == float("-inf")
    coef = torch.randn(1, 10)
    grad = cpu.token_logprobs_backward(logits, labels, lse, coef, IGNORE, False)
    want = _oracle_grad(logits, labels, coef)
    finite = [0, 4, 5, 9]
    assert_close_grad(grad[0, finite], want[0, finite], torch.float32)
    assert torch.isnan(grad[0, 3]).all()  # NaN propagates as in torch.exp
    assert (grad[0, 0, :4500] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_ties_across_chunks(dtype):
    """The row max appears twice, at chunk edges (2047 | 2048, 4095 | 4096) or in one chunk."""
    V = 5003
    pairs = [(2047, 2048), (2048, 4096), (4095, 4096), (100, 200), (0, 5002), (4096, 5002)]
    logits = (torch.randn(1, len(pairs), V) * 3).to(dtype)
    for t, (i, j) in enumerate(pairs):
        logits[0, t, i] = logits[0, t, j] = 50.0
    first = torch.tensor([[i for i, _ in pairs]])
    second = torch.tensor([[j for _, j in pairs]])
    assert cpu.token_logprobs_forward(logits, first, IGNORE, {"accuracy"})[2]["accuracy"].eq(1).all()
    assert cpu.token_logprobs_forward(logits, second, IGNORE, {"accuracy"})[2]["accuracy"].eq(0).all()
    # A row that rises chunk after chunk moves the argmax every time.
    rising = torch.arange(V, dtype=torch.float32).to(dtype)[None, None]
    last = torch.tensor([[int(rising.float().argmax())]])
    assert cpu.token_logprobs_forward(rising, last, IGNORE, {"accuracy"})[2]["accuracy"].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_extras_combination_gives_the_same_bits(dtype):
    """Each of the kernel's flag combinations: logp and lse never change, each extra is the same."""
    V = 4500  # three chunks, the last one partial
    logits = (torch.randn(2, 3, V) * 3).to(dtype)
    logits[0, 1, 3000:] = float("-inf")
    labels = _labels(2, 3, V)
    labels[1, 2] = int(logits[1, 2].double().argmax())
    logp, lse, full = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
    _check_forward(logits, labels, logp, lse, full)
    for mask in range(1 << len(EXTRAS)):
        names = frozenset(name for i, name in enumerate(EXTRAS) if mask >> i & 1)
        logp_k, lse_k, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, names)
        assert set(extras) == names
        assert torch.equal(logp_k, logp) and torch.equal(lse_k, lse), names
        for name in names:
            assert torch.equal(extras[name], full[name]), (names, name)


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
    logp, lse, extras = cpu.token_logprobs_forward(logits, labels, IGNORE, ALL)
    _check_forward(logits, labels.long(), logp, lse, extras)
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
    _, lse, _ = cpu.token_logprobs_forward(logits, labels, IGNORE, NONE)
    coef = torch.randn(2, 5, dtype=_acc(dtype))
    torch.library.opcheck(OPS.token_logprobs_fwd.default, (logits, labels, IGNORE, 15))
    torch.library.opcheck(OPS.token_logprobs_fwd.default, (logits[:, 1:, ::2], labels[:, 1:].remainder(150), IGNORE, 0))
    torch.library.opcheck(OPS.token_logprobs_fwd.default, (logits, labels, IGNORE, 2 | 8))
    torch.library.opcheck(OPS.token_logprobs_bwd.default, (logits, labels, lse, coef, IGNORE))
    torch.library.opcheck(OPS.token_logprobs_bwd_.default, (logits.clone(), labels, lse, coef, IGNORE))
    # The operators themselves compute what the oracle says; extras are stacked in bit order.
    logp, lse2, extras = OPS.token_logprobs_fwd(logits, labels, IGNORE, 0)
    assert extras.shape == (0, 2, 5)
    _check_forward(logits, labels, logp, lse2)
    logp, lse2, extras = OPS.token_logprobs_fwd(logits, labels, IGNORE, 1 | 4)  # logits_sum, accuracy
    assert extras.shape == (2, 2, 5) and extras.is_contiguous()
    _check_forward(logits, labels, logp, lse2, {"logits_sum": extras[0], "accuracy": extras[1]})
    _check_backward(logits, labels, coef, OPS.token_logprobs_bwd(logits, labels, lse, coef, IGNORE))


def test_compiles_with_torch_compile():
    logits = torch.randn(2, 4, 300)
    labels = _labels(2, 4, 300)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fwd(z, y):
        logp, lse, extras = OPS.token_logprobs_fwd(z, y, IGNORE, 2)
        return logp.sum(), lse, extras[0]

    total, lse, entropy = fwd(logits, labels)
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(total.double(), want_logp.sum(), rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(entropy.double(), token_extras(logits, labels)["entropy"], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y.float(), IGNORE, 0), "integer"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y.bool(), IGNORE, 0), "integer"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z.int(), y, IGNORE, 0), "float32, bfloat16"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z[0], y, IGNORE, 0), r"\[B, T, V\]"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y[:, :3], IGNORE, 0), "do not match"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y, IGNORE, 16), "extras_mask"),
        (lambda z, y, l: OPS.token_logprobs_fwd(z, y, IGNORE, -1), "extras_mask"),
        (lambda z, y, l: cpu.token_logprobs_forward(z, y, IGNORE, {"perplexity"}), "extras must be among"),
        (lambda z, y, l: OPS.token_logprobs_bwd(z, y, l[:, :3], l, IGNORE), "lse must be"),
        (lambda z, y, l: OPS.token_logprobs_bwd(z, y, l, l.long(), IGNORE), "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    logits = torch.randn(2, 4, 30)
    labels = torch.randint(0, 30, (2, 4))
    lse = torch.logsumexp(logits, -1)
    with pytest.raises((RuntimeError, ValueError), match=match):
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
import dpo_kernels.backends.reference as reference
from dpo_kernels.backends import EXTRAS
from oracle import token_logprobs, assert_close_grad
print(cpu.cpu_capability())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    base = (torch.randn(3, 5, 4200) * 3).to(dtype)
    for z in (base[..., :4133], base[..., 1::2]):  # contiguous rows (with a tail) and stride 2
        y = torch.randint(0, z.shape[-1], (3, 5)); y[0, 0] = -100
        y[1] = z[1].double().argmax(-1)
        logp, lse, _ = cpu.token_logprobs_forward(z, y, -100, frozenset())
        want, want_lse = token_logprobs(z, y)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(logp.double(), want, rtol=tol, atol=10 * tol)
        # every extra, from the same pass: logp and lse unchanged (bitwise), extras as the reference
        logp2, lse2, extras = cpu.token_logprobs_forward(z, y, -100, frozenset(EXTRAS))
        assert torch.equal(logp2, logp) and torch.equal(lse2, lse)
        _, _, want_extras = reference.token_logprobs_forward(z.double(), y, -100, frozenset(EXTRAS))
        for name, value in extras.items():
            atol = 10 * tol * (z.shape[-1] ** 0.5 if name == "logits_sum" else 1)
            torch.testing.assert_close(value.double(), want_extras[name], rtol=tol, atol=atol, msg=name)
        coef = torch.randn(3, 5, dtype=torch.float32)
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
