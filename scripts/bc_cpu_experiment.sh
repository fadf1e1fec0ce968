#!/usr/bin/env bash
# The CPU-default behaviour-cloning experiment (IVT Sec. 3.2 on IVT-Synthetic-v0, issue 5):
#   1. synthesize an inspectable sample of the teacher data (the training itself synthesizes fresh trajectories
#      on the fly with the same settings: configs/bc_cpu.yaml, data: online);
#   2. behaviour-clone the tiny Qwen3-VL from scratch (configs/bc_cpu.yaml; val evaluation every eval_every steps, the
#      best checkpoint by val Acc@0.5 in $OUT/bc/best);
#   3. evaluate the untrained model ("before") and the best checkpoint ("after") on the synthetic TEST split with
#      T = 2, greedy: the paper's Table 1 / Table 2 layout in $OUT/eval_{before,after}/metrics.md.
# Usage: bash scripts/bc_cpu_experiment.sh [OUT_DIR] [extra agents.bc overrides...]
# Ships as assets/tiny-ivt-bc: cp -r $OUT/bc/best assets/tiny-ivt-bc (then add its README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bc_cpu}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
t0=$(date +%s)
python -m agents.synthesis --config synthesize_cpu.yaml --limit 200 --out "$OUT/teacher-sample" --progress False
python -m agents.bc train --config bc_cpu.yaml --out "$OUT/bc" "$@"
t1=$(date +%s)
python -m agents.evaluate --model "$OUT/bc/base" --policy-kwargs '{"prompts": "prompts_tiny.yaml"}' --split test \
    --steps 2 --max-new-tokens 48 --num-envs 50 --out "$OUT/eval_before" --name "tiny (untrained)" --no-progress
python -m agents.evaluate --model "$OUT/bc/best" --split test --steps 2 --max-new-tokens 48 --num-envs 50 \
    --out "$OUT/eval_after" --name "tiny BC (best)" --no-progress
t2=$(date +%s)
echo "wall time: synthesis + behaviour cloning $((t1 - t0)) s, test evaluations $((t2 - t1)) s"
