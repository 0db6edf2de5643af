"""``backends/triton/logits_grad_matmul.py``: the logits' gradient written by the matmul's epilogue.

Against a float64 oracle written from the formula, on realistic rows (the ``lse`` of the full
vocabulary the slice is cut from, labels inside and outside the slice, ignored rows with a
non-zero coefficient), every training dtype, bias, softcap and temperature; the same roundings
as the unfused path (a torch matmul, then the reference backend's backward) bit for bit where
the matmul is exact; strided views inside NaN-filled buffers (nothing outside them is read or
written); the shared ``tanh`` and rounding helpers; bad input.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from dpo_kernels.backends.triton import config  # noqa: E402
from dpo_kernels.backends.triton.logits_grad_matmul import _tma_ready, logits_grad_matmul  # noqa: E402
from dpo_kernels.linear import Head, _chunk_grad_logits_, _chunk_logits  # noqa: E402

IGNORE = -1000
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (tokens M, slice rows N, hidden K): one tile; several tiles with K past a block and ragged
# edges everywhere (the interpreter's tile is 16 x 32 x 16); a slice smaller than a tile.
SHAPES = [(1, 7, 5), (37, 301, 70), (50, 20, 33)]


def _problem(M, N, K, dtype, bias, v0=13, extra_cols=40):
    """A slice ``[v0, v0 + N)`` of a random lm_head over ``N + extra_cols`` columns, the hidden
    rows, each row's label (in the slice, before or after it, or ignored) shifted into the slice,
    a coefficient on every row (ignored ones too: it must not leak), and the full row's lse."""
    V = N + extra_cols
    h = torch.randn(M, K).to(dtype)
    weight = (torch.randn(V, K) * 2.0 / math.sqrt(K)).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (M,))
    labels[: min(M, 3)] = torch.arange(v0, v0 + min(M, 3))  # some surely inside the slice
    if M > 4:
        labels[4] = IGNORE
    coef = torch.randn(M) + 0.5
    return h, weight, b, labels, coef, v0


def _raw_logits(h, weight, b):
    a = h.double() @ weight.double().T
    return a if b is None else a + b.double()


def _oracle(h, weight, b, labels, coef, v0, N, softcap, temperature):
    """float64: the full rows' transformed logits and lse, then the slice's gradient w.r.t. the
    raw logits ``coef * (onehot - softmax) / T * (1 - tanh^2)``; zero on ignored rows."""
    a = _raw_logits(h, weight, b)
    if softcap is not None:
        t = torch.tanh(a / softcap)
        z, dcap = softcap * t, 1 - t * t
    else:
        z, dcap = a, torch.ones_like(a)
    z = z / temperature
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    onehot = torch.zeros_like(p)
    valid = labels != IGNORE
    onehot[valid.nonzero()[:, 0], labels[valid]] = 1.0
    g = coef.double()[:, None] * (onehot - p) / temperature * dcap
    g[~valid] = 0.0
    cols = slice(v0, v0 + N)
    return g[:, cols], lse, p[:, cols], onehot[:, cols], a[:, cols], z[:, cols]


def _shifted(labels, v0):
    return torch.where(labels == IGNORE, labels, labels - v0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (4.0, 0.7), (None, 1.3)])
