"""``python -m dpo_kernels demo``: a very short run end to end (both trainers, the table, the PNG), and
the shipped data (every word known to the tokenizer, the file as its generator writes it)."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
pytest.importorskip("matplotlib")

from dpo_kernels import demo  # noqa: E402
from dpo_kernels.__main__ import main  # noqa: E402
from tiny_world import quiet_and_single_threaded  # noqa: E402,F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_runs_both_trainers_and_writes_the_plot(tmp_path, capsys):
    rc = main(["demo", "--steps", "5", "--batch", "4", "--vocab", "300", "--out", str(tmp_path),
               "--print-every", "2"])
    assert rc == 0
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    report = json.loads((tmp_path / "demo.json").read_text())
    ours, trl_run = report["runs"]
    assert ours["name"] == "dpo_kernels (fused lm head)" and trl_run["name"] == "TRL DPOTrainer"
    assert len(ours["loss"]) == len(trl_run["loss"]) == 5
    assert report["loss_agreement"]["first_10_steps"] < 1e-5  # same seed, data and weights: the same loss
    assert ours["median_step_ms"] > 0 and "eval_rewards/accuracies" in ours["eval"]
    out = capsys.readouterr().out
    assert "step time (median)" in out and "reward accuracy" in out and "demo.png" in out


def test_demo_logits_path_without_comparison(tmp_path):
    rc = main(["demo", "--steps", "3", "--batch", "2", "--vocab", "64", "--out", str(tmp_path), "--no-compare",
               "--logits"])
    assert rc == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["dpo_kernels (logits path)"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC


def test_shipped_data_is_what_its_generator_writes_and_fully_tokenized():
    path = os.path.join(os.path.dirname(demo.__file__), "data", "make_preferences.py")
    spec = importlib.util.spec_from_file_location("make_preferences", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    rows = demo.load_rows()
    assert rows == generator.rows()
    assert {r["split"] for r in rows} == {"train", "eval"}
    train_prompts = {r["prompt"] for r in rows if r["split"] == "train"}
    assert not train_prompts & {r["prompt"] for r in rows if r["split"] == "eval"}
    tokenizer = demo.build_tokenizer(rows)
    for row in rows[:50]:
        for key in ("prompt", "chosen", "rejected"):
            assert tokenizer.unk_token_id not in tokenizer(row[key])["input_ids"]
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="--vocab"):
        main(["demo", "--vocab", "5", "--no-compare", "--steps", "1"])


@pytest.mark.parametrize("argv, message", [
    (["--print-every", "0"], "argument --print-every: must be an int >= 1, got '0'"),
    (["--steps", "-1"], "argument --steps: must be an int >= 1"),
    (["--beta", "0"], "argument --beta: must be a finite number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["--seed", "-5"], r"argument --seed: must be an int in \[0, 2\*\*32\)"),
    (["--batch", "two"], "argument --batch: must be an int >= 1, got 'two'"),
])
def test_bad_values_are_refused_while_parsing(argv, message, capsys):
    """Refused by argparse (exit 2, its usage line), before a model is built: --print-every 0 used
    to divide by zero after the first training step, --seed -5 to fail inside NumPy."""
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--no-compare", *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_out_must_be_a_directory(tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        main(["demo", "--no-compare", "--steps", "1", "--out", str(taken)])
