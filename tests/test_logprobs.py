"""Autograd around the kernel contract: gradcheck, shift alignment, in-place safety, fused loss."""
import numpy as np
import pytest
import torch

from dpo_kernels.logprobs import align_labels, fused_sigmoid_dpo, sequence_logprobs, token_logprobs
from dpo_kernels.backends import triton_available
from oracle import IGNORE, token_logprobs as oracle_token_logprobs


def test_gradcheck_float64(backend):
    # Small, because gradcheck runs the forward twice per input element; a 16-wide block still
    # makes the 50-entry vocabulary span several blocks in the Triton kernels.
    from dpo_kernels.backends.triton.config import set_block_override

    set_block_override(16)
    logits = torch.randn(1, 3, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, 7, 49]])

    def f(z):
        return token_logprobs(z, labels, backend=backend).logp

    try:
        assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8)
    finally:
        set_block_override(None)


def test_shift_scores_row_t_on_label_t_plus_1(backend):
    logits = torch.randn(2, 5, 80, requires_grad=True)
    labels = torch.randint(0, 80, (2, 5))
    out = token_logprobs(logits, labels, shift=True, backend=backend)
    want, _ = oracle_token_logprobs(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(out.logp[:, :-1].double(), want, rtol=2e-5, atol=2e-5)
    assert (out.logp[:, -1] == 0).all()
    assert torch.equal(out.labels, align_labels(labels, IGNORE, True))
    out.logp.sum().backward()
    assert (logits.grad[:, -1] == 0).all()  # the last position predicts nothing
    z = logits.detach().double().requires_grad_(True)
    oracle_token_logprobs(z[:, :-1], labels[:, 1:])[0].sum().backward()
    torch.testing.assert_close(logits.grad.double(), z.grad, rtol=1e-4, atol=1e-6)


def test_inplace_backward_gives_the_same_gradient_into_the_logits_buffer(backend):
    base = torch.randn(2, 4, 120)
    labels = torch.randint(0, 120, (2, 4))
    ref = base.clone().requires_grad_(True)
    token_logprobs(ref, labels, backend=backend).logp.sum().backward()

    logits = base.clone().requires_grad_(True)
    token_logprobs(logits, labels, backend=backend, inplace_backward=True).logp.sum().backward()
    assert torch.equal(logits.grad, ref.grad)
    assert torch.equal(logits.detach(), ref.grad)  # the buffer now holds the gradient


def test_inplace_second_backward_raises(backend):
    logits = torch.randn(2, 4, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 4))
    h = logits * 1.0  # a non-leaf, as model outputs are
    loss = token_logprobs(h, labels, backend=backend, inplace_backward=True).logp.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_inplace_backward_invalidates_other_users_of_the_logits(backend):
    """Another node that saved the logits must fail loudly, not read the gradient as logits."""
    x = torch.randn(2, 3, 64, requires_grad=True)
    logits = x * 1.0
    labels = torch.randint(0, 64, (2, 3))
    other = (logits * logits).sum()  # saves `logits` for its backward
    lp = token_logprobs(logits, labels, backend=backend, inplace_backward=True).logp.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp + other).backward()


def test_label_ids_widen_only_what_cannot_hold_ignore_index():
    """int64, and int32 with ignore_index in its range, are read as given (no copy); narrower
    dtypes and int32 with a wider ignore_index become int64 with the same values, so a comparison
    with ignore_index does not wrap (uint8 != -100 would compare with 156). The lengths and the
    shift read them so."""
    from dpo_kernels.logprobs import label_ids

    y64 = torch.tensor([[3, IGNORE, 156]])
    assert label_ids(y64, IGNORE) is y64
    y32 = y64.int()
    assert label_ids(y32, IGNORE) is y32
    assert label_ids(y32, 2 ** 31).dtype == torch.int64 and label_ids(y32, -(2 ** 31)) is y32
    for dtype in (torch.uint8, torch.int8, torch.int16):
        narrow = torch.tensor([[3, 100, 24]], dtype=dtype)
        wide = label_ids(narrow, IGNORE)
        assert wide.dtype == torch.int64 and torch.equal(wide, narrow.long())
    u8 = torch.tensor([[156, 3, 156]], dtype=torch.uint8)
    assert (u8 != IGNORE).sum() == 1  # what torch does: the reason for label_ids
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    torch.testing.assert_close(sequence_logprobs(logp, u8, IGNORE, True), torch.tensor([-2.0]))
    assert torch.equal(align_labels(u8, IGNORE, True), torch.tensor([[3, 156, IGNORE]]))


