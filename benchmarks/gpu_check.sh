#!/usr/bin/env bash
# One-shot GPU check for a lent machine: install what is missing (when it can), run, print one table.
# What it answers is listed in README.md's GPU section and in benchmarks/gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, transformers" 2>/dev/null || pip install --quiet torch transformers
pip install --quiet --no-deps -e . 2>/dev/null || true
# Optional runtimes: a check whose runtime is missing says so in its row.
python - <<'PY'
import importlib.util
import torch
print("CUDA:", torch.cuda.is_available(), torch.version.cuda, "| GPUs:", torch.cuda.device_count())
for mod in ("onnxruntime", "tensorrt"):
    spec = importlib.util.find_spec(mod)
    extra = ""
    if spec and mod == "onnxruntime":
        import onnxruntime
        extra = f"providers {onnxruntime.get_available_providers()}"
    print(f"{mod}: {'installed ' + extra if spec else 'not installed'}")
PY
python benchmarks/gpu_check.py "$@"
