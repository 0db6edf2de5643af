"""Bad input gets a clear error naming the argument, never a wrong number."""
import re

import pytest
import torch

from dpo_kernels import LOSSES, fused_dpo_loss, fused_linear_dpo_loss
import oracle
from oracle import IGNORE, make_batch


@pytest.fixture
def batch():
    logits, labels = make_batch(2, 5, 64, torch.float32)
    return logits, labels, torch.randn(4)


@pytest.mark.parametrize("rows", [3, 0])
def test_odd_or_empty_batch(rows):
    logits = torch.randn(rows, 4, 10)
    labels = torch.randint(0, 10, (rows, 4))
    with pytest.raises(ValueError, match=r"logits batch must be 2B > 0"):
        fused_dpo_loss(logits, labels, reference_free=True)


def test_labels_shape_mismatch(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"labels shape \(4, 4\) does not match logits shape \(4, 5, 64\)"):
        fused_dpo_loss(logits, labels[:, :4], ref_logps=ref)


def test_logits_must_be_3d(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"logits must be \[2B, T, V\]"):
        fused_dpo_loss(logits[0], labels, ref_logps=ref)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_logits(batch, dtype):
    logits, labels, ref = batch
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        fused_dpo_loss(logits.to(dtype), labels, ref_logps=ref)


def test_float_labels(batch):
    logits, labels, ref = batch
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fused_dpo_loss(logits, labels.float(), ref_logps=ref)


@pytest.mark.parametrize("ignore_index", [2 ** 63, -(2 ** 63) - 1])
def test_ignore_index_beyond_int64(batch, ignore_index):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fused_dpo_loss(logits, labels, ref_logps=ref, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fused_linear_dpo_loss(torch.randn(*labels.shape, 8), torch.randn(logits.shape[-1], 8), labels, ref_logps=ref,
                              ignore_index=ignore_index)


def test_not_tensors(batch):
    logits, labels, ref = batch
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fused_dpo_loss(logits.tolist(), labels, ref_logps=ref)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fused_dpo_loss(logits, labels.tolist(), ref_logps=ref)


@pytest.mark.parametrize("bad", [64, 1000, -1, -99])
def test_labels_out_of_range(backend, batch, bad):
    logits, labels, ref = batch
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"labels\[1, 3\].*= {bad} is outside \[0, V=64\) and is not ignore_index=-100"):
        fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)


def test_labels_out_of_range_unvalidated_is_nan_not_silent(backend, batch):
    logits, labels, ref = batch
    labels[1, 3] = 64
    out = fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, validate=False)
    assert torch.isnan(out.loss)


def test_out_of_range_label_in_shifted_position_is_reported_where_it_is_used(backend, batch):
    logits, labels, ref = batch
    labels[0, 0] = 5000  # with shift, labels[:, 0] is never scored: no error
    fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, shift=True)
    labels[0, 4] = 5000  # scored by logits row 3
    with pytest.raises(ValueError, match=r"labels\[0, 3\] \(as aligned with the logits rows\) = 5000"):
        fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, shift=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise_when_validated(backend, batch, value):
    logits, labels, ref = batch
    labels[2, 4] = 1
    logits[2, 4, 7] = value
    with pytest.raises(ValueError, match=r"logits\[2, 4\] gives a non-finite log-probability"):
        fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)
    out = fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, validate=False)
    assert not torch.isfinite(out.loss)  # documented: propagates when not validated


@pytest.mark.parametrize("offset", [2e13, -1e15, 1e30])
def test_logits_past_the_fp64_lse_precision_raise_when_validated(backend, batch, offset):
    """The kernels keep a row's lse in fp64 (exact log-probs and gradients at any offset a model
    produces: tested to 1e8); past |lse| = 2^44 (1.8e13) its own rounding exceeds bf16's precision
    in the gradient, and near 1e17 the log-sum is lost. validate=True refuses a scored row there,
    naming it; an ignored row that large is never read; validate=False scores it anyway; 1e12
    passes."""
    logits, labels, ref = batch
    labels[2, 4], labels[3, 1] = 1, IGNORE
    logits[3, 1] += offset
    fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)
    logits[2, 4] += 1e12
    fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)
    logits[2, 4] += offset
    with pytest.raises(ValueError, match=r"logits\[2, 4\]: the row's log-sum-exp is .* past \+-1.75922e\+13"):
        fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)
    fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend, validate=False)


