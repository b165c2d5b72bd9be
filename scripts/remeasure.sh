#!/usr/bin/env bash
# Re-measure the CPU figures of docs/benchmarks.md and docs/experiments.md at the current commit, on a
# quiet machine (nothing else running; take the heavy lock where machines are shared):
#   flock /work/.heavy.lock bash scripts/remeasure.sh [--tiny] [--out DIR] [STEP ...]
# Steps (default: benchmark phase_switch bench_7b curves; about 20 + 5 + 6 + 20 minutes on 2 cores):
#   benchmark     launch/benchmark.py side by side (LIFT / full / LoRA / BAdam / plain loop) -> DIR/benchmark.json, benchmark.png
#   phase_switch  launch/bench_phase_switch.py (reset vs offload, ZeRO-2/3, FSDP2) -> DIR/bench_switch.json
#   bench_7b      launch/bench_7b.py (LLaMA-2-7B shapes, ZeRO-3, 2 ranks, ~21 GiB of RAM) -> DIR/bench_7b.json
#   curves        validation curves of LIFT / FT-Full / LoRA through launch/train.py -> DIR/experiments/curves.png, curves.json
#   test_time     the whole suite once (pytest), its count and duration -> appended to DIR/runs/test_times.json (not a default step)
# Every data file records machine, date and commit (lift_ds/provenance.py); commit the tree first, or
# the record says "dirty". DIR defaults to docs/. --tiny runs every step with tiny shapes and a few
# steps into a scratch DIR (a check of this script: it measures nothing, and refuses to write docs/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
tiny=0
out=docs
steps=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --out) out=$2; shift ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) steps+=("$1") ;;
  esac
  shift
done
[ ${#steps[@]} -eq 0 ] && steps=(benchmark phase_switch bench_7b curves)
for s in "${steps[@]}"; do
  case "$s" in benchmark|phase_switch|bench_7b|curves|test_time) ;; *) echo "error: unknown step $s (allowed: benchmark phase_switch bench_7b curves test_time)" >&2; exit 2 ;; esac
done
if [ "$tiny" = 1 ] && [ "$(realpath -m "$out")" = "$(realpath -m docs)" ]; then
  echo "error: --tiny measures nothing: give it a scratch --out DIR, not docs/" >&2; exit 2
fi
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "warning: the tree has uncommitted changes: the data files will record commit $(git rev-parse --short HEAD) as dirty" >&2
fi
work=outputs/remeasure
[ "$tiny" = 1 ] && work=$out/work
mkdir -p "$out" "$work"
run=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)
if [ "$tiny" = 1 ]; then  # a tiny LLaMA with its own tokenizer, and sentiment data: the same code paths in seconds
  PYTHONPATH=tests "$PY" -c "from helpers import make_model_dir, write_sentiment; make_model_dir('$work/model', layers=4); write_sentiment('$work/train.jsonl', 64); write_sentiment('$work/held.jsonl', 16, seed=1)"
  model=(--model "$work/model")
fi

benchmark() {
  local methods=lift-zero2,lift-zero3,lift-fsdp,full-zero2,full-zero3,lora-zero2,plain-fixed,lift-torch-fixed,badam-fixed,lift-bf16-fixed,badam-switch,lift-bf16-switch
  local extra=(--steps 30)
  [ "$tiny" = 1 ] && extra=(--steps 4 --seq_len 16 "${model[@]}" --methods lift-zero2,full-zero2,lift-torch-fixed,plain-fixed) || extra+=(--methods "$methods")
  "$PY" launch/benchmark.py "${extra[@]}" --out "$out/benchmark.json" | tee "$work/benchmark.txt"
  "$PY" launch/plot_benchmark.py "$out/benchmark.json" --out "$out/benchmark.png"
}
phase_switch() {
  local extra=()
  [ "$tiny" = 1 ] && extra=(--hidden 64 --layers 2 --vocab 256 --batch 2 --seq 16 --steps 4)
  "${run[@]}" launch/bench_phase_switch.py "${extra[@]}" --out "$out/bench_switch.json" | tee "$work/phase_switch.txt"
}
bench_7b() {
  local extra=()
  [ "$tiny" = 1 ] && extra=(--tiny)
  "$PY" launch/bench_7b.py "${extra[@]}" --out "$out/bench_7b.json" | tee "$work/bench_7b.txt"
}
curves() {
  local extra=(--max_steps 60 --eval_every 10 --eval_limit 100 --seq_len 64 --micro_batch_size 4)
  [ "$tiny" = 1 ] && extra=(--max_steps 4 --eval_every 2 --eval_limit 8 --seq_len 32 --micro_batch_size 2 "${model[@]}" --data "$work/train.jsonl"
                           --eval_data "$work/held.jsonl" --format classification)
  for which in "--method lift" "--baseline full" "--baseline lora"; do
    local m=${which#* }
    rm -rf "$work/curves_$m"  # the launcher appends to metrics.jsonl: a run starts in a clean directory
    "${run[@]}" launch/train.py --ds_config ds_configs/quickstart_cpu.json $which "${extra[@]}" --no_final_model --no_checkpoint \
      --output_dir "$work/curves_$m"
  done
  "$PY" -m lift_ds.analysis curves --run LIFT="$work/curves_lift/metrics.jsonl" --run FT-Full="$work/curves_full/metrics.jsonl" \
    --run LoRA="$work/curves_lora/metrics.jsonl" --title "SmolLM2-135M, movie-review sentiment, validation loss" --out "$out/experiments/curves.png"
}
test_time() {
  mkdir -p "$out/runs"
  local t0=$SECONDS
  set +e
  "$PY" -m pytest -q -p no:cacheprovider --junitxml "$work/tests.xml" "$@" > "$work/tests.log" 2>&1
  local code=$?
  set -e
  "$PY" - "$work/tests.xml" "$out/runs/test_times.json" "$code" "$(( SECONDS - t0 ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
from lift_ds.provenance import provenance, write_json
xml, path, code, wall = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
suite = ET.parse(xml).getroot().find("testsuite")
entry = {**{k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}, "pytest_seconds": float(suite.get("time")),
         "wall_seconds": wall, "exit": code, "provenance": provenance(command=["python", "-m", "pytest", "-q"])}
data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
data["runs"].append(entry)
write_json(path, data)
print(f"{entry['tests']} tests, {entry['pytest_seconds'] / 60:.1f} min of pytest, exit {code}: appended to {path}")
EOF
}

for s in "${steps[@]}"; do
  echo "=== $s $(date -u +%H:%M:%S)"
  "$s"
done
echo "=== done $(date -u +%H:%M:%S): data files in $out/ (commit them with the figures they change in docs/)"