def test_matches_the_float64_oracle(dtype, M, N, K, bias, softcap, temperature):
    h, weight, b, labels, coef, v0 = _problem(M, N, K, dtype, bias)
    want, lse, p, onehot, a, z = _oracle(h, weight, b, labels, coef, v0, N, softcap, temperature)
    got = logits_grad_matmul(h, weight[v0:v0 + N], None if b is None else b[v0:v0 + N], _shifted(labels, v0),
                             lse.float(), coef, IGNORE, softcap, temperature)
    assert got.dtype == dtype and got.shape == (M, N)
    # Rounding the logits to the input dtype moves exp(z - lse) by about |z| ulps (and the
    # softcap's derivative by |a| ulps); each rounded step adds one ulp of the result, and below
    # the dtype's smallest normal one ulp is the subnormal spacing (three roundings: 4 of them).
    eps, finfo = EPS[dtype], torch.finfo(dtype)
    tol = 8 * eps * (coef.double().abs()[:, None] * (1 + a.abs() + z.abs()) * (p + onehot) / temperature
                     + want.abs()) + 4 * finfo.smallest_normal * finfo.eps
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"
    if M > 4:
        assert (got[4] == 0).all()  # the ignored row, whatever its coefficient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_same_roundings_as_the_unfused_path(dtype, temperature, bias):
    """Operands that are multiples of 1/64 below 1 (7 significant bits: exact in every dtype) make
    every product and sum exact in fp32, so the matmul's order of accumulation cannot matter, while
    the logits have up to 18 significant bits and must be rounded to the input dtype. Then the
    epilogue must give the unfused path's numbers bit for bit (torch matmul, the reference
    backend's backward, the chain rule in torch). A temperature of 1/2 divides exactly both ways."""
    M, N, K, V = 37, 301, 40, 400
    h = (torch.randint(-64, 65, (M, K)) / 64).to(dtype)
    weight = (torch.randint(-64, 65, (V, K)) / 64).to(dtype)
    b = (torch.randint(-64, 65, (V,)) / 64).to(dtype) if bias else None
    lse = torch.logsumexp(torch.randn(M, V) * 2, 1) + 3
    labels = torch.randint(0, V, (M,))
    labels[5] = IGNORE
    coef = torch.randn(M)
    v0 = 50
    head = Head(weight=weight, bias=b, temperature=temperature, softcap=None, backend_name="reference",
                ignore_index=IGNORE)
    z, dcap = _chunk_logits(head, h, keep_derivative=True, vocab=slice(v0, v0 + N))
    want = _chunk_grad_logits_(head, z, _shifted(labels, v0), lse, coef, dcap)
    got = logits_grad_matmul(h, weight[v0:v0 + N], None if b is None else b[v0:v0 + N], _shifted(labels, v0),
                             lse, coef, IGNORE, None, temperature)
    assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [0.7, 1.1])
