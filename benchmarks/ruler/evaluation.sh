#!/usr/bin/env bash
# The two-model evaluation as run on the GPU machine (benchmarks/RESULTS.md), resumable:
#   1. sensitivity profiles of both models on calibration text (stdlib docstrings, no haystack family);
#   2. development sweeps (seed 0) that choose, and the reported sweeps (seed 1000) on four haystack
#      families x the five core tasks, query-agnostic;
#   3. the query-aware protocol for the configurations the development sweeps pick (pick.py);
#   4. the other lengths with the main budgets.
# Every (family, task) cell of a sweep is one process (--shard); WORKERS of them share the GPU.
#
#   SMOLLM2=DIR QWEN05=DIR bash benchmarks/ruler/evaluation.sh ROOT SECONDS [WORKERS]
#
# MODELS (default "smollm2 qwen05") runs a subset: two runs with different MODELS may share one ROOT
# at the same time (their sweeps are disjoint). STAGES (default "dev rep aware lengths") runs a subset
# of steps 2-4 (dev: the development sweeps; rep: the reported ones; aware; lengths), for a short GPU
# lease. The grid lists the budgets and scorers most asked about first: a shard cut at the deadline
# keeps whole scorers, in that order.
# Run it again with the same ROOT to continue; a finished shard leaves ROOT/done/<sweep>.<k>.
# SMOKE=1 shrinks everything (tiny lengths, 2 samples) to check the plumbing on a CPU.
set -uo pipefail
root=${1:?usage: evaluation.sh ROOT SECONDS [WORKERS]}; seconds=${2:-540}; workers=${3:-14}
end=$(( $(date +%s) + seconds ))
left() { local s=$(( end - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false END_EPOCH=$end PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
py=${PYTHON:-python3}
models=" ${MODELS:-smollm2 qwen05} "
for key in $models; do  # each model asked for needs its folder
  case $key in smollm2) : "${SMOLLM2:?SMOLLM2 must name the model folder}" ;; qwen05) : "${QWEN05:?QWEN05 must name the model folder}" ;;
    *) echo "unknown model in MODELS: $key" >&2; exit 2 ;; esac
done
stages=" ${STAGES:-dev rep aware lengths} "
for st in $stages; do case $st in dev|rep|aware|lengths) ;; *) echo "unknown stage in STAGES: $st" >&2; exit 2 ;; esac; done
stage() { [[ $stages == *" $1 "* ]]; }
wanted() { [[ $models == *" $1 "* ]]; }
model_dir() { if [ "$1" = smollm2 ]; then echo "$SMOLLM2"; else echo "$QWEN05"; fi; }

families=essays,novels,manuals,noise
tasks=niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery
scorers=knorm,snapkv,tova,expected_attention,expected_attention+pool25,streaming_llm
budgets=uniform,zigzag,sensitivity,zigzag+skip2,sensitivity+bound0.2,pyramid,adakv,zigzag_heads
main_budgets=uniform,zigzag,sensitivity,zigzag+skip2,sensitivity+bound0.2
cells=20  # families x tasks
# Batch per process: Qwen at 8k and batch 25 peaks near 16 GiB in its prefill, and 8 of them beside the
# SmolLM2 workers ran an 80 GB H100 out of memory; these keep 16 workers of both models under ~60 GiB.
batch_s=25; batch_q=8; batch_q1=16; batch_q2=4
dev_samples=8; rep_samples=25; cal=(--context-tokens 4096 --samples 16 --batch-size 8)
len_s=4096; len_s2=8192; len_q=8192; len_q1=4096; len_q2=16384
if [ "${SMOKE:-0}" = 1 ]; then
  dev_samples=2; rep_samples=2; cal=(--context-tokens 256 --copy-tokens 32 --cue-tokens 8 --samples 2 --batch-size 2)
  len_s=256; len_s2=320; len_q=256; len_q1=200; len_q2=384; scorers=knorm,tova; budgets=uniform,zigzag,sensitivity
  main_budgets=$budgets
fi
mkdir -p "$root"/{calibration,done,logs}

