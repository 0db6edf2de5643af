"""Determinism (issue 7): the same inputs give bitwise identical loss, outputs, metrics and
gradients across repeated runs on every backend, and on the cpu backend whatever the thread count."""
import pytest
import torch

from conftest import BACKENDS
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss
from oracle import IGNORE, make_batch

RUNS = 3
CONFIGS = [
    dict(dtype=torch.bfloat16, V=1000, shift=True, options=dict(loss_type="sigmoid")),
    dict(dtype=torch.float32, V=300, shift=False,
         options=dict(loss_type=["ipo", "sft"], token_metrics=True, use_weighting=True)),
    dict(dtype=torch.float16, V=257, shift=True, options=dict(loss_type="aot", label_smoothing=0.1,
                                                              average_log_prob=True)),
]


def _flat(out, grads):
    """Every tensor a call returns, by name."""
    values = {name: getattr(out, name) for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps",
                                                     "rejected_logps")}
    values.update({f"metrics[{k}]": v for k, v in out.metrics.items()})
    values.update({f"grad[{i}]": g for i, g in enumerate(grads)})
    return {k: v.detach().clone() for k, v in values.items()}


def _assert_bitwise(runs):
    first = runs[0]
    for other in runs[1:]:
        assert other.keys() == first.keys()
        for name, value in first.items():
            assert value.dtype == other[name].dtype and torch.equal(value, other[name]), name
            # torch.equal treats NaN as unequal: none expected on these fresh random inputs
            assert torch.isfinite(value).all(), name


def _logits_run(backend, logits, labels, ref, config, inplace=False):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, labels, ref_logps=ref, backend=backend, shift=config["shift"],
                         inplace_backward=inplace, **config["options"])
    out.loss.backward()
    return _flat(out, [leaf.grad])


def _batch(config):
    logits, labels = make_batch(3, 7, config["V"], config["dtype"])
    labels[4, 2:5] = IGNORE
    return logits, labels, torch.randn(6) * 5


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c["dtype"]).split(".")[-1])
def test_fused_dpo_loss_is_bitwise_repeatable(backend, config, inplace):
    logits, labels, ref = _batch(config)
    runs = [_logits_run(backend, logits, labels, ref, config, inplace) for _ in range(RUNS)]
    _assert_bitwise(runs)


def _linear_inputs(dtype):
    hidden = (torch.randn(4, 6, 32) * 2).to(dtype)
    weight = (torch.randn(300, 32) / 4).to(dtype)
    bias = torch.randn(300).to(dtype)
    labels = torch.randint(0, 300, (4, 6))
    labels[:, :2] = IGNORE
    labels[1, -1] = IGNORE
    return hidden, weight, bias, labels, torch.randn(4) * 5


def _linear_run(backend, inputs, mode, **options):
    hidden, weight, bias, labels, ref = inputs
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = fused_linear_dpo_loss(h, w, labels, b, ref_logps=ref, backend=backend, mode=mode, chunk_tokens=5,
                                **options)
    out.loss.backward()
    return _flat(out, [h.grad, w.grad, b.grad])


@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_dpo_loss_is_bitwise_repeatable(backend, mode, dtype):
    inputs = _linear_inputs(dtype)
    runs = [_linear_run(backend, inputs, mode, token_metrics=True, shift=True) for _ in range(RUNS)]
    _assert_bitwise(runs)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _with_threads(n, fn):
    torch.set_num_threads(n)
    return fn()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension dpo_kernels._C not built")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c["dtype"]).split(".")[-1])
def test_cpu_backend_is_bitwise_identical_across_thread_counts(threads, config):
    logits, labels, ref = _batch(config)
    # Enough rows that two threads really split them.
    logits, labels = logits.repeat(8, 1, 1), labels.repeat(8, 1)
    ref = ref.repeat(8)
    runs = [_with_threads(n, lambda: _logits_run("cpu", logits, labels, ref, config)) for n in (1, 2, 1, 2)]
    _assert_bitwise(runs)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension dpo_kernels._C not built")
@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
def test_cpu_backend_linear_is_bitwise_identical_across_thread_counts(threads, mode):
    inputs = _linear_inputs(torch.bfloat16)
    runs = [_with_threads(n, lambda: _linear_run("cpu", inputs, mode, shift=True)) for n in (1, 2, 1, 2)]
    _assert_bitwise(runs)
