"""Packed (padding-free) batches: ``cu_seqlens`` on both front doors.

A packed batch holds its 2B sequences back to back (the B chosen first, then the B rejected).
Every result must equal the same sequences padded into ``[2B, Tmax]`` (loss, outputs, metrics and
the gradients, compared token by token), and the float64 oracle on that padded batch. The padded
batch is built here by a plain loop over the sequences, independently of ``api.Packing``.
"""
import itertools
import math

import pytest
import torch

import oracle
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss
from oracle import IGNORE
from runs import run_linear, run_logits

F32, BF16 = torch.float32, torch.bfloat16
V = 37  # not a power of two
# B = 4 pairs: chosen lengths 6, 1, 0, 5, rejected 3, 7, 2, 4 (a length-1 and an empty sequence).
LENGTHS = (6, 1, 0, 5, 3, 7, 2, 4)


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


def packed_labels(lengths):
    """``[1, total]`` labels: a 2-token prompt at the start of each sequence that has a completion
    after it, and one ignored token inside a completion."""
    cu = offsets(lengths).tolist()
    labels = torch.randint(0, V, (1, cu[-1]))
    for start, end in zip(cu[:-1], cu[1:]):
        labels[0, start:start + min(2, end - start - 1)] = IGNORE
    longest = max(range(len(lengths)), key=lambda s: lengths[s])
    if lengths[longest] >= 5:
        labels[0, cu[longest] + 3] = IGNORE  # inside a completion
    return labels


def pad(packed, lengths, fill):
    """``[total, ...]`` -> ``[2B, Tmax, ...]`` by a loop; ``fill`` (a value, or a tensor of the
    padded shape to copy the tokens into) past each sequence's end."""
    cu = offsets(lengths).tolist()
    shape = (len(lengths), max(max(lengths), 1), *packed.shape[1:])
    out = fill.clone() if isinstance(fill, torch.Tensor) else torch.full(shape, fill, dtype=packed.dtype)
    for s, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        out[s, :end - start] = packed[start:end]
    return out


def unpad(padded, lengths):
    """``[2B, Tmax, ...]`` -> ``[total, ...]``: the tokens of each sequence, back to back."""
    return torch.cat([padded[s, :n] for s, n in enumerate(lengths)])


def random_like_padded(packed, lengths, scale=3.0):
    """The padded copy of ``packed`` with random (never zero) values in the padding slots: they
    are ignored tokens, so they must not matter."""
    shape = (len(lengths), max(max(lengths), 1), *packed.shape[1:])
    noise = (torch.randn(shape) * scale).to(packed.dtype)
    return pad(packed, lengths, noise)


def assert_same_output(packed, padded):
    """Two DPOOutputs of the same sequences: equal to fp32 accumulation-order differences."""
    for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        oracle.assert_close_values(getattr(packed, name), getattr(padded, name), F32, name)
    assert set(packed.metrics) == set(padded.metrics)
    for name, value in padded.metrics.items():
        oracle.assert_close_values(packed.metrics[name], value, F32, name)


# --------------------------------------------------------------------------------------------
# The logits path.


LOGITS_CASES = {
    "sigmoid": dict(loss_type="sigmoid", ref="logps"),
    # IPO normalizes by TRL's completion lengths (with shift: of the input labels).
    "ipo_ref_logits": dict(loss_type="ipo", beta=0.5, ref="logits"),
    "ld_alpha_wpo_metrics": dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True, token_metrics=True,
                                 ref="logps"),
    "sigmoid_norm_average": dict(loss_type="sigmoid_norm", average_log_prob=True, ref="logits"),
}


def logits_inputs(lengths, dtype, ref):
    total = sum(lengths)
    logits = (torch.randn(1, total, V) * 3).to(dtype)
    labels = packed_labels(lengths)
    ref_kwargs = {}
    if ref == "logps":
        ref_kwargs["ref_logps"] = torch.randn(len(lengths)) - 10
    else:
        ref_kwargs["ref_logits"] = (torch.randn(1, total, V) * 3).to(dtype)
    return logits, labels, ref_kwargs


