"""The CLI benchmark and the GPU report script, end to end on tiny CPU shapes (subprocesses, so
that tests/conftest.py's TRITON_INTERPRET setting does not leak into them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI leaves the interpreter out; keep it off here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if tmp_path is not None:
        env["OUT"] = str(tmp_path)
    return env


def test_cli_bench_tiny():
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_kernels", "bench", "--device", "cpu", "--batch", "1", "--seq", "16",
         "--vocab", "1000", "--iters", "2"],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    assert "PASS fused_dpo_loss[reference] vs float64 oracle" in out, out
    assert "FAIL" not in out, out
    assert "| variant | median ms | min ms | peak extra memory | speed-up vs eager |" in out, out
    assert "| eager" in out and "| fused_dpo_loss[reference] |" in out, out
    assert "| fused_dpo_loss[reference], inplace_backward |" in out, out


@pytest.mark.parametrize("argv, message", [
    (["--seq", "0"], "argument --seq: must be an int >= 1, got '0'"),
    (["--warmup", "-3"], "argument --warmup: must be an int >= 0, got '-3'"),
    (["--prompt-frac", "nan"], "argument --prompt-frac: must be a number in [0, 1), got 'nan'"),
    (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "meta"], "no kernel of ours runs on meta"),
    (["--backends", "nope"], "--backends takes comma-separated names among ['triton', 'reference', 'cpu'], got 'nope'"),
])
def test_cli_bench_rejects_bad_options(argv, message):
    """Refused before anything is checked or timed (no traceback, no eager timing first)."""
    proc = subprocess.run([sys.executable, "-m", "dpo_kernels", "bench", *argv],
                          capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "eager" not in proc.stdout


def test_bench_module_runs_as_a_script():
    """``python -m dpo_kernels.bench`` is the same command as ``python -m dpo_kernels bench``."""
    proc = subprocess.run([sys.executable, "-m", "dpo_kernels.bench", "--help"],
                          capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert proc.returncode == 0 and "--prompt-frac" in proc.stdout, proc.stderr


@pytest.mark.parametrize("script", ["hidden_path_sweep.py", "host_profile.py"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_scripts_refuse_without_cuda(script):
    """Without --smoke on a machine without CUDA they exit at once: the full shapes are an H200's
    (they used to start an hours-long CPU run that --budget-s could not stop)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--out", "/nonexistent/never"],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "9"], "gpu_report: --shapes indices run from 0 to 2"),
    (["--shapes", "x"], "argument --shapes: must be comma-separated shape indices such as 0,2, got 'x'"),
    (["--hidden-shapes", "7"], "gpu_report: --hidden-shapes indices run from 0 to"),
])
def test_gpu_report_checks_shape_indices_first(argv, message, tmp_path):
    """An index past the shapes exits with the choices before any section runs (a bad hidden index
    used to be recorded as a correctness failure after the logits section had run)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--smoke", *argv],
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path), cwd=REPO)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_oracle_comparison_flags_a_wrong_gradient():
    from dpo_kernels.bench import Shape, compare, make_batch, oracle_dpo, reference_logps

    shape = Shape(pairs=1, seq=8, vocab=64, dtype=torch.float32)
    logits, labels = make_batch(shape, "cpu")
    loss, seq, grad = oracle_dpo(logits, labels, reference_logps(2, "cpu"))
    assert compare("x", torch.float32, loss, seq, grad, loss, seq, grad).passed
    bad = grad.clone()
    bad[0, -1, 3] += 1e-2 * grad[0, -1].abs().max()
    result = compare("x", torch.float32, loss, seq, bad, loss, seq, grad)
    assert not result.passed and "gradient" in result.detail
    assert not compare("x", torch.float32, loss + 1e-2, seq, grad, loss, seq, grad).passed


def test_cpu_peak_memory_sees_the_gradient():
    from dpo_kernels.bench import peak_extra_bytes

    x = torch.randn(64, 1000, requires_grad=True)
    peak = peak_extra_bytes(lambda: torch.autograd.grad(torch.log_softmax(x, -1)[:, 0].sum(), x)[0], "cpu")
    if peak is None:
        pytest.skip("this torch's profiler does not expose allocation events")
    assert peak >= x.numel() * 4  # at least the gradient


def test_gpu_report_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--smoke", "--iters", "2"],
        capture_output=True, text=True, timeout=180, env=_env(tmp_path), cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = (tmp_path / "gpu_report.md").read_text()
    assert (tmp_path / "gpu_report.json").is_file()
    assert "## Correctness against float64" in report and "PASS" in report and "FAIL" not in report
    assert "| variant | median ms | min ms | x floor | extra peak memory | note |" in report
    for name in ("eager `log_softmax", "TRL's older per-row loop", "full fused_dpo_loss sigmoid step"):
        assert name in report
    assert "unavailable: trl_triton is a Triton GPU kernel" in report  # skipped cleanly, not crashed
    # the hidden-state path section (fused lm_head): eager and Liger time on the CPU, CCE is skipped
    assert "# Hidden-state path: fused lm_head + DPO sigmoid loss" in report
    assert "## Hidden-state path: correctness against float64" in report
    assert "## Hidden-state path: forward + backward" in report
    assert "| variant | median ms | min ms | x floor (3 mm) | x floor (4 mm) | extra peak memory | note |" in report
    assert "unavailable: cce is a Triton GPU kernel" in report
    import dpo_kernels

    if not hasattr(dpo_kernels, "fused_linear_dpo_loss"):
        assert "dpo_kernels has no fused_linear_dpo_loss" in report
        pytest.skip("fused_linear_dpo_loss does not exist yet: its hidden-path rows are not checked")
    hidden = report[report.index("# Hidden-state path"):]
    for mode in ("one_pass", "two_phase", "split"):
        assert f"| ours_{mode} |" in hidden and f"fused_linear_dpo_loss(mode='{mode}')" in hidden
    checks = hidden[:hidden.index("## Hidden-state path: forward + backward")]
    check_rows = [line for line in checks.splitlines() if "| ours_" in line]
    # The fused logits-gradient matmul and the token sweep's tuning are for Triton on a GPU: their
    # variants are skipped cleanly here.
    gpu_ids = ("ours_split_fused_mm", "ours_split_tuned", "ours_one_pass_tuned")
    gpu_only = [line for line in check_rows if any(f"| {v} |" in line for v in gpu_ids)]
    assert len(gpu_only) >= len(gpu_ids) and all(
        any(f"unavailable: {v} is a Triton GPU kernel" in line for v in gpu_ids) for line in gpu_only)
    check_rows = [line for line in check_rows if line not in gpu_only]
    assert check_rows and all(line.rstrip().endswith("| PASS |") for line in check_rows), check_rows
    assert "| variant | target | median ms | extra peak memory | vs TRL | verdict |" in hidden
    assert "| ours_split | low-memory mode |" in hidden


def test_gpu_report_sections(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--smoke", "--iters", "1",
         "--sections", "hidden", "--hidden-shapes", "0", "--no-check"],
        capture_output=True, text=True, timeout=180, env=_env(tmp_path), cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = (tmp_path / "gpu_report.md").read_text()
    assert "## Hidden-state path: forward + backward" in report
    assert "## Correctness against float64" not in report and "from the logits" not in report
    assert "LigerFusedLinearDPOLoss" in report and "eager `hidden @ weight.T`" in report
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--smoke", "--sections", "x"],
                         capture_output=True, text=True, timeout=60, env=_env(tmp_path), cwd=tmp_path)
    assert bad.returncode != 0 and "--sections" in bad.stderr


def _load_gpu_report(monkeypatch):
    """gpu_report.py as a module (it parses its command line on import: given ``--smoke``)."""
    import importlib.util

    monkeypatch.setattr(sys, "argv", ["gpu_report.py", "--smoke"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the checkout and benchmarks/
    spec = importlib.util.spec_from_file_location("gpu_report_under_test", REPO / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_report_issue5_target_verdicts(monkeypatch):
    """The report's verdict per (our variant, target): time, extra memory and, for the fast mode, the
    speed-up over TRL's fused lm head timed in the same run; a variant that did not run is not
    judged, and without a TRL time the speed-up target cannot be met."""
    report = _load_gpu_report(monkeypatch)
    records = [
        {"variant": "ours_one_pass", "status": "ok", "median_ms": 29.5, "peak_extra_bytes": 1.54e9},
        {"variant": "ours_split", "status": "ok", "median_ms": 37.0, "peak_extra_bytes": 1.25e9},
        {"variant": "ours_two_phase", "status": "out of memory: (synthetic)"},
        {"variant": "trl_chunked", "status": "ok", "median_ms": 43.0, "peak_extra_bytes": 3.6e9},
        {"variant": "eager", "status": "ok", "median_ms": 20.0, "peak_extra_bytes": 0.5e9},
    ]
    rows = {(r[0], r[1]): r for r in report.target_rows(records)}
    assert set(rows) == {(v, t) for v in ("ours_one_pass", "ours_split") for t in ("fast mode", "low-memory mode")}
    assert rows["ours_one_pass", "fast mode"][4:] == ["1.46x", "MET"]
    assert rows["ours_one_pass", "low-memory mode"][5] == "missed: memory 1.54 GB > 1.30 GB"
    assert rows["ours_split", "fast mode"][5] == "missed: time 37.0 > 30 ms; 1.16x TRL < 1.4x"
    assert rows["ours_split", "low-memory mode"][5] == "MET"
    alone = {(r[0], r[1]): r[5] for r in report.target_rows(records[:2])}
    assert alone["ours_one_pass", "fast mode"] == "missed: no TRL time in this run"
    assert alone["ours_split", "low-memory mode"] == "MET"


def test_token_kernel_sweep_smoke(tmp_path):
    """benchmarks/token_kernel_sweep.py on the CPU through Triton's interpreter: every
    configuration runs and agrees with the default (the backward bit for bit), the one-kernel
    forward-and-gradient agrees with the two kernels bit for bit, and the fused logits-gradient
    matmul's tiles stay within twice the unfused path's float64 error."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "token_kernel_sweep.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = (tmp_path / "token_kernel_sweep.md").read_text()
    assert report.count("| configuration | us | TB/s | % copy | vs the default |") == 3
    assert report.count("| way | us | TB/s | vs two kernels |") == 2
    assert report.count("bit for bit") == 4 + 2 * 3 and report.count("| agrees |") == 3 and "DIFFERS" not in report
    assert report.count("| way | us | TFLOP/s | error | verdict |") == 1
    assert report.count("x the unfused |") == 3 and "Not run" not in report
    # What beat the rules, for the whole-step timings after it (gpu_checks.sh): every entry
    # well-formed and consistent with its own timings.
    import json

    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["matmul"]["fused_us"] > 0 and tuned["matmul"]["slice"] == "tiny slice"
    assert "Fastest fused tile here" in report
    for k in tuned["kernels"]:
        assert k["kernel"] in ("forward", "backward") and k["us"] < 0.98 * k["default_us"]
        assert k["lane_stats"] in (True, False) and (k["kernel"] == "forward" or not k["lane_stats"])
    assert "lane statistics" in report  # the forward's other loop is timed too
    assert [f["vocab_size"] for f in tuned["forward_and_grad"]] == [3000, 700]
    for f in tuned["forward_and_grad"]:
        assert (f["us"] < f["two_kernels_us"]) == f["one_kernel"] or f["us"] == f["two_kernels_us"]


