"""The Triton forward's two vocabulary loops, side by side: per-lane running statistics merged once
per row (``LANE_STATS``, ``token_logprobs_fwd._fold_block`` with ``AXIS = 1``) and block-wide reductions per block.

The contract tests run whichever loop the rule takes (the lanes under the interpreter); here both
run on the same inputs and each is held to the float64 oracle, and to the other: the special
values (infinities, NaN, ignored and out-of-range rows) and the accuracy bit for bit, the sums
within fp32 rounding (they are summed in another order). Blocks of 256 (several per row) and
rows that start anywhere modulo the 16-byte vector, so the head and tail peel and the scalar-load
lanes (unaligned views) all run.
"""
import pytest
import torch

pytest.importorskip("triton")

from dpo_kernels.backends import load_backend  # noqa: E402
from dpo_kernels.backends.triton import config  # noqa: E402
from dpo_kernels.backends.triton.token_logprobs_fwd import lane_width  # noqa: E402
from oracle import IGNORE, rows_holding_nan, token_extras, token_logprobs  # noqa: E402

ALL_EXTRAS = frozenset({"logits_sum", "entropy", "accuracy", "log_sum_p2"})
LOOPS = {"lanes": True, "blocks": False}


@pytest.fixture(autouse=True)
def _restore_rules():
    yield
    config.set_block_override(None)
    config.set_lane_stats(None)


def forward(logits, labels, extras=ALL_EXTRAS, *, lanes: bool, block: int = 256):
    config.set_block_override(block, 1, lane_stats=lanes)
    try:
        return load_backend("triton").token_logprobs_forward(logits, labels, IGNORE, extras)
    finally:
        config.set_block_override(None)


def oracle(logits, labels):
    logp, lse = token_logprobs(logits, labels)
    return logp, lse, token_extras(logits, labels)


def same_specials(a, b):
    """Equal where either is not finite (inf of the same sign, NaN at the same places)."""
    special = ~torch.isfinite(a) | ~torch.isfinite(b)
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.where(special & ~torch.isnan(a), a, 0), torch.where(special & ~torch.isnan(b), b, 0))


def agree(one, other, rtol=1e-6, atol=1e-5):
    """Two loops' results: specials identical, finite values within fp32 rounding of each other,
    the accuracy bit for bit."""
    (lp1, lse1, ex1), (lp2, lse2, ex2) = one, other
    for name, a, b in [("logp", lp1, lp2), ("lse", lse1, lse2), *[(k, ex1[k], ex2[k]) for k in ex1]]:
        assert same_specials(a, b), name
        finite = torch.isfinite(a)
        if name == "accuracy":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol * (50 if name == "logits_sum" else 1),
                                       msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("V", [7, 255, 700, 3001])
def test_both_loops_match_the_oracle_and_each_other(dtype, V):
    """Below, at and above one block; every extra; a third of the rows ignored; about half of the
    scored labels the argmax (so the accuracy is not trivially 0)."""
    torch.manual_seed(V)
    logits = (torch.randn(3, 5, V) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 5))
    labels[torch.rand(3, 5) < 0.3] = IGNORE
    labels = torch.where((torch.rand(3, 5) < 0.5) & (labels != IGNORE), logits.double().argmax(-1), labels)
    want_logp, want_lse, want = oracle(logits, labels)
    results = {}
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, lanes in LOOPS.items():
        logp, lse, extras = results[name] = forward(logits, labels, lanes=lanes)
        torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10, msg=f"{name}: logp")
        torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol * 10, msg=f"{name}: lse")
        for k in ALL_EXTRAS:
            torch.testing.assert_close(extras[k].double(), want[k], rtol=tol, atol=tol * (V if k == "logits_sum" else 10),
                                       msg=f"{name}: {k}")
    agree(results["lanes"], results["blocks"], rtol=1e-9 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [5, 301, 1030])
