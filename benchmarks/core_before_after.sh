#!/usr/bin/env bash
# Issue 13's before/after table in one run: the step cost of lora and bilora with the core before the redesign
# (commit 431cc6a: packed storage, the earlier flat update; its lora on the same fused forward, like-for-like)
# and with this tree's core, on the small SDXL topology and at SDXL's real widths (shallow), one after the
# other on the same machine. Each run is benchmarks/step_cost.py (interleaved lora/bilora rounds, paired
# ratios, peak memory in fresh processes, held bytes); the "before" side imports the old package from a
# temporary git worktree.
#
#   bash benchmarks/core_before_after.sh        # CPU: about 30 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:-431cc6a}
OUT=benchmarks/results
tree=$(mktemp -d)
git worktree add -q --detach "$tree" "$BEFORE"
trap 'git worktree remove --force "$tree"' EXIT
runs=(
  "small|--model sdxl-topology-small --steps 30 --warmup 3"
  "shallow|--model sdxl-widths-shallow --resolution 512 --steps 8 --warmup 2"
)
for run in "${runs[@]}"; do
  name=${run%%|*}
  args=${run#*|}
  for side in before after; do
    echo "== $side ($name): python benchmarks/step_cost.py $args --variants lora bilora"
    path=$PWD
    [ "$side" = before ] && path=$tree
    # shellcheck disable=SC2086
    PYTHONPATH=$path python benchmarks/step_cost.py $args --variants lora bilora --out "$OUT/core_${side}_$name" \
      | grep -v "it/s\]$"
  done
done
