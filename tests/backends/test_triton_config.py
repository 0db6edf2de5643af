"""The Triton backend's launch rules (``backends/triton/config.py``), decided on the host."""
import pytest
import torch

pytest.importorskip("triton")

from dpo_kernels.backends.triton import config  # noqa: E402


@pytest.fixture
def on_gpu_rules(monkeypatch):
    """The rules a GPU process sees (this process may be interpreting)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield
    config.set_forward_and_grad_fusion(None)
    config.set_logits_grad_fusion(None)
    config.set_matmul_config_override(None)


def test_forward_and_grad_is_one_kernel_only_for_rows_that_can_stay_in_l2(on_gpu_rules):
    assert config.fuse_forward_and_grad(32000, torch.bfloat16)  # 64 000 B rows
    assert config.fuse_forward_and_grad(32768, torch.float16)  # 64 KB exactly
    assert not config.fuse_forward_and_grad(32769, torch.bfloat16)
    assert not config.fuse_forward_and_grad(32000, torch.float32)  # 128 000 B
    assert not config.fuse_forward_and_grad(128256, torch.bfloat16)  # Llama-3: 256 KB rows


def test_forward_and_grad_override_wins_and_none_restores_the_rule(on_gpu_rules):
    config.set_forward_and_grad_fusion(True)
    assert config.fuse_forward_and_grad(128256, torch.bfloat16)
    config.set_forward_and_grad_fusion(False)
    assert not config.fuse_forward_and_grad(1000, torch.bfloat16)
    config.set_forward_and_grad_fusion(None)
    assert not config.fuse_forward_and_grad(128256, torch.bfloat16)
    # Per row length: only there, and the override of every length wins over it.
    config.set_forward_and_grad_fusion(True, vocab_size=128256)
    assert config.fuse_forward_and_grad(128256, torch.bfloat16) and not config.fuse_forward_and_grad(152064, torch.bfloat16)
    config.set_forward_and_grad_fusion(False)
    assert not config.fuse_forward_and_grad(128256, torch.bfloat16)
    config.set_forward_and_grad_fusion(None)
    config.set_forward_and_grad_fusion(False, vocab_size=32000)
    assert not config.fuse_forward_and_grad(32000, torch.bfloat16)
    config.set_forward_and_grad_fusion(None, vocab_size=32000)
    config.set_forward_and_grad_fusion(None, vocab_size=128256)
    assert config.fuse_forward_and_grad(32000, torch.bfloat16) and not config.fuse_forward_and_grad(128256, torch.bfloat16)


def test_the_interpreter_runs_the_one_kernel_so_the_cpu_tests_cover_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.fuse_forward_and_grad(128256, torch.bfloat16)


def test_logits_grad_matmul_waits_for_a_gpu_timing(on_gpu_rules):
    """On a GPU the backward's slices keep the measured cuBLAS matmul and backward kernel until a
    run has timed the fused matmul; float64 never takes it."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert not config.fuse_logits_grad(dtype)
    config.set_logits_grad_fusion(True)
    assert config.fuse_logits_grad(torch.bfloat16) and not config.fuse_logits_grad(torch.float64)
    config.set_logits_grad_fusion(None)
    assert not config.fuse_logits_grad(torch.bfloat16)


def test_the_interpreter_runs_the_fused_matmul_so_the_cpu_tests_cover_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.fuse_logits_grad(torch.bfloat16) and config.fuse_logits_grad(torch.float32)
    assert not config.fuse_logits_grad(torch.float64)


def test_only_the_accuracy_takes_the_forwards_smaller_steps(on_gpu_rules):
    """The accuracy's argmax index keeps a second value per lane live (over 100 registers at 16 KB
    per step on sm_90): 4 KB steps with 4 warps. Every other extra, the entropy included (63
    registers, as the plain forward), keeps the 16 KB step (``test_triton_codegen`` holds both)."""
    for extras in (frozenset(), frozenset({"entropy"}), frozenset({"logits_sum", "entropy", "log_sum_p2"})):
        cfg = config.pick_config(128256, torch.bfloat16, extras)
        assert (cfg.block_v, cfg.num_warps) == (8192, 8), extras
    for extras in (frozenset({"accuracy"}), frozenset({"entropy", "accuracy"})):
        cfg = config.pick_config(128256, torch.bfloat16, extras)
        assert (cfg.block_v, cfg.num_warps) == (2048, 4), extras
    assert config.pick_config(128256, torch.float32, frozenset({"accuracy"})).block_v == 1024


