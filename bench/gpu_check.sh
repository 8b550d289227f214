#!/usr/bin/env bash
# The GPU check: one command, at most 10.6 minutes on one GPU (the sum of the steps' limits; under 7 with --skip scale_llama3-8b,scale_llama3-70b,compress_cpu), needing only
# this checkout and torch, transformers, typer, rich, safetensors, pyyaml (and pytest for step 1; skipped,
# and said so, without it).
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --device cpu --quick   # a dry run of every step on the CPU (tiny sizes)
#   bash bench/gpu_check.sh --tar "$OUT/gpu_check.tgz"   # also pack the results into one file (a lent machine
#                                                        # returns few files from $OUT; unpack into bench/results/gpu_check)
#   bash bench/gpu_check.sh --part latency --tar "$OUT/gpu_latency.tgz"   # the second command (below)
#   bash bench/gpu_check.sh --skip scale_llama3-70b,compress_cpu   # leave steps out (names as in the summary)
#
# Steps, each under its own time limit (a step that runs out is recorded as such, the others still run):
#   1. pytest -m gpu: CUDA statistics and decompositions against the float64 CPU path (tests/test_gpu.py)
#   2. the default compression (sparse-dictionary + knapsack) of a config-built model with SmolLM2-135M's
#      widths, 6 layers (random weights, byte tokenizer, generated text), 64 x 512 windows, on cuda, then
#      the same on cpu; compared by
#      bench/gpu_check.py compare (times per phase, held-out perplexities, tensors)
#   3. bench/scale.py on cuda: one Llama-3-8B and one Llama-3-70B layer, projected to the whole models
#   4. bench/runtime.py on cuda, bfloat16: the dense model of step 2, its default-recipe output and a
#      loss-aware (pure low rank) output: bytes, peak device memory, prefill and decode tokens/s
#   5. bench/layer_speed.py on cuda: one Llama-3-8B decoder layer's projections, dense / low rank / sparse
#      dictionary at equal bytes, 1 and 512 tokens
#   6. bench/gpu_kernel_sweep.py: the bitmask kernel's tile sizes, and what a sparse layer's call costs the CPU
#
# `--part latency`, a second command (at most 10 minutes; results in bench/results/gpu_latency/): compress a
# config-built model with Llama-3-8B's layer widths (random weights, 4 layers, loss-aware) for
# `--objective latency --budget 0.3` on the device (0.05 below the most it can meet if 0.3 cannot be met there), then time
# it against its dense model with bench/runtime.py (`--widths smollm2-135m` for a CPU dry run's sizes).
# Results: bench/results/gpu_check/ (logs, summary.md, compare.md, the scale tables scale_SHAPE_cuda.md/.yaml,
# runtime_cuda.md/.yaml, layer_speed_cuda_llama3-8b.md).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DEVICE=cuda
QUICK=0
TAR=
PART=check
WIDTHS=llama3-8b
SKIP=
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --tar) TAR="$2"; shift 2 ;;
        --part) PART="$2"; shift 2 ;;
        --widths) WIDTHS="$2"; shift 2 ;;
        --skip) SKIP=",$2,"; shift 2 ;;
        *) echo "usage: bash bench/gpu_check.sh [--part check|latency] [--device cuda|cpu] [--quick] [--widths W] [--skip STEP,...] [--tar FILE.tgz]" >&2
           exit 2 ;;
    esac
done

case "$PART" in check|latency) ;; *) echo "--part is check or latency, got $PART" >&2; exit 2 ;; esac
RESULTS=bench/results/gpu_$PART
[ "$DEVICE" = cpu ] && RESULTS="${TMPDIR:-/tmp}/lrc-gpu_$PART-dry-run"  # a dry run leaves the GPU results alone
mkdir -p "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lrc-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$RESULTS/summary.md"
START=$(date +%s)

if [ "$QUICK" = 1 ]; then  # dry-run sizes: every step in seconds to a few minutes on a small CPU
    LAYERS=2; SAMPLES=16; SEQ=128; CHARS=60000; METHOD=(--method loss-aware); SHAPES=(test-tiny)
    SCALE_ARGS=(--samples 2 --seq-len 64); LIMIT_TESTS=300; LIMIT_BUILD=300; LIMIT_RUN=(300 300); LIMIT_SCALE=(300)
    LIMIT_RUNTIME=300; LIMIT_LAYERS=300; LIMIT_KERNELS=300
