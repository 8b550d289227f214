#!/usr/bin/env bash
# The latency objective where it runs: compress a config-built model with a big model's layer widths (random
# weights, 2 layers) for `--objective latency` on the device, then time it against its dense model there.
# One command, at most 5.5 minutes (the sum of the steps' limits); needs this checkout, torch, transformers,
# typer, rich, safetensors, pyyaml.
#
#   bash bench/gpu_latency.sh --tar "$OUT/gpu_latency.tgz"       # on a machine with a CUDA GPU
#   bash bench/gpu_latency.sh --device cpu --widths tiny          # a dry run on the CPU
#
# Results: bench/results/gpu_latency/ (logs, the report, runtime_DEVICE.md / .yaml, summary.md).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DEVICE=cuda
WIDTHS=llama3-8b
BUDGET=0.3
TAR=
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --widths) WIDTHS="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --tar) TAR="$2"; shift 2 ;;
        *) echo "usage: bash bench/gpu_latency.sh [--device cuda|cpu] [--widths llama3-8b|smollm2-135m|tiny] [--budget B] [--tar FILE.tgz]" >&2; exit 2 ;;
    esac
done

RESULTS=bench/results/gpu_latency
[ "$DEVICE" = cpu ] && RESULTS="${TMPDIR:-/tmp}/lrc-gpu_latency-dry-run"  # a dry run leaves the GPU results alone
mkdir -p "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lrc-gpu-latency.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$RESULTS/summary.md"
START=$(date +%s)
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "- $name: STOPPED at its ${limit} s limit"
    else
        note "- $name: exit $rc in $(( $(date +%s) - t0 )) s"
    fi
    tail -n 2 "$RESULTS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    return "$rc"
}

: >"$SUMMARY"
note "# Latency objective on $DEVICE, $WIDTHS widths, 2 layers, budget $BUDGET, $(date -u +%Y-%m-%dT%H:%MZ)"
python - <<'PY' 2>&1 | tee -a "$SUMMARY"
import torch, transformers
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"- torch {torch.__version__}, transformers {transformers.__version__}, device: {device}")
PY

step build 60 python bench/gpu_check.py build "$WORK" --widths "$WIDTHS" --layers 2 --chars 200000
COMPRESS=(python -m lrc compress "$WORK/model" --calib "$WORK/calib.txt" --samples 32 --seq-len 512 --method loss-aware
          --objective latency --dtype bfloat16 --device "$DEVICE" -o "$WORK/latency" --quiet)
step compress 150 "${COMPRESS[@]}" --budget "$BUDGET"
if grep -q "cannot be met" "$RESULTS/compress.log"; then  # infeasible here: half the budget (table cached)
    BUDGET=$(python -c "print(round($BUDGET / 2, 3))")
    step compress_retry 60 "${COMPRESS[@]}" --budget "$BUDGET"
fi
if [ -f "$WORK/latency/lrc_report.yaml" ]; then
    cp "$WORK/latency/lrc_report.yaml" "$RESULTS/report_$DEVICE.yaml"
    grep -A6 "predicted_cost" "$RESULTS/report_$DEVICE.yaml" | sed 's/^/    /' | tee -a "$SUMMARY"
    step runtime 60 python bench/runtime.py --device "$DEVICE" --dtypes bfloat16 --rounds 1 --alternations 6 --seq-len 512 \
        --text "$WORK/calib.txt" --out "$RESULTS/runtime_$DEVICE" \
        --models dense="$WORK/model" "latency objective, $BUDGET=$WORK/latency"
    tail -n 3 "$RESULTS/runtime_$DEVICE.md" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
fi
note "total: $(( $(date +%s) - START )) s"
if [ -n "$TAR" ]; then
    tar czf "$TAR" -C "$RESULTS" . && echo "results packed into $TAR"
fi