def test_non_finite_in_an_ignored_row_is_harmless(backend, batch):
    logits, labels, ref = batch
    labels[2, 4] = IGNORE
    logits[2, 4, :] = float("nan")
    out = fused_dpo_loss(logits, labels, ref_logps=ref, backend=backend)
    assert torch.isfinite(out.loss)


def test_non_finite_ref_logits(backend, batch):
    logits, labels, _ = batch
    ref_logits = torch.randn_like(logits)
    labels[1, 2] = 3
    ref_logits[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ref_logits\[1, 2\] gives a non-finite"):
        fused_dpo_loss(logits, labels, ref_logits=ref_logits, backend=backend)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("form", ["tensor", "pair"])
def test_non_finite_ref_logps_raise_when_validated(backend, batch, value, form):
    """A precomputed reference is where a NaN most likely comes from: named, as a bad logit is;
    with validate=False it reaches the loss."""
    logits, labels, ref = batch
    ref = ref.clone()
    ref[2] = value
    given = ref if form == "tensor" else (ref[:2], ref[2:])
    with pytest.raises(ValueError, match=r"^ref_logps\[2\] = (nan|inf|-inf) is not finite"):
        fused_dpo_loss(logits, labels, ref_logps=given, backend=backend)
    out = fused_dpo_loss(logits, labels, ref_logps=given, backend=backend, validate=False)
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
def test_non_finite_ref_logps_raise_on_the_hidden_path(mode):
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 5, 8), torch.randn(40, 8)
    labels = torch.randint(0, 40, (4, 5))
    ref = torch.randn(4)
    ref[1] = float("nan")
    with pytest.raises(ValueError, match=r"^ref_logps\[1\] = nan is not finite"):
        fused_linear_dpo_loss(hidden.requires_grad_(), weight, labels, ref_logps=ref, mode=mode)


@pytest.mark.parametrize("front", ["logits", "hidden"])
def test_orpo_with_an_empty_rejected_completion(backend, front):
    """ORPO's odds ``p / (1 - p)`` of an empty completion (average log-prob 0: p = 1) are infinite:
    with an empty rejected completion the pair's loss is inf, which validate=True refuses, naming
    the pair (the README's "a sequence with no completion tokens gives a finite loss" has this
    one exception). Without validation the loss is inf and the gradients stay finite. An empty
    chosen completion is finite, and matches the float64 oracle."""
    torch.manual_seed(3)
    P, T, H, V = 2, 6, 8, 37
    hidden, weight = torch.randn(2 * P, T, H), torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = IGNORE

    def call(labels, **kwargs):
        if front == "logits":
            logits = (hidden @ weight.T).requires_grad_(True)
            return fused_dpo_loss(logits, labels, loss_type="orpo", backend=backend, **kwargs), logits
        h = hidden.clone().requires_grad_(True)
        return fused_linear_dpo_loss(h, weight, labels, loss_type="orpo", backend=backend, **kwargs), h

    empty_rejected = labels.clone()
    empty_rejected[P + 1] = IGNORE
    with pytest.raises(ValueError, match=r"^loss_type='orpo': the rejected completion of pair 1 has no scored token"):
        call(empty_rejected)
    out, leaf = call(empty_rejected, validate=False)
    out.loss.backward()
    assert out.loss.item() == float("inf") and torch.isfinite(leaf.grad).all()
    empty_chosen = labels.clone()
    empty_chosen[1] = IGNORE
    out, _ = call(empty_chosen)
    want = oracle.dpo(hidden @ weight.T, empty_chosen, loss_type="orpo")
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("reference", ["logps", "logits"])
def test_validation_is_one_host_read(backend, batch, validate, reference):
    """``validate=True`` checks the policy's and the reference logits' results in one host read
    (a GPU synchronisation); ``validate=False`` reads nothing in the forward."""
    from host_syncs import host_reads

    logits, labels, ref = batch
    kwargs = dict(ref_logps=ref) if reference == "logps" else dict(ref_logits=torch.randn_like(logits))
    with host_reads() as reads:
        out = fused_dpo_loss(logits, labels, backend=backend, validate=validate, **kwargs)
    assert len(reads) == (1 if validate else 0), reads
    assert torch.isfinite(out.loss)


