"""Drop-ins for training frameworks. Each module imports its framework, so import the one you use:

- :mod:`dpo_kernels.integrations.trl`: ``FusedDPOTrainer``, TRL's ``DPOTrainer`` with its loss on
  the fused kernels (logits path, or the hidden-state path with ``use_fused_lm_head=True``);
- :mod:`dpo_kernels.integrations.hf`: ``dpo_compute_loss_func``, a ``compute_loss_func`` for a
  plain ``transformers.Trainer``.

``from dpo_kernels.integrations import FusedDPOTrainer`` works too: the names are looked up
lazily, so importing this package imports neither TRL nor transformers.
"""
from __future__ import annotations

_LAZY = {
    "FusedDPOTrainer": "trl",
    "dpo_compute_loss_func": "hf",
    "DPOComputeLoss": "hf",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
