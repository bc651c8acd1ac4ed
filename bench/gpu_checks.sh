#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one go, for one call on a lent GPU machine (10 minutes at most):
#   1. bf16 + ZeRO-3 training of a random model of Qwen2.5-1.5B's shape (6 steps), GPU memory sampled;
#   2. the engine's log-probs against the trainer's, with and without `rollout.static_cache`, and under
#      `model.autocast` (float32 weights; 4 steps each, `rollout_correction/logp_abs_diff_*` in metrics.jsonl);
#   3. `alphaalign bench --gpu` with what time is left (BENCH_ROUNDS rounds, default 1; no reward benchmarks:
#      those are CPU-only and run by `make bench`).
# Everything lands in $OUT (default outputs/gpu); the last lines printed are the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
began=$(date +%s)
budget=${BUDGET_S:-570}  # the whole script's seconds: the bench gets what the first two parts leave

{ nvidia-smi; $PY -c "import sys, torch, transformers, trl, deepspeed, datasets, pydantic
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| trl', trl.__version__, '| deepspeed', deepspeed.__version__)"
} > "$OUT/zero3.log" 2>&1  # the machine first; at most 8 files come back from $OUT
tail -1 "$OUT/zero3.log"

model=$PWD/.cache/bench/qwen2.5-1.5b
start=$(date +%s)
$PY -c "from pathlib import Path; from alphaalign.perf.workload import WORKLOADS, build
build(WORKLOADS['qwen2.5-1.5b'], Path('$model'))" || exit 1
echo "workload built in $(( $(date +%s) - start )) s"

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/zero3-gpu-mem-mib.csv" &
monitor=$!
start=$(date +%s)
timeout 240 torchrun --nproc_per_node 1 -m alphaalign.cli train recipes/demo.yaml \
  model.name_or_path=$model model.build=null model.dtype=bfloat16 \
  model.gradient_checkpointing=true "data.train=[{path: $model/prompts.jsonl}]" \
  data.eval=[] data.template=none trainer.deepspeed=zero3 \
  trainer.prompts_per_step=8 rollout.num_generations=8 rollout.max_new_tokens=64 rollout.min_new_tokens=64 \
  trainer.max_steps=6 trainer.save_every=6 trainer.output_dir=outputs/gpu-zero3 logging.wandb_mode=disabled \
  >> "$OUT/zero3.log" 2>&1
echo "zero3 run: exit $?, $(( $(date +%s) - start )) s"
kill $monitor
cp outputs/gpu-zero3/metrics.jsonl "$OUT/zero3-metrics.jsonl" 2>/dev/null
tail -3 "$OUT/zero3.log"

for run in false true autocast; do  # no min_new_tokens: its EOS mask would count as a gap
  static=false precision="model.dtype=bfloat16"
  [ $run = true ] && static=true
  [ $run = autocast ] && precision="model.dtype=float32 model.autocast=bfloat16"  # not with static_cache
  timeout 150 $PY -m alphaalign.cli train recipes/demo.yaml model.name_or_path=$model model.build=null \
    $precision "data.train=[{path: $model/prompts.jsonl}]" data.eval=[] data.template=none \
    trainer.prompts_per_step=8 rollout.num_generations=8 rollout.max_new_tokens=64 rollout.static_cache=$static \
    algorithm.rollout_correction=token_truncate trainer.max_steps=4 trainer.save_every=100 \
    trainer.output_dir=outputs/gpu-static-$run trainer.progress_bar=false logging.wandb_mode=disabled \
    >> "$OUT/static.log" 2>&1
  echo "static_cache=$static ($precision) run: exit $?"
done

timeout $(( budget - 20 - $(date +%s) + began )) $PY -m alphaalign.cli bench --gpu --rounds "${BENCH_ROUNDS:-1}" --no-rewards \
  --out "$OUT/results_gpu.json" 2>&1 | tail -25

$PY - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    rows = [json.loads(line) for line in (out / "zero3-metrics.jsonl").read_text().splitlines()][1:]
    for key in ("time/step_s", "time/generate_s", "time/update_s"):
        print(f"zero3 {key} median of steps 2-6: {statistics.median(r[key] for r in rows):.2f}")
    mem = [int(x) for x in (out / "zero3-gpu-mem-mib.csv").read_text().split()]
    print(f"zero3 peak GPU memory used (nvidia-smi): {max(mem)} MiB")
except (OSError, KeyError, ValueError) as e:
    print("zero3 summary unavailable:", e)
for run in ("false", "true", "autocast"):  # printed only: at most 8 files come back from $OUT
    try:
        rows = [json.loads(line) for line in Path(f"outputs/gpu-static-{run}/metrics.jsonl").read_text().splitlines()]
        gaps = [(r["rollout_correction/logp_abs_diff_mean"], r["rollout_correction/logp_abs_diff_max"]) for r in rows]
        steps = [round(r["time/step_s"], 2) for r in rows]
        print(f"static_cache run {run}: engine vs trainer log-prob |diff| mean, max per step: {gaps}; step s {steps}")
    except (OSError, KeyError, ValueError) as e:
        print(f"static_cache run {run} summary unavailable:", e)
EOF