def test_unknown_loss_type_lists_valid_ones(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=re.escape(f"loss_type must be one of {sorted(LOSSES)}, got 'dpo'")):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type="dpo")


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), "0.1"])
def test_bad_beta(batch, beta):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fused_dpo_loss(logits, labels, ref_logps=ref, beta=beta)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sft", "sigmoid"], ["sft", "orpo"]])
def test_beta_zero_only_where_no_loss_reads_it(batch, loss_type):
    """beta = 0 is accepted for sft alone (it scales only the logged rewards); a loss that reads it
    is named."""
    logits, labels, ref = batch
    reader = [name for name in ([loss_type] if isinstance(loss_type, str) else loss_type) if name != "sft"]
    with pytest.raises(ValueError, match=re.escape(f"got 0.0: loss_type {reader} reads it")):
        fused_dpo_loss(logits, labels, ref_logps=ref, beta=0.0, loss_type=loss_type)


@pytest.mark.parametrize("ls", [-0.1, 0.5, 1.0])
def test_bad_label_smoothing(batch, ls):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        fused_dpo_loss(logits, labels, ref_logps=ref, label_smoothing=ls)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_label_smoothing_that_does_not_apply(batch, loss_type):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=f"label_smoothing=0.1 does not apply to loss_type='{loss_type}'"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=loss_type, label_smoothing=0.1)


def test_missing_reference(batch):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match="no reference: pass ref_logps or ref_logits, or reference_free=True"):
        fused_dpo_loss(logits, labels)


def test_conflicting_references(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="either ref_logps or ref_logits, not both"):
        fused_dpo_loss(logits, labels, ref_logps=ref, ref_logits=logits)
    with pytest.raises(ValueError, match="reference_free=True conflicts with ref_logps"):
        fused_dpo_loss(logits, labels, ref_logps=ref, reference_free=True)


@pytest.mark.parametrize("bad_ref", [torch.randn(3), torch.randn(4, 1), torch.randn(2)])
def test_ref_logps_wrong_shape(batch, bad_ref):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[2B\] = \(4,\)"):
        fused_dpo_loss(logits, labels, ref_logps=bad_ref)


def test_ref_logps_pair_wrong_shape(batch):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match=r"ref_logps\[1\] \(rejected\) must have shape \[B\] = \(2,\)"):
        fused_dpo_loss(logits, labels, ref_logps=(torch.randn(2), torch.randn(3)))
    with pytest.raises(TypeError, match="ref_logps as a pair"):
        fused_dpo_loss(logits, labels, ref_logps=(torch.randn(2),))


def test_ref_logps_integer(batch):
    logits, labels, _ = batch
    with pytest.raises(TypeError, match="ref_logps must be floating"):
        fused_dpo_loss(logits, labels, ref_logps=torch.zeros(4, dtype=torch.long))


def test_ref_logits_wrong_shape(batch):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match=r"ref_logits shape \(4, 5, 63\) must equal logits shape \(4, 5, 64\)"):
        fused_dpo_loss(logits, labels, ref_logits=logits[..., :63])


def test_unknown_backend(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_dpo_loss(logits, labels, ref_logps=ref, backend="cuda")


def test_inplace_on_overlapping_logits(batch):
    _, labels, ref = batch
    logits = torch.randn(1, 5, 64).expand(4, 5, 64).requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose elements do not overlap"):
        fused_dpo_loss(logits, labels, ref_logps=ref, inplace_backward=True)
    # Reading overlapping logits is fine out of place.
    out = fused_dpo_loss(logits, labels, ref_logps=ref)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# The zoo's options: each error names the option and the loss type(s).


@pytest.mark.parametrize("loss_type,match", [
    ([], r"loss_type must be a loss name or a non-empty list of loss names, got \[\]"),
    (3, r"loss_type must be a loss name or a non-empty list of loss names, got 3"),
    (["sigmoid", "dpo"], r"loss_type must be one of \[.*\], got 'dpo'"),
])
def test_bad_loss_type_lists(batch, loss_type, match):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=match):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=loss_type)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, float("nan")], ["a", 1.0]])
def test_bad_loss_weights(batch, weights):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"loss_weights must be"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=["sigmoid", "sft"], loss_weights=weights)


