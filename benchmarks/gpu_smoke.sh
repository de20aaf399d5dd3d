#!/usr/bin/env bash
# First GPU smoke script (shared/GPU-NOTES.md): each step a few minutes; nvidia-smi memory logged beside it.
# Run on a lent GPU machine: `bash benchmarks/gpu_smoke.sh 2>&1 | tee benchmarks/results/gpu_smoke-$(date +%F).log`
set -uo pipefail
cd "$(dirname "$0")/.."
F=${F:-.venv/bin/fedistill}
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 2 > "$OUT/nvidia-smi.csv" &
trap 'kill $! 2>/dev/null || true' EXIT
step() { echo "== $1"; shift; local t0=$SECONDS; timeout 600 "$@" > "$OUT/step.log" 2>&1; echo "rc=$? seconds=$((SECONDS - t0))"; tail -3 "$OUT/step.log"; }
# 1. environment
.venv/bin/python -c "import torch; print(torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported(), torch.cuda.is_bf16_supported(including_emulation=False))"
# 2. DM real chunk size at width 128
for chunk in 128 4096; do
  step "dm chunk $chunk" $F central dataset=fashion_mnist ipc=10 model.width=128 device=cuda method.iterations=300 \
    method.real_chunk=$chunk eval.epochs=50 eval.runs=1 hydra.run.dir=$OUT/dm-$chunk
done
# 3. determinism: twice on CUDA, once on CPU, 100 iterations; max abs difference of the images
for run in cuda-a cuda-b cpu; do
  dev=${run%%-*}
  step "determinism $run" $F central dataset=fashion_mnist ipc=1 model.width=32 device=$dev method.iterations=100 \
    method.compile=false eval.epochs=1 eval.runs=1 hydra.run.dir=$OUT/det-$run
done
.venv/bin/python - "$OUT" <<'PY'
import sys
from fedistill.io import load_tensors
o = sys.argv[1]
a, b, c = (load_tensors(f"{o}/det-{r}/synthetic.safetensors")["images"] for r in ("cuda-a", "cuda-b", "cpu"))
print("cuda vs cuda", float((a - b).abs().max()), "cuda vs cpu", float((a - c).abs().max()))
PY
# 4. dp_dm epsilon on CUDA equals the CPU run's
step "dp_dm cuda" $F central method=dp_dm dataset=fashion_mnist ipc=10 device=cuda method.iterations=50 eval.epochs=5 \
  eval.runs=1 hydra.run.dir=$OUT/dpdm-cuda
# 5. dp_dc memory at width 128
step "dp_dc width 128" $F central method=dp_dc dataset=fashion_mnist ipc=10 model.width=128 device=cuda \
  method.iterations=3 method.batch_real=256 eval.epochs=1 eval.runs=1 hydra.run.dir=$OUT/dpdc
# 6. 100 clients, 0.1 GPU each, width 128
step "100 clients num_gpus 0.1" $F simulate dataset=fashion_mnist clients=100 alpha=0.1 device=cuda \
  client.num_gpus=0.1 model.width=128 strategy.random_baseline=false hydra.run.dir=$OUT/sim100
# 7. device routing: clients without a GPU share (expect the warning)
step "device routing" $F simulate clients=10 device=cuda hydra.run.dir=$OUT/route
# 8. a heavy engine under fractional GPUs: out-of-memory failures?
step "dp_dc 20 clients" $F simulate method=dp_dc clients=20 device=cuda client.num_gpus=0.1 \
  strategy.random_baseline=false hydra.run.dir=$OUT/dpdc20
grep -h client_failed $OUT/*/metrics.jsonl | head -5 || true
