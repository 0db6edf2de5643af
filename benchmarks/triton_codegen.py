"""Compile the Triton kernels for a GPU that is not here, and report what the machine code does.

Sessions without a GPU can still check the properties that decide bandwidth on one: that the
logits are moved with 16-byte vector loads and stores, that nothing spills to local memory, and
how many registers a program needs (which bounds the programs, hence the bytes in flight, per SM).

The launch wrappers are called on ``meta`` tensors of a real shape (no memory, nothing runs); the
kernel launch is captured, every argument is specialized exactly as Triton's JIT would at that
launch (alignment, divisibility by 16, ints equal to 1), and the kernel is compiled for the target
(default sm_90, Hopper) with Triton's own ptxas. Prints a JSON report, or a table with --table.

    python benchmarks/triton_codegen.py [--arch 90] [--table]
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' import: real JITFunctions

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import importlib  # noqa: E402

from dpo_kernels.backends import EXTRAS, extras_mask  # noqa: E402

# By module path: the package re-exports functions under some of these names. The launchers are
# called directly: the public functions go through registered operators, which on meta tensors run
# their fake implementations and launch nothing.
loss_module = importlib.import_module("dpo_kernels.backends.triton.dpo_sigmoid_loss")
bwd_module = importlib.import_module("dpo_kernels.backends.triton.token_logprobs_bwd")
fwd_module = importlib.import_module("dpo_kernels.backends.triton.token_logprobs_fwd")
scale_module = importlib.import_module("dpo_kernels.backends.triton.scale")
matmul_module = importlib.import_module("dpo_kernels.backends.triton.logits_grad_matmul")
config_module = importlib.import_module("dpo_kernels.backends.triton.config")

# The device-side scale of fused_linear_dpo_loss's one_pass gradients: Llama-3-8B's lm_head
# weight gradient (V x H), and one past 2^31 elements (64-bit sizes).
SCALE_SIZES = [128256 * 4096, (1 << 31) + 8]

# The fused logits-gradient matmul of the backward's vocabulary slices: (tokens, slice rows, H) of
# split at 8 x 1024 (6144 valid tokens, 8192-row slices of Llama-3's head) and at Qwen's H.
MATMUL_SHAPES = [(6144, 8192, 4096), (6144, 7168, 3584)]

# The design's shapes: [2B, T, V] logits of Llama-3's and Qwen's vocabularies, and an odd one.
SHAPES = [(8, 1024, 128256), (4, 4096, 151936), (8, 512, 50257)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ALL_EXTRAS = frozenset(EXTRAS)


class _CapturedKernel:
    """Stands in for a @triton.jit kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, fn):
        self.fn = fn
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@contextlib.contextmanager
def capture(module, name):
    original = getattr(module, name)
    captured = _CapturedKernel(original)
    setattr(module, name, captured)
    try:
        yield captured
    finally:
        setattr(module, name, original)


def _specialize(backend, value):
    """(type, attribute key) of one runtime argument, exactly as the JIT computes it."""
    from triton._C.libtriton import native_specialize_impl

    return native_specialize_impl(type(backend), value, False, True, True)[:2]


def compile_launch(fn, args, kwargs, target):
    backend = triton.compiler.make_backend(target)
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if fn.params[index].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = _specialize(backend, value)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = kind
        if key:
            attrs[(index,)] = backend.parse_attr(key)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options)


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    path = "/tmp/dpo_kernels_codegen.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return {"registers": int(match.group(1)), "local_bytes": int(match.group(2))} if match else {}