def padded_ref(ref_kwargs, lengths):
    if "ref_logits" in ref_kwargs:
        return {"ref_logits": random_like_padded(ref_kwargs["ref_logits"][0], lengths)}
    return ref_kwargs


def check_logits_case(backend, lengths, dtype, shift, case, packed_logits=None):
    """Packed vs padded (ours) vs the float64 oracle on the padded batch."""
    options = dict(LOGITS_CASES[case])
    logits, labels, ref_kwargs = logits_inputs(lengths, dtype, options.pop("ref"))
    if packed_logits is not None:  # a non-contiguous view holding the same values
        packed_logits = packed_logits(logits)
        assert torch.equal(packed_logits.reshape(logits.shape), logits) and not packed_logits.is_contiguous()
        logits = packed_logits
    cu = offsets(lengths)
    packed_in = logits.detach().requires_grad_(True)
    out = fused_dpo_loss(packed_in, labels, cu_seqlens=cu, shift=shift, backend=backend, **ref_kwargs, **options)
    out.loss.backward()
    grad = packed_in.grad.reshape(-1, V)

    flat = logits.detach().reshape(-1, V)
    pad_logits = random_like_padded(flat, lengths).requires_grad_(True)
    pad_labels = pad(labels[0], lengths, IGNORE)
    pad_ref = padded_ref(ref_kwargs, lengths)
    ref_out = fused_dpo_loss(pad_logits, pad_labels, shift=shift, backend=backend, **pad_ref, **options)
    ref_out.loss.backward()

    assert_same_output(out, ref_out)
    assert grad.dtype == dtype
    oracle.assert_close_grad(grad, unpad(pad_logits.grad, lengths), dtype)

    rename = {"average_log_prob": "average"}
    want = oracle.dpo(pad_logits.detach(), pad_labels, shift=shift, **pad_ref,
                      **{rename.get(k, k): v for k, v in options.items()})
    oracle.assert_matches_oracle(out, want, pad(grad, lengths, 0.0), dtype)
    return out, grad


@pytest.mark.parametrize("case", list(LOGITS_CASES))
@pytest.mark.parametrize("shift", [False, True])
def test_logits_packed_equals_padded_fp32(backend, case, shift):
    check_logits_case(backend, LENGTHS, F32, shift, case)


@pytest.mark.parametrize("case", ["sigmoid", "ld_alpha_wpo_metrics"])
def test_logits_packed_equals_padded_bf16(backend, case):
    check_logits_case(backend, LENGTHS, BF16, True, case)


@pytest.mark.parametrize("layout", ["sliced_rows", "vocab_major"])
def test_non_contiguous_packed_logits(backend, layout):
    """The kernels take the packed rows through their strides: a row-sliced ``[1, total, V]``
    view, and a ``[total, V]`` view of vocabulary-major storage (column stride total)."""
    if layout == "sliced_rows":
        def view(logits):
            wide = torch.randn(1, logits.shape[1], V + 11).to(logits.dtype)
            wide[..., 5:5 + V] = logits
            return wide[..., 5:5 + V]
    else:
        def view(logits):
            return logits[0].t().contiguous().t()
    check_logits_case(backend, LENGTHS, F32, True, "sigmoid", packed_logits=view)


def test_inplace_backward_packed(backend):
    """inplace_backward writes the gradient into the packed logits themselves."""
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    cu = offsets(LENGTHS)
    copy = logits.clone().requires_grad_(True)
    fused_dpo_loss(copy, labels, cu_seqlens=cu, shift=True, backend=backend, **ref_kwargs).loss.backward()
    inplace = logits.clone().requires_grad_(True)
    fused_dpo_loss(inplace, labels, cu_seqlens=cu, shift=True, backend=backend, inplace_backward=True,
                   **ref_kwargs).loss.backward()
    assert torch.equal(inplace.grad, copy.grad)
    assert torch.equal(inplace.detach(), copy.grad)  # the packed buffer now holds the gradient


