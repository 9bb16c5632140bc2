#!/usr/bin/env bash
# Every CUDA path of sp-ray once, on a machine with an NVIDIA GPU, in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh      # -> benchmarks/results/gpu/gpu_check.{json,md}, <step>.json, logs/<step>.log
#
#   train            one epoch of each family's tiny config on CUDA, in-process, bf16 autocast (train.amp),
#                    then its validation on the GPU
#   ray              the tiny K-Net through `sp-ray finetune --gpu --num-workers 1`: a Ray Train worker on the
#                    GPU, NCCL process group (checked in WORK/ray_knet/workers/rank0.json)
#   parity_cuda      export of the four trained models; parity against PyTorch through Segmenter on the CUDA
#                    provider (IO binding)
#   parity_tensorrt  the same on the TensorRT provider: engine build time, then a session from the engine
#                    cache; K-Net also with TensorRT fp16
#   cli              `sp-ray evaluate --onnx --gpu --trt-cache` and `sp-ray predict --gpu --trt-cache` (a Ray
#                    Data actor on the GPU)
#   throughput_*     benchmarks/throughput.py --device cuda, the four families (R50) at 512 and 800 px, batch 1,
#                    PyTorch and onnxruntime (CUDA provider); fp16 / int8 too when throughput.py has --precisions
#
# Each step runs under `timeout` and inside one budget (GPU_CHECK_BUDGET_S, default 440 s, so that the whole
# script, summary included, ends within 8 minutes); a step that fails, hangs or finds no time left is recorded
# with that status and the next one runs. The exit status is 0 when every step passed, 1 otherwise.
# Without a GPU (no working nvidia-smi, or torch.cuda.is_available() false) it exits at once with status 3
# and one line on stderr. CI never runs it.
#
# Environment: GPU_CHECK_OUT (results, default benchmarks/results/gpu), GPU_CHECK_WORK (data, checkpoints,
# models, engine cache; default runs/gpu_check), GPU_CHECK_PYTHON (default the repo's .venv/bin/python,
# created with `make .venv/.installed` when missing: that install is not part of the 8 minutes).

set -u -o pipefail

# No GPU: leave before anything else (bash builtins only, so it holds on any machine).
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found); nothing was run" >&2
    exit 3
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L fails: no driver or no device); nothing was run" >&2
    exit 3
fi

REPO=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
cd "$REPO" || exit 3
PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ ! -x "$PY" ]; then
    echo "gpu_check: creating .venv (make .venv/.installed)"
    make .venv/.installed || { echo "gpu_check: make .venv/.installed failed" >&2; exit 3; }
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (torch.cuda.is_available() is false for $PY); nothing was run" >&2
    exit 3
fi

OUT=$(mkdir -p "${GPU_CHECK_OUT:-$REPO/benchmarks/results/gpu}" && cd "${GPU_CHECK_OUT:-$REPO/benchmarks/results/gpu}" && pwd)
WORK=$(mkdir -p "${GPU_CHECK_WORK:-$REPO/runs/gpu_check}" && cd "${GPU_CHECK_WORK:-$REPO/runs/gpu_check}" && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-440}
MIN_STEP_S=20       # a step with less time than this left is skipped, not started
KILL_AFTER_S=15     # after its timeout a step gets SIGINT (Ray and Python clean up), then SIGKILL this much later
DEADLINE=$((SECONDS + BUDGET_S))
mkdir -p "$OUT/logs"
rm -f "$OUT/steps.jsonl"
export PYTHONUNBUFFERED=1
FAILED=0

# record NAME STATUS RC SECONDS TIMEOUT COMMAND...: one line of OUT/steps.jsonl.
record() {
    "$PY" - "$OUT/steps.jsonl" "$@" <<'EOF'
import json, sys
path, name, status, rc, seconds, timeout, *command = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "status": status, "returncode": int(rc), "seconds": int(seconds),
                        "timeout_s": int(timeout), "command": " ".join(command),
                        "log": None if status.startswith("skipped") else f"logs/{name}.log"}) + "\n")
