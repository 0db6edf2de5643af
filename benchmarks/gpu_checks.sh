#!/usr/bin/env bash
# The hidden-path checks in ONE device call (a GPU's time is scarce: one start, one command):
#
#     bash benchmarks/gpu_checks.sh            # with the device tool: carry [".whl"]
#
# 1. installs the wheels the GPU image lacks (TRL, Liger, CCE and TRL's imports) from .whl/, if
#    present, into /tmp/site: nothing is downloaded (the GPU machine has no internet);
# 2. token_kernel_sweep.py first (its answers decide defaults): the backward's slice logits
#    gradient unfused (cuBLAS + backward kernel) against the fused Triton matmul, then the token
#    kernels' blocks and warps and split's forward-and-gradient at the hidden path's shapes;
#    It writes what beat the rules to tokens/tuned.json (the fastest fused tile at split's slice,
#    the token kernels' faster blocks, the faster forward-and-gradient); the scripts below force
#    that tile wherever they force the fused matmul, and time ours_split_tuned and
#    ours_one_pass_tuned with all of it (DPO_BENCH_TUNED);
# 3. hidden_path_sweep.py: the knobs (the fused matmul forced on, for split and two_phase,
#    included), the kernel profile and the phases of a step;
# 4. gpu_report.py --sections hidden: correctness against float64 and time / memory of ours
#    beside TRL's fused lm head, Liger, CCE and eager at the issue-5 shapes (runs D and E have
#    them all: its budget is what is left);
# 5. host_profile.py: the host's time before the first matmul, per mode (auto's memory check
#    included);
# 6. gpu_report.py --sections logits --no-timing --shapes 0: the logits path's correctness on the
#    GPU at 8 x 1024 x 128256, bf16 and fp32, and fp32 with every logit shifted by 1e5 (the fp64
#    lse's exactness on the hardware). Last: if the call runs out of time, it is what is lost.
#
# Writes under $OUT (default ./gpu_checks_out): tokens/, sweep/, report/, host/ and logits_check/. Budgets
# (seconds) can be changed with TOKENS_BUDGET_S, SWEEP_BUDGET_S and REPORT_BUDGET_S; each script
# stops starting rows (sections) past its budget: 140, 80 and 180 by default (the token sweep
# first: its tuned.json decides what the report's tuned rows apply; the knob sweep is the one to
# cut). Together with the wheels' install they fit a 540 s device call (estimated: none of the
# three has run on a GPU at this length yet). SMOKE=1 runs them all on the CPU at tiny shapes (to check this script; the
# numbers mean nothing).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-./gpu_checks_out}
SITE=/tmp/site
SMOKE_FLAG=()
if [ "${SMOKE:-0}" = "1" ]; then
    SMOKE_FLAG=(--smoke)
elif ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: no CUDA device (SMOKE=1 runs the scripts on the CPU at tiny shapes)" >&2
    exit 2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
# What the token sweep found faster than the rules (tokens/tuned.json, if it wrote one): the later
# scripts' fused variants take its tile, and their tuned variants all of it.
export DPO_BENCH_TUNED="$OUT_DIR/tokens/tuned.json"
python3 benchmarks/token_kernel_sweep.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --budget-s "${TOKENS_BUDGET_S:-140}" --out "$OUT_DIR/tokens"
tokens=$?
python3 benchmarks/hidden_path_sweep.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --pythonpath "$SITE" --budget-s "${SWEEP_BUDGET_S:-80}" --out "$OUT_DIR/sweep"
sweep=$?
python3 benchmarks/gpu_report.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --pythonpath "$SITE" --sections hidden --budget-s "${REPORT_BUDGET_S:-180}" \
    --out "$OUT_DIR/report"
report=$?
python3 benchmarks/host_profile.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --out "$OUT_DIR/host"
host=$?
python3 benchmarks/gpu_report.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --sections logits --no-timing --shapes 0 \
    --budget-s "${LOGITS_CHECK_BUDGET_S:-45}" --out "$OUT_DIR/logits_check"
logits=$?
echo "gpu_report: exit $report; hidden_path_sweep: exit $sweep; token_kernel_sweep: exit $tokens; host_profile: exit $host; logits check: exit $logits"
exit $(( report || sweep || tokens || host || logits ))