def test_shift_stays_within_each_sequence():
    """With shift=True the last token of a sequence scores nothing (zero gradient row) and is not
    scored on the next sequence's first label: moving that label changes nothing."""
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    cu = offsets(LENGTHS)
    results = []
    for first_label in (3, 30):
        moved = labels.clone()
        moved[0, cu[1:-1].long()] = first_label  # the first token of every later sequence
        z = logits.clone().requires_grad_(True)
        out = fused_dpo_loss(z, moved, cu_seqlens=cu, shift=True, backend="reference", **ref_kwargs)
        out.loss.backward()
        results.append((out.loss, z.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    last = (cu[1:] - 1)[torch.tensor(LENGTHS) > 0].long()
    assert torch.all(results[0][1][0, last] == 0)
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize("lengths", [(0, 4, 0, 3), (1, 1, 1, 1), (0, 0, 0, 0)], ids=["empty_pair_sides", "ones",
                                                                                         "all_empty"])
@pytest.mark.parametrize("shift", [False, True])
def test_empty_and_length_one_sequences(backend, lengths, shift):
    """An empty packed sequence is a padded row with every token ignored (log-prob 0), down to a
    batch with no tokens at all (``total = 0``)."""
    total = sum(lengths)
    logits = (torch.randn(1, total, V) * 3).requires_grad_(True)
    labels = torch.randint(0, V, (1, total))
    ref_logps = torch.randn(len(lengths)) - 5
    out = fused_dpo_loss(logits, labels, cu_seqlens=offsets(lengths, torch.int64), ref_logps=ref_logps,
                         shift=shift, backend=backend, token_metrics=True)
    out.loss.backward()
    pad_logits = random_like_padded(logits.detach()[0], lengths)
    want = oracle.dpo(pad_logits, pad(labels[0], lengths, IGNORE), ref_logps=ref_logps, shift=shift,
                      token_metrics=True)
    oracle.assert_matches_oracle(out, want, pad(logits.grad[0], lengths, 0.0))
    assert torch.isfinite(out.loss)


def test_unbatched_packed_form_and_int32_labels(backend):
    """``[total, V]`` logits and ``[total]`` int32 labels give what ``[1, total, V]`` gives."""
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logits")
    cu = offsets(LENGTHS, torch.int64)
    a = fused_dpo_loss(logits, labels, cu_seqlens=cu, shift=True, backend=backend, **ref_kwargs)
    b = fused_dpo_loss(logits[0], labels[0].int(), cu_seqlens=cu, shift=True, backend=backend,
                       ref_logits=ref_kwargs["ref_logits"][0])
    assert_same_output(a, b)


# --------------------------------------------------------------------------------------------
# The hidden-state path.


H = 12


def hidden_inputs(lengths, dtype, *, bias):
    total = sum(lengths)
    hidden = torch.randn(1, total, H).to(dtype)
    weight = (torch.randn(V, H) * (2.0 / math.sqrt(H))).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, packed_labels(lengths)




def assert_grad_close(actual, expected, dtype, what):
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    expected = expected.double()
    if dtype == F32:
        atol = 1e-5 * expected.abs().max().item() + 1e-12
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")
    else:  # bf16 rounding level, normwise
        rel = ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()
        assert rel < 2 ** -7, (what, rel)


HIDDEN_CASES = {
    "sigmoid_ref_hidden": dict(loss_type="sigmoid", ref="hidden"),
    "ipo": dict(loss_type="ipo", beta=0.5, ref="logps"),
    "ld_alpha_wpo_metrics": dict(loss_type="sigmoid", ld_alpha=0.3, use_weighting=True, token_metrics=True,
                                 ref="logps"),
}


def check_hidden_case(backend, dtype, shift, case, mode, lengths=LENGTHS):
    options = dict(HIDDEN_CASES[case])
    ref = options.pop("ref")
    hidden, weight, bias, labels = hidden_inputs(lengths, dtype, bias=True)
    ref_packed, ref_padded, ref_oracle = {}, {}, {}
    if ref == "hidden":
        ref_hidden = torch.randn(1, sum(lengths), H).to(dtype)
        ref_packed["ref_hidden"] = ref_hidden
        ref_padded["ref_hidden"] = ref_oracle["ref_hidden"] = random_like_padded(ref_hidden[0], lengths, 1.0)
    else:
        ref_packed["ref_logps"] = ref_padded["ref_logps"] = ref_oracle["ref_logps"] = torch.randn(len(lengths)) - 10
    common = dict(shift=shift, backend=backend, chunk_tokens=4, **options)
    out, (gh, gw, gb) = run_linear(hidden, weight, labels, bias, cu_seqlens=offsets(lengths), mode=mode,
                                 **ref_packed, **common)

    pad_hidden = random_like_padded(hidden[0], lengths, 1.0)
    pad_labels = pad(labels[0], lengths, IGNORE)
    pad_out, (pgh, pgw, pgb) = run_linear(pad_hidden, weight, labels=pad_labels, bias=bias, mode=mode,
                                        **ref_padded, **common)
    assert_same_output(out, pad_out)
    assert_grad_close(gh[0], unpad(pgh, lengths), dtype, "grad hidden vs padded")
    assert_grad_close(gw, pgw, dtype, "grad weight vs padded")
    assert_grad_close(gb, pgb, dtype, "grad bias vs padded")

    rename = {"average_log_prob": "average"}
    want = oracle.linear_dpo(pad_hidden, weight, pad_labels, bias, shift=shift, **ref_oracle,
                             **{rename.get(k, k): v for k, v in options.items()})
    vt = dict(rtol=2e-5, atol=2e-4) if dtype == F32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.loss.double(), want["loss"], **vt)
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(out, name).double(), want[name], **vt, msg=lambda m, n=name: f"{n}: {m}")
    assert set(out.metrics) == set(want["metrics"])
    for name, value in want["metrics"].items():
        if name == "rewards/accuracies" and dtype != F32:
            continue  # a near-tie may flip under bf16 logits
        torch.testing.assert_close(out.metrics[name].double(), value, **vt, msg=lambda m, n=name: f"{n}: {m}")
    assert_grad_close(pad(gh[0], lengths, 0.0), want["grad_hidden"], dtype, "grad hidden vs oracle")
    assert_grad_close(gw, want["grad_weight"], dtype, "grad weight vs oracle")
    assert_grad_close(gb, want["grad_bias"], dtype, "grad bias vs oracle")


