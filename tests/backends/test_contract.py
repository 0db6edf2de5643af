"""The kernel contract, backend by backend, against the float64 oracle.

Every backend in ``conftest.BACKENDS`` runs every test here: forward (logp, lse, logits sum) and
backward (``coef * (onehot - softmax)``) for each dtype, vocabularies below, at and above one
block, ignored tokens, strided views, in-place mode, and rows that must never be read.
"""
import pytest
import torch

from dpo_kernels.backends import forward_and_grad_, load_backend
from oracle import IGNORE, assert_close_grad, rows_holding_nan, token_extras, token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 7, 255, 1000, 3001]  # 1000 and 3001 span several 256-wide blocks


def _labels(B, T, V, ignore_frac=0.3):
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = IGNORE
    labels[0, 0] = IGNORE
    return labels


def _expected_grad(logits, labels, coef):
    z = logits.detach().to(torch.float64, copy=True).requires_grad_(True)  # a fresh leaf, even for fp64
    logp, _ = token_logprobs(z, labels)
    (logp * coef.double()).sum().backward()
    return z.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_forward_and_backward_match_oracle(backend, small_block, dtype, V):
    ops = load_backend(backend)
    B, T = 3, 5
    logits = (torch.randn(B, T, V) * 4).to(dtype)
    labels = _labels(B, T, V)
    logp, lse, extras = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset({"logits_sum"}))
    logits_sum = extras["logits_sum"]
    want_logp, want_lse = token_logprobs(logits, labels)
    scored = labels != IGNORE
    want_sum = torch.where(scored, logits.double().sum(-1), 0.0)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == logits_sum.dtype == expected_dtype and lse.dtype == torch.float64
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(logits_sum.double(), want_sum, rtol=tol, atol=tol * V)
    assert (logp[~scored] == 0).all() and (lse[~scored] == 0).all()

    coef = torch.randn(B, T, dtype=expected_dtype)
    grad = ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE, frozenset())
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_grad(grad, _expected_grad(logits, labels, coef), dtype)
    assert (grad[~scored] == 0).all()


def test_without_extras_returns_none(backend):
    ops = load_backend(backend)
    logits = torch.randn(2, 3, 50)
    logp, lse, extras = ops.token_logprobs_forward(logits, _labels(2, 3, 50), IGNORE, frozenset())
    assert extras == {} and logp.shape == lse.shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_are_read_in_place(backend, small_block, dtype):
    """A shifted view, a vocabulary slice of a wider buffer and a transposed batch layout; the
    backward's ``lse`` and ``coef`` also as every other element of a NaN buffer."""
    ops = load_backend(backend)
    V = 600
    base = (torch.randn(5, 4, 9, V + 40) * 3).to(dtype)
    logits = base[1:4, 1, 1:8, 20 : 20 + V]  # non-contiguous in every dimension but the last
    logits_t = base[:, :, :, :V].permute(2, 0, 1, 3)[:, 1, :3]  # [9, 5, V] with stride(0) < stride(1)
    vocab_stride = base[:2, 0, :3, :2 * V : 2]  # vocabulary stride 2
    for view in (logits, logits_t, vocab_stride):
        assert not view.is_contiguous()
        labels = _labels(view.shape[0], view.shape[1], view.shape[2])
        logp, lse, _ = ops.token_logprobs_forward(view, labels, IGNORE, frozenset())
        want_logp, _ = token_logprobs(view, labels)
        torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-5)
        coef = torch.randn(view.shape[:2])
        grad = ops.token_logprobs_backward(view, labels, lse, coef, IGNORE, frozenset())
        assert_close_grad(grad, _expected_grad(view, labels, coef), dtype)
        lse_view, coef_view = (torch.stack([x, torch.full_like(x, float("nan"))], -1)[..., 0] for x in (lse, coef))
        assert not lse_view.is_contiguous() and not coef_view.is_contiguous()
        again = ops.token_logprobs_backward(view, labels, lse_view, coef_view, IGNORE, frozenset())
        assert torch.equal(again, grad)


