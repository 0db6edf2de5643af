"""DDP and FSDP training steps with the fused loss (issue 7): 2 processes, gloo, CPU.

Each rank gets half of the preference pairs, laid out as TRL lays out every batch (its chosen rows,
then its rejected rows). ``fused_dpo_loss`` is local: the mean over the rank's pairs. With equal
pairs per rank, DDP's gradient average (and FSDP's reduce-scatter average) of those per-rank means
IS the gradient of the mean over all pairs, so both must equal one process on the whole batch.

Tolerance: relative 1e-5 of each gradient's largest element against one process on the whole batch
(the same kernels on the same rows; only the fp32 summation order of the lm_head gradient
differs: two half-batch sums averaged instead of one sum), and the float64 oracle's tolerance as
in test_compile.py. FSDP is FSDP2 (``torch.distributed.fsdp.fully_shard``), which runs on CPU
with gloo in torch 2.13; its gradients are sharded DTensors, gathered with ``full_tensor()``.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist

import oracle
from dpo_kernels import fused_dpo_loss
from dpo_kernels.backends import available_backends
from oracle import IGNORE
from spawned_ranks import free_port, run_ranks

WORLD = 2
PAIRS, T, V = 4, 8, 45  # V odd, not a power of two
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STRATEGIES = ("ddp", "fsdp")
SPAWN_TIMEOUT_S = 300
# The backends the `backend` fixture runs (tests/conftest.py has set TRITON_INTERPRET=1 on a CPU-only
# machine before this import); the ranks run every one of them in one spawn.
BACKENDS = available_backends(torch.device("cpu"))


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def _model():
    torch.manual_seed(7)  # the same initial weights in every process
    return TinyLM()


def _full_batch():
    """``2P`` rows: pairs' chosen rows ``0..P-1``, their rejected rows ``P..2P-1``."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 50, (2 * PAIRS, T), generator=gen)
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=gen)
    labels[:, :3] = IGNORE  # prompt
    labels[1, -2:] = IGNORE  # padding: ragged completion lengths, on both ranks
    labels[PAIRS + 3, -3:] = IGNORE
    ref = torch.randn(2 * PAIRS, generator=gen) * 3
    return ids, labels, ref


def _rank_rows(rank):
    """Rows of this rank's pairs in TRL's layout: its chosen rows, then its rejected rows."""
    per_rank = PAIRS // WORLD
    pairs = list(range(rank * per_rank, (rank + 1) * per_rank))
    return torch.tensor(pairs + [p + PAIRS for p in pairs])


def _loss(model, ids, labels, ref, backend, dtype, inplace):
    logits = model(ids).to(dtype)
    return fused_dpo_loss(logits, labels, ref_logps=ref, shift=True, backend=backend,
                          inplace_backward=inplace).loss


def _ddp_step(rank, batch, backend, dtype):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    loss = _loss(ddp, *batch, backend, dtype, inplace=False)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _fsdp_step(rank, batch, backend, dtype, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model.head, mesh=mesh)  # the lm_head is its own FSDP unit, as in real models
    fully_shard(model, mesh=mesh)
    loss = _loss(model, *batch, backend, dtype, inplace=True)
    loss.backward()
    return loss.detach(), [p.grad.full_tensor() for p in model.parameters()]


def _worker(rank, port, out_dir, backends):
    torch.set_num_threads(1)  # two processes on a small CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        ids, labels, ref = _full_batch()
        rows = _rank_rows(rank)
        batch = (ids[rows], labels[rows], ref[rows])
        results = {}
        for backend in backends:
            for dtype_name, dtype in DTYPES.items():
                results[("ddp", backend, dtype_name)] = _ddp_step(rank, batch, backend, dtype)
                results[("fsdp", backend, dtype_name)] = _fsdp_step(rank, batch, backend, dtype, mesh)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Spawn the two ranks once; every test reads their saved losses and gradients."""
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    run_ranks(_worker, (free_port(), out_dir, BACKENDS), WORLD, SPAWN_TIMEOUT_S)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _single_process(backend, dtype):
    model = _model()
    ids, labels, ref = _full_batch()
    loss = _loss(model, ids, labels, ref, backend, dtype, inplace=False)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _oracle_grads(dtype):
    """float64: the loss of the whole batch's (rounded) logits, and the parameter gradients through
    a float64 copy of the model."""
    model64 = copy.deepcopy(_model()).double()
    ids, labels, ref = _full_batch()
    z64 = model64(ids)
    want = oracle.dpo(z64.detach().to(dtype), labels, ref_logps=ref, shift=True)
    return want["loss"], torch.autograd.grad(z64, list(model64.parameters()), grad_outputs=want["grad"])


ORACLE_RTOL = {"fp32": 1e-4, "bf16": 2e-2}  # as test_compile.py: bf16 rounds the logits gradient


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_on_the_whole_batch(rank_results, backend, strategy, dtype_name):
    dtype = DTYPES[dtype_name]
    full_loss, full_grads = _single_process(backend, dtype)
    per_rank = [results[(strategy, backend, dtype_name)] for results in rank_results]

    # The loss is local: the mean over the rank's pairs; their mean is the whole batch's loss.
    rank_losses = torch.stack([loss for loss, _ in per_rank])
    assert not torch.equal(rank_losses[0], rank_losses[1])  # each rank saw its own pairs
    torch.testing.assert_close(rank_losses.mean(), full_loss, rtol=1e-6, atol=1e-7)

    want_loss, want_grads = _oracle_grads(dtype)
    oracle.assert_close_values(full_loss, want_loss, dtype, "loss")
    for rank, (_, grads) in enumerate(per_rank):
        for name, got, full, want in zip(("embed.weight", "head.weight", "head.bias"), grads, full_grads, want_grads):
            scale = full.abs().amax().item()
            assert scale > 0, name
            # The same averaged gradient on every rank, equal to one process on the whole batch.
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"rank {rank} {name}: {m}")
            rtol = ORACLE_RTOL[dtype_name]
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().amax().item(),
                                       msg=lambda m: f"rank {rank} {name} vs float64: {m}")