EOF
}

# run_step NAME TIMEOUT_S COMMAND...: run it under timeout, its output in OUT/logs/NAME.log, its status recorded.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS)) start=$SECONDS rc=0 status
    if ((left < MIN_STEP_S)); then
        echo "-- $name: skipped (${left}s of the ${BUDGET_S}s budget left)"
        record "$name" "skipped: budget spent" -1 0 0 "$@"
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "-- $name (timeout ${limit}s)"
    timeout --signal=INT --kill-after="$KILL_AFTER_S" "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "   $status (exit $rc, $((SECONDS - start))s)"
    if [ "$status" != ok ]; then
        FAILED=1
        tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
    fi
    record "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "$@"
}

# In order of importance: the budget cuts from the end. Most of the time is the CPU's: torch's ONNX exports
# (on a 2-core Xeon the four R50 models of one throughput.py run took 23 + 58 + 52 + 28 s of CPU time with
# their imports and a CPU run; parity_cuda exports the four tiny models side by side), so on a slow host
# throughput_800 is the step that gets skipped.
STEPS=(--work "$WORK" --out "$OUT")
run_step data 60 "$PY" benchmarks/gpu_check.py data "${STEPS[@]}"
run_step train 90 "$PY" benchmarks/gpu_check.py train "${STEPS[@]}"
run_step ray 90 "$PY" benchmarks/gpu_check.py ray "${STEPS[@]}"
run_step parity_cuda 110 "$PY" benchmarks/gpu_check.py parity --providers cuda "${STEPS[@]}"
run_step parity_tensorrt 120 "$PY" benchmarks/gpu_check.py parity --providers tensorrt "${STEPS[@]}"
run_step cli 75 "$PY" benchmarks/gpu_check.py cli "${STEPS[@]}"

# throughput.py flags relied on: --device --depth --size --batches --iterations --warmup --families --runtimes
# --in-process --out, and --precisions when its --help lists it (only the precisions its help names are asked for;
# the plain steps ask for fp32, as throughput.py's default is every precision it has, and the last --precisions wins).
# Its --size is square: 800 stands for COCO's 800x1333 short side (a non-square size needs a throughput.py flag).
THROUGHPUT=(benchmarks/throughput.py --device cuda --depth 50 --batches 1 --iterations 5 --warmup 2
    --families knet mask2former queryinst maskrcnn --runtimes torch onnxruntime --in-process)
HELP=$("$PY" benchmarks/throughput.py --help 2>/dev/null | tr '\n' ' ')
if [[ $HELP == *--precisions* ]]; then
    THROUGHPUT+=(--precisions fp32)
fi
run_step throughput_512 160 "$PY" "${THROUGHPUT[@]}" --size 512 --out "$OUT/throughput_512"
run_step throughput_800 160 "$PY" "${THROUGHPUT[@]}" --size 800 --out "$OUT/throughput_800"
if [[ $HELP == *--precisions* ]]; then
    PRECISIONS=()
    for precision in fp16 int8; do
        [[ $HELP == *$precision* ]] && PRECISIONS+=("$precision")
    done
    if ((${#PRECISIONS[@]})); then
        run_step throughput_512_precisions 150 "$PY" "${THROUGHPUT[@]}" --size 512 --precisions "${PRECISIONS[@]}" \
            --out "$OUT/throughput_512_precisions"
    fi
else
    echo "-- throughput_512_precisions: skipped (benchmarks/throughput.py has no --precisions: fp32 only)"
    record throughput_512_precisions "skipped: throughput.py has no --precisions" -1 0 0
fi

timeout 60 "$PY" benchmarks/gpu_check.py summary "${STEPS[@]}" >"$OUT/logs/summary.log" 2>&1 ||
    { echo "gpu_check: the summary failed, see $OUT/logs/summary.log" >&2; FAILED=1; }
echo "gpu_check: $OUT/gpu_check.md ($((SECONDS))s)"
exit "$FAILED"
