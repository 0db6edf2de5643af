"""Property-based fuzzing of ``fused_dpo_loss`` (issue 7): every call either matches the float64
oracle (loss, outputs, metrics, gradient) or raises a clear, documented error naming the argument.

Shapes, dtypes, masks, strides and options are drawn by hypothesis (derandomized, so CI is
reproducible). The Triton interpreter is slow: its properties run a few examples only.
"""
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import oracle
from conftest import BACKENDS
from dpo_kernels import LOSSES, fused_dpo_loss
from oracle import IGNORE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "wider", "permuted", "shifted", "vocab_stride2"]
EXAMPLES = {"reference": 200, "cpu": 200, "triton": 16}


def _settings(backend, scale=1.0):
    return settings(deadline=None, derandomize=True, max_examples=max(2, int(EXAMPLES[backend] * scale)),
                    suppress_health_check=list(HealthCheck), database=None)


def _strided(values: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """``values`` [2B, T, V] copied into a non-contiguous view of a bigger buffer (garbage around it)."""
    R, T, V = values.shape
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return (torch.randn(*shape, generator=gen) * 3).to(values.dtype)

    if layout == "contiguous":
        view = noise(R, T, V)
    elif layout == "wider":  # a slice of a wider vocabulary and a longer sequence
        view = noise(R + 1, T + 2, V + 5)[1:, 1:T + 1, 2:V + 2]
    elif layout == "permuted":  # stored [T, 2B, V], as a seq-first model returns it
        view = noise(T, R, V).permute(1, 0, 2)
    elif layout == "shifted":  # a storage offset that breaks every alignment
        view = noise(R * T * V + 3)[3:].view(R, T, V)
    elif layout == "vocab_stride2":
        view = noise(R, T, 2 * V)[..., ::2]
    else:
        raise KeyError(layout)
    assert view.shape == values.shape
    with torch.no_grad():
        view.copy_(values)
    return view


@st.composite
def _problem(draw, triton=False):
    P = draw(st.sampled_from([1, 2]))
    T = draw(st.integers(1, 6))
    V = draw(st.sampled_from([1, 2, 3, 7, 64, 100, 129, 255, 256, 300]) if not triton
             else st.sampled_from([1, 7, 100, 300]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    mask = draw(st.sampled_from(["prompt", "random", "all_ignored", "empty_rows", "none"]))
    shift = draw(st.booleans())
    average = draw(st.booleans())
    inplace = draw(st.booleans())
    loss_type = draw(st.sampled_from(sorted(LOSSES)))
    spec = LOSSES[loss_type]
    smoothing = 0.0
    if spec.label_smoothing and (loss_type == "exo_pair" or draw(st.booleans())):
        smoothing = draw(st.sampled_from([0.05, 0.2, 0.45]))
    reference = draw(st.sampled_from(["logps", "logits"] + ([] if spec.needs_reference else ["none"])))
    beta = draw(st.sampled_from([0.1, 0.5, 2.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(P=P, T=T, V=V, dtype=dtype, layout=layout, mask=mask, shift=shift, average=average,
                inplace=inplace, loss_type=loss_type, smoothing=smoothing, reference=reference, beta=beta, seed=seed)


def _labels(P, T, V, mask, gen):
    labels = torch.randint(0, V, (2 * P, T), generator=gen)
    if mask == "prompt":
        labels[:, : T // 2] = IGNORE
    elif mask == "random":
        labels[torch.rand(2 * P, T, generator=gen) < 0.4] = IGNORE
    elif mask == "all_ignored":
        labels[:] = IGNORE
    elif mask == "empty_rows":  # one chosen and one rejected completion with no token at all
        labels[0] = IGNORE
        labels[-1] = IGNORE
    return labels


def _check_problem(backend, p):
    gen = torch.Generator().manual_seed(p["seed"])
    P, T, V, dtype = p["P"], p["T"], p["V"], p["dtype"]
    values = (torch.randn(2 * P, T, V, generator=gen) * 3).to(dtype)  # never zeros
    labels = _labels(P, T, V, p["mask"], gen)
    kwargs = dict(beta=p["beta"], loss_type=p["loss_type"], label_smoothing=p["smoothing"], shift=p["shift"])
    want_kwargs = dict(kwargs, average=p["average"])
    ref_kwargs = {}
    if p["reference"] == "logps":
        ref_kwargs["ref_logps"] = torch.randn(2 * P, generator=gen) * 5
    elif p["reference"] == "logits":
        ref_kwargs["ref_logits"] = _strided((torch.randn(2 * P, T, V, generator=gen) * 3).to(dtype), "permuted", 7)
    want = oracle.dpo(values, labels, **ref_kwargs, **want_kwargs)
    # Oracle itself undefined (e.g. ORPO's log-odds of an empty completion): nothing to compare.
    assume(torch.isfinite(want["loss"]) and torch.isfinite(want["grad"]).all())

    logits = _strided(values, p["layout"], p["seed"] + 1).requires_grad_(True)
    before_ref = None if "ref_logits" not in ref_kwargs else ref_kwargs["ref_logits"].clone()
    out = fused_dpo_loss(logits, labels, backend=backend, inplace_backward=p["inplace"],
                         average_log_prob=p["average"], **ref_kwargs, **kwargs)
    out.loss.backward()
    grad = logits.grad
    if p["inplace"]:
        # The gradient lives in the logits' own memory.
        assert torch.equal(logits.detach(), grad)
    _assert_matches(out, want, grad, dtype)
    if before_ref is not None:
        assert torch.equal(ref_kwargs["ref_logits"], before_ref)


# Absolute floor of the gradient tolerance. fp16: a saturated loss gives gradients below 2^-24
# that fp16 can only round to 0 or 2^-24. fp32/bf16: the per-sequence loss coefficient is computed
# in fp32 (documented), so a saturated loss carries absolute errors of ~1e-11 on gradients of
# ~1e-8, far below anything a training step can see.
GRAD_ATOL_FLOOR = {torch.float16: 2.0**-25, torch.bfloat16: 1e-9, torch.float32: 1e-9}


def _assert_matches(out, want, grad, dtype):
    """``oracle.assert_matches_oracle``, with the gradient's absolute tolerance floored."""
    oracle.assert_matches_oracle(out, {**want, "grad": grad.double()}, grad, dtype)  # everything but the gradient
    expected = want["grad"].double()
    rtol = oracle.GRAD_RTOL[dtype]
    atol = rtol * expected.abs().amax().item() * 0.05 + GRAD_ATOL_FLOOR[dtype]
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol)


def _make_property(backend):
    @_settings(backend)
    @given(p=_problem(triton=backend == "triton"))
    def prop(p):
        _check_problem(backend, p)

    return prop


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_inputs_match_the_float64_oracle(backend):
    _make_property(backend)()


# ---------------------------------------------------------------------------------------------
# Bad inputs: a documented error naming the argument, never a wrong number or an obscure crash.


BAD = ["rows_odd", "rows_zero", "labels_shape", "logits_2d", "logits_int", "labels_float", "label_high",
       "label_negative", "nan", "inf", "neg_inf_label", "overlap_inplace", "labels_meta", "ref_meta",
       "ref_logits_meta", "ref_shape", "ref_int", "vocab_zero", "ref_logits_shape"]


@st.composite
def _bad_problem(draw):
    return dict(kind=draw(st.sampled_from(BAD)), P=draw(st.sampled_from([1, 2])), T=draw(st.integers(1, 6)),
                V=draw(st.sampled_from([1, 5, 64, 300])), dtype=draw(st.sampled_from(DTYPES)),
                shift=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _check_bad(backend, p):
    gen = torch.Generator().manual_seed(p["seed"])
    P, T, V, dtype, kind, shift = p["P"], p["T"], p["V"], p["dtype"], p["kind"], p["shift"]
    logits = (torch.randn(2 * P, T, V, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=gen)
    kwargs = dict(ref_logps=torch.randn(2 * P, generator=gen), backend=backend, shift=shift)
    # The token that is scored with and without shift: logits row (r, t) reads labels[r, t + shift].
    r, t = int(torch.randint(0, 2 * P, (1,), generator=gen)), 0
    if shift:
        assume(T >= 2)
    lab_t = t + int(shift)
    if kind == "rows_odd":
        logits, labels = logits[:-1], labels[:-1]
        kwargs.pop("ref_logps")
        kwargs["reference_free"] = True
        err, match = ValueError, r"logits batch must be 2B > 0"
    elif kind == "rows_zero":
        logits, labels = logits[:0], labels[:0]
        kwargs.pop("ref_logps")
        kwargs["reference_free"] = True
        err, match = ValueError, r"logits batch must be 2B > 0 sequences .* got 0"
    elif kind == "labels_shape":
        labels = torch.randint(0, V, (2 * P, T + 1), generator=gen)
        err, match = ValueError, r"labels shape .* does not match logits shape"
    elif kind == "logits_2d":
        logits = logits[:, 0]
        err, match = ValueError, r"logits must be \[2B, T, V\]"
    elif kind == "logits_int":
        logits = logits.to(torch.int32)
        err, match = TypeError, r"logits must be a floating tensor"
    elif kind == "labels_float":
        labels = labels.float()
        err, match = TypeError, r"labels must be an integer tensor"
    elif kind in ("label_high", "label_negative"):
        bad = V + int(torch.randint(0, 1000, (1,), generator=gen)) if kind == "label_high" else -1
        labels[r, lab_t] = bad
        err, match = ValueError, rf"labels\[{r}, {t}\] \(as aligned with the logits rows\) = {bad} is outside \[0, V={V}\)"
    elif kind in ("nan", "inf"):
        logits[r, t, int(torch.randint(0, V, (1,), generator=gen))] = float(kind)
        err, match = ValueError, rf"logits\[{r}, {t}\] gives a non-finite log-probability"
    elif kind == "neg_inf_label":  # the label's own logit is -inf: log p = -inf
        logits[r, t, labels[r, lab_t]] = float("-inf")
        err, match = ValueError, rf"logits\[{r}, {t}\] gives a non-finite log-probability"
    elif kind == "overlap_inplace":
        logits = logits[:1].expand(2 * P, T, V)
        assume(P > 1 or T > 1 or V > 1)
        kwargs["inplace_backward"] = True
        err, match = ValueError, r"inplace_backward=True needs logits whose elements do not overlap"
    elif kind == "labels_meta":
        labels = labels.to("meta")
        err, match = ValueError, r"labels are on meta but logits are on cpu"
    elif kind == "ref_meta":
        kwargs["ref_logps"] = kwargs["ref_logps"].to("meta")
        err, match = ValueError, r"ref_logps are on meta but logits are on cpu"
    elif kind == "ref_logits_meta":
        kwargs.pop("ref_logps")
        kwargs["ref_logits"] = torch.empty(logits.shape, dtype=dtype, device="meta")
        err, match = ValueError, r"ref_logits are on meta but logits are on cpu"
    elif kind == "ref_shape":
        kwargs["ref_logps"] = torch.randn(2 * P + 1, generator=gen)
        err, match = ValueError, rf"ref_logps must have shape \[2B\] = \({2 * P},\)"
    elif kind == "ref_int":
        kwargs["ref_logps"] = torch.randint(-5, 0, (2 * P,), generator=gen)
        err, match = TypeError, r"ref_logps must be floating"
    elif kind == "vocab_zero":
        logits = logits[..., :0]
        err, match = ValueError, r"logits has an empty vocabulary dimension"
    elif kind == "ref_logits_shape":
        kwargs.pop("ref_logps")
        kwargs["ref_logits"] = torch.randn(2 * P, T, V + 1, generator=gen).to(dtype)
        err, match = ValueError, r"ref_logits shape .* must equal logits shape"
    else:
        raise KeyError(kind)
    if logits.is_floating_point():
        logits.requires_grad_(True)
    with pytest.raises(err, match=match):
        fused_dpo_loss(logits, labels, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_documented_errors(backend):
    @_settings(backend, scale=0.75)
    @given(p=_bad_problem())
    def prop(p):
        _check_bad(backend, p)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_unvalidated_propagate(backend):
    """validate=False: NaN/inf in a scored row reaches the loss (documented), never a crash."""

    @_settings(backend, scale=0.2)
    @given(V=st.sampled_from([1, 5, 300]), value=st.sampled_from([float("nan"), float("inf")]),
           dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
    def prop(V, value, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(2, 3, V, generator=gen) * 3).to(dtype)
        labels = torch.randint(0, V, (2, 3), generator=gen)
        logits[1, 2, int(torch.randint(0, V, (1,), generator=gen))] = value
        out = fused_dpo_loss(logits, labels, ref_logps=torch.randn(2, generator=gen), backend=backend,
                             validate=False)
        assert not torch.isfinite(out.loss)

    prop()


def test_inplace_backward_on_permuted_logits(backend):
    values = (torch.randn(4, 3, 300) * 3)
    labels = torch.randint(0, 300, (4, 3))
    ref = torch.randn(4)
    logits = _strided(values, "permuted", 0).requires_grad_(True)
    out = fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, inplace_backward=True)
    out.loss.backward()
    oracle.assert_matches_oracle(out, oracle.dpo(values, labels, ref_logps=ref), logits.grad, torch.float32)


def test_every_fuzzed_loss_type_is_in_the_registry():
    """The strategy draws from the registry: a new loss type is fuzzed without touching this file."""
    assert {"sigmoid", "ipo", "exo_pair", "orpo", "aot"} <= set(LOSSES)
    assert re.fullmatch(r"[a-z_]+", "".join(LOSSES))
