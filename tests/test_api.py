"""fused_dpo_loss end to end against the float64 oracle: every output, metric and the gradient."""
import pytest
import torch

import oracle
from dpo_kernels import fused_dpo_loss
from oracle import IGNORE, assert_close_grad, make_batch
from runs import run_logits as _run

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


_check = oracle.assert_matches_oracle




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [300, 1000])
@pytest.mark.parametrize("shift", [False, True])
def test_sigmoid_matches_oracle(backend, small_block, dtype, V, shift):
    logits, labels = make_batch(2, 6, V, dtype)
    ref = torch.randn(4) * 5 - 30
    out, grad = _run(logits, labels, ref_logps=ref, shift=shift, backend=backend)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, shift=shift), grad, dtype)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("average", [False, True])
def test_each_loss_type_matches_oracle(backend, loss_type, average):
    logits, labels = make_batch(3, 5, 200, torch.float32)
    ref_logits = torch.randn_like(logits) * 3
    kwargs = dict(beta=0.5, loss_type=loss_type, average_log_prob=average, shift=True)
    out, grad = _run(logits, labels, ref_logits=ref_logits, backend=backend, **kwargs)
    want = oracle.dpo(logits, labels, ref_logits=ref_logits, beta=0.5, loss_type=loss_type, average=average, shift=True)
    _check(out, want, grad, torch.float32)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_label_smoothing(backend, label_smoothing):
    logits, labels = make_batch(2, 5, 150, torch.bfloat16)
    ref = torch.randn(4)
    out, grad = _run(logits, labels, ref_logps=ref, label_smoothing=label_smoothing, backend=backend)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, label_smoothing=label_smoothing), grad, torch.bfloat16)


def test_fused_triton_loss_equals_the_torch_registry_loss():
    """The sigmoid loss from the Triton loss kernel and from losses.py agree (same logits)."""
    pytest.importorskip("triton")
    logits, labels = make_batch(3, 6, 400, torch.float32)
    ref = torch.randn(6)
    for average in (False, True):
        fused, fused_grad = _run(logits, labels, ref_logps=ref, average_log_prob=average, backend="triton")
        torch_path, torch_grad = _run(logits, labels, ref_logps=ref, average_log_prob=average, backend="reference")
        for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
            torch.testing.assert_close(getattr(fused, name), getattr(torch_path, name), rtol=1e-6, atol=1e-6)
        for name in fused.metrics:
            torch.testing.assert_close(fused.metrics[name], torch_path.metrics[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("form", ["pair", "flat"])
def test_ref_logps_as_pair_or_flat(backend, form):
    logits, labels = make_batch(2, 5, 100, torch.float32)
    ref = torch.randn(4)
    given = (ref[:2], ref[2:]) if form == "pair" else ref
    out, grad = _run(logits, labels, ref_logps=given, backend=backend)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref), grad, torch.float32)


def test_reference_free(backend):
    logits, labels = make_batch(2, 5, 100, torch.float32)
    out, grad = _run(logits, labels, reference_free=True, backend=backend)
    _check(out, oracle.dpo(logits, labels), grad, torch.float32)


def test_ref_logits_get_no_gradient_and_stay_untouched(backend):
    logits, labels = make_batch(2, 5, 100, torch.bfloat16)
    ref_logits = (torch.randn(4, 5, 100) * 2).to(torch.bfloat16).requires_grad_(True)
    before = ref_logits.detach().clone()
    out, grad = _run(logits, labels, ref_logits=ref_logits, backend=backend, shift=True, inplace_backward=True)
    assert ref_logits.grad is None and torch.equal(ref_logits.detach(), before)
    _check(out, oracle.dpo(logits, labels, ref_logits=before, shift=True), grad, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_oracle(backend, small_block, dtype):
    logits, labels = make_batch(2, 5, 700, dtype)
    ref = torch.randn(4)
    out, grad = _run(logits, labels, ref_logps=ref, shift=True, inplace_backward=True, backend=backend)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, shift=True), grad, dtype)


def test_non_contiguous_logits_and_labels(backend, small_block):
    """A [2B, T, V] view out of a wider, permuted buffer, and labels with a stride."""
    wide = (torch.randn(7, 4, 600 + 17) * 3).to(torch.bfloat16)
    logits = wide.permute(1, 0, 2)[:, 1:6, 5:605]
    labels = torch.randint(0, 600, (4, 10))[:, ::2].clone()
    labels = torch.randint(0, 600, (4, 10))[:, ::2]
    labels[:, 0] = IGNORE
    assert not logits.is_contiguous() and not labels.is_contiguous()
    ref = torch.randn(4)
    leaf = logits.detach().requires_grad_(True)  # keeps the strides
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, shift=True, backend=backend)
    out.loss.backward()
    _check(out, oracle.dpo(logits, labels, ref_logps=ref, shift=True), leaf.grad, torch.bfloat16)


def test_sequences_without_completion_tokens_are_finite(backend):
    logits, labels = make_batch(2, 4, 50, torch.float32)
    labels[0] = IGNORE  # a chosen sequence with nothing to score
    labels[3] = IGNORE
    ref = torch.randn(4)
    for average in (False, True):
        out, grad = _run(logits, labels, ref_logps=ref, average_log_prob=average, backend=backend)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())
        _check(out, oracle.dpo(logits, labels, ref_logps=ref, average=average), grad, torch.float32)


