"""torch.compile over the fused loss, and torch.library.opcheck over every operator (issue 7).

Every kernel launch is a registered operator with a fake implementation, and the per-token
log-probs are ONE autograd-carrying operator (``dpo_kernels::token_logprobs``) whatever the
backend, so ``torch.compile(fullgraph=True)`` traces a training step without a graph break.

Compiler backend: the backend x dtype matrix compiles with ``"aot_eager"`` — Dynamo (fullgraph) and
AOTAutograd (fake tensors, functionalization, the joint forward/backward graph, the partitioner)
exactly as Inductor gets them, without Inductor's C++ code generation, which costs 10-35 s per
graph on this 2-core CPU (cold cache). One test compiles with ``"inductor"`` (the C++ backend,
the one ``backend="auto"`` picks on CPU) to show the generated code runs the operators right.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import oracle
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss
# The hidden path's operators (torch.ops.dpo_kernels.linear_token_logprobs[_backward]) are
# registered by this module, which `import dpo_kernels` loads only on first use (it pulls in
# torch._dynamo, ~1 s): the opchecks below name them directly, so load it here.
import dpo_kernels.linear  # noqa: E402,F401
from dpo_kernels.backends import cpu_extension_available, load_backend, triton_available
from dpo_kernels.logprobs import token_logprobs
from oracle import IGNORE

V = 37  # vocabulary: odd, not a power of two
PAD = 3  # the lm_head has V + PAD outputs; the logits are the view [..., :V] (non-contiguous)
PAIRS, T = 2, 9


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, V + PAD)

    def forward(self, ids):
        # A vocabulary padded for the matmul, sliced back: logits rows with a stride of V + PAD.
        return self.head(torch.tanh(self.embed(ids)))[..., :V]


def _batch():
    ids = torch.randint(0, 50, (2 * PAIRS, T))
    labels = torch.randint(0, V, (2 * PAIRS, T))
    labels[:, :3] = IGNORE  # prompt
    labels[1, -2:] = IGNORE  # padding, ragged completion lengths
    return ids, labels, torch.randn(2 * PAIRS) * 3


def _step_fn(model, backend, dtype, **options):
    def step(ids, labels, ref):
        logits = model(ids).to(dtype)
        out = fused_dpo_loss(logits, labels, ref_logps=ref, shift=True, token_metrics=True, backend=backend,
                             **options)
        return out.loss, out.chosen_logps, out.metrics["entropy"]

    return step


def _run(step, model, ids, labels, ref):
    """Loss, outputs and the parameter gradients of one training step (forward, backward)."""
    model.zero_grad(set_to_none=True)
    loss, chosen_logps, entropy = step(ids, labels, ref)
    loss.backward()
    return loss.detach(), chosen_logps.detach(), entropy, [p.grad.clone() for p in model.parameters()]


def _oracle(model, ids, labels, ref, dtype):
    """float64: the loss of the step's (rounded) logits and the parameter gradients through a
    float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    z64 = model64(ids)
    want = oracle.dpo(z64.detach().to(dtype), labels, ref_logps=ref, shift=True, token_metrics=True)
    grads = torch.autograd.grad(z64, list(model64.parameters()), grad_outputs=want["grad"])
    return want, grads


# Parameter-gradient tolerance, relative to each gradient's largest element: fp32 accumulation,
# and for bf16 logits the logits gradient is rounded to bf16 (2^-8) before the lm_head backward.
PARAM_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _assert_params_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        scale = e.abs().amax().item()
        torch.testing.assert_close(a.double(), e, rtol=PARAM_RTOL[dtype], atol=PARAM_RTOL[dtype] * scale)