def test_strided_labels(backend):
    ops = load_backend(backend)
    logits = torch.randn(3, 6, 300)
    wide = torch.randint(0, 300, (3, 12))
    labels = wide[:, ::2]
    logp, _, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    torch.testing.assert_close(logp.double(), token_logprobs(logits, labels)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_label_dtypes_and_custom_ignore_index(backend, label_dtype):
    ops = load_backend(backend)
    logits = torch.randn(2, 4, 100)
    labels = torch.randint(0, 100, (2, 4))
    labels[0, 1] = -1
    logp, _, _ = ops.token_logprobs_forward(logits, labels.to(label_dtype), -1, frozenset())
    want, _ = token_logprobs(logits, labels, ignore_index=-1)
    torch.testing.assert_close(logp.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inplace_backward_overwrites_logits_with_the_gradient(backend, small_block, dtype):
    ops = load_backend(backend)
    logits = (torch.randn(2, 5, 700) * 3).to(dtype)
    labels = _labels(2, 5, 700)
    _, lse, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    coef = torch.randn(2, 5)
    expected = _expected_grad(logits, labels, coef)
    out_of_place = ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE, frozenset())
    buffer = logits.clone()
    grad = ops.token_logprobs_backward(buffer, labels, lse, coef, IGNORE, True)
    assert grad.data_ptr() == buffer.data_ptr()
    assert torch.equal(grad, out_of_place)  # same arithmetic, bit for bit
    assert_close_grad(grad, expected, dtype)


def test_true_class_gradient_does_not_cancel_in_bf16(backend):
    """p_y -> 1: coef * (1 - p_y) must come from fp32, not from bf16 p_y rounded to 1."""
    ops = load_backend(backend)
    V = 300
    logits = torch.randn(1, 2, V)
    labels = torch.tensor([[5, 9]])
    logits[0, 0, 5] = 12.0  # p_y ~ 1 - 300 e^-12 ~ 0.998: bf16 rounds it to 1.0
    logits[0, 1, 9] = 9.0
    logits = logits.to(torch.bfloat16)
    _, lse, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    coef = torch.ones(1, 2)
    grad = ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE, frozenset())
    expected = _expected_grad(logits, labels, coef)
    for t, y in ((0, 5), (1, 9)):
        assert grad[0, t, y].item() > 0
        torch.testing.assert_close(grad[0, t, y].double(), expected[0, t, y], rtol=1e-2, atol=0)


def test_out_of_range_labels_give_nan_and_no_out_of_bounds_read(backend, small_block):
    """Rows sit inside a NaN-filled buffer: any read outside [0, V) would poison finite rows."""
    ops = load_backend(backend)
    V = 500
    buffer = torch.full((2, 4, V + 64), float("nan"))
    buffer[:, :, 32 : 32 + V] = torch.randn(2, 4, V)
    logits = buffer[:, :, 32 : 32 + V]
    labels = torch.randint(0, V, (2, 4))
    labels[0, 1] = V  # one past the end
    labels[1, 2] = -7  # negative, not ignore_index
    labels[1, 3] = IGNORE
    logp, lse, extras = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset({"logits_sum"}))
    logits_sum = extras["logits_sum"]
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(logp[bad]).all()
    assert torch.isfinite(logp[~bad]).all() and torch.isfinite(lse).all() and torch.isfinite(logits_sum).all()
    grad = ops.token_logprobs_backward(logits, labels, lse, torch.ones(2, 4), IGNORE, frozenset())
    assert torch.isfinite(grad).all()
    assert torch.isnan(buffer[:, :, :32]).all() and torch.isnan(buffer[:, :, 32 + V :]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [5, 301, 1030])
def test_rows_starting_anywhere_are_read_exactly_within_bounds(backend, small_block, dtype, V):
    """Row stride V + 3 puts row starts at every offset modulo the 16-byte vector; the gaps and
    the buffer's ends are NaN, so a read past any row boundary would poison the results."""
    ops = load_backend(backend)
    buffer = torch.full((2, 6, V + 3), float("nan"), dtype=dtype)
    buffer[..., :V] = (torch.randn(2, 6, V) * 3).to(dtype)
    logits = buffer[..., :V]
    labels = torch.randint(0, V, (2, 6))
    labels[1, 2] = IGNORE
    logp, lse, extras = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset({"logits_sum"}))
    logits_sum = extras["logits_sum"]
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(logits_sum.double(), torch.where(labels != IGNORE, logits.double().sum(-1), 0.0),
                               rtol=2e-5, atol=2e-5 * V)
    coef = torch.randn(2, 6)
    grad = ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE, frozenset())
    assert_close_grad(grad, _expected_grad(logits, labels, coef), dtype)
    before = buffer.clone()
    ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE, True)
    assert torch.isnan(buffer[..., V:]).all(), "the in-place backward wrote outside the rows"
    assert_close_grad(buffer[..., :V], _expected_grad(before[..., :V], labels, coef), dtype)