def test_all_tokens_ignored(backend):
    logits, labels = make_batch(1, 3, 40, torch.float32)
    labels[:] = IGNORE
    out, grad = _run(logits, labels, ref_logps=torch.zeros(2), backend=backend)
    assert torch.isfinite(out.loss) and (grad == 0).all()
    torch.testing.assert_close(out.metrics["logits/chosen"], torch.tensor(0.0))


def test_default_backend_runs_and_matches(small_block):
    logits, labels = make_batch(2, 4, 300, torch.float32)
    ref = torch.randn(4)
    out, grad = _run(logits, labels, ref_logps=ref)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref), grad, torch.float32)


def test_chosen_logps_carry_gradient_for_extra_terms(backend):
    """An RPO-style NLL term on out.chosen_logps backpropagates through the same kernel."""
    logits, labels = make_batch(2, 5, 120, torch.float32)
    ref = torch.randn(4)
    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend)
    (out.loss - 0.1 * out.chosen_logps.mean()).backward()
    z = logits.double().requires_grad_(True)
    logp, _ = oracle.token_logprobs(z, labels)
    seq = logp.sum(-1)
    m = (seq[:2] - ref[:2].double()) - (seq[2:] - ref[2:].double())
    (torch.nn.functional.softplus(-0.1 * m).mean() - 0.1 * seq[:2].mean()).backward()
    assert_close_grad(leaf.grad, z.grad, torch.float32)


def test_float64_logits(backend):
    logits, labels = make_batch(2, 4, 90, torch.float64)
    ref = torch.randn(4, dtype=torch.float64)
    out, grad = _run(logits, labels, ref_logps=ref, backend=backend)
    _check(out, oracle.dpo(logits, labels, ref_logps=ref), grad, torch.float64)


@pytest.mark.parametrize("case", oracle.LABEL_DTYPE_CASES, ids=oracle.label_dtype_id)
@pytest.mark.parametrize("shift", [False, True])
def test_labels_of_every_integer_dtype(backend, case, shift):
    """uint8, int8, int16 and int32 labels score exactly what their values say: an ignore_index the
    dtype cannot hold ignores nothing (torch would wrap it, -100 to 156 in uint8, and a real id
    would drop out of the lengths while the kernel scores it), one it holds ignores as usual; the
    shift pads with it either way. The float64 oracle reads the same values as int64."""
    _, ignore_index, V, _ = case
    labels, wide = oracle.labels_of_dtype(case, 4, 7)
    logits = torch.randn(4, 7, V) * 3
    ref = torch.randn(4) - 20
    kwargs = dict(ref_logps=ref, shift=shift, average_log_prob=True, ignore_index=ignore_index)
    out, grad = _run(logits, labels, backend=backend, **kwargs)
    want = oracle.dpo(logits, wide, ref_logps=ref, shift=shift, average=True, ignore_index=ignore_index)
    _check(out, want, grad, torch.float32)


@pytest.mark.parametrize("shift", [False, True])
def test_sequences_of_no_tokens(backend, shift):
    """T = 0 (nothing scored, shifted or not): every log-prob is 0, the loss the oracle's
    -log sigmoid(-beta * ref margin), and the logits gradient an empty tensor."""
    logits = torch.randn(4, 0, 50)
    labels = torch.zeros(4, 0, dtype=torch.long)
    ref = torch.randn(4)
    out, grad = _run(logits, labels, ref_logps=ref, shift=shift, backend=backend)
    want = oracle.dpo(logits, labels, ref_logps=ref, shift=shift)
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-6, atol=1e-7)
    assert torch.equal(out.chosen_logps, torch.zeros(2)) and grad.shape == logits.shape


@pytest.mark.parametrize("dtype, offsets", [(torch.float32, (4e4, -1e5, 1e8, 0.0)), (torch.bfloat16, (3e4, -2e5))])
def test_a_common_offset_of_a_row_costs_no_precision(backend, small_block, dtype, offsets):
    """Rows of logits that each share a large offset (4e4, -1e5, 1e8, ...) give the loss, the
    log-probs, every metric (the entropy and WPO's weights included) and the gradient of the
    float64 oracle on the same values, to the tolerances of rows centred on 0: the kernels keep
    ``lse`` in fp64 and every other statistic relative to the row's max. With one fp32 lse each
    log-prob would be off by up to |lse| * 2^-24 (3e-3 at 1e5), and at 1e8 every probability
    would be 1. (bf16 rows that large hold few distinct values; their softmax is still exact.)"""
    logits, labels = make_batch(3, 7, 700, torch.float32)
    for row in range(logits.shape[0]):
        logits[row] += offsets[row % len(offsets)]
    logits = logits.to(dtype)
    ref = torch.randn(6)
    kwargs = dict(ref_logps=ref, use_weighting=True, token_metrics=True)
    out, grad = _run(logits, labels, backend=backend, **kwargs)
    _check(out, oracle.dpo(logits, labels, **kwargs), grad, dtype)