def test_a_temperature_gives_the_forwards_logits_near_1e5(temperature):
    """The epilogue multiplies the logits by the temperature's fp32 reciprocal, as the forward
    (``linear._chunk_logits``) does, so at logits near 1e5 (a bias's offset; fp32's ulp there is
    1/128) it forms the logits whose fp64 lse the forward kept: the same gradient as the unfused
    path to fp32 rounding. Dividing instead differs by an ulp for 0.7 or 1.1: up to 2e-2 of a
    gradient entry. (fp32: the interpreter's exp and torch's differ in the last bit, so not
    bitwise.)"""
    M, N, K, V = 37, 301, 40, 400
    h = torch.randint(-64, 65, (M, K)) / 64
    weight = torch.randint(-64, 65, (V, K)) / 64
    b = torch.randint(-64, 65, (V,)) / 64 + 1e5
    head = Head(weight=weight, bias=b, temperature=temperature, softcap=None, backend_name="reference",
                ignore_index=IGNORE)
    lse = torch.logsumexp(_chunk_logits(head, h, keep_derivative=False)[0].double(), 1)  # the forward's, in fp64
    labels = torch.randint(0, V, (M,))
    labels[5] = IGNORE
    coef = torch.randn(M)
    v0 = 50
    z, dcap = _chunk_logits(head, h, keep_derivative=True, vocab=slice(v0, v0 + N))
    want = _chunk_grad_logits_(head, z, _shifted(labels, v0), lse, coef, dcap)
    got = logits_grad_matmul(h, weight[v0:v0 + N], b[v0:v0 + N], _shifted(labels, v0), lse, coef, IGNORE, None,
                             temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_inside_nan_buffers(dtype):
    """Hidden rows with a row stride and a column stride of 2, the weight slice a block of a wider
    buffer, the bias every third element of one: every element around and between them is NaN,
    so a read outside the operands (a clamped row or column, a K tail, a bias read as if
    contiguous) would poison the result. It must equal the contiguous operands' result bit for
    bit."""
    M, N, K = 37, 301, 70
    h, weight, b, labels, coef, v0 = _problem(M, N, K, dtype, bias=True)
    want, lse, *_ = _oracle(h, weight, b, labels, coef, v0, N, 4.0, 0.7)
    hbuf = torch.full((2 * M + 3, 2 * K + 5), float("nan"), dtype=dtype)
    hbuf[1:2 * M + 1:2, 3:2 * K + 3:2] = h
    h_view = hbuf[1:2 * M + 1:2, 3:2 * K + 3:2]
    wbuf = torch.full((weight.shape[0] + 9, K + 11), float("nan"), dtype=dtype)
    wbuf[4:4 + weight.shape[0], 6:6 + K] = weight
    w_view = wbuf[4:4 + weight.shape[0], 6:6 + K]
    bbuf = torch.full((3 * b.shape[0] + 2,), float("nan"), dtype=dtype)
    bbuf[1:3 * b.shape[0] + 1:3] = b
    b_view = bbuf[1:3 * b.shape[0] + 1:3]
    assert not h_view.is_contiguous() and not w_view.is_contiguous() and not b_view.is_contiguous()
    args = (_shifted(labels, v0), lse.float(), coef, IGNORE, 4.0, 0.7)
    got = logits_grad_matmul(h_view, w_view[v0:v0 + N], b_view[v0:v0 + N], *args)
    assert torch.isfinite(got).all()
    assert torch.equal(got, logits_grad_matmul(h, weight[v0:v0 + N], b[v0:v0 + N], *args))


# The interpreter's default tiles, read through tensor descriptors and/or walked by a persistent grid.
_INTERPRETER_TILES = dict(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=1, num_stages=1)
WAYS = {"descriptors": config.MatmulConfig(**_INTERPRETER_TILES, use_tma=True),
        "persistent": config.MatmulConfig(**_INTERPRETER_TILES, persistent=True),
        "descriptors, persistent": config.MatmulConfig(**_INTERPRETER_TILES, use_tma=True, persistent=True)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("way", list(WAYS))
def test_descriptors_and_persistent_grid_give_the_same_numbers(dtype, way):
    """The same tiles read through tensor descriptors (views whose strides allow it: unit column
    stride, 16-byte rows and base, inside NaN-filled buffers, so an out-of-range read would show)
    or walked by a persistent grid give the pointer tiles' numbers bit for bit."""
    M, N, K = 37, 301, 72
    h, weight, b, labels, coef, v0 = _problem(M, N, K, dtype, bias=True)
    _, lse, *_ = _oracle(h, weight, b, labels, coef, v0, N, 4.0, 0.7)
    hbuf = torch.full((M + 6, 96), float("nan"), dtype=dtype)
    hbuf[3:3 + M, 8:8 + K] = h
    wbuf = torch.full((weight.shape[0] + 8, 104), float("nan"), dtype=dtype)
    wbuf[4:4 + weight.shape[0], 16:16 + K] = weight
    h_view, w_view = hbuf[3:3 + M, 8:8 + K], wbuf[4:4 + weight.shape[0], 16:16 + K][v0:v0 + N]
    assert _tma_ready(h_view) and _tma_ready(w_view)
    args = (b[v0:v0 + N], _shifted(labels, v0), lse.float(), coef, IGNORE, 4.0, 0.7)
    want = logits_grad_matmul(h, weight[v0:v0 + N], *args)
    try:
        config.set_matmul_config_override(WAYS[way])
        got = logits_grad_matmul(h_view, w_view, *args)
    finally:
        config.set_matmul_config_override(None)
    assert torch.equal(got, want)


def test_descriptors_need_aligned_rows():
    """An operand whose rows are not 16-byte multiples (or with a column stride) is read by the
    pointer tiles even when the configuration asks for descriptors."""
    x = torch.randn(8, 13)
    assert not _tma_ready(x) and _tma_ready(torch.randn(8, 16)) and not _tma_ready(torch.randn(16, 8).t())
    h, weight, b, labels, coef, v0 = _problem(9, 20, 13, torch.float32, bias=False)
    _, lse, *_ = _oracle(h, weight, b, labels, coef, v0, 20, None, 1.0)
    args = (h, weight[v0:v0 + 20], None, _shifted(labels, v0), lse.float(), coef, IGNORE)
    want = logits_grad_matmul(*args)
    try:
        config.set_matmul_config_override(WAYS["descriptors"])
        assert torch.equal(logits_grad_matmul(*args), want)
    finally:
        config.set_matmul_config_override(None)


def test_tiles_do_not_change_the_numbers():
    """Tiles of other shapes and group sizes give the same numbers (fp32: the interpreter's dot
    sums each tile exactly as numpy does, so only K's blocking may move the last bit)."""
    h, weight, b, labels, coef, v0 = _problem(45, 200, 64, torch.float32, bias=True)
    _, lse, *_ = _oracle(h, weight, b, labels, coef, v0, 200, None, 1.0)
    args = (h, weight[v0:v0 + 200], b[v0:v0 + 200], _shifted(labels, v0), lse.float(), coef, IGNORE)
    base = logits_grad_matmul(*args)
    try:
        for cfg in (config.MatmulConfig(32, 16, 64, 1, 1, 1), config.MatmulConfig(64, 64, 16, 4, 2, 2)):
            config.set_matmul_config_override(cfg)
            torch.testing.assert_close(logits_grad_matmul(*args), base, rtol=2e-6, atol=1e-9)
    finally:
        config.set_matmul_config_override(None)


def test_empty_and_zero_width_inputs():
    h = torch.randn(0, 8)
    w = torch.randn(5, 8)
    empty = torch.zeros(0)
    assert logits_grad_matmul(h, w, None, empty.long(), empty, empty, IGNORE).shape == (0, 5)
    h = torch.randn(3, 8)
    vec = torch.zeros(3)
    assert logits_grad_matmul(h, w[:0], None, vec.long(), vec, vec, IGNORE).shape == (3, 0)
    # K = 0: the logits are the bias alone
    b = torch.randn(5)
    lse = torch.logsumexp(b, 0).expand(3).contiguous()
    g = logits_grad_matmul(torch.randn(3, 0), torch.randn(5, 0), b, torch.tensor([0, 4, IGNORE]), lse,
                           torch.ones(3), IGNORE)
    p = torch.softmax(b.double(), 0)
    torch.testing.assert_close(g[0].double(), torch.eye(5, dtype=torch.float64)[0] - p)
    assert (g[2] == 0).all()


@pytest.mark.parametrize("change,error,match", [
    (dict(hidden=torch.randn(4, 8).double(), weight=torch.randn(6, 8).double()), TypeError, "share a dtype"),
    (dict(weight=torch.randn(6, 8).half()), TypeError, "share a dtype"),
    (dict(weight=torch.randn(6, 9)), ValueError, r"\[M, K\] and weight \[N, K\]"),
    (dict(hidden=torch.randn(2, 4, 8)), ValueError, r"\[M, K\]"),
    (dict(bias=torch.randn(5)), ValueError, "bias must be"),
    (dict(labels=torch.zeros(4)), ValueError, "labels must be"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must be"),
    (dict(lse=torch.zeros(5)), ValueError, "lse must be"),
    (dict(coef=torch.zeros(4, dtype=torch.long)), ValueError, "coef must be"),
    (dict(softcap=0.0), ValueError, "softcap must be"),
    (dict(temperature=-1.0), ValueError, "temperature must be"),
    (dict(temperature=float("nan")), ValueError, "temperature must be"),
])
def test_refuses_bad_input(change, error, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
                labels=torch.zeros(4, dtype=torch.long), lse=torch.zeros(4), coef=torch.ones(4), ignore_index=IGNORE,
                softcap=None, temperature=1.0)
    args.update(change)
    with pytest.raises(error, match=match):
        logits_grad_matmul(**args)