def test_masked_vocabulary_entries(backend):
    """-inf logits (a masked vocabulary) are legitimate: no NaN unless the whole row is -inf."""
    ops = load_backend(backend)
    logits = torch.randn(1, 3, 400)
    logits[0, 0, 100:] = float("-inf")
    logits[0, 1, :] = float("-inf")
    labels = torch.tensor([[3, 3, 3]])
    logp, lse, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    want, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(logp[0, 0].double(), want[0, 0], rtol=1e-5, atol=1e-5)
    assert lse[0, 1].item() == float("-inf")
    assert torch.isfinite(logp[0, 2])


def test_positive_infinity_gives_infinite_lse_like_torch(backend, small_block):
    ops = load_backend(backend)
    logits = torch.randn(1, 2, 300)
    logits[0, 0, 250] = float("inf")
    logp, lse, _ = ops.token_logprobs_forward(logits, torch.tensor([[3, 3]]), IGNORE, frozenset())
    assert lse[0, 0].item() == float("inf") and logp[0, 0].item() == float("-inf")
    assert torch.isfinite(lse[0, 1]) and torch.isfinite(logp[0, 1])
    _, _, extras = ops.token_logprobs_forward(logits, torch.tensor([[3, 3]]), IGNORE, ALL_EXTRAS)
    # The softmax of a row holding +inf is not defined: log sum p^2 is NaN there (torch's softmax too).
    assert extras["entropy"][0, 0].item() == float("inf") and torch.isnan(extras["log_sum_p2"][0, 0])
    assert torch.isfinite(extras["entropy"][0, 1]) and torch.isfinite(extras["log_sum_p2"][0, 1])


@pytest.mark.parametrize("spike", [3e38, 1e35, 1e30])
def test_a_huge_max_after_the_row_leaves_the_entropy_exact(backend, small_block, spike):
    """A row of small logits whose last entry is huge: the max jumps by ~spike after the rest was
    summed, leaving that sum no weight. The entropy is that of a one-hot (0; log 2 where the max
    is reached twice), never NaN (``0 * -inf`` from the moved sum); the log-probs exact."""
    ops = load_backend(backend)
    V = 3001
    logits = torch.randn(2, 2, V)
    logits[:, :, -1] = spike
    logits[1, 1, 1000] = spike  # the max reached mid-row, then equalled at the end
    labels = torch.tensor([[V - 1, 5], [V - 1, 1000]])
    logp, _, extras = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset({"entropy"}))
    # The oracle on each row less its max (log-probs and entropy do not move): in float64 too,
    # z_y - lse and lse - sum p z would cancel at 1e38 (its ulp there is ~1e22).
    centred = logits.double() - logits.double().amax(-1, keepdim=True)
    want_logp, _ = token_logprobs(centred, labels)
    want = token_extras(centred, labels)["entropy"]
    assert torch.isfinite(extras["entropy"]).all(), extras["entropy"]
    torch.testing.assert_close(extras["entropy"].double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-6, atol=1e-6)