def _compile(fn, compiler):
    """fullgraph=True: any graph break raises. The counter counts the graphs compiled."""
    counter = CompileCounterWithBackend(compiler)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own closures over one code object: start from empty caches so that
    # recompilation limits and earlier guards never leak between tests.
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_training_step_matches_eager_and_oracle(backend, dtype):
    model = TinyLM()
    ids, labels, ref = _batch()
    step = _step_fn(model, backend, dtype)
    eager = _run(step, model, ids, labels, ref)
    compiled_step, counter = _compile(step, "aot_eager")
    compiled = _run(compiled_step, model, ids, labels, ref)
    assert counter.frame_count == 1 and not counters["graph_break"]
    want, want_grads = _oracle(model, ids, labels, ref, dtype)

    for got in (eager, compiled):
        loss, chosen_logps, entropy, grads = got
        oracle.assert_close_values(loss, want["loss"], dtype, "loss")
        oracle.assert_close_values(chosen_logps, want["chosen_logps"], dtype, "chosen_logps")
        oracle.assert_close_values(entropy, want["metrics"]["entropy"], dtype, "entropy")
        _assert_params_close(grads, want_grads, dtype)
    # Compiled and eager run the same kernels: equal up to the order of the fp32 glue arithmetic.
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
    for c, e in zip(compiled[3], eager[3]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6 * e.abs().amax().item())

    # Same shapes, new label values: the compiled step is reused, with no recompilation.
    ids2, labels2, ref2 = _batch()
    again = _run(compiled_step, model, ids2, labels2, ref2)
    want2, want_grads2 = _oracle(model, ids2, labels2, ref2, dtype)
    oracle.assert_close_values(again[0], want2["loss"], dtype, "loss")
    _assert_params_close(again[3], want_grads2, dtype)
    assert counter.frame_count == 1

    # validate=True (the default) costs no graph break when compiled: its host-synced checks are
    # skipped there, so a bad label gives a NaN loss (as validate=False does in eager) where the
    # eager call raises the documented error.
    labels2[2, 5] = V + 4  # out of range, not ignore_index
    with pytest.raises(ValueError, match=rf"labels\[2, 4\] \(as aligned with the logits rows\) = {V + 4}"):
        step(ids2, labels2, ref2)
    loss, *_ = compiled_step(ids2, labels2, ref2)
    assert torch.isnan(loss)
    assert counter.frame_count == 1 and not counters["graph_break"]


def test_inplace_backward_is_exact_when_compiled(backend):
    """Compiled, inplace_backward is ignored (the allocating backward is cheaper than the copy a
    functionalized in-place write costs): same gradients, and retain_graph works."""
    model = TinyLM()
    ids, labels, ref = _batch()
    step = _step_fn(model, backend, torch.bfloat16, inplace_backward=True)
    eager = _run(step, model, ids, labels, ref)
    compiled_step, counter = _compile(step, "aot_eager")
    model.zero_grad(set_to_none=True)
    loss, *_ = compiled_step(ids, labels, ref)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    assert counter.frame_count == 1 and not counters["graph_break"]
    for g, f, e in zip((p.grad for p in model.parameters()), first, eager[3]):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6 * e.abs().amax().item())
        assert torch.equal(g, f + f)  # the second backward read the logits, not their gradient