def test_rows_starting_anywhere_and_unaligned_views(dtype, V):
    """Row stride V + 3 puts row starts at every offset modulo the vector (the head and tail peel
    around the lanes); every other column of a wider buffer is a view with no vector at all (one
    element per load: lanes of 8 elements across threads). NaN gaps: a read outside a row would
    poison it."""
    torch.manual_seed(V + 1)
    buffer = torch.full((2, 6, V + 3), float("nan"), dtype=dtype)
    buffer[..., :V] = (torch.randn(2, 6, V) * 3).to(dtype)
    wide = torch.full((2, 6, 2 * V), float("nan"), dtype=dtype)
    wide[..., ::2] = buffer[..., :V]
    labels = torch.randint(0, V, (2, 6))
    labels[1, 2] = IGNORE
    for logits in (buffer[..., :V], wide[..., ::2]):
        want_logp, want_lse, want = oracle(logits, labels)
        results = {name: forward(logits, labels, lanes=lanes) for name, lanes in LOOPS.items()}
        for name, (logp, lse, extras) in results.items():
            torch.testing.assert_close(logp.double(), want_logp, rtol=2e-5, atol=2e-5, msg=name)
            torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5, msg=name)
            torch.testing.assert_close(extras["entropy"].double(), want["entropy"], rtol=2e-5, atol=2e-4, msg=name)
            assert torch.equal(extras["accuracy"].double(), want["accuracy"]), name
        agree(results["lanes"], results["blocks"])


