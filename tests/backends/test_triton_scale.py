"""``backends/triton/scale.py``: ``buf *= scale`` decided on the device, through Triton's interpreter
on the CPU. The product must equal ``buf.mul_(float(scale))`` bit for bit (formed in fp32, fp64
for fp64 buffers, rounded once), for every size around the block and the capped grid."""
import pytest
import torch

from dpo_kernels.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.fixture
def scale_mod():
    from dpo_kernels.backends.triton import scale

    return scale


def _want(buf, factor):
    """torch's own in-place scaling by a Python float, on every path: under Triton's interpreter,
    whose own fp32 -> bf16 cast truncates, the kernel rounds to nearest-even on the bits
    (``_common.cast_rounded``), as the GPU's conversion does."""
    return buf.clone().mul_(factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [1 / 3, -2.5, 0.0, 1.0, float("inf")])
def test_matches_torch_mul_by_the_host_value(scale_mod, dtype, factor):
    buf = (torch.randn(5, 300) * 7).to(dtype)
    scale = torch.tensor(factor, dtype=torch.float64 if dtype == torch.float64 else torch.float32)  # a loss's grad
    want = _want(buf, float(scale))
    got = scale_mod.scale_(buf, scale)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 5 * 1024 + 3])
def test_grid_stride_loop_covers_every_element(scale_mod, monkeypatch, n):
    """A grid capped below the number of blocks: each program walks several blocks (64-bit
    offsets), the last one partial; nothing past ``n`` is touched."""
    monkeypatch.setattr(scale_mod, "_MAX_PROGRAMS", 2)
    backing = torch.randn(n + 50).to(torch.bfloat16)
    buf, after = backing[:n], backing[n:].clone()
    want = _want(buf, 0.37)
    scale_mod.scale_(buf, torch.tensor(0.37))
    assert torch.equal(buf, want)
    assert torch.equal(backing[n:], after)


def test_fp64_scale_on_bf16_buffer_rounds_like_torch(scale_mod):
    """The scale enters the fp32 product as torch's scalar does (rounded to fp32), never bf16."""
    buf = torch.randn(2000).to(torch.bfloat16)
    factor = 0.1234567891234
    got = scale_mod.scale_(buf.clone(), torch.tensor(factor, dtype=torch.float64))
    assert torch.equal(got, _want(buf, factor))


def test_empty_buffer(scale_mod):
    buf = torch.empty(0, dtype=torch.bfloat16)
    assert scale_mod.scale_(buf, torch.tensor(2.0)).numel() == 0


@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.randn(4, 6)[:, ::2], torch.tensor(2.0)), "contiguous"),
    (lambda: (torch.randn(8), torch.tensor([2.0, 3.0])), "one element"),
    (lambda: (torch.randn(8).to(torch.int32), torch.tensor(2.0)), "not supported"),
])
def test_refuses_what_it_cannot_scale(scale_mod, bad, match):
    buf, scale = bad()
    with pytest.raises((ValueError, TypeError), match=match):
        scale_mod.scale_(buf, scale)


def test_opcheck(scale_mod):
    buf = torch.randn(3, 700).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.dpo_kernels.triton_scale_unless_one_, (buf, torch.tensor([0.5])))
