#!/usr/bin/env bash
# FedMe's round on a lent GPU (issue 14): VGG-11 on generated 3x32x32 images, 20 clients,
# U = 500 and 1,000, FedMe and FedAvg, clients and server on the GPU through device = "auto".
#
# The GPU machine has no internet and no .venv (6.6 GB; 64 MiB may travel), but its python3
# has torch, numpy, scikit-learn, psutil and pandas. Flower and the few packages it needs that
# are missing there travel as wheels in .whl (docs/performance.md); Ray does not (too big),
# so clients run in this process, one after another (--engine in-process), not as Ray actors.
#
#     device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 330
#
# Writes gpu.txt, round_time_gpu.json and round_time_gpu.txt under $OUT
# (benchmarks/results/gpu without it). About 3-4 minutes.
set -euo pipefail

OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .whl ]; then
  # Installed apart and put first on the path: the machine's own packages stay as they are.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedapps-site .whl/*.whl
  export PYTHONPATH="/tmp/fedapps-site:$PYTHONPATH"
fi
"$PYTHON" -c "import flwr" 2>/dev/null \
  || { echo "gpu_check: Flower is not importable; carry .whl (docs/performance.md, GPU)" >&2; exit 1; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpu cores: $(nproc); $(uptime)"
} | tee "$OUT/gpu.txt"

# device = "auto" must pick the GPU, or nothing below measures what it claims.
timeout 120 "$PYTHON" - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch

from fedapps.training import resolve_device

device = resolve_device("auto")
assert device.type == "cuda", f"device='auto' resolved to {device}, not the GPU"
print(f"device auto -> {device}: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
EOF

timeout 210 "$PYTHON" benchmarks/round_time.py --engine in-process --device auto \
  --shapes 32 --clients 20 --pools 500 --rounds 3 \
  --out "$OUT/round_time_gpu.json" 2>&1 | tee "$OUT/round_time_gpu.txt"