else  # SmolLM2-135M's widths with 6 of its 30 layers and 64 of the default 128 x 512 windows: the cpu run
      # (about 1/10 of the full run's work) fits its limit on 16 cores
    LAYERS=6; SAMPLES=64; SEQ=512; CHARS=400000; METHOD=(); SHAPES=(llama3-8b llama3-70b)
    SCALE_ARGS=(--samples 8 --seq-len 512 --job-budget-s 40); LIMIT_TESTS=60; LIMIT_BUILD=30; LIMIT_RUN=(60 90); LIMIT_SCALE=(50 95)
    LIMIT_RUNTIME=150; LIMIT_LAYERS=40; LIMIT_KERNELS=60  # runtime: Triton compiles its kernels on first use
fi

note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $RESULTS/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    if [[ "$SKIP" == *",$name,"* ]]; then
        note "- $name: skipped (--skip)"
        return 3
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "- $name: STOPPED at its ${limit} s limit (log: $RESULTS/$name.log)"
    else
        note "- $name: exit $rc in ${took} s (log: $RESULTS/$name.log)"
    fi
    return "$rc"
}

: >"$SUMMARY"
note "# GPU check ($PART), $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
python - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform, torch, transformers
print(f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
EOF
if [ "$DEVICE" != cpu ] && ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "- no CUDA GPU visible to torch: nothing to check (bash bench/gpu_check.sh --device cpu --quick for a dry run)"
    exit 2
fi
if [ "$DEVICE" = cpu ]; then
    export LRC_TEST_GPU_DEVICE=cpu
    note "- DRY RUN on the CPU: the 'cuda' runs below ran on the CPU; no GPU figures here"
fi
note ""

check_part() {
    # 1. the gpu-marked tests
    if python -c 'import pytest' 2>/dev/null; then
        step tests "$LIMIT_TESTS" python -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider
        tail -n 3 "$RESULTS/tests.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "- tests: SKIPPED, pytest is not installed here"
    fi

    # 2. the default compression on the device, then on the cpu
    step build "$LIMIT_BUILD" python bench/gpu_check.py build "$WORK" --layers "$LAYERS" --chars "$CHARS"
    RUN_ARGS=("$WORK/model" --calib "$WORK/calib.txt" --samples "$SAMPLES" --seq-len "$SEQ" "${METHOD[@]}" --quiet)
    step compress_device "${LIMIT_RUN[0]}" python -m lrc compress "${RUN_ARGS[@]}" --device "$DEVICE" -o "$WORK/out_device"
    step compress_cpu "${LIMIT_RUN[1]}" python -m lrc compress "${RUN_ARGS[@]}" --device cpu -o "$WORK/out_cpu"
    if [ -f "$WORK/out_device/lrc_report.yaml" ] && [ -f "$WORK/out_cpu/lrc_report.yaml" ]; then
        python bench/gpu_check.py compare "$WORK/out_device" "$WORK/out_cpu" "$RESULTS/compare.md" \
            >"$RESULTS/compare.log" 2>&1 && note "- comparison: $RESULTS/compare.md"
        cp "$WORK/out_device/lrc_report.yaml" "$RESULTS/report_device.yaml"
        cp "$WORK/out_cpu/lrc_report.yaml" "$RESULTS/report_cpu.yaml"
    else
        note "- comparison: not made (a run did not finish)"
    fi

    # 3. per-layer cost at 8B / 70B shapes on the device, projected (one shape per step: the first lands alone)
    for i in "${!SHAPES[@]}"; do
        step "scale_${SHAPES[$i]}" "${LIMIT_SCALE[$i]}" python bench/scale.py --device "$DEVICE" --shapes "${SHAPES[$i]}" \
            "${SCALE_ARGS[@]}" --scratch "$WORK" --out "$RESULTS/scale_${SHAPES[$i]}_$DEVICE"
    done

    # 4. what the outputs cost where they run: dense, default recipe, pure low rank, bfloat16 on the device
    step compress_lowrank "${LIMIT_RUN[0]}" python -m lrc compress "${RUN_ARGS[@]}" --method loss-aware --device "$DEVICE" \
        -o "$WORK/out_lowrank"
    rm -f "$RESULTS/runtime_$DEVICE.md" "$RESULTS/layer_speed_${DEVICE}_"*.md  # no stale table quoted below
    if [ -f "$WORK/out_device/lrc_report.yaml" ] && [ -f "$WORK/out_lowrank/lrc_report.yaml" ]; then
        step runtime "$LIMIT_RUNTIME" python bench/runtime.py --device "$DEVICE" --dtypes bfloat16 --rounds 1 --alternations 6 \
            --seq-len "$SEQ" --text "$WORK/calib.txt" --out "$RESULTS/runtime_$DEVICE" \
            --models dense="$WORK/model" "default recipe=$WORK/out_device" "loss-aware=$WORK/out_lowrank"
        tail -n 5 "$RESULTS/runtime_$DEVICE.md" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "- runtime: not measured (a compression did not finish)"
    fi

    # 5. one big decoder layer's projections in each form
    LAYER_SHAPE=llama3-8b
    [ "$QUICK" = 1 ] && LAYER_SHAPE=test-tiny
    step layer_speed "$LIMIT_LAYERS" python bench/layer_speed.py --device "$DEVICE" --shape "$LAYER_SHAPE" \
        --out "$RESULTS/layer_speed_${DEVICE}_$LAYER_SHAPE"
    grep -F "**decoder layer**" "$RESULTS/layer_speed_${DEVICE}_$LAYER_SHAPE.md" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"

    # 6. the bitmask kernel's tile sizes and a sparse layer's CPU cost per call (GPU only: Triton compiled)
    if [ "$DEVICE" != cpu ]; then
        step kernels "$LIMIT_KERNELS" python bench/gpu_kernel_sweep.py --out "$RESULTS" $([ "$QUICK" = 1 ] && echo --quick)
    fi
}

latency_part() {  # the latency objective at a big model's widths, then the output against its dense model
    local budget=0.3
    step build 60 python bench/gpu_check.py build "$WORK" --widths "$WIDTHS" --layers 4 --chars 200000
    # statistics cached for the retry; the latency table is cached by lrc itself
    local compress=(python -m lrc compress "$WORK/model" --calib "$WORK/calib.txt" --samples 32 --seq-len 512
                    --method loss-aware --objective latency --dtype bfloat16 --device "$DEVICE" --cache-dir "$WORK/cache"
                    -o "$WORK/latency")
    step compress 270 "${compress[@]}" --budget "$budget"
    if grep -q "cannot be met" "$RESULTS/compress.log"; then  # infeasible there: 0.05 below the most it can meet
        tail -n 1 "$RESULTS/compress.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        budget=$(sed -n 's/.*budget at most \([0-9.]*\).*/\1/p' "$RESULTS/compress.log" | tail -n 1 |
                 awk '{ b = int(($1 - 0.05) * 100) / 100; if (b < 0.05) b = 0.05; print b }')
        step compress_retry 200 "${compress[@]}" --budget "$budget"
    fi
    if [ -f "$WORK/latency/lrc_report.yaml" ]; then
        cp "$WORK/latency/lrc_report.yaml" "$RESULTS/report_$DEVICE.yaml"
        grep -A6 "predicted_cost" "$RESULTS/report_$DEVICE.yaml" | sed 's/^/    /' | tee -a "$SUMMARY"
        step runtime 60 python bench/runtime.py --device "$DEVICE" --dtypes bfloat16 --rounds 1 --alternations 6 \
            --seq-len 512 --text "$WORK/calib.txt" --out "$RESULTS/runtime_$DEVICE" \
            --models dense="$WORK/model" "latency objective, $budget=$WORK/latency"
        grep -F "| bfloat16 |" "$RESULTS/runtime_$DEVICE.md" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
}

"${PART}_part"

note ""
note "total: $(( $(date +%s) - START )) s"
if [ -n "$TAR" ]; then
    tar czf "$TAR" -C "$RESULTS" . && echo "results packed into $TAR"
fi