@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
@pytest.mark.parametrize("case", list(HIDDEN_CASES))
def test_hidden_packed_equals_padded_fp32(backend, case, mode):
    check_hidden_case(backend, F32, True, case, mode)


@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
def test_hidden_packed_equals_padded_bf16_no_shift(backend, mode):
    check_hidden_case(backend, BF16, False, "sigmoid_ref_hidden", mode)


def test_hidden_auto_mode_and_empty_batch():
    """``mode='auto'`` on a packed batch, and a packed batch of empty sequences."""
    check_hidden_case("reference", F32, True, "ld_alpha_wpo_metrics", "auto")
    hidden, weight, bias, _ = hidden_inputs((0, 0), F32, bias=False)
    out, (gh, gw, _) = run_linear(hidden, weight, torch.zeros(0, dtype=torch.long), None,
                                cu_seqlens=offsets((0, 0)), ref_logps=torch.zeros(2))
    assert out.loss.item() == pytest.approx(math.log(2)) and gh.shape == (1, 0, H) and not gw.any()


# --------------------------------------------------------------------------------------------
# Errors: each names what is wrong.


def _bad_cu(kind):
    cu = offsets(LENGTHS)
    return {
        "float": (cu.float(), TypeError, "cu_seqlens must be int32 or int64"),
        "list": (cu.tolist(), TypeError, "cu_seqlens must be a torch.Tensor"),
        "2d": (cu.unsqueeze(0), ValueError, r"cu_seqlens must be 1-D"),
        "device": (cu.to("meta"), ValueError, "cu_seqlens is on meta"),
        "odd": (cu[:-1], ValueError, "7 sequences"),
        "one_offset": (cu[:1], ValueError, "0 sequences"),
        "first": (cu + 1, ValueError, r"cu_seqlens\[0\] must be 0"),
        "decreasing": (torch.tensor([0, 6, 4, 7, 12, 15, 22, 24, 28], dtype=torch.int32), ValueError,
                       r"non-decreasing: cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 6"),
        "last": (torch.cat([cu[:-1], cu[-1:] - 1]), ValueError, r"cu_seqlens\[-1\] = 27 must equal .* total = 28"),
    }[kind]