def test_infinities_nan_masked_and_ignored_rows():
    """Per row: a +inf (lse and entropy +inf, logp -inf), a NaN (that row only), a masked tail
    (-inf entries are legitimate), a row of -inf (lse -inf), an ignored row of NaN (never read,
    zeros), an out-of-range label (NaN logp, nothing read out of the row). Both loops give the
    same values, each as torch would."""
    V = 700
    logits = torch.randn(1, 6, V)
    logits[0, 0, 650] = float("inf")
    logits[0, 1, 10] = float("nan")
    logits[0, 2, 40:] = float("-inf")
    logits[0, 3] = float("-inf")
    logits[0, 4] = float("nan")
    labels = torch.tensor([[3, 3, 3, 3, IGNORE, V + 5]])
    results = {name: forward(logits, labels, lanes=lanes) for name, lanes in LOOPS.items()}
    for name, (logp, lse, extras) in results.items():
        assert lse[0, 0] == float("inf") and logp[0, 0] == float("-inf"), name
        assert extras["entropy"][0, 0] == float("inf") and torch.isnan(extras["log_sum_p2"][0, 0]), name
        assert torch.isnan(logp[0, 1]) and torch.isnan(lse[0, 1]), name
        want = torch.logsumexp(logits[0, 2, :40].double(), 0)
        torch.testing.assert_close(lse[0, 2].double(), want, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.isfinite(extras["entropy"][0, 2]) and extras["logits_sum"][0, 2] == float("-inf"), name
        assert lse[0, 3] == float("-inf"), name
        assert all(v[0, 4] == 0 for v in (logp, lse, *extras.values())), name
        assert torch.isnan(logp[0, 5]) and torch.isfinite(lse[0, 5]), name
    agree(results["lanes"], results["blocks"])


def test_accuracy_ties_go_to_the_first_index_across_lanes_blocks_head_and_tail():
    """The max twice in a row: in two lanes of one block, in two blocks, in the head and the body,
    in the body and the tail (rows starting off the vector boundary). Only the first index counts,
    as torch.argmax; both loops."""
    V = 700
    buffer = torch.randn(1, 6, V + 3)
    logits = buffer[..., :V]  # rows start at offsets 0, 3, 6, ... of the 8-element vector (fp32: 4)
    pairs = [(9, 17), (5, 600), (0, 1), (650, 699), (1, 300), (2, 698)]
    for t, (i, j) in enumerate(pairs):
        logits[0, t, i] = logits[0, t, j] = 50.0
    for labels, want in ((torch.tensor([[i for i, _ in pairs]]), 1.0), (torch.tensor([[j for _, j in pairs]]), 0.0)):
        for name, lanes in LOOPS.items():
            _, _, extras = forward(logits, labels, frozenset({"accuracy"}), lanes=lanes)
            assert (extras["accuracy"] == want).all(), (name, labels, extras["accuracy"])


@pytest.mark.parametrize("spike", [3e38, 1e35])
def test_entropy_stays_finite_when_the_max_jumps_past_the_sums_range(spike):
    """The block loop's running sum reaches ~V before a huge last logit: ``delta * S`` overflows to
    -inf where ``exp(delta)`` is 0. Both loops report the one-hot's entropy (0), not NaN."""
    V = 3001
    logits = torch.randn(1, 3, V)
    logits[0, :, -1] = spike
    labels = torch.tensor([[V - 1, 0, IGNORE]])
    # The oracle on each row less its max (the entropy does not move): in float64 too, lse - sum p z
    # would cancel at 1e38 (its ulp there is ~1e22).
    want = token_extras(logits.double() - logits.double().amax(-1, keepdim=True), labels)["entropy"]
    for name, lanes in LOOPS.items():
        _, _, extras = forward(logits, labels, frozenset({"entropy"}), lanes=lanes)
        torch.testing.assert_close(extras["entropy"].double(), want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accuracy_of_rows_holding_nan_with_either_loop(dtype):
    """The first NaN wins, as torch.argmax: NaN in the head, the tail, two lanes, two blocks, beside
    +inf (``oracle.rows_holding_nan``); both loops, blocks of 256 (several per row)."""
    logits, labels = rows_holding_nan(dtype)
    want = token_extras(logits, labels)["accuracy"]
    for name, lanes in LOOPS.items():
        _, _, extras = forward(logits, labels, frozenset({"accuracy"}), lanes=lanes)
        assert torch.equal(extras["accuracy"].double(), want), (name, extras["accuracy"], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_and_grad_with_either_loop(dtype):
    """The forward that also writes each row's gradient (split's): the same lse and gradient with
    either loop, each against float64."""
    from dpo_kernels.backends import forward_and_grad_

    torch.manual_seed(7)
    V = 1030
    logits = (torch.randn(2, 4, V) * 3).to(dtype)
    labels = torch.randint(0, V, (2, 4))
    labels[0, 1] = IGNORE
    config.set_forward_and_grad_fusion(True)
    try:
        grads = {}
        for name, lanes in LOOPS.items():
            config.set_block_override(256, 1, lane_stats=lanes)
            buf = logits.clone()
            _, lse, _ = forward_and_grad_(load_backend("triton"), buf, labels, IGNORE, frozenset())
            grads[name] = buf
            z = logits.double().requires_grad_(True)
            logp, want_lse = token_logprobs(z, labels)
            logp.sum().backward()
            torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5, msg=name)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(buf.double(), z.grad, rtol=tol, atol=tol, msg=name)
    finally:
        config.set_forward_and_grad_fusion(None)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20  # an lse differing in its last bit moves a rounding
    assert (grads["lanes"].double() - grads["blocks"].double()).abs().max() <= ulp


def test_the_rule_and_its_overrides():
    """Under the interpreter the lanes run (so every contract test covers them); on a GPU the
    measured block loop until a run times the lanes; the backward has no loop; ``set_lane_stats``
    and an override's own ``lane_stats`` force it, the latter first."""
    assert config.pick_config(3000, torch.bfloat16).lane_stats
    assert not config.pick_config(3000, torch.bfloat16, kernel="backward").lane_stats
    config.set_lane_stats(False)
    assert not config.pick_config(3000, torch.bfloat16, kernel="forward_and_grad").lane_stats
    config.set_block_override(256, 1, lane_stats=True)
    assert config.pick_config(3000, torch.bfloat16).lane_stats
    config.set_block_override(256, 1)
    assert not config.pick_config(3000, torch.bfloat16).lane_stats  # None: the rule (forced False)
    config.set_block_override(None)
    config.set_lane_stats(None)
    import os

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert not config.pick_config(128256, torch.bfloat16).lane_stats
        config.set_kernel_override("forward", 128256, 8192, 8, lane_stats=True)
        assert config.pick_config(128256, torch.bfloat16).lane_stats
        assert not config.pick_config(128256, torch.bfloat16, kernel="forward_and_grad").lane_stats
    finally:
        config.clear_kernel_overrides()
        os.environ["TRITON_INTERPRET"] = old if old is not None else ""
    assert [lane_width(v) for v in (1, 2, 4, 8)] == [8, 2, 4, 8]
