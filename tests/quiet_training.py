"""Tests that run trainers (TRL, transformers) on tiny models: one thread, no library chatter.

Tiny tensors gain nothing from intra-op threads, which only add synchronisation (and stall badly
when the machine is busy); transformers', datasets' and TRL's logs and progress bars only bury
the test output. :func:`quiet_single_threaded` sets all of that for a block and restores it.
Imported as a top-level module: pytest puts ``tests/`` on ``sys.path`` (``tests/conftest.py``)."""
from __future__ import annotations

import contextlib
import logging

import torch


@contextlib.contextmanager
def quiet_single_threaded():
    import datasets
    import transformers

    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    progress = datasets.is_progress_bar_enabled()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    trl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if progress:
            datasets.enable_progress_bar()
        trl_logger.setLevel(trl_level)