def _write_tuning(path, tile, fused_us, unfused_us):
    import dataclasses
    import json

    path.write_text(json.dumps({
        "matmul": {"config": dataclasses.asdict(tile), "slice": "a slice", "fused_us": fused_us,
                   "unfused_us": unfused_us, "label": "64x64x32"},
        "kernels": [{"kernel": "backward", "vocab_size": 8192, "block_v": 4096, "num_warps": 16, "lane_stats": False,
                     "us": 1.0, "default_us": 2.0},
                    {"kernel": "forward", "vocab_size": 128256, "block_v": 8192, "num_warps": 8, "lane_stats": True,
                     "us": 1.0, "default_us": 2.0}],
        "forward_and_grad": [{"vocab_size": 128256, "one_kernel": True, "block_v": 8192, "num_warps": 32,
                              "lane_stats": True, "us": 1.0, "two_kernels_us": 2.0},
                             {"vocab_size": 32000, "one_kernel": False, "block_v": None, "num_warps": None,
                              "us": 1.0, "two_kernels_us": 1.0}],
    }))


def test_the_sweeps_tuning_reaches_the_whole_step_variants(tmp_path, monkeypatch):
    """The token sweep's ``tuned.json`` (which gpu_checks.sh names in ``DPO_BENCH_TUNED``): the
    fused variants force its tile (16-bit inputs only), the tuned variants apply all of it (the
    fused matmul only where it beat the unfused path), and the rules are back after each; without
    the file the fused variants take the default tile and the tuned ones are unavailable."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's rules (config reads it on each call)
    import baselines_hidden
    from baselines import Unavailable
    from dpo_kernels.backends.triton import config

    rules = {"bf16": config.pick_matmul_config(torch.bfloat16), "fp32": config.pick_matmul_config(torch.float32),
             "backward": config.pick_config(8192, torch.bfloat16, kernel="backward"),
             "forward": config.pick_config(128256, torch.bfloat16),
             "fwd_grad": config.pick_config(128256, torch.bfloat16, kernel="forward_and_grad")}
    assert not config.fuse_logits_grad(torch.bfloat16) and not config.fuse_forward_and_grad(128256, torch.bfloat16)
    tile = config.MatmulConfig(64, 64, 32, 4, 4, 2, use_tma=True)
    path = tmp_path / "tuned.json"
    _write_tuning(path, tile, fused_us=1.5, unfused_us=2.5)
    monkeypatch.setenv(baselines_hidden.TUNED_ENV, str(path))
    assert baselines_hidden.swept_matmul_config() == tile
    assert baselines_hidden.swept_matmul_label().startswith("64x64x32: the token sweep's fastest at a slice")

    def restored():
        assert not config.fuse_logits_grad(torch.bfloat16) and not config.fuse_forward_and_grad(128256, torch.bfloat16)
        assert config.pick_matmul_config(torch.bfloat16) == rules["bf16"]
        assert config.pick_config(8192, torch.bfloat16, kernel="backward") == rules["backward"]
        assert config.pick_config(128256, torch.bfloat16, kernel="forward_and_grad") == rules["fwd_grad"]
        assert config.pick_config(128256, torch.bfloat16) == rules["forward"] and not rules["forward"].lane_stats
        assert config.fuse_forward_and_grad(32000, torch.bfloat16)  # the rule's (64 KB rows)

    with baselines_hidden.fused_logits_grad_matmul():
        assert config.fuse_logits_grad(torch.bfloat16)
        assert config.pick_matmul_config(torch.bfloat16) == tile == config.pick_matmul_config(torch.float16)
        assert config.pick_matmul_config(torch.float32) == rules["fp32"]
    restored()
    with baselines_hidden.tuned_rules() as tuning:
        assert "fused matmul on" in tuning.describe()
        assert config.fuse_logits_grad(torch.bfloat16) and config.pick_matmul_config(torch.bfloat16) == tile
        assert config.pick_config(8192, torch.bfloat16, kernel="backward") == config.LaunchConfig(4096, 16)
        assert config.fuse_forward_and_grad(128256, torch.bfloat16)
        assert config.pick_config(128256, torch.bfloat16, kernel="forward_and_grad") == config.LaunchConfig(8192, 32, True)
        assert config.pick_config(128256, torch.bfloat16) == config.LaunchConfig(8192, 8, True)
        assert "forward at V=128256: block 8192, 8 warps, lane statistics" in tuning.describe()
        assert not config.fuse_forward_and_grad(32000, torch.bfloat16)  # two kernels were as fast
    restored()
    baselines_hidden.HIDDEN_BY_ID["ours_split_tuned"].check("cuda")

    _write_tuning(path, tile, fused_us=3.0, unfused_us=2.5)  # the fused tile lost: not forced
    with baselines_hidden.tuned_rules() as tuning:
        assert "fused matmul off" in tuning.describe() and not config.fuse_logits_grad(torch.bfloat16)
    restored()

    path.write_text('{"matmul": {"config"')  # cut mid-write: ignored, as no file
    assert baselines_hidden.Tuning.load() is None
    monkeypatch.setenv(baselines_hidden.TUNED_ENV, str(tmp_path / "none.json"))
    assert baselines_hidden.swept_matmul_config() is None
    assert baselines_hidden.swept_matmul_label().startswith("the default")
    with pytest.raises(Unavailable, match="no token-sweep tuning"):
        with baselines_hidden.tuned_rules():
            pass
    with pytest.raises(Unavailable, match="token sweep's tuning"):
        baselines_hidden.HIDDEN_BY_ID["ours_one_pass_tuned"].check("cuda")
    restored()