CU_ERRORS = ["float", "list", "2d", "device", "odd", "one_offset", "first", "decreasing", "last"]


@pytest.mark.parametrize("kind", CU_ERRORS)
def test_cu_seqlens_errors_logits_path(kind):
    cu, error, match = _bad_cu(kind)
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    with pytest.raises(error, match=match):
        fused_dpo_loss(logits, labels, cu_seqlens=cu, backend="reference", **ref_kwargs)


@pytest.mark.parametrize("kind", CU_ERRORS)
def test_cu_seqlens_errors_hidden_path(kind):
    cu, error, match = _bad_cu(kind)
    hidden, weight, _, labels = hidden_inputs(LENGTHS, F32, bias=False)
    with pytest.raises(error, match=match):
        fused_linear_dpo_loss(hidden, weight, labels, cu_seqlens=cu, ref_logps=torch.zeros(8), backend="reference")


def test_packed_shape_errors():
    logits, labels, _ = logits_inputs(LENGTHS, F32, "logps")
    cu, ref = offsets(LENGTHS), torch.zeros(8)
    call = dict(cu_seqlens=cu, ref_logps=ref, backend="reference")
    with pytest.raises(ValueError, match="labels shape .* does not match logits shape"):
        fused_dpo_loss(logits, labels[:, :-1], **call)
    with pytest.raises(ValueError, match="batch dim of 2"):
        fused_dpo_loss(logits.expand(2, -1, -1), labels.expand(2, -1), **call)
    with pytest.raises(ValueError, match=r"logits must be \[1, total, V\] or \[total, V\]"):
        fused_dpo_loss(logits[0, 0], labels[0, :1], **call)
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[2B\] = \(8,\)"):
        fused_dpo_loss(logits, labels, cu_seqlens=cu, ref_logps=torch.zeros(6), backend="reference")
    with pytest.raises(ValueError, match="ref_logits shape .* must equal logits shape"):
        fused_dpo_loss(logits, labels, cu_seqlens=cu, ref_logits=logits[:, :-1], backend="reference")
    bad = labels.clone()
    bad[0, 9] = V
    with pytest.raises(ValueError, match=r"labels\[0, 9\] .* is outside \[0, V=37\)"):
        fused_dpo_loss(logits, bad, **call)

    hidden, weight, _, labels = hidden_inputs(LENGTHS, F32, bias=False)
    with pytest.raises(ValueError, match="labels shape .* does not match hidden shape"):
        fused_linear_dpo_loss(hidden, weight, labels[:, 1:], **call)
    with pytest.raises(ValueError, match="batch dim of 2"):
        fused_linear_dpo_loss(hidden.expand(2, -1, -1), weight, labels.expand(2, -1), **call)
    with pytest.raises(ValueError, match=r"ref_hidden must be \[2B, T, H_ref\]"):
        fused_linear_dpo_loss(hidden, weight, labels, cu_seqlens=cu, ref_hidden=hidden[:, 1:], backend="reference")
    bad = labels.clone()
    bad[0, 9] = -3
    with pytest.raises(ValueError, match=r"labels\[0, 9\] .* is outside \[0, V=37\)"):
        fused_linear_dpo_loss(hidden, weight, bad, **call)


# --------------------------------------------------------------------------------------------
# max_seqlen: the padded width given, so the offsets need no host read.


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("extra", [0, 5])
def test_max_seqlen_gives_the_same_result(backend, validate, extra):
    """The longest length, or a wider one (more fully ignored padded columns): same loss, outputs,
    metrics and gradients as without it, checked or not."""
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logits")
    kwargs = dict(cu_seqlens=offsets(LENGTHS), shift=True, backend=backend, token_metrics=True,
                  ld_alpha=0.5, **ref_kwargs)
    want, want_grad = run_logits(logits, labels, **kwargs)
    got, grad = run_logits(logits, labels, max_seqlen=max(LENGTHS) + extra, validate=validate, **kwargs)
    assert_same_output(got, want)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["two_phase", "one_pass", "split"])
