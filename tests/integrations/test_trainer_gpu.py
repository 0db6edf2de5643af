"""``benchmarks/trainer_gpu.py --smoke``: every code path of the GPU trainer comparison on the CPU."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from tiny_world import quiet_and_single_threaded  # noqa: E402,F401

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "trainer_gpu.py")


def _script():
    spec = importlib.util.spec_from_file_location("trainer_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_smoke_mode_measures_every_variant(tmp_path, reference):
    assert _script().main(["--smoke", "--out", str(tmp_path), "--reference", reference]) == 0
    report = json.loads((tmp_path / "trainer_gpu.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"trl", "ours-logits", "ours-fused"}
    assert not [r["error"] for r in rows.values() if "error" in r]
    for name in ("ours-logits", "ours-fused"):  # same weights and batch: the same first loss (fp32)
        assert abs(rows[name]["loss"] - rows["trl"]["loss"]) < 1e-5
        assert rows[name]["median_ms"] > 0
    assert abs(rows["trl"]["margin"]) > 1e-4  # the reference differs from the policy: the loss sees the log-probs
    md = (tmp_path / "trainer_gpu.md").read_text()
    assert "| ours-fused |" in md and "TRL's speed" in md


def test_a_failing_variant_becomes_a_row(tmp_path, monkeypatch):
    module = _script()

    def broken(variant, *args, **kwargs):
        raise RuntimeError(f"{variant} broke")

    monkeypatch.setattr(module, "run_variant", broken)
    assert module.main(["--smoke", "--out", str(tmp_path), "--variants", "trl,ours-fused"]) == 0
    rows = json.loads((tmp_path / "trainer_gpu.json").read_text())["rows"]
    assert [r["error"] for r in rows] == ["RuntimeError: trl broke", "RuntimeError: ours-fused broke"]
    assert "ours-fused broke" in (tmp_path / "trainer_gpu.md").read_text()
