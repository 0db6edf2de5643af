"""``backends/triton/_common.py``'s numeric helpers, run through small kernels: ``tanh`` (from
``exp``, for the interpreter) against ``torch.tanh``, and ``round_to``/``cast_rounded`` (exact
round-to-nearest-even, which the interpreter's own bf16 cast is not) against torch's casts."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dpo_kernels.backends.triton._common import cast_rounded, round_to, tanh  # noqa: E402
from dpo_kernels.backends.triton.config import interpreting  # noqa: E402


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, tanh(x), mask=offs < n)


@triton.jit
def _round_kernel(x_ptr, rounded_ptr, cast_ptr, n, BY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(rounded_ptr + offs, round_to(x, cast_ptr.dtype.element_ty, BY_BITS), mask=offs < n)
    tl.store(cast_ptr + offs, cast_rounded(x, cast_ptr.dtype.element_ty, BY_BITS), mask=offs < n)


def _edge_values():
    x = torch.cat([torch.randn(3000) * 3, torch.randn(500) * 1e-3, torch.randn(200) * 60,
                   torch.tensor([0.0, -0.0, 0.125, -0.125, 0.12499999, 1e-30, -1e-38, 1e-42, 20.0, -20.0,
                                 88.0, -100.0, 3.4e38, float("inf"), float("-inf")])])
    return x.float()


def test_tanh_is_within_a_few_ulps_of_torch():
    x = _edge_values()
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((out.double() - want).abs() <= 4 * ulp).all()
    assert torch.equal(torch.signbit(out[x == 0]), torch.signbit(x[x == 0]))  # -0 stays -0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("by_bits", [True, False])
def test_round_to_is_torchs_round_to_nearest_even(dtype, by_bits):
    if dtype == torch.bfloat16 and not by_bits and interpreting():
        pytest.skip("the interpreter's own fp32 -> bf16 cast truncates: the reason for BY_BITS")
    x = _edge_values()
    # Ties: values exactly halfway between two bf16 numbers, both parities.
    ties = (torch.arange(1, 200, dtype=torch.float32) * 2.0**-7 + 1) + 2.0**-8
    x = torch.cat([x, ties, -ties]).contiguous()
    rounded = torch.empty_like(x)
    cast = torch.empty(x.shape, dtype=dtype)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, rounded, cast, x.numel(), BY_BITS=by_bits, BLOCK=1024)
    want = x.to(dtype)
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.equal(cast.view(bits), want.view(bits))  # bit for bit: signed zeros, subnormals
    assert torch.equal(rounded, want.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_store_what_the_reference_rounds_to(dtype):
    """The backward kernel's and the forward-and-gradient kernel's half-precision stores round to
    nearest-even like torch (under the interpreter through ``cast_rounded``'s bits, whose own cast
    would truncate half the elements): against the reference backend, the same numbers but where
    the two ``exp`` implementations straddle a rounding boundary (at most 1 ulp, rarely)."""
    from dpo_kernels.backends import load_backend

    triton_backend, reference = load_backend("triton"), load_backend("reference")
    logits = (torch.randn(2, 9, 700) * 3).to(dtype)
    labels = torch.randint(0, 700, (2, 9))
    labels[0, 2] = -100
    _, lse, _ = reference.token_logprobs_forward(logits, labels, -100, frozenset())
    coef = torch.randn(2, 9)
    want = reference.token_logprobs_backward(logits, labels, lse, coef, -100)
    got = triton_backend.token_logprobs_backward(logits, labels, lse, coef, -100)
    one_kernel = logits.clone()
    triton_backend.token_logprobs_forward_and_grad_(one_kernel, labels, -100, frozenset())
    want_one = reference.token_logprobs_backward(logits, labels, lse, torch.ones_like(coef), -100)
    for a, b in ((got, want), (one_kernel, want_one)):
        differ = a != b
        assert differ.float().mean() < 0.01
        ulp = torch.finfo(dtype).eps * b.float().abs().clamp(min=torch.finfo(dtype).tiny)
        assert ((a.float() - b.float()).abs()[differ] <= ulp[differ] * 1.01).all()


def test_launch_device_is_nothing_off_cuda(monkeypatch):
    """Off CUDA (the interpreter's CPU tensors) the launch context touches no CUDA state."""
    from dpo_kernels.backends.triton._common import launch_device

    monkeypatch.setattr(torch.cuda, "device", lambda *_: pytest.fail("torch.cuda.device called for a CPU tensor"))
    with launch_device(torch.zeros(3)):
        pass


def test_every_kernel_launch_makes_its_tensors_device_current():
    """Triton launches on the current CUDA device, which need not be the tensors' (a model spread
    over GPUs with device_map): every ``kernel[grid](...)`` launch in the Triton backend runs
    inside ``with launch_device(...)``. Read from the source, so a new launch without it fails."""
    import ast
    import pathlib

    import dpo_kernels.backends.triton as package

    launches = 0
    for path in sorted(pathlib.Path(package.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "launch_device"
                    for item in node.items):
                guarded.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and getattr(node.func.value, "id", "").endswith("_kernel")):
                launches += 1
                assert id(node) in guarded, f"{path.name}:{node.lineno}: a kernel launch outside launch_device"
    assert launches == 5  # forward, backward, the sigmoid loss, the fused matmul, the scale
