"""Regenerate ``preferences.jsonl``, the demo's preference data (``python -m dpo_kernels demo``).

    python dpo_kernels/data/make_preferences.py > dpo_kernels/data/preferences.jsonl

Four small rule-based tasks on numbers, so that the preferences can be learned and reward
accuracy rises during training: the chosen completion is the right answer, the rejected one a
wrong answer close to it. Rows carry a ``split`` ("train" or "eval"); eval prompts never appear in
train.

- ``which is larger : A or B ?`` / ``which is smaller : A or B ?``   (A != B in 0..9) chosen the
  right one, rejected the other
- ``what comes after A ?``   (A in 0..17) chosen A+1, rejected A-1 or A+2
- ``what is A plus B ?``     (A, B in 0..4) chosen A+B, rejected A+B-1 or A+B+1
"""
from __future__ import annotations

import json
import random
import sys


def rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for a in range(10):
        for b in range(10):
            if a != b:
                out.append((f"which is larger : {a} or {b} ?", f" {max(a, b)} .", f" {min(a, b)} ."))
                out.append((f"which is smaller : {a} or {b} ?", f" {min(a, b)} .", f" {max(a, b)} ."))
    for a in range(18):
        for wrong in (a - 1, a + 2):
            if wrong >= 0:
                out.append((f"what comes after {a} ?", f" {a + 1} .", f" {wrong} ."))
    for a in range(5):
        for b in range(5):
            for wrong in (a + b - 1, a + b + 1):
                if wrong >= 0:
                    out.append((f"what is {a} plus {b} ?", f" {a + b} .", f" {wrong} ."))
    prompts = sorted({p for p, _, _ in out})
    eval_prompts = set(rng.sample(prompts, 24))
    rng.shuffle(out)
    return [{"prompt": p, "chosen": c, "rejected": r, "split": "eval" if p in eval_prompts else "train"}
            for p, c, r in out]


if __name__ == "__main__":
    for row in rows():
        sys.stdout.write(json.dumps(row) + "\n")