def test_matmul_tiles(on_gpu_rules):
    """The tutorial's Hopper tile for 16-bit inputs, half as wide for fp32; an override must be
    powers of two with blocks of at least 16 (``tl.dot``'s smallest), and may be limited to some
    input dtypes."""
    cfg = config.pick_matmul_config(torch.bfloat16)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages) == (128, 256, 64, 8, 3)
    assert config.pick_matmul_config(torch.float32).block_n == 128
    forced = config.MatmulConfig(64, 128, 32, 4, 4, 4)
    config.set_matmul_config_override(forced)
    assert config.pick_matmul_config(torch.bfloat16) == forced
    for bad in (config.MatmulConfig(8, 128, 32, 4, 4, 4), config.MatmulConfig(64, 96, 32, 4, 4, 4),
                config.MatmulConfig(64, 128, 32, 3, 4, 4), config.MatmulConfig(64, 128, 32, 4, 6, 4),
                config.MatmulConfig(64, 128, 32, 4, 4, 0)):
        with pytest.raises(ValueError, match="MatmulConfig"):
            config.set_matmul_config_override(bad)
    assert config.pick_matmul_config(torch.bfloat16) == forced  # a refused override changes nothing
    config.set_matmul_config_override(forced, dtypes=(torch.bfloat16, torch.float16))
    assert config.pick_matmul_config(torch.float16) == forced
    assert config.pick_matmul_config(torch.float32).block_n == 128  # the rule's fp32 tile
    config.set_matmul_config_override(None)
    assert config.pick_matmul_config(torch.bfloat16) == cfg


def test_kernel_overrides_force_one_kernel_at_one_vocabulary_size(on_gpu_rules):
    """A kernel override (the benchmarks' tuned variants) applies to that kernel at that
    vocabulary size only; the override of every launch wins over it; bad values are refused."""
    rule = {k: config.pick_config(128256, torch.bfloat16, kernel=k) for k in config.KERNELS}
    try:
        config.set_kernel_override("backward", 128256, 4096, 16)
        assert config.pick_config(128256, torch.bfloat16, kernel="backward") == config.LaunchConfig(4096, 16)
        assert config.pick_config(128256, torch.bfloat16, kernel="forward") == rule["forward"]
        assert config.pick_config(8192, torch.bfloat16, kernel="backward") == config.pick_config(8192, torch.bfloat16)
        config.set_block_override(256, 2)
        assert config.pick_config(128256, torch.bfloat16, kernel="backward") == config.LaunchConfig(256, 2)
        config.set_block_override(None)
        for args, match in [(("sideways", 1000, 256), "kernel must be one of"), (("forward", 1000, 100), "block_v"),
                            (("forward", 1000, 256, 3), "num_warps")]:
            with pytest.raises(ValueError, match=match):
                config.set_kernel_override(*args)
        config.set_kernel_override("backward", 128256, None)
        assert config.pick_config(128256, torch.bfloat16, kernel="backward") == rule["backward"]
        config.set_kernel_override("forward_and_grad", 128256, 8192, 32)
        config.clear_kernel_overrides()
        assert {k: config.pick_config(128256, torch.bfloat16, kernel=k) for k in config.KERNELS} == rule
    finally:
        config.set_block_override(None)
        config.clear_kernel_overrides()


def test_each_launch_names_its_kernel(monkeypatch):
    """The forward, the one-kernel forward-and-gradient and the backward each ask for their own
    configuration (what a kernel override keys on), with the row length they run on."""
    from dpo_kernels.backends.triton import token_logprobs_bwd, token_logprobs_fwd

    asked = []

    def recording(vocab_size, dtype, extras=frozenset(), kernel="forward"):
        asked.append((kernel, vocab_size))
        return config.pick_config(vocab_size, dtype, extras, kernel)

    monkeypatch.setattr(token_logprobs_fwd, "pick_config", recording)
    monkeypatch.setattr(token_logprobs_bwd, "pick_config", recording)
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 300)
    labels = torch.tensor([[1, 299, -100]])
    _, lse, _ = token_logprobs_fwd.launch_forward(logits, labels, -100, 0)
    token_logprobs_bwd.launch_backward(logits, labels, lse, torch.ones_like(lse), -100, torch.empty_like(logits))
    token_logprobs_fwd.launch_forward(logits.clone(), labels, -100, 0, write_grad=True)
    assert asked == [("forward", 300), ("backward", 300), ("forward_and_grad", 300)]
