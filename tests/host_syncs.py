"""Counting the host reads of tensor values (on a GPU each one is a synchronisation: the host
waits for the device to drain). Imported as a top-level module, like ``runs.py``."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must wait for: a scalar read (item, float, bool, int) and nonzero
# (its output size is data-dependent: CUDA copies the count to the host).
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.nonzero.default)


class _Reads(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.log.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads():
    """Yields a list that collects one entry per host read inside the block: the dispatched reads
    above, and ``Tensor.tolist`` (not dispatched: wrapped here for the block's duration)."""
    log: list[str] = []
    tolist = torch.Tensor.tolist
    own = "tolist" in vars(torch.Tensor)  # else inherited from the C base class: removed afterwards

    def counted_tolist(self, *args, **kwargs):
        log.append("Tensor.tolist")
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist
    try:
        with _Reads(log):
            yield log
    finally:
        if own:
            torch.Tensor.tolist = tolist
        else:
            del torch.Tensor.tolist