# 1. Calibration, both models at once, unless the repository holds their profiles.
for key in $models; do
  set -- "$key" "$(model_dir "$key")"
  [ -f "$root/calibration/$1.json" ] || [ ! -f "benchmarks/results/calibration/$1.json" ] || [ "${SMOKE:-0}" = 1 ] ||
    cp "benchmarks/results/calibration/$1.json" "$root/calibration/$1.json"
  [ -f "$root/calibration/$1.json" ] || timeout "$(left)" $py -m zigzag.calibrate sensitivity --model "$2" \
    --out "$root/calibration/$1.json" "${cal[@]}" > "$root/logs/calibrate-$1.log" 2>&1 &
done
wait

jobs_file=$(mktemp)
add_sweep() {  # add_sweep NAME MODEL_KEY LENGTH SEED SAMPLES RATIOS BUDGETS SCORERS PROTOCOL BATCH
  wanted "$2" || return 0
  local name=$1 key=$2 dir; dir=$(model_dir "$2")
  for ((k = 0; k < cells; k++)); do
    [ -f "$root/done/$name.$k" ] && continue
    echo "$name $k $py -m benchmarks.ruler --model $dir --calibration $root/calibration/$key.json --length $3 --seed $4" \
         "--samples $5 --ratios $6 --budgets $7 --scorers $8 --protocols $9 --batch-size ${10} --haystack $families" \
         "--tasks $tasks --no-plots --shard $k/$cells --out $root/$name" >> "$jobs_file"
  done
}
run_jobs() {  # every line: NAME K COMMAND...; WORKERS at a time, each cut at the deadline
  xargs -r -P "$workers" -L 1 bash -c 'name=$0 k=$1; shift 1; s=$(( END_EPOCH - $(date +%s) )); [ $s -gt 5 ] || exit 0
    timeout $s "$@" >> "'"$root"'/logs/$name.$k.log" 2>&1 && touch "'"$root"'/done/$name.$k"' < "$jobs_file"
  : > "$jobs_file"
}

# 2. Development sweeps, then the reported ones of the main lengths.
if stage dev; then
  add_sweep dev-smollm2-$len_s smollm2 $len_s 0 $dev_samples 0.75,0.5 $budgets $scorers agnostic $batch_s
  add_sweep dev-qwen05-$len_q qwen05 $len_q 0 $dev_samples 0.75,0.5 $budgets $scorers agnostic $batch_q
fi
if stage rep; then
  add_sweep rep-smollm2-$len_s smollm2 $len_s 1000 $rep_samples 0.75,0.5,0.875 $budgets $scorers agnostic $batch_s
  add_sweep rep-qwen05-$len_q qwen05 $len_q 1000 $rep_samples 0.75,0.5,0.875 $budgets $scorers agnostic $batch_q
fi
run_jobs

# 3. Query-aware: the overall pick and the best of each budget family, chosen on the development seed.
for m in "smollm2 $len_s" "qwen05 $len_q"; do
  set -- $m
  stage aware && wanted "$1" || continue
  dev=$root/dev-$1-$2
  for prefix in "" uniform zigzag sensitivity; do
    read -r scorer budget _ < <($py -m benchmarks.ruler.pick "$dev" ${prefix:+--budget-prefix $prefix} 2>/dev/null) || continue
    [ -n "${budget:-}" ] && add_sweep "rep-$1-$2-aware-${scorer}-${budget}" "$1" "$2" 1000 $rep_samples 0.5,0.75,0.875 \
      "$budget" "$scorer" aware "$([ "$1" = smollm2 ] && echo $batch_s || echo $batch_q)"
  done
done
sort -u -o "$jobs_file" "$jobs_file"
run_jobs

# 4. The other lengths, main budgets.
if stage lengths; then
  add_sweep rep-smollm2-$len_s2 smollm2 $len_s2 1000 $rep_samples 0.75,0.5 $main_budgets $scorers agnostic $batch_s
  add_sweep rep-qwen05-$len_q1 qwen05 $len_q1 1000 $rep_samples 0.75,0.5 $main_budgets $scorers agnostic $batch_q1
  add_sweep rep-qwen05-$len_q2 qwen05 $len_q2 1000 $rep_samples 0.75,0.5 $main_budgets $scorers agnostic $batch_q2
fi
run_jobs
rm -f "$jobs_file"

echo "evaluation stopped with $(left) s left; shards done: $(ls "$root/done" | wc -l)"
for d in "$root"/*/; do
  [ -n "$(ls "$d"samples.rank*.jsonl 2>/dev/null)" ] && echo "$(basename "$d"): $(cat "$d"samples.rank*.jsonl | wc -l) records"
done
