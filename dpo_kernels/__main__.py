"""``python -m dpo_kernels <command>``.

Commands:
  demo    DPO-train a tiny causal LM with FusedDPOTrainer beside TRL's DPOTrainer on the shipped
          preference data: reward accuracy and margins, step time, peak memory, a PNG of the curves
          (see ``dpo_kernels/demo.py``; ``python -m dpo_kernels demo --help``).
  bench   check ``fused_dpo_loss`` against a float64 oracle on this machine's device, then time
          forward + backward of every available backend beside an eager PyTorch loss
          (see ``dpo_kernels/bench.py``; ``python -m dpo_kernels bench --help``).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m dpo_kernels",
        description="Fused DPO kernels: a training demo beside TRL (demo) and a correctness check and "
                    "timing table (bench).",
    )
    parser.add_argument("--version", action="version", version=f"dpo_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.required = True

    from . import bench, demo

    demo_parser = commands.add_parser(
        "demo",
        help="DPO-train a tiny model with FusedDPOTrainer beside TRL's DPOTrainer; curves, step time, memory",
        description=demo.__doc__.split("\n\n")[0].split(": ", 1)[-1].replace("``", ""),
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.main)

    bench_parser = commands.add_parser(
        "bench",
        help="correctness check against a float64 oracle, then a forward+backward timing table",
        description=(
            "Check fused_dpo_loss (loss, per-sequence log-probs, logits gradient) against a float64 "
            "oracle, then time forward+backward and measure the peak extra memory of every available "
            "backend beside an eager PyTorch loss. Exits 1 if a check fails."
        ),
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
