"""``argparse`` types for the command line (``python -m dpo_kernels demo|bench``): a bad value is
refused while the arguments are parsed, with argparse's usage line, before anything is built or
timed (a ``--print-every 0`` used to divide by zero after the first training step)."""
from __future__ import annotations

import argparse
import math


def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (steps, batch, sizes, iterations)."""
    value = _number(int, text, "must be an int >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (warm-up runs)."""
    value = _number(int, text, "must be an int >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed every generator the runs seed takes: NumPy's (through TRL's ``set_seed``) needs
    ``[0, 2**32)``."""
    value = _number(int, text, "must be an int in [0, 2**32)")
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (learning rate, beta)."""
    value = _number(float, text, "must be a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A float in ``[0, 1)`` (the ignored prompt's share of each sequence)."""
    value = _number(float, text, "must be a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value