def test_loss_weights_count_names_the_loss_types(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=re.escape("one weight per loss type (2 for loss_type=['sigmoid', 'sft'])")):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_label_smoothing_must_apply_to_one_of_the_loss_types(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=re.escape("label_smoothing=0.1 does not apply to loss_type=['hinge', 'ipo']")):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=["hinge", "ipo"], label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["robust", "aot", "exo_pair"])
def test_label_smoothing_range_names_the_loss_type(batch, loss_type):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 0.5\) \(loss_type='{loss_type}'\), got 0.5"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=loss_type, label_smoothing=0.5)


def test_exo_pair_needs_label_smoothing(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"loss_type='exo_pair' needs label_smoothing > 0 .*got label_smoothing=0.0"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type="exo_pair")


def test_unknown_f_divergence(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"f_divergence_type must be one of \('reverse_kl', 'forward_kl'.*got 'kl'"):
        fused_dpo_loss(logits, labels, ref_logps=ref, f_divergence_type="kl")


@pytest.mark.parametrize("loss_type", ["nca_pair", "aot", ["sigmoid", "bco_pair"], "simpo"])
def test_f_divergence_only_for_trls_loss_types(batch, loss_type):
    logits, labels, ref = batch
    kw = {} if loss_type == "simpo" else {"ref_logps": ref}
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl' does not apply to loss_type \["):
        fused_dpo_loss(logits, labels, loss_type=loss_type, f_divergence_type="forward_kl", **kw)


def test_f_alpha_divergence_coef_only_with_alpha_divergence(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"f_alpha_divergence_coef=0.3 applies only with "
                                         r"f_divergence_type='alpha_divergence', got f_divergence_type='reverse_kl' "
                                         r"\(loss_type='sigmoid'\)"):
        fused_dpo_loss(logits, labels, ref_logps=ref, f_alpha_divergence_coef=0.3)
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be a finite number"):
        fused_dpo_loss(logits, labels, ref_logps=ref, f_divergence_type="alpha_divergence",
                       f_alpha_divergence_coef=float("inf"))


@pytest.mark.parametrize("option,value,users", [
    ("discopop_tau", 0.1, "discopop"), ("simpo_gamma", 0.3, "simpo"), ("cpo_alpha", 0.5, "cpo"),
])
def test_loss_specific_options_that_do_not_apply(batch, option, value, users):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=rf"{option}={value} does not apply to loss_type='ipo' \(it applies to \[.*'{users}'"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type="ipo", **{option: value})


@pytest.mark.parametrize("loss_type,option,value,match", [
    ("discopop", "discopop_tau", 0.0, r"discopop_tau must be a finite number > 0 for loss_type='discopop', got 0.0"),
    ("discopop", "discopop_tau", float("nan"), r"discopop_tau must be a finite number > 0"),
    ("simpo", "simpo_gamma", float("inf"), r"simpo_gamma must be a finite number for loss_type='simpo'"),
    ("cpo", "cpo_alpha", -0.1, r"cpo_alpha must be a finite number >= 0, got -0.1"),
    ("simpo", "cpo_alpha", float("nan"), r"cpo_alpha must be a finite number >= 0"),
])
def test_loss_specific_options_out_of_range(batch, loss_type, option, value, match):
    logits, labels, ref = batch
    kw = {} if loss_type in ("simpo", "cpo") else {"ref_logps": ref}
    with pytest.raises(ValueError, match=match):
        fused_dpo_loss(logits, labels, loss_type=loss_type, **{option: value}, **kw)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_ld_alpha(batch, alpha):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"ld_alpha must be a number in \[0, 1\] \(or None\)"):
        fused_dpo_loss(logits, labels, ref_logps=ref, ld_alpha=alpha)


def test_ld_alpha_combinations(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"ld_alpha does not combine with average_log_prob=True.*loss_type='sigmoid'"):
        fused_dpo_loss(logits, labels, ref_logps=ref, ld_alpha=0.5, average_log_prob=True)
    with pytest.raises(ValueError, match=r"ld_alpha=0.5 does not apply to loss_type='sft'"):
        fused_dpo_loss(logits, labels, loss_type="sft", ld_alpha=0.5)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", ["sigmoid", "aot"]])