def analyse(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    report = {
        "global_loads": len(re.findall(r"\bld\.global", ptx)),
        "global_loads_16B": len(re.findall(r"\bld\.global(?:\.[a-z0-9_:]+)*\.v4\.(?:b32|f32|u32)", ptx)),
        "global_stores": len(re.findall(r"\bst\.global", ptx)),
        "global_stores_16B": len(re.findall(r"\bst\.global(?:\.[a-z0-9_:]+)*\.v4\.(?:b32|f32|u32)", ptx)),
        "ex2_approx": ptx.count("ex2.approx"),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "tma_loads": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "local_in_ptx": len(re.findall(r"\bld\.local|\bst\.local", ptx)),
    }
    # The first loop's body (the forward's vocabulary loop): the cross-thread traffic each trip
    # waits on. A block-wide reduction is warp shuffles plus barriers; per-lane statistics none.
    start = ptx.find("Inner Loop Header")
    if start >= 0:
        body = ptx[start:ptx.find("bra", start)]
        report.update(loop_shuffles=body.count("shfl.sync"), loop_barriers=body.count("bar.sync"))
    if "cubin" in kernel.asm:
        report.update(_resource_usage(kernel.asm["cubin"]))
    return report


def report(arch: int = 90) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for (rows_b, T, V) in SHAPES:
        # The plain forward per dtype (with the logits sum, TRL's logits metric), then bf16 with the
        # entropy alone (16 KB steps: config's rule) and with every extra (the accuracy's smaller steps).
        for dtype, extras in ([(d, frozenset({"logits_sum"})) for d in DTYPES]
                              + [(torch.bfloat16, frozenset({"entropy"})), (torch.bfloat16, ALL_EXTRAS)]):
            plain = extras == frozenset({"logits_sum"})
            name = "forward" if plain else "forward+all extras" if extras == ALL_EXTRAS else "forward+entropy"
            logits = torch.empty(rows_b, T, V, dtype=dtype, device="meta")
            labels = torch.empty(rows_b, T, dtype=torch.long, device="meta")
            lse = torch.empty(rows_b, T, dtype=torch.float64, device="meta")
            launches = []
            # The forward's vocabulary loop both ways: block-wide reductions (the rule on a GPU)
            # and per-lane statistics (config.lane_stats), named "... lanes".
            for lanes in (False, True):
                suffix = " lanes" if lanes else ""
                config_module.set_lane_stats(lanes)
                try:
                    with capture(fwd_module, "_token_logprobs_fwd_kernel") as fwd:
                        fwd_module.launch_forward(logits, labels, -100, extras_mask(extras))
                    launches.append((name + suffix, fwd))
                    if plain:
                        # split's forward: the same kernel also writing the row's gradient of logp
                        with capture(fwd_module, "_token_logprobs_fwd_kernel") as fwd_grad:
                            fwd_module.launch_forward(logits, labels, -100, 0, write_grad=True)
                        launches.append(("forward+grad" + suffix, fwd_grad))
                finally:
                    config_module.set_lane_stats(None)
            if plain:  # the backward has no extras: once per dtype
                with capture(bwd_module, "_token_logprobs_bwd_kernel") as bwd:
                    bwd_module.launch_backward(logits, labels, lse, lse, -100, torch.empty_like(logits))
                launches.append(("backward", bwd))
            for name, captured in launches:
                grid, args, kwargs = captured.launches[0]
                kernel = compile_launch(captured.fn, args, kwargs, target)
                rows.append({
                    "kernel": name,
                    "shape": [rows_b, T, V], "dtype": str(dtype).replace("torch.", ""),
                    "grid": list(grid), "block_v": kwargs["BLOCK_V"], "num_warps": kwargs["num_warps"],
                    **analyse(kernel),
                })
    token_logp = torch.empty(16, 1024, dtype=torch.float32, device="meta")
    labels = torch.empty(16, 1024, dtype=torch.long, device="meta")
    with capture(loss_module, "_dpo_sigmoid_loss_kernel") as loss:
        loss_module.launch_dpo_sigmoid_loss(token_logp, labels, token_logp[:, 0], -100, 0.1, 0.0, False)
    grid, args, kwargs = loss.launches[0]
    kernel = compile_launch(loss.fn, args, kwargs, target)
    rows.append({"kernel": "dpo_sigmoid_loss", "shape": [16, 1024], "dtype": "float32", "grid": list(grid),
                 "block_v": kwargs["BLOCK_T"], "num_warps": kwargs["num_warps"], **analyse(kernel)})
    tma = matmul_module.TensorDescriptor is not None
    for (m, n, k) in MATMUL_SHAPES:
        # (dtype, softcap, bias, config): the bias (Qwen-style lm_heads) is a contiguous [N] slice
        ways = [(torch.bfloat16, None, False, None), (torch.bfloat16, 30.0, False, None),
                (torch.bfloat16, None, True, None), (torch.float16, None, False, None)]
        if tma:  # tutorial 09's options: descriptors (TMA) and a persistent grid
            ways.append((torch.bfloat16, None, False, config_module.MatmulConfig(128, 256, 64, 8, 8, 3, use_tma=True,
                                                                                 persistent=True)))
        for dtype, softcap, with_bias, cfg in ways:
            h = torch.empty(m, k, dtype=dtype, device="meta")
            w = torch.empty(n, k, dtype=dtype, device="meta")
            bias = torch.empty(n, dtype=dtype, device="meta") if with_bias else None
            vec = torch.empty(m, dtype=torch.float32, device="meta")
            lse = torch.empty(m, dtype=torch.float64, device="meta")
            config_module.set_matmul_config_override(cfg)
            try:
                with capture(matmul_module, "_logits_grad_matmul_kernel") as mm:
                    matmul_module.logits_grad_matmul(h, w, bias, vec.long(), lse, vec, -100, softcap, 1.0)
            finally:
                config_module.set_matmul_config_override(None)
            grid, args, kwargs = mm.launches[0]
            kernel = compile_launch(mm.fn, args, kwargs, target)
            name = ("logits_grad_matmul" + (" softcap" if softcap else "") + (" bias" if with_bias else "")
                    + (" tma persistent" if cfg else ""))
            rows.append({"kernel": name, "shape": [m, n, k],
                         "dtype": str(dtype).replace("torch.", ""), "grid": list(grid),
                         "block_v": f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']}",
                         "num_warps": kwargs["num_warps"], **analyse(kernel)})
    for n in SCALE_SIZES:
        for dtype in (torch.bfloat16, torch.float32):
            buf = torch.empty(n, dtype=dtype, device="meta")
            with capture(scale_module, "_scale_unless_one_kernel") as scale:
                scale_module.launch_scale_unless_one(buf, torch.empty(1, device="meta"))
            grid, args, kwargs = scale.launches[0]
            kernel = compile_launch(scale.fn, args, kwargs, target)
            rows.append({"kernel": "scale_unless_one", "shape": [n], "dtype": str(dtype).replace("torch.", ""),
                         "grid": list(grid), "block_v": kwargs["BLOCK"], "num_warps": kwargs["num_warps"],
                         **analyse(kernel)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--table", action="store_true", help="print a markdown table instead of JSON")
    args = parser.parse_args(argv)
    rows = report(args.arch)
    if not args.table:
        json.dump({"triton": triton.__version__, "arch": args.arch, "kernels": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"triton {triton.__version__}, sm_{args.arch}\n")
    print("| kernel | shape | dtype | block | warps | regs | local B | loads (16 B) | stores (16 B) | loop shuffles / barriers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['block_v']} | {r['num_warps']} "
              f"| {r.get('registers', '?')} | {r.get('local_bytes', '?')} | {r['global_loads']} ({r['global_loads_16B']}) "
              f"| {r['global_stores']} ({r['global_stores_16B']}) "
              f"| {r.get('loop_shuffles', '')}{' / ' if 'loop_barriers' in r else ''}{r.get('loop_barriers', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