def test_max_seqlen_hidden_path(backend, mode):
    hidden, weight, b, labels = hidden_inputs(LENGTHS, F32, bias=True)
    kwargs = dict(cu_seqlens=offsets(LENGTHS), shift=True, backend=backend, mode=mode,
                  ref_logps=torch.randn(8) - 10)
    want = run_linear(hidden, weight, labels, b, **kwargs)
    got = run_linear(hidden, weight, labels, b, max_seqlen=max(LENGTHS) + 2, validate=False, **kwargs)
    assert_same_output(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_max_seqlen_below_the_longest_sequence_is_never_silent():
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    kwargs = dict(cu_seqlens=offsets(LENGTHS), backend="reference", **ref_kwargs)
    with pytest.raises(ValueError, match=r"max_seqlen = 6 is below the longest sequence: sequence 5 has "
                                         r"cu_seqlens\[6\] - cu_seqlens\[5\] = 7 tokens"):
        fused_dpo_loss(logits, labels, max_seqlen=6, **kwargs)
    # Unchecked: the bounds check of the index that moves the per-token results still refuses it.
    with pytest.raises(IndexError):
        fused_dpo_loss(logits, labels, max_seqlen=6, validate=False, **kwargs)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "7"])
def test_max_seqlen_type_errors(bad):
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    with pytest.raises(ValueError, match="max_seqlen must be an int >= 0"):
        fused_dpo_loss(logits, labels, cu_seqlens=offsets(LENGTHS), max_seqlen=bad, backend="reference",
                       **ref_kwargs)


def test_max_seqlen_without_cu_seqlens():
    logits, labels = torch.randn(2, 4, V), torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="max_seqlen describes a packed batch: pass it with cu_seqlens"):
        fused_dpo_loss(logits, labels, ref_logps=torch.zeros(2), max_seqlen=4)
    hidden, weight = torch.randn(2, 4, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="max_seqlen describes a packed batch"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_logps=torch.zeros(2), max_seqlen=4)


def test_packed_batch_compiles_without_a_graph_break_given_max_seqlen():
    """fullgraph=True refuses any graph break: with max_seqlen the packed path has no host read
    (without it, the read of the offsets breaks the graph); the compiled loss and gradient equal
    the eager ones."""
    logits, labels, ref_kwargs = logits_inputs(LENGTHS, F32, "logps")
    cu = offsets(LENGTHS)

    def loss_fn(x, max_seqlen):
        return fused_dpo_loss(x, labels, cu_seqlens=cu, max_seqlen=max_seqlen, shift=True, loss_type="ipo",
                              **ref_kwargs).loss

    x = logits.detach().clone().requires_grad_(True)
    compiled = torch.compile(lambda x: loss_fn(x, max(LENGTHS)), fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    want, want_grad = run_logits(logits, labels, cu_seqlens=cu, shift=True, loss_type="ipo", **ref_kwargs)
    torch.testing.assert_close(loss, want.loss)
    torch.testing.assert_close(x.grad, want_grad)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="data-dependent|graph break|Could not guard"):
        torch.compile(lambda x: loss_fn(x, None), fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


def test_packed_hidden_path_compiles_without_a_graph_break_given_max_seqlen():
    """The hidden-state path on a packed batch with max_seqlen: fullgraph=True traces it (its
    valid-token sync is inside the two_phase operators); the compiled loss and gradients equal the
    eager ones, reference hidden states included."""
    hidden, weight, bias, labels = hidden_inputs(LENGTHS, F32, bias=True)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    cu = offsets(LENGTHS)

    def loss_fn(h, w, b):
        return fused_linear_dpo_loss(h, w, labels, b, ref_hidden=ref_hidden, cu_seqlens=cu, max_seqlen=max(LENGTHS),
                                     shift=True, chunk_tokens=4, vocab_chunk=16).loss

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    want, want_grads = run_linear(hidden, weight, labels, bias, ref_hidden=ref_hidden, cu_seqlens=cu, shift=True,
                                  chunk_tokens=4, vocab_chunk=16)
    torch.testing.assert_close(loss, want.loss)
    for got, expected in zip((leaf.grad for leaf in leaves), want_grads):
        torch.testing.assert_close(got, expected)
    torch._dynamo.reset()