def test_use_weighting_not_with_aot(batch, loss_type):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match=r"use_weighting=True does not apply to loss_type \['aot"):
        fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=loss_type, use_weighting=True)


def _flag_calls():
    """(function name, call(**option), its bool options) for every public function with on/off options."""
    from dpo_kernels import estimate_linear_memory, fused_kto_loss, token_logprobs

    logits, labels = make_batch(2, 5, 64, torch.float32)
    hidden, weight = torch.randn(4, 5, 8), torch.randn(64, 8)
    ref = torch.randn(4)
    dpo_flags = ["use_weighting", "token_metrics", "average_log_prob", "reference_free", "shift", "validate"]
    return [
        ("fused_dpo_loss", lambda **kw: fused_dpo_loss(logits, labels, ref_logps=ref, **kw),
         dpo_flags + ["inplace_backward"]),
        ("fused_linear_dpo_loss", lambda **kw: fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, **kw),
         dpo_flags),
        ("fused_kto_loss", lambda **kw: fused_kto_loss(logits, labels, [True, False, True, False], ref_logps=ref,
                                                       loss_type="apo_zero_unpaired", **kw),
         ["bco_update", "shift", "inplace_backward", "validate"]),
        ("token_logprobs", lambda **kw: token_logprobs(logits, labels, **kw), ["shift", "inplace_backward"]),
        ("estimate_linear_memory", lambda **kw: estimate_linear_memory(hidden, weight, labels, **kw),
         ["shift", "use_weighting", "token_metrics"]),
    ]


@pytest.mark.parametrize("function", [name for name, _, _ in _flag_calls()])
@pytest.mark.parametrize("value", [1, "no", None])
def test_flags_must_be_bools(function, value):
    """A truthy stand-in (validate="no", inplace_backward="yes", shift=1) silently meant True for
    validate, shift, inplace_backward and reference_free; every on/off option takes a bool only.
    A NumPy bool is Python's."""
    import numpy as np

    _, call, flags = next(c for c in _flag_calls() if c[0] == function)
    for option in flags:
        with pytest.raises(TypeError, match=rf"{option} must be a bool, got {re.escape(repr(value))}"):
            call(**{option: value})
    call(**{flags[-1]: np.bool_(False)})


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo", "sft", ["simpo", "sft"]])
def test_reference_free_losses_need_no_reference_and_use_one_only_for_rewards(batch, loss_type):
    logits, labels, ref = batch
    free = fused_dpo_loss(logits, labels, loss_type=loss_type, backend="reference")
    with_ref = fused_dpo_loss(logits, labels, ref_logps=ref, loss_type=loss_type, backend="reference")
    torch.testing.assert_close(free.loss, with_ref.loss)
    torch.testing.assert_close(free.chosen_rewards - with_ref.chosen_rewards, 0.1 * ref[:2])


def test_a_reference_loss_in_the_list_needs_a_reference(batch):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match="no reference: pass ref_logps or ref_logits, or reference_free=True"):
        fused_dpo_loss(logits, labels, loss_type=["simpo", "sigmoid"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("validate", [True, False])
def test_meta_tensors_propagate_shapes(backend, validate):
    """On meta tensors (shape propagation, e.g. building a model on the meta device) the loss and
    the gradient come out as meta tensors of the right shapes: validation has no values to check
    and is skipped instead of failing inside its host sync."""
    logits = torch.empty(4, 8, 50, device="meta", requires_grad=True)
    labels = torch.zeros(4, 8, dtype=torch.long, device="meta")
    out = fused_dpo_loss(logits, labels, ref_logps=torch.zeros(4, device="meta"), backend=backend, validate=validate)
    out.loss.backward()
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    assert out.chosen_logps.shape == (2,) and logits.grad.shape == logits.shape


def test_meta_tensors_on_the_hidden_path_raise_clearly():
    hidden = torch.empty(4, 8, 16, device="meta")
    weight = torch.empty(50, 16, device="meta")
    labels = torch.zeros(4, 8, dtype=torch.long, device="meta")
    with pytest.raises(NotImplementedError, match="does not run on meta tensors"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_logps=torch.zeros(4, device="meta"))
