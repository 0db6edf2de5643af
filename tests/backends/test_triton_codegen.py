"""Machine code of the Triton kernels, compiled for Hopper (sm_90) without a GPU.

Bandwidth on the GPU depends on properties visible in the compiled code: 16-byte vector loads
and stores of the logits, no spills to local memory. ``benchmarks/triton_codegen.py`` compiles
each kernel exactly as the JIT would specialize it at the design shapes; this test holds the line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_codegen.py"


@pytest.fixture(scope="module")
def codegen():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip("this triton build ships no CUDA assembler")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)["kernels"]


def _rows(codegen, kernel):
    rows = [r for r in codegen if r["kernel"] == kernel]
    assert any(r["shape"][-1] % 16 for r in rows), "an odd vocabulary (rows start unaligned) is covered"
    return rows


def test_every_kernel_compiles_without_spills(codegen):
    assert len(codegen) >= 13
    for row in codegen:
        assert row["local_in_ptx"] == 0, row
        if "local_bytes" in row:
            assert row["local_bytes"] == 0, row


def test_forward_reads_logits_with_16_byte_vectors(codegen):
    """Whatever V: the vocabulary loop is vector loads; only label, target and the row's unaligned
    head/tail (one masked element per thread) are scalar."""
    for row in _rows(codegen, "forward"):
        assert row["global_loads_16B"] >= 4 and row["global_loads"] - row["global_loads_16B"] <= 3, row


def test_backward_reads_and_writes_16_byte_vectors(codegen):
    for row in _rows(codegen, "backward"):
        assert row["global_loads_16B"] >= 4, row
        assert row["global_stores_16B"] >= 4 and row["global_stores"] - row["global_stores_16B"] <= 1, row


def test_forward_and_grad_reads_and_writes_16_byte_vectors(codegen):
    """split's forward kernel (``WRITE_GRAD``): two vector passes over the row, the second one
    storing; the scalar accesses are the label, the target and the unaligned head/tail."""
    for row in _rows(codegen, "forward+grad"):
        assert row["global_loads_16B"] >= 8 and row["global_loads"] - row["global_loads_16B"] <= 4, row
        assert row["global_stores_16B"] >= 4 and row["global_stores"] - row["global_stores_16B"] <= 3, row


def test_forward_lane_loop_has_no_cross_thread_traffic(codegen):
    """The forward's per-lane loop (``config.lane_stats``): each trip's reductions stay inside a
    thread (no warp shuffle, no barrier; the block loop has both, per statistic per block), with
    the same 16-byte loads and no more registers than the block loop, plus one allocation unit
    (with every extra, sm_90, 4 warps: 64 against the block loop's 71 with triton 3.6, 66 against
    69 with triton 3.9)."""
    for kind in ("forward", "forward+grad", "forward+entropy", "forward+all extras"):
        blocks = {(tuple(r["shape"]), r["dtype"]): r for r in codegen if r["kernel"] == kind}
        lanes = [r for r in codegen if r["kernel"] == kind + " lanes"]
        assert len(lanes) == len(blocks) > 0, kind
        for row in lanes:
            block_row = blocks[tuple(row["shape"]), row["dtype"]]
            assert row["loop_shuffles"] == 0 and row["loop_barriers"] == 0, row
            assert block_row["loop_barriers"] > 0, block_row
            assert row["global_loads_16B"] == block_row["global_loads_16B"], row
            if "registers" in row:
                assert row["registers"] <= block_row["registers"] + 8, (row, block_row)


def test_the_forward_rules_keep_the_programs_per_sm(codegen):
    """``config.pick_config``'s steps, as compiled (the block loop: the rule on a GPU): 16 KB steps
    of 8 warps in at most 64 registers (4 programs per SM), the entropy alone included; with the
    accuracy (every extra here), 4 KB steps of 4 warps in at most 80 (6 programs per SM)."""
    for kind, step_bytes, warps, most in (("forward", 16384, 8, 64), ("forward+entropy", 16384, 8, 64),
                                          ("forward+all extras", 4096, 4, 80)):
        rows = [r for r in codegen if r["kernel"] == kind]
        assert rows, kind
        for row in rows:
            elem = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[row["dtype"]]
            assert row["block_v"] * elem == step_bytes and row["num_warps"] == warps, row
            if "registers" in row:
                assert row["registers"] <= most, row


def test_exp_is_the_fast_hardware_exp(codegen):
    for row in _rows(codegen, "forward") + _rows(codegen, "backward") + _rows(codegen, "forward+grad"):
        assert row["ex2_approx"] > 0, row


def test_scale_moves_the_gradient_with_16_byte_vectors(codegen):
    """The device-side scale of one_pass's gradients: below 2^31 elements (every lm_head in use:
    Llama-3-8B's is 5.3e8) it loads and stores 16-byte vectors, the scale itself the only scalar
    load. Past 2^31 (a 64-bit size) it compiles and stays correct with scalar accesses."""
    rows = [r for r in codegen if r["kernel"] == "scale_unless_one"]
    assert {r["shape"][0] < 2**31 for r in rows} == {True, False}
    for row in rows:
        if row["shape"][0] < 2**31:
            assert row["global_loads_16B"] >= 1 and row["global_loads"] - row["global_loads_16B"] <= 1, row
            assert row["global_stores_16B"] >= 1 and row["global_stores"] == row["global_stores_16B"], row


def test_logits_grad_matmul_runs_on_tensor_cores_and_stores_vectors(codegen):
    """The backward's fused matmul (``logits_grad_matmul.py``) at split's slice shapes: Hopper's
    asynchronous tensor-core instruction (``wgmma``), no spill at the tutorial's 128 x 256 tile
    (the epilogue's softcap included: it needs ~255 registers, the most a thread has), and the
    gradient stored in 16-byte vectors. With host-side tensor descriptors (Triton >= 3.4) the
    persistent TMA variant the sweep times is compiled too. A bias (contiguous, as an lm_head's
    slice is: Triton specializes its unit stride) costs the epilogue one load per tile, nothing
    in the K loop."""
    rows = [r for r in codegen if r["kernel"].startswith("logits_grad_matmul")]
    assert {r["kernel"] for r in rows} >= {"logits_grad_matmul", "logits_grad_matmul softcap",
                                           "logits_grad_matmul bias"}
    plain = {(tuple(r["shape"]), r["dtype"]): r for r in rows if r["kernel"] == "logits_grad_matmul"}
    for row in rows:
        if row["kernel"] == "logits_grad_matmul bias":
            base = plain[tuple(row["shape"]), row["dtype"]]
            assert row["global_loads"] == base["global_loads"] + 1, (row, base)
            assert row["loop_shuffles"] == base["loop_shuffles"] and row["loop_barriers"] == base["loop_barriers"], row
        assert row["wgmma"] > 0, row
        # tutorial 09's variant reads its operands with Hopper's bulk tensor copies (TMA)
        assert (row["tma_loads"] > 0) == ("tma" in row["kernel"]), row
        assert row["global_stores_16B"] >= 1 and row["global_stores"] == row["global_stores_16B"], row
        assert row["ex2_approx"] > 0, row