def test_compiled_token_logprobs_matches_oracle(backend):
    """The per-token op on its own, fp16 logits as a graph input (a non-contiguous view) requiring
    grad."""
    dtype = torch.float16
    base = (torch.randn(3, 6, V + 5) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 6))
    labels[0, :2] = IGNORE
    coef = torch.randn(3, 6)

    def per_token(logits, labels):
        out = token_logprobs(logits, labels, backend=backend, extras=("entropy", "logits_sum"))
        return (out.logp * coef).sum(), out.extras["logits_sum"]

    compiled, counter = _compile(per_token, "aot_eager")
    leaf = base.detach().clone().requires_grad_(True)
    logits = leaf[..., 2:V + 2]
    total, logits_sum = compiled(logits, labels)
    total.backward()
    assert counter.frame_count == 1 and not counters["graph_break"]
    z = base[..., 2:V + 2].double().requires_grad_(True)
    want_logp, _ = oracle.token_logprobs(z, labels)
    (want_logp * coef.double()).sum().backward()
    oracle.assert_close_values(total, (want_logp * coef.double()).sum(), dtype, "sum of logp")
    want_sum = torch.where(labels != IGNORE, z.detach().sum(-1), 0.0)
    torch.testing.assert_close(logits_sum.double(), want_sum, rtol=1e-5, atol=1e-4)
    oracle.assert_close_grad(leaf.grad[..., 2:V + 2], z.grad, dtype)
    assert not leaf.grad[..., :2].any() and not leaf.grad[..., V + 2:].any()


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_changing_float_options_and_shapes_stay_one_graph(dynamic):
    """A beta schedule, a second configuration, a new batch shape: Dynamo makes such floats (and
    shapes) symbolic, and the option checks compare them rather than call math.isfinite, and the
    in-place check (ignored when compiled) does not sort symbolic strides; each call is one graph
    (fullgraph=True) with the eager result. Both used to raise."""
    def step(logits, labels, ref, beta, gamma, softcap):
        out = fused_dpo_loss(logits, labels, ref_logps=ref, beta=beta, loss_type=["sigmoid", "sft"],
                             loss_weights=[1.0, gamma], backend="cpu" if cpu_extension_available() else "reference",
                             inplace_backward=True)
        return out.loss * softcap

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for seq, beta, gamma in ((6, 0.1, 0.5), (6, 0.2, 0.5), (6, 0.2, 0.7), (8, 0.35, 0.25)):
        logits, labels = oracle.make_batch(2, seq, V, torch.float32)
        ref = torch.randn(4) - 10
        got = compiled(logits, labels, ref, beta, gamma, 2.5)
        want = step(logits, labels, ref, beta, gamma, 2.5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not counters["graph_break"]


def test_inductor_compiled_step_matches_oracle():
    """The generated C++ code around the registered operators (backend="auto": the C++ backend
    when built, else the reference)."""
    model = TinyLM()
    ids, labels, ref = _batch()
    step = _step_fn(model, "auto", torch.float32)
    compiled_step, counter = _compile(step, "inductor")
    loss, chosen_logps, entropy, grads = _run(compiled_step, model, ids, labels, ref)
    assert counter.frame_count == 1 and not counters["graph_break"]
    want, want_grads = _oracle(model, ids, labels, ref, torch.float32)
    oracle.assert_close_values(loss, want["loss"], torch.float32, "loss")
    oracle.assert_close_values(chosen_logps, want["chosen_logps"], torch.float32, "chosen_logps")
    oracle.assert_close_values(entropy, want["metrics"]["entropy"], torch.float32, "entropy")
    _assert_params_close(grads, want_grads, torch.float32)


# --------------------------------------------------------------------------------------------
# torch.library.opcheck: schema (declared mutations, no aliasing), fake tensors vs real outputs,
# autograd registration, and AOTAutograd tracing with dynamic shapes, for every operator.

# (logits dtype, layout): fresh random logits, never zeros; "view" is a non-contiguous slice of a
# wider buffer (rows with stride V + 7, an offset start).
OP_CASES = [(torch.float32, "contiguous"), (torch.bfloat16, "view"), (torch.float16, "view")]


def _op_inputs(dtype, layout, requires_grad=False):
    if layout == "view":
        logits = (torch.randn(2, 5, V + 7) * 3).to(dtype)[..., 3:V + 3]
    else:
        logits = (torch.randn(2, 5, V) * 3).to(dtype)
    labels = torch.randint(0, V, (2, 5))
    labels[:, :2] = IGNORE
    labels[1, -1] = IGNORE
    lse = torch.logsumexp(logits.float(), -1)
    grad_logp = torch.randn(2, 5)
    if requires_grad:
        logits = logits.detach().requires_grad_(True) if layout == "contiguous" else logits.requires_grad_(True)
    return logits, labels, lse, grad_logp


def _case_id(case):
    return f"{str(case[0]).split('.')[-1]}-{case[1]}"


@pytest.mark.parametrize("case, inplace", [(OP_CASES[0], False), (OP_CASES[1], True), (OP_CASES[2], False)],
                         ids=lambda v: _case_id(v) if isinstance(v, tuple) else ("inplace" if v else "alloc"))
def test_opcheck_token_logprobs(backend, case, inplace):
    """The one autograd-carrying operator, on each backend, with its backward (in place or not)."""
    logits, labels, _, _ = _op_inputs(*case, requires_grad=True)
    mask = 0b1111 if case[0] == torch.float32 else 0b0101  # every extra / logits_sum + accuracy
    torch.library.opcheck(torch.ops.dpo_kernels.token_logprobs, (logits, labels, IGNORE, backend, mask, inplace))


def _kernel_ops():
    ops = []
    if cpu_extension_available():
        ops += [("cpu", "token_logprobs_fwd"), ("cpu", "token_logprobs_bwd"), ("cpu", "token_logprobs_bwd_")]
    if triton_available():
        ops += [("triton", "triton_token_logprobs_fwd"), ("triton", "triton_token_logprobs_bwd"),
                ("triton", "triton_token_logprobs_bwd_"), ("triton", "triton_token_logprobs_fwd_and_grad_")]
    return ops


@pytest.mark.parametrize("case", OP_CASES[:2], ids=_case_id)
@pytest.mark.parametrize("backend_op", _kernel_ops(), ids=lambda o: o[1])
def test_opcheck_kernel_ops(backend_op, case):
    backend_name, name = backend_op
    load_backend(backend_name)  # registers the operators
    op = getattr(torch.ops.dpo_kernels, name)
    logits, labels, lse, grad_logp = _op_inputs(*case)
    if name.endswith("_fwd") or name.endswith("_fwd_and_grad_"):
        args = (logits, labels, IGNORE, 0b1011)  # the in-place one writes through a view, as below
    else:
        # The in-place op writes through the view into its wider buffer.
        args = (logits, labels, lse, grad_logp, IGNORE)
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("average", [False, True])
def test_opcheck_triton_dpo_sigmoid_loss(average):
    load_backend("triton")
    token_logp = -torch.rand(4, 6) * 5 - 0.1
    labels = torch.randint(0, V, (4, 6))
    labels[:, :2] = IGNORE
    token_logp[:, :2] = 0.0  # the contract: ignored tokens carry a 0 log-prob
    args = (token_logp, labels, torch.randn(4) * 3, IGNORE, 0.1, 0.05, average)
    torch.library.opcheck(torch.ops.dpo_kernels.triton_dpo_sigmoid_loss, args)


# --------------------------------------------------------------------------------------------
# The hidden-state path (fused_linear_dpo_loss): two_phase is two registered operators (forward,
# backward) whose host sync stays inside them, so a compiled step traces it whole.

H = 16


def _linear_batch(dtype):
    hidden = (torch.randn(2 * PAIRS, T, H) * 2).to(dtype)
    weight = (torch.randn(V, H) * 0.5).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    labels = torch.randint(0, V, (2 * PAIRS, T))
    labels[:, :3] = IGNORE
    labels[1, -2:] = IGNORE
    return hidden, weight, bias, labels, ref_hidden


def _linear_step_fn(backend, **options):
    def step(hidden, weight, bias, labels, ref_hidden):
        out = fused_linear_dpo_loss(hidden, weight, labels, bias, ref_hidden=ref_hidden, shift=True,
                                    logit_softcap=4.0, token_metrics=True, backend=backend, **options)
        return out.loss, out.chosen_logps, out.metrics["entropy"]

    return step


def _run_linear(step, hidden, weight, bias, labels, ref_hidden):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, chosen_logps, entropy = step(*leaves, labels, ref_hidden)
    loss.backward()
    return loss.detach(), chosen_logps.detach(), entropy, [leaf.grad for leaf in leaves]


def _check_linear_against_oracle(got, batch, dtype):
    hidden, weight, bias, labels, ref_hidden = batch
    want = oracle.linear_dpo(hidden, weight, labels, bias, ref_hidden=ref_hidden, softcap=4.0, shift=True,
                             token_metrics=True)
    loss, chosen_logps, entropy, grads = got
    # The oracle's float64 logits are not rounded to the input dtype, ours are (the lm_head's own
    # output): bf16 values agree to bf16 rounding of the logits, as in test_linear.py.
    tol = dict(rtol=2e-5, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for value, name in ((loss, "loss"), (chosen_logps, "chosen_logps"), (entropy, "entropy")):
        expected = want["metrics"]["entropy"] if name == "entropy" else want[name]
        torch.testing.assert_close(value.double(), expected, **tol, msg=lambda m, n=name: f"{n}: {m}")
    _assert_params_close(grads, [want["grad_hidden"], want["grad_weight"], want["grad_bias"]], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["auto", "two_phase"])
def test_compiled_linear_step_matches_eager_and_oracle(backend, dtype, mode):
    """fullgraph=True over the hidden-state path with a reference model's hidden states, a bias,
    a softcap, several token chunks and vocabulary slices (the last one partial): one graph, the
    eager results, the float64 oracle's; new label values (another number of valid tokens) reuse
    the compiled step."""
    batch = _linear_batch(dtype)
    step = _linear_step_fn(backend, mode=mode, chunk_tokens=5, vocab_chunk=16)
    eager = _run_linear(step, *batch)
    compiled_step, counter = _compile(step, "aot_eager")
    compiled = _run_linear(compiled_step, *batch)
    assert counter.frame_count == 1 and not counters["graph_break"]
    for got in (eager, compiled):
        _check_linear_against_oracle(got, batch, dtype)
    # auto takes two_phase under torch.compile (split here in eager, pairs above the chunk): the
    # compiled step is eager two_phase's, to fp32 rounding.
    same = eager if mode == "two_phase" else _run_linear(
        _linear_step_fn(backend, mode="two_phase", chunk_tokens=5, vocab_chunk=16), *batch)
    torch.testing.assert_close(compiled[0], same[0], rtol=1e-6, atol=1e-7)
    for c, e in zip(compiled[3], same[3]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6 * e.abs().amax().item())

    hidden, weight, bias, labels, ref_hidden = batch
    labels2 = labels.clone()
    labels2[0, 3:6] = IGNORE  # fewer valid tokens: sized inside the operators, no recompilation
    again = _run_linear(compiled_step, hidden, weight, bias, labels2, ref_hidden)
    _check_linear_against_oracle(again, (hidden, weight, bias, labels2, ref_hidden), dtype)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", ["one_pass", "split"])
def test_compiled_linear_one_pass_runs_eagerly_inside(mode):
    """mode="one_pass" (and "split", its variant) sizes its chunks on the host: compiled without
    fullgraph it runs eagerly in its graph break, with the eager results; with fullgraph=True
    torch.compile refuses it."""
    batch = _linear_batch(torch.float32)
    step = _linear_step_fn("auto", mode=mode)
    eager = _run_linear(step, *batch)
    compiled = _run_linear(torch.compile(step, backend="aot_eager"), *batch)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
    for c, e in zip(compiled[3], eager[3]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6 * e.abs().amax().item())
    _check_linear_against_oracle(compiled, batch, torch.float32)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        _run_linear(torch.compile(step, backend="aot_eager", fullgraph=True), *batch)


@pytest.mark.parametrize("case", OP_CASES[:2], ids=_case_id)
@pytest.mark.parametrize("positions", [False, True], ids=["found-inside", "given"])
def test_opcheck_linear_token_logprobs(backend, case, positions):
    """The two-phase forward operator with its registered backward (bias, softcap, extras), and
    the backward operator on its own."""
    dtype, layout = case
    hidden, weight, bias, labels, _ = _linear_batch(dtype)
    if layout == "view":
        hidden = torch.cat([hidden, hidden], -1)[..., 3:3 + H]  # rows with a stride of 2H
    hidden, weight, bias = (t.detach().requires_grad_(True) for t in (hidden, weight, bias))
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True) if positions else (None, None)
    args = (hidden, weight, bias, labels, rows, cols, 1.5, 4.0, backend, IGNORE, 0b0101, 5, 16, 7)
    torch.library.opcheck(torch.ops.dpo_kernels.linear_token_logprobs, args)
    lse = torch.randn(labels.shape) + 5
    grad_logp = torch.randn(labels.shape)
    back = (grad_logp, hidden.detach(), weight.detach(), bias.detach(), labels, lse, rows, cols, 1.5, 4.0, backend,
            IGNORE, 16, 7, True, True, True)
    torch.library.opcheck(torch.ops.dpo_kernels.linear_token_logprobs_backward, back)
