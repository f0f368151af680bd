#!/usr/bin/env bash
# The step-cost runs on the real SDXL architecture (random weights), for a machine with one CUDA GPU.
# One prepared script, most important run first; each run writes
# benchmarks/results/step_cost_sdxl_<resolution>[_te][_pertensor].{json,png} and a Markdown table to the log.
# Needs the project installed (pip install -e .). About 10 minutes on one H100/H200-class GPU; each run is
# bounded by `timeout` so one stuck run cannot eat the machine's whole lease.
#
#   bash benchmarks/gpu_step_cost.sh            # all runs, log in benchmarks/results/gpu_step_cost.log
#   RUNS=1 bash benchmarks/gpu_step_cost.sh     # only the first (1024 px, UNet LoRA, every method)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
LOG=benchmarks/results/gpu_step_cost.log
RUNS=${RUNS:-4}
LIMIT=${LIMIT:-240}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$LOG"
runs=(
  "--model sdxl --resolution 1024 --steps 10 --warmup 3"
  "--model sdxl --resolution 512 --steps 10 --warmup 3"
  "--model sdxl --resolution 1024 --steps 10 --warmup 3 --train_text_encoder --variants lora bilora bilora-unfused lora-sam"
  "--model sdxl --resolution 1024 --steps 10 --warmup 3 --per_tensor_update --no_memory --variants lora bilora"
)
for args in "${runs[@]:0:$RUNS}"; do
  echo "== python benchmarks/step_cost.py $args" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$LIMIT" python benchmarks/step_cost.py $args 2>&1 | grep -v "it/s\]$" | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
done
