#!/usr/bin/env bash
# One-shot GPU check for a lent machine: install what is missing, run, print one table.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, transformers" 2>/dev/null || pip install --quiet torch transformers
pip install --quiet --no-deps -e . 2>/dev/null || true
python benchmarks/gpu_check.py "$@"
