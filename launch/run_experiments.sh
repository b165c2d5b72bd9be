#!/usr/bin/env bash
# The real runs behind docs/benchmarks.md and docs/experiments.md, one after the other (2 CPU cores, 24 GiB).
# Each step writes under outputs/experiments/ and can be run alone:  bash launch/run_experiments.sh minilm_contribution
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=outputs/experiments
mkdir -p "$OUT"
MINILM=$(python -c "from lift_ds import assets; print(assets.minilm_l6())")

benchmark() {
  OMP_NUM_THREADS=1 python launch/benchmark.py --steps 30 \
    --methods lift-zero2,lift-zero3,lift-fsdp,full-zero2,full-zero3,lora-zero2,plain-fixed,lift-torch-fixed,badam-fixed,lift-bf16-fixed,badam-switch,lift-bf16-switch \
    --out docs/benchmark.json | tee "$OUT/benchmark.txt"
  python launch/plot_benchmark.py docs/benchmark.json --out docs/benchmark.png
}
bench_7b() { python launch/bench_7b.py --out docs/bench_7b.json | tee "$OUT/bench_7b.txt"; }
minilm_contribution() {
  python -m lift_ds.analysis contribution --model "$MINILM" --classifier_head --task sentiment --task trec --sublayers \
    --steps 40 --micro_batch 16 --lr 3e-4 --seq_len 64 --eval_limit 150 --out "$OUT/minilm_contribution" | tee "$OUT/minilm_contribution.txt"
}
minilm_ablation() {
  python -m lift_ds.analysis ablation --model "$MINILM" --classifier_head --task sentiment --task trec \
    --steps 120 --micro_batch 16 --lr 3e-4 --seq_len 64 --seeds 0,1 --eval_limit 150 --out "$OUT/minilm_ablation" | tee "$OUT/minilm_ablation.txt"
}
curves() {
  for m in lift full lora; do
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launch/train.py --ds_config ds_configs/quickstart_cpu.json --method $m \
      --max_steps 60 --eval_every 10 --eval_limit 100 --seq_len 64 --micro_batch_size 4 --no_final_model --output_dir "$OUT/curves_$m" --overwrite_output_dir
  done
  python -m lift_ds.analysis curves --run LIFT="$OUT/curves_lift/metrics.jsonl" --run FT-Full="$OUT/curves_full/metrics.jsonl" \
    --run LoRA="$OUT/curves_lora/metrics.jsonl" --title "SmolLM2-135M, movie-review sentiment, validation loss" --out docs/experiments/curves.png
}
smollm_ablation() {
  python -m lift_ds.analysis ablation --task sentiment --task bigbench:strategyqa --steps 30 --micro_batch 8 --lr 1e-4 --seq_len 64 \
    --eval_limit 100 --out "$OUT/smollm_ablation" | tee "$OUT/smollm_ablation.txt"
}
smollm_contribution() {
  # the embedding and every third layer (11 of the 31 candidates), to fit the budget
  python -m lift_ds.analysis contribution --task sentiment --task bigbench:strategyqa --steps 12 --micro_batch 8 --lr 1e-4 --seq_len 64 \
    --eval_limit 100 --window 3 --only embedding,$(seq -s, -f "model.layers.%g" 0 3 29) \
    --out "$OUT/smollm_contribution" | tee "$OUT/smollm_contribution.txt"
}
compare() {
  # methods x learning rates x tasks x 3 seeds through launch/train.py; the rate is chosen on a validation
  # split with seed 0, seeds 1-2 run at it; a stopped study continues where it was (finished runs are read back)
  python -m lift_ds.analysis compare --task sentiment --task trec --task bigbench:strategyqa \
    --methods lift,lift-random,full,lora,badam,lisa --lrs lift=1e-4,3e-4 --lrs lift-random=1e-4,3e-4 --lrs badam=1e-4,3e-4 \
    --lrs lisa=1e-4,3e-4 --lrs full=1e-5,3e-5 --lrs lora=3e-4,1e-3 --seeds 0,1,2 --steps 60 --switch_every 2 --eval_every 20 \
    --val_items 100 --test_limit 200 --lm_eval --out "$OUT/compare" | tee "$OUT/compare.txt"
  mkdir -p docs/compare && cp "$OUT"/compare/compare.{json,csv,md} "$OUT"/compare/curves_*.png docs/compare/
}

phase_switch() { OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launch/bench_phase_switch.py --out docs/bench_switch.json | tee "$OUT/phase_switch.txt"; }
quickstart() { bash launch/quickstart.sh 2>&1 | tail -5 | tee "$OUT/quickstart.txt"; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(benchmark bench_7b minilm_contribution minilm_ablation curves smollm_ablation smollm_contribution phase_switch quickstart)
for s in "${steps[@]}"; do
  echo "=== $s $(date -u +%H:%M:%S)"
  "$s"
done
echo "=== done $(date -u +%H:%M:%S)"
