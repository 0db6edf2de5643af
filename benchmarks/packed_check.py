"""Packed (cu_seqlens) vs padded batches on the GPU: same results, and what the packing costs.

    python benchmarks/packed_check.py            # CUDA; prints one line per check
    python benchmarks/packed_check.py --smoke    # tiny shapes on the CPU (wall clock), to try it

Ragged lengths (a quarter of each sequence a prompt), B pairs; the padded batch holds the same
sequences padded to the longest. Both are timed forward+backward with CUDA events (median after
warm-up) on the logits path (bf16 logits) and on the hidden path (every mode). Not run on a GPU
yet.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss


def batch(lengths, width, vocab, dtype, device, scale=2.0):
    total = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    packed = (torch.randn(1, total, width, device=device) * scale).to(dtype)
    labels = torch.randint(0, vocab, (1, total), device=device)
    tmax = max(lengths)
    padded = torch.zeros(len(lengths), tmax, width, device=device, dtype=dtype)
    padded_labels = torch.full((len(lengths), tmax), -100, device=device)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        labels[0, a:a + (b - a) // 4] = -100
        padded[s, :b - a] = packed[0, a:b]
        padded_labels[s, :b - a] = labels[0, a:b]
    return cu, packed, labels, padded, padded_labels


def unpad(padded, lengths):
    return torch.cat([padded[s, :n] for s, n in enumerate(lengths)])


def timed(fn, reps=10):
    """Median milliseconds of ``fn`` after warm-up: CUDA events on the GPU, wall clock otherwise."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def logits_path(lengths, V, device):
    cu, packed, labels, padded, padded_labels = batch(lengths, V, V, torch.bfloat16, device)
    ref = torch.randn(len(lengths), device=device) - 100
    packed.requires_grad_(True)
    padded.requires_grad_(True)

    def step_packed():
        packed.grad = None
        out = fused_dpo_loss(packed, labels, cu_seqlens=cu, ref_logps=ref, shift=True, token_metrics=True)
        out.loss.backward()
        return out

    def step_padded():
        padded.grad = None
        out = fused_dpo_loss(padded, padded_labels, ref_logps=ref, shift=True, token_metrics=True)
        out.loss.backward()
        return out

    a, b = step_packed(), step_padded()
    loss_diff = (a.loss - b.loss).abs().item()
    metric_diff = max((a.metrics[k] - b.metrics[k]).abs().item() for k in a.metrics)
    grad_diff = (packed.grad[0].float() - unpad(padded.grad, lengths).float()).abs().max().item()
    t_packed, t_padded = timed(step_packed), timed(step_padded)
    print(f"logits path 2B={len(lengths)} total={sum(lengths)} Tmax={max(lengths)} V={V} bf16: "
          f"|loss diff| {loss_diff:.2e}, max |metric diff| {metric_diff:.2e}, max |grad diff| {grad_diff:.2e}; "
          f"fwd+bwd packed {t_packed:.2f} ms, padded {t_padded:.2f} ms")


def hidden_path(lengths, H, V, device, mode):
    cu, packed, labels, padded, padded_labels = batch(lengths, H, V, torch.bfloat16, device, scale=1.0)
    weight = (torch.randn(V, H, device=device) * H ** -0.5 * 2).to(torch.bfloat16).requires_grad_(True)
    ref = torch.randn(len(lengths), device=device) - 100
    packed.requires_grad_(True)
    padded.requires_grad_(True)

    def step(h, y, **kw):
        def run():
            h.grad = None
            weight.grad = None
            out = fused_linear_dpo_loss(h, weight, y, ref_logps=ref, shift=True, mode=mode, **kw)
            out.loss.backward()
            return out, weight.grad.clone()
        return run

    step_packed, step_padded = step(packed, labels, cu_seqlens=cu), step(padded, padded_labels)
    (a, gw_a), (b, gw_b) = step_packed(), step_padded()
    loss_diff = (a.loss - b.loss).abs().item()
    gh_diff = (packed.grad[0].float() - unpad(padded.grad, lengths).float()).abs().max().item()
    gw_diff = (gw_a.float() - gw_b.float()).abs().max().item()
    t_packed, t_padded = timed(step_packed, 5), timed(step_padded, 5)
    print(f"hidden path {mode} 2B={len(lengths)} total={sum(lengths)} H={H} V={V} bf16: |loss diff| {loss_diff:.2e}, "
          f"max |grad hidden diff| {gh_diff:.2e}, max |grad weight diff| {gw_diff:.2e}; "
          f"fwd+bwd packed {t_packed:.2f} ms, padded {t_padded:.2f} ms")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (wall clock), to try the script")
    smoke = parser.parse_args(argv).smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("packed_check.py needs CUDA (or --smoke for tiny shapes on the CPU)")
    torch.manual_seed(0)
    device = torch.device("cpu" if smoke else "cuda")
    low, high, V, H = (8, 33, 1000, 64) if smoke else (256, 1025, 128256, 4096)
    lengths = [int(n) for n in torch.randint(low, high, (8,))]
    logits_path(lengths, V, device)
    for mode in ("two_phase", "one_pass", "split"):
        hidden_path(lengths, H, V, device, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
