#!/usr/bin/env bash
# One-shot GPU check for a lent machine: install upop, run every GPU check, print the tables. GPU_CHECK_<STEP>_S
# sets a step's limit in seconds. All steps take about 9-10 minutes on an H100 (estimated from the 2026-12-06 runs;
# the profile step has not run on a GPU yet), over one device call's 10 minutes: run two
# calls back to back (the machine stays warm between them), GPU_CHECK_STEPS="profile real" then "ddp checks trt".
# What it answers is listed in README.md's GPU section and in benchmarks/gpu_check.py's docstring. Each step has
# its own time limit and a failed step says so and lets the next one run: one run answers as much as it can.
#
#   bash benchmarks/gpu_check.sh                 # everything
#   GPU_CHECK_STEPS="checks trt" bash benchmarks/gpu_check.sh    # some steps: profile real ddp checks trt
#   GPU_CHECK_TRACE=$OUT bash benchmarks/gpu_check.sh            # the profile's Chrome traces where they come back
#
# Steps:
#   profile benchmarks/step_profile.py: where a BLIP-base training step's time goes (GPU busy share, kernel
#           launches, host waits, the costliest operators), search and retrain, gzipped Chrome traces
#   checks  benchmarks/gpu_check.py: AMP search step, FP16 slim latency aligned/unaligned, the AMP dtype, BLIP
#           retrieval evaluation memory, ONNX Runtime provider and IO binding, TensorRT on its own stream
#   real    benchmarks/real_size.py on CUDA: BLIP-base size, images/s of search and retrain, data wait, peak CUDA memory
#           (AMP; GPU_CHECK_PRECISION=both adds fp32)
#   ddp     a 1-GPU torchrun of `upop compress`: a group of one, every collective through NCCL; the report says so
#   trt     TensorRT engines of a slim demo at fp32 / fp16 / int8 (strongly typed, from the ONNX graphs) and
#           `upop eval --runtime tensorrt` of each: the task metric of the engine next to the ONNX Runtime one
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="${GPU_CHECK_STEPS:-profile real ddp checks trt}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1  # each line as it comes: a step cut off by its limit keeps what it printed
python -c "import torch, transformers" 2>/dev/null || python -m pip install --quiet torch transformers
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install --quiet --no-deps -e . || true
python - <<'PY'
import importlib.util
import torch
print("CUDA:", torch.cuda.is_available(), torch.version.cuda, "| GPUs:", torch.cuda.device_count())
for mod in ("onnxruntime", "tensorrt", "modelopt"):
    spec = importlib.util.find_spec(mod)
    extra = ""
    if spec and mod == "onnxruntime":
        import onnxruntime
        extra = f"providers {onnxruntime.get_available_providers()}"
    print(f"{mod}: {'installed ' + extra if spec else 'not installed'}")
PY

step() {  # step NAME LIMIT_S COMMAND...: run it if asked, with its limit; report how it ended
    local name="$1" limit="$2"
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" bash -c '"$@"' _ "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (time limit)')"
}

trt_road() {  # compress demo-vit at 0.5 (short), export ONNX + TensorRT at three precisions, evaluate each
    local slim="$WORK/demo-vit-p0.5"
    python -m upop_cli compress --model demo-vit --ratio 0.5 --out "$slim" --max-steps 40 --overwrite || return 1
    python -m upop_cli export "$slim" --format onnx --out "$WORK/onnx" --overwrite --quiet || return 1
    python -m upop_cli eval "$WORK/onnx" --runtime onnxruntime || return 1
    if ! python -c "import tensorrt; tensorrt.Builder" 2>/dev/null; then
        echo "TensorRT: not installed here (pip install 'upop[trt]'); engines not built"
        return 0
    fi
    local p
    for p in fp32 fp16 int8; do
        python -m upop_cli export "$slim" --format trt --precision "$p" --batch 8 --out "$WORK/trt-$p" --overwrite \
            || { echo "TensorRT $p: export failed"; continue; }
        python -m upop_cli eval "$WORK/trt-$p" --runtime tensorrt || echo "TensorRT $p: eval failed"
    done
}

ddp_road() {  # one process under torchrun joins a group of one: every collective runs through NCCL on the GPU
    local out="$WORK/ddp"
    # (--nproc 1 would run in-process, without a group)
    python -m torch.distributed.run --standalone --nproc-per-node 1 --module upop_cli compress --model demo-vit \
        --ratio 0.5 --out "$out" --max-steps 30 --overwrite || return 1
    python - "$out" <<'PY'
import json, sys
from pathlib import Path
rep = json.loads((Path(sys.argv[1]) / "report.json").read_text())
dist = rep["distributed"]
print("report's distributed record:", dist)
assert dist["backend"] == "nccl", f"expected the NCCL backend on a GPU, got {dist['backend']}"
PY
}

export WORK
export -f trt_road ddp_road
# the order is the value's: a machine lent for minutes answers the open question first (where a step's time
# goes: the 2026-12-06 H100 run searched at about 3 % of the GPU's dense bf16 rate), then the real-size numbers
# (AMP only: fp32 was measured that day; GPU_CHECK_PRECISION=both measures it again)
step profile "${GPU_CHECK_PROFILE_S:-240}" python benchmarks/step_profile.py --trace "${GPU_CHECK_TRACE:-$WORK/trace}"
step real "${GPU_CHECK_REAL_S:-240}" python benchmarks/real_size.py --device cuda --images 256 --batch 32 --steps 30 --workers 8 \
    --precision "${GPU_CHECK_PRECISION:-amp}"
step ddp "${GPU_CHECK_DDP_S:-90}" ddp_road
step checks "${GPU_CHECK_CHECKS_S:-180}" python benchmarks/gpu_check.py "$@"
step trt "${GPU_CHECK_TRT_S:-120}" trt_road
echo
echo "work folder: $WORK"
