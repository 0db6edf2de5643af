"""``argparse`` types for the command line (``python -m dpo_kernels demo|bench``): a bad value is
refused while the arguments are parsed, with argparse's usage line, before anything is built or
timed (a ``--print-every 0`` used to divide by zero after the first training step)."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _checked(kind: type, what: str, ok: Callable) -> Callable[[str], int | float]:
    """A parser of ``kind`` (int or float: finite) whose value must pass ``ok``; ``what`` is the
    message, completed with the text given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return parse


# Steps, batch, sizes, iterations.
positive_int = _checked(int, "must be an int >= 1", lambda v: v >= 1)
# Warm-up runs, the bench's seed.
non_negative_int = _checked(int, "must be an int >= 0", lambda v: v >= 0)
# The demo's seed: NumPy's generator (through TRL's set_seed) takes [0, 2**32).
seed = _checked(int, "must be an int in [0, 2**32)", lambda v: 0 <= v < 2 ** 32)
# Learning rate, beta.
positive_float = _checked(float, "must be a finite number > 0", lambda v: v > 0)
# The ignored prompt's share of each sequence.
fraction = _checked(float, "must be a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
