#!/usr/bin/env bash
# The GPU check in one command, for the day a GPU is available (docs/performance.md):
#   bash benchmarks/gpu_check.sh [--scans 16] [--cpu-scans 2] ...   (gpu_check.py's options)
# Needs the gpu extra (pip install -e '.[gpu]'); without a GPU it runs on the CPU and says so.
set -euo pipefail
cd "$(dirname "$0")"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    echo "nvidia-smi: not found"
fi
exec "${PYTHON:-python}" gpu_check.py "$@"