def test_nan_in_logits_propagates_to_that_row_only(backend):
    ops = load_backend(backend)
    logits = torch.randn(1, 3, 64)
    logits[0, 1, 10] = float("nan")
    logp, lse, _ = ops.token_logprobs_forward(logits, torch.tensor([[1, 2, 3]]), IGNORE, frozenset())
    assert torch.isnan(logp[0, 1]) and torch.isnan(lse[0, 1])
    assert torch.isfinite(logp[0, [0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_of_rows_holding_nan_is_torch_argmax(backend, small_block, dtype):
    """torch.argmax (and so TRL's mean_token_accuracy) takes the first NaN of a row: every backend
    reports the same, wherever in the row the NaN falls (see ``oracle.rows_holding_nan``)."""
    logits, labels = rows_holding_nan(dtype)
    _, _, extras = load_backend(backend).token_logprobs_forward(logits, labels, IGNORE, frozenset({"accuracy"}))
    want = token_extras(logits, labels)["accuracy"]
    assert want.sum() not in (0, want.numel()), "the rows must give both answers"
    assert torch.equal(extras["accuracy"].double(), want), (extras["accuracy"], want)


def test_ignored_gradient_is_zero_even_with_nonzero_coef(backend):
    ops = load_backend(backend)
    logits = torch.randn(1, 3, 200)
    labels = torch.tensor([[IGNORE, 4, IGNORE]])
    _, lse, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    grad = ops.token_logprobs_backward(logits, labels, lse, torch.full((1, 3), 5.0), IGNORE, frozenset())
    assert (grad[0, 0] == 0).all() and (grad[0, 2] == 0).all() and (grad[0, 1] != 0).any()


def test_empty_batch(backend):
    ops = load_backend(backend)
    logits = torch.randn(0, 3, 10)
    labels = torch.zeros(0, 3, dtype=torch.long)
    logp, lse, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    assert logp.shape == (0, 3)
    grad = ops.token_logprobs_backward(logits, labels, lse, logp, IGNORE, frozenset())
    assert grad.shape == logits.shape


ALL_EXTRAS = frozenset({"logits_sum", "entropy", "accuracy", "log_sum_p2"})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 301, 1030])
def test_same_pass_extras_match_oracle(backend, small_block, dtype, V):
    """Entropy, argmax == label, log sum p^2 and the logits sum, all from the one forward pass."""
    ops = load_backend(backend)
    logits = (torch.randn(3, 5, V) * 3).to(dtype)
    labels = _labels(3, 5, V)
    # Make about half of the scored tokens correct, so accuracy is not trivially 0.
    argmax = logits.double().argmax(-1)
    take = (torch.rand(3, 5) < 0.5) & (labels != IGNORE)
    labels = torch.where(take, argmax, labels)
    logp, lse, extras = ops.token_logprobs_forward(logits, labels, IGNORE, ALL_EXTRAS)
    assert set(extras) == ALL_EXTRAS
    want = token_extras(logits, labels)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in ALL_EXTRAS:
        assert extras[name].dtype == logp.dtype and extras[name].shape == (3, 5)
        atol = tol * (V if name == "logits_sum" else 10)
        torch.testing.assert_close(extras[name].double(), want[name], rtol=tol, atol=atol, msg=name)
    assert extras["accuracy"].sum() > 0
    # the extras change nothing else
    logp0, lse0, _ = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    assert torch.equal(logp, logp0) and torch.equal(lse, lse0)


def test_accuracy_breaks_ties_at_the_first_index_like_argmax(backend, small_block):
    """The max appears twice, across blocks and in the unaligned tail: only the first counts."""
    ops = load_backend(backend)
    V = 700
    logits = torch.randn(1, 4, V)
    for t, (i, j) in enumerate([(5, 600), (3, 699), (0, 1), (650, 699)]):
        logits[0, t, i] = logits[0, t, j] = 50.0
    labels_first = torch.tensor([[5, 3, 0, 650]])
    labels_second = torch.tensor([[600, 699, 1, 699]])
    for labels, want in ((labels_first, 1.0), (labels_second, 0.0)):
        _, _, extras = ops.token_logprobs_forward(logits, labels, IGNORE, frozenset({"accuracy"}))
        assert (extras["accuracy"] == want).all(), (labels, extras["accuracy"])


def test_extras_of_masked_vocabulary_and_ignored_rows(backend):
    ops = load_backend(backend)
    logits = torch.randn(1, 3, 200)
    logits[0, 0, 50:] = float("-inf")  # entropy over the 50 live entries only; no NaN from 0 * -inf
    logits[0, 1] = float("nan")  # ignored: never read, extras 0
    labels = torch.tensor([[7, IGNORE, 9]])
    _, _, extras = ops.token_logprobs_forward(logits, labels, IGNORE, ALL_EXTRAS)
    want = token_extras(torch.where(torch.isnan(logits), 0.0, logits), labels)
    for name in ("entropy", "accuracy", "log_sum_p2"):
        torch.testing.assert_close(extras[name].double(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert extras["logits_sum"][0, 0] == float("-inf")
    assert all((v[0, 1] == 0).all() for v in extras.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_of_a_vocabulary_slice_out_of_range_label_gets_no_onehot(backend, small_block, dtype):
    """The hidden-state path's two_phase backward (``dpo_kernels.linear``) hands the kernel one
    vocabulary slice ``[v0, v1)`` of each row with the full row's lse, labels shifted by ``-v0``
    and an ``ignore_index`` no shifted label can equal: a label outside the slice (>= V or
    negative, not ignore_index) must give ``-coef * exp(z - lse)`` with no one-hot, a label inside
    it ``coef * (onehot - exp(z - lse))``."""
    ops = load_backend(backend)
    V_full, v0, V = 1500, 600, 300
    full = (torch.randn(2, 4, V_full) * 3).to(dtype)
    labels_full = torch.tensor([[5, 650, 899, 900], [1499, 0, 700, 599]])
    _, lse, _ = ops.token_logprobs_forward(full, labels_full, IGNORE, frozenset())
    coef = torch.randn(2, 4, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    logits = full[:, :, v0 : v0 + V].contiguous()
    labels = labels_full - v0  # in the slice: 650, 899, 700 -> 50, 299, 100; the rest out of range
    no_label = -(V_full + 1)
    grad = ops.token_logprobs_backward(logits.clone(), labels, lse, coef, no_label, True)
    expected = _expected_grad(full, labels_full, coef)[:, :, v0 : v0 + V]
    assert grad.dtype == dtype
    assert_close_grad(grad, expected, dtype)


def _forward_and_grad_ways(backend):
    """The Triton backend's two ways of ``token_logprobs_forward_and_grad_`` (each forced in
    turn); the other backends' one."""
    if backend != "triton":
        yield backend
        return
    from dpo_kernels.backends.triton.config import set_forward_and_grad_fusion

    try:
        for one_kernel in (True, False):
            set_forward_and_grad_fusion(one_kernel)
            yield "one kernel" if one_kernel else "two kernels"
    finally:
        set_forward_and_grad_fusion(None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 301, 1030])
def test_forward_and_grad_writes_the_unit_gradient_over_the_logits(backend, small_block, dtype, V):
    """``forward_and_grad_`` (``split``'s forward): the forward's results, and the logits overwritten
    with ``d logp / d z = onehot - softmax`` (zeros on ignored rows), the same numbers as the
    forward followed by the in-place backward with ``grad_logp = 1``, bit for bit. The rows sit
    at every alignment inside a NaN-filled buffer: a read or write past a row would show."""
    for way in _forward_and_grad_ways(backend):
        _check_forward_and_grad(backend, dtype, V, way)


def _check_forward_and_grad(backend, dtype, V, way):
    ops = load_backend(backend)
    B, T = 3, 5
    buffer = torch.full((B, T, V + 3), float("nan"), dtype=dtype)
    buffer[..., 1 : V + 1] = (torch.randn(B, T, V) * 3).to(dtype)
    labels = _labels(B, T, V)
    labels[2, 4] = V + 5  # out of range, not ignored: logp NaN, and no one-hot anywhere
    before = buffer[..., 1 : V + 1].clone()

    fused = buffer.clone()
    logp, lse, extras = forward_and_grad_(ops, fused[..., 1 : V + 1], labels, IGNORE, frozenset({"entropy"}))
    composed = buffer.clone()
    want_logp, want_lse, want_extras = ops.token_logprobs_forward(composed[..., 1 : V + 1], labels, IGNORE,
                                                                  frozenset({"entropy"}))
    ops.token_logprobs_backward(composed[..., 1 : V + 1], labels, want_lse, torch.ones_like(want_lse), IGNORE, True)

    torch.testing.assert_close(logp, want_logp, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(lse, want_lse) and torch.equal(extras["entropy"], want_extras["entropy"])
    assert torch.equal(fused.nan_to_num(7.0), composed.nan_to_num(7.0)), way
    assert torch.isnan(fused[..., 0]).all() and torch.isnan(fused[..., V + 1 :]).all(), way

    grad = fused[..., 1 : V + 1]
    scored = labels != IGNORE
    assert (grad[~scored] == 0).all()
    in_range = scored & (labels < V)
    assert torch.isnan(logp[scored & ~in_range]).all()
    # Against the float64 oracle: d logp / d z for every row with a label in range; the
    # out-of-range row is -softmax (no one-hot).
    expected = _expected_grad(before, torch.where(in_range | ~scored, labels, IGNORE), torch.ones(B, T))
    expected[scored & ~in_range] = -torch.softmax(before[scored & ~in_range].double(), -1)
    assert_close_grad(grad, expected, dtype)
    oracle_logp = token_logprobs(before, torch.where(in_range, labels, IGNORE))[0]
    torch.testing.assert_close(logp[in_range].double(), oracle_logp[in_range],
                               rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_common_offset_of_a_row_costs_no_precision(backend, small_block, dtype):
    """Rows shifted by 4e4, -1e5, 3e7 or 1e8 (one offset per row): logp, the fp64 lse, the
    entropy, log sum p^2 and the backward match the float64 oracle of the same values to the
    tolerances of a row centred on 0, and so does ``forward_and_grad_`` (each Triton way). A
    kernel that added the max back in fp32 (``z - lse`` with one fp32 lse, or ``lse - sum p z``)
    would be off by |lse| * 2^-24 per log-prob and per probability: 6e-3 at 1e5, everything at 1e8."""
    ops = load_backend(backend)
    B, T, V = 2, 4, 1000
    offsets = torch.tensor([4e4, -1e5, 3e7, 1e8, 0.0, -1e5, 1e8, 4e4]).view(B, T, 1)
    logits = (torch.randn(B, T, V) * 3 + offsets).to(dtype)
    labels = _labels(B, T, V)
    names = frozenset({"entropy", "log_sum_p2"})
    logp, lse, extras = ops.token_logprobs_forward(logits, labels, IGNORE, names)
    # The oracle on the centred rows (the logits are fp32 numbers: removing the offset in float64
    # is exact), where even float64 keeps every digit; the log-softmax does not depend on it.
    centred = logits.double() - offsets.double()
    want_logp, want_lse = token_logprobs(centred, labels)
    want_lse = torch.where(labels != IGNORE, want_lse + offsets.double()[..., 0], 0.0)
    want = token_extras(centred, labels)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert lse.dtype == torch.float64
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10)
    # lse to the rounding of its log-sum, not of its own size (1e8 * 2^-24 = 6 in fp32)
    torch.testing.assert_close(lse, want_lse, rtol=2.0 ** -50, atol=tol * 10)
    for name in names:
        torch.testing.assert_close(extras[name].double(), want[name], rtol=tol, atol=tol * 10, msg=name)
    coef = torch.randn(B, T, dtype=logp.dtype)
    grad = ops.token_logprobs_backward(logits, labels, lse, coef, IGNORE)
    _check_offset_grad(grad, _expected_grad(centred, labels, coef))
    for way in _forward_and_grad_ways(backend):
        written = logits.clone()
        fused_logp, fused_lse, _ = forward_and_grad_(ops, written, labels, IGNORE)
        assert torch.equal(fused_logp, logp) and torch.equal(fused_lse, lse), way
        _check_offset_grad(written, _expected_grad(centred, labels, torch.ones(B, T)))


def _check_offset_grad(actual, expected):
    """``assert_close_grad``, but fp64 logits to 1e-7: their lse is one fp64 number (no low part),
    whose rounding, |lse| * 2^-53 = 1e-8 at 1e8, every probability inherits."""
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())
    else:
        assert_close_grad(actual, expected, actual.dtype)


def test_forward_and_grad_refuses_rows_that_share_memory(backend):
    ops = load_backend(backend)
    expanded = torch.randn(1, 1, 50).expand(2, 3, 50)
    with pytest.raises(RuntimeError, match="internal overlap"):
        forward_and_grad_(ops, expanded, torch.zeros(2, 3, dtype=torch.long), IGNORE)


def test_forward_and_grad_of_an_empty_batch(backend):
    ops = load_backend(backend)
    logp, lse, _ = forward_and_grad_(ops, torch.randn(0, 3, 10), torch.zeros(0, 3, dtype=torch.long), IGNORE)
    assert logp.shape == lse.shape == (0, 3)


def test_a_device_without_float64_keeps_an_fp32_lse(monkeypatch):
    """Apple's MPS has no float64: there (the reference backend's device) ``lse`` is fp32, split
    with no low part, and the contract's results still match the oracle (at logits of a few
    units, where one fp32 lse is precise). CPU and CUDA keep fp64. The CPU stands in for such a
    device here, through ``lse_dtype``."""
    from dpo_kernels import backends, fused_dpo_loss
    from dpo_kernels.backends import reference

    assert backends.lse_dtype("mps") == torch.float32
    assert backends.lse_dtype("cpu") == backends.lse_dtype("cuda") == torch.float64
    monkeypatch.setattr(reference, "lse_dtype", lambda device: torch.float32)
    logits = torch.randn(3, 5, 300) * 3
    labels = _labels(3, 5, 300)
    logp, lse, _ = reference.token_logprobs_forward(logits, labels, IGNORE, frozenset())
    assert lse.dtype == torch.float32
    want_logp, want_lse = token_logprobs(logits, labels)
    torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-4)
    coef = torch.randn(3, 5)
    grad = reference.token_logprobs_backward(logits, labels, lse, coef, IGNORE)
    assert_close_grad(grad, _expected_grad(logits, labels, coef), torch.float32)
    # and through the front door, whose autograd saves that lse
    leaf = logits[:2].clone().requires_grad_(True)
    fused_dpo_loss(leaf, labels[:2], ref_logps=torch.zeros(2), backend="reference").loss.backward()
    assert torch.isfinite(leaf.grad).all()
