#!/usr/bin/env bash
# Every training-free method on the GPU, as run for benchmarks/RESULTS.md ("The method zoo"):
#   1. prefill overhead at 32k tokens on the Llama-3.1-8B shape (random weights, bf16), uniform budgets;
#   2. the RULER-style sweep on a real model: four haystack families x the five core tasks, the
#      reported seed, query-agnostic, every scorer at ratio 0.75 with uniform budgets, and SnapKV with
#      the SimLayerKV budgets. Each (family, task) cell is one process, WORKERS at a time.
#
#   SMOLLM2=DIR bash benchmarks/methods.sh ROOT SECONDS [WORKERS]
#
# Results: ROOT/perf/perf.jsonl (+ perf.log, the table last) and ROOT/ruler-smollm2-<budget>/ (samples, then
# `python -m benchmarks.ruler.report FOLDER`). SMOKE=1: a CPU check.
set -uo pipefail
root=${1:?usage: methods.sh ROOT SECONDS [WORKERS]}; seconds=${2:-540}; workers=${3:-14}
end=$(( $(date +%s) + seconds ))
left() { local s=$(( end - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
py=${PYTHON:-python3}
: "${SMOLLM2:?SMOLLM2 must name the model folder}"
mkdir -p "$root"/{perf,logs,done}

scorers=snapkv,knorm,keydiff,lagkv,leverage,cur,observed_attention,h2o,tova,snapkv+critical,snapkv+chunk10,tova+critical,kvzip_plus
families=essays,novels,manuals,noise
tasks=niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery
perf=(--lengths 32768 --decode-steps 10); samples=10; length=4096; batch=10; perf_seconds=240
if [ "${SMOKE:-0}" = 1 ]; then
  perf=(--tiny --lengths 256 --decode-steps 2); samples=1; length=256; batch=1; perf_seconds=120; scorers=knorm,snapkv+critical
fi

# 1. Prefill overhead, alone on the GPU (its times are wall times).
[ -f "$root/done/perf" ] || { timeout $(( $(left) < perf_seconds ? $(left) : perf_seconds )) $py -m benchmarks.perf "${perf[@]}" \
  --sections overhead --scorers "$scorers,expected_attention" --budgets uniform --out "$root/perf" > "$root/perf/perf.log" 2>&1 &&
  touch "$root/done/perf"; }

# 2. The sweep: uniform budgets for every scorer, then SnapKV with SimLayerKV's.
jobs_file=$(mktemp)
for sweep in "uniform $scorers" "simlayerkv snapkv,streaming_llm"; do
  set -- $sweep
  for ((k = 0; k < 20; k++)); do
    [ -f "$root/done/$1.$k" ] && continue
    echo "$1 $k $py -m benchmarks.ruler --model $SMOLLM2 --length $length --seed 1000 --samples $samples --ratios 0.75" \
      "--budgets $1 --scorers $2 --protocols agnostic --batch-size $batch --haystack $families --tasks $tasks --no-plots" \
      "--shard $k/20 --out $root/ruler-smollm2-$1" >> "$jobs_file"
  done
done
END_EPOCH=$end xargs -r -P "$workers" -L 1 bash -c 'name=$0 k=$1; shift 1; s=$(( END_EPOCH - $(date +%s) )); [ $s -gt 5 ] || exit 0
  timeout $s "$@" >> "'"$root"'/logs/$name.$k.log" 2>&1 && touch "'"$root"'/done/$name.$k"' < "$jobs_file"
rm -f "$jobs_file"
echo "methods.sh stopped with $(left) s left; done: $(ls "$root/done" | wc -l) of 41"
for d in "$root"/ruler-*/; do echo "$d: $(cat "$d"samples.rank*.jsonl 2>/dev/null | wc -l) records"; done
tail -25 "$root/perf/perf.log"