def test_sequence_logprobs_sum_and_average_with_empty_completion():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[1, 2, IGNORE], [IGNORE, IGNORE, IGNORE]])
    torch.testing.assert_close(sequence_logprobs(logp, labels, IGNORE, False), torch.tensor([-3.0, 0.0]))
    torch.testing.assert_close(sequence_logprobs(logp, labels, IGNORE, True), torch.tensor([-1.5, 0.0]))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_fused_sigmoid_matches_the_formula_and_its_gradient(average, label_smoothing):
    P, T = 3, 9
    token_logp = (-torch.rand(2 * P, T) * 5).requires_grad_(True)
    labels = torch.randint(0, 10, (2 * P, T))
    labels[:, :2] = IGNORE
    labels[-1, :] = IGNORE  # a rejected sequence with no completion tokens
    token_logp.data[labels == IGNORE] = 0.0
    ref = torch.randn(2 * P)
    beta = 0.3
    loss, seq, cr, rr, losses = fused_sigmoid_dpo(
        token_logp, labels, ref, ignore_index=IGNORE, beta=beta, label_smoothing=label_smoothing, average=average
    )
    (loss + 0.5 * seq.sum()).backward()  # both differentiable outputs carry gradient

    t = token_logp.detach().double().requires_grad_(True)
    n = (labels != IGNORE).sum(-1).clamp(min=1).double()
    s = t.sum(-1) / n if average else t.sum(-1)
    m = (s[:P] - ref[:P].double()) - (s[P:] - ref[P:].double())
    want = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * m) - label_smoothing * torch.nn.functional.logsigmoid(-beta * m)
    (want.mean() + 0.5 * s.sum()).backward()
    torch.testing.assert_close(loss.double(), want.mean().detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seq.double(), s.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cr.double(), beta * (s[:P] - ref[:P].double()).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rr.double(), beta * (s[P:] - ref[P:].double()).detach(), rtol=1e-6, atol=1e-6)
    grad_want = torch.where(labels != IGNORE, t.grad, 0.0)
    torch.testing.assert_close(token_logp.grad.double(), grad_want, rtol=1e-5, atol=1e-7)
    assert not cr.requires_grad and not losses.requires_grad


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_fused_sigmoid_is_stable_for_huge_margins():
    token_logp = torch.tensor([[-1.0], [-5000.0]], requires_grad=True)
    labels = torch.zeros(2, 1, dtype=torch.long)
    for ref in (torch.zeros(2), torch.tensor([0.0, -20000.0])):
        loss, *_ = fused_sigmoid_dpo(token_logp, labels, ref, ignore_index=IGNORE, beta=1.0, label_smoothing=0.0, average=False)
        assert torch.isfinite(loss)
        m = (-1.0 - ref[0]) - (-5000.0 - ref[1])
        torch.testing.assert_close(loss, torch.nn.functional.softplus(-m.double()).float())


def test_one_extra_may_be_named_alone_and_an_empty_vocabulary_is_refused():
    """``extras="entropy"`` is that one extra (not its letters); logits with no vocabulary are
    refused with the shape named, the same on every backend (each kernel would fail its own way)."""
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    alone = token_logprobs(logits, labels, extras="entropy", backend="reference")
    listed = token_logprobs(logits, labels, extras=("entropy",), backend="reference")
    assert set(alone.extras) == {"entropy"} and torch.equal(alone.extras["entropy"], listed.extras["entropy"])
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=r"token_logprobs: logits has an empty vocabulary dimension \(V = 0\)"):
            token_logprobs(torch.randn(2, 3, 0), labels, backend=backend)


