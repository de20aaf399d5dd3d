#!/usr/bin/env bash
# GPU scale check (issue 15): 1,000 Fashion-MNIST clients on one GPU, fractional client.num_gpus.
# Prepared for a lent GPU machine; each step a few minutes. Writes benchmarks/results/gpu_scale-DATE.md
# (through benchmarks/scale.py) and nvidia-smi memory samples beside it.
#   bash benchmarks/gpu_scale.sh            # 100 and 1000 clients, 0.05 GPU per client (20 actors)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FRACTION=${FRACTION:-0.05}
CLIENTS=${CLIENTS:-100,1000}
mkdir -p benchmarks/results
SMI=benchmarks/results/gpu_scale-$(date +%F)-nvidia-smi.csv
nvidia-smi --query-gpu=timestamp,name,memory.used,memory.total,utilization.gpu --format=csv -l 2 > "$SMI" &
SMI_PID=$!
trap 'kill $SMI_PID 2>/dev/null || true' EXIT
$PY -c "import torch; print(torch.cuda.get_device_name(0), 'bf16 (native):', torch.cuda.is_bf16_supported(including_emulation=False))"
$PY benchmarks/scale.py --clients "$CLIENTS" --out gpu_scale \
  --extra "device=cuda client.num_gpus=$FRACTION client.num_cpus=0.5 model.width=32"
echo "peak GPU memory (MiB): $(awk -F, 'NR>1{gsub(/ MiB/,"",$3); if ($3>m) m=$3} END{print m}' "$SMI")"