BAD_TOKEN_INPUTS = [
    ("labels_rows", dict(labels=torch.zeros(1, 3, dtype=torch.long)), ValueError,
     r"labels shape \(1, 3\) does not match logits shape \(2, 3, 11\)"),
    ("labels_cols", dict(labels=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"labels shape \(2, 5\)"),
    ("labels_float", dict(labels=torch.zeros(2, 3)), TypeError, r"labels must be an integer tensor.*float32"),
    ("labels_bool", dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, r"labels must be an integer.*bool"),
    ("labels_device", dict(labels=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError,
     r"labels are on meta but logits are on cpu"),
    ("ignore_numpy_float", dict(ignore_index=np.float64(-100.0)), TypeError, r"ignore_index must be an int, got float"),
    ("ignore_float", dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int, got float"),
    ("ignore_bool", dict(ignore_index=True), TypeError, r"ignore_index must be an int, got bool"),
    ("ignore_none", dict(ignore_index=None), TypeError, r"ignore_index must be an int, got NoneType"),
    ("ignore_huge", dict(ignore_index=2 ** 63), ValueError, r"ignore_index must fit in int64"),
    ("inplace_overlap", dict(logits=torch.randn(1, 3, 11).expand(2, 3, 11).requires_grad_(), inplace_backward=True),
     ValueError, r"inplace_backward=True needs logits whose elements do not overlap"),
]


def test_numpy_integer_ignore_index_is_the_python_int(backend):
    """A NumPy integer ``ignore_index`` is the int it holds (int32 labels included: no scan of the
    labels' range), in both per-token functions."""
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5), dtype=torch.int32)
    labels[0, :2] = -100
    want = token_logprobs(logits, labels, ignore_index=-100, backend=backend)
    got = token_logprobs(logits, labels, ignore_index=np.int64(-100), backend=backend)
    assert torch.equal(got.logp, want.logp) and torch.equal(got.lse, want.lse)
    assert torch.equal(sequence_logprobs(got.logp, labels, np.int32(-100), True),
                       sequence_logprobs(want.logp, labels, -100, True))


@pytest.mark.parametrize("case", BAD_TOKEN_INPUTS, ids=lambda c: c[0])
def test_token_logprobs_checks_its_inputs(backend, case):
    """The public per-token function checks what the front doors check, on every backend, before
    any kernel: labels an integer ``[B, T]`` on the logits' device (a Triton program would read
    another row's label past the tensor; the reference would score a slice), ``ignore_index`` an
    int (a float one made int32 labels scan 2^32 candidates), and no in-place gradient
    over logits that share memory (one gradient written over another's)."""
    _, kwargs, error, match = case
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", torch.randn(2, 3, 11))
    labels = kwargs.pop("labels", torch.randint(0, 11, (2, 3), dtype=torch.int32))
    with pytest.raises(error, match="^token_logprobs: " + match):
        token_logprobs(logits, labels, backend=backend, **kwargs)


def test_sequence_logprobs_checks_its_inputs():
    """As the README says: integer [B, T] labels of token_logp's shape and device, floating weights of
    its shape, an int ignore_index, a bool average; each message starts with sequence_logprobs:.
    (Float and bool labels, and a string average, were taken before.)"""
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    logp = torch.randn(2, 3) * (labels != -100)  # ignored tokens carry 0, as token_logprobs gives them
    torch.testing.assert_close(sequence_logprobs(logp, labels, -100, True),
                               torch.stack([logp[0, :2].sum() / 2, logp[1, 0]]))
    torch.testing.assert_close(sequence_logprobs(logp, labels, -100, np.bool_(False)), logp.sum(-1))
    for bad in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"^sequence_logprobs: labels shape .* does not match token_logp shape \(2, 3\)"):
            sequence_logprobs(logp, bad, -100, True)
    for bad in (labels.float(), labels != -100):
        with pytest.raises(TypeError, match=r"^sequence_logprobs: labels must be an integer tensor of token ids"):
            sequence_logprobs(logp, bad, -100, True)
    with pytest.raises(ValueError, match=r"^sequence_logprobs: labels are on meta but token_logp is on cpu"):
        sequence_logprobs(logp, labels.to("meta"), -100, True)
    with pytest.raises(ValueError, match=r"^sequence_logprobs: weights must be token_logp's shape \(2, 3\)"):
        sequence_logprobs(logp, labels, -100, False, weights=torch.ones(2, 1))
    with pytest.raises(TypeError, match=r"^sequence_logprobs: weights must be a floating tensor"):
        sequence_logprobs(logp, labels, -100, False, weights=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^sequence_logprobs: token_logp must be a floating \[B, T\] tensor"):
        sequence_logprobs(logp[0], labels[0], -100, False)
    with pytest.raises(ValueError, match=r"^sequence_logprobs: token_logp must be a floating \[B, T\] tensor"):
        sequence_logprobs(labels, labels, -100, False)
    with pytest.raises(TypeError, match=r"^sequence_logprobs: ignore_index must be an int"):
        sequence_logprobs(logp, labels, np.float32(-100), True)
    with pytest.raises(TypeError, match=r"^sequence_logprobs: average must be a bool, got 'yes'"):
        sequence_logprobs(logp, labels, -100, "yes")
