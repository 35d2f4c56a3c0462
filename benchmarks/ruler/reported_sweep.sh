#!/usr/bin/env bash
# The reported sweep of the design variants (second round), chosen on the development run only.
#
#   bash benchmarks/ruler/reported_sweep.sh DEV_DIR OUT [SECONDS]
#
# 1. picks, from DEV_DIR (benchmarks/ruler/dev_sweep.sh, seed 11), the best agnostic core5 setting
#    overall and the best with ZigZag-family budgets (mean of ratios 0.5 and 0.75);
# 2. runs both on the reported seed 1000 (50 samples per task): the five core tasks at ratios 0.25,
#    0.5, 0.75 and 0.875, then the other seven tasks at 0.5 and 0.75 with the uncompressed baseline.
# OUT may already hold the first sweep's records (same seed): they are reused, not recomputed.
set -uo pipefail
dev=$1; out=$2; seconds=${3:-1800}
end=$((SECONDS + seconds))
read -r best_s best_b best_m best_dev < <(python3 -m benchmarks.ruler.pick "$dev")
read -r zz_s zz_b zz_m zz_dev < <(python3 -m benchmarks.ruler.pick "$dev" --budget-prefix zigzag)
echo "picked on dev (seed 11): best $best_s / $best_b / merge $best_m ($best_dev); best zigzag $zz_s / $zz_b / merge $zz_m ($zz_dev)"
common=(--length 4096 --samples 50 --batch-size 50 --seed 1000 --protocols agnostic --no-plots --out "$out")
core=niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery
rest=niah_single_3,niah_multikey_2,niah_multikey_3,vt,cwe,fwe,qa_1
run() { local left=$((end - SECONDS)); (( left > 0 )) && timeout "$left" python3 -m benchmarks.ruler "${common[@]}" "$@"; }
run --tasks $core --scorers "$best_s" --budgets "$best_b" --merge "$best_m" --ratios 0.25,0.5,0.75,0.875
run --tasks $core --scorers "$zz_s" --budgets "$zz_b" --merge "$zz_m" --ratios 0.25,0.5,0.75,0.875
run --tasks $rest --scorers "$best_s" --budgets "$best_b" --merge "$best_m" --ratios 0.5,0.75
run --tasks $rest --scorers "$zz_s" --budgets "$zz_b" --merge "$zz_m" --ratios 0.5,0.75
run --tasks $rest --scorers expected_attention+pool5 --budgets uniform,zigzag --ratios 0.5,0.75
echo "reported sweep stopped after $SECONDS s"
python3 -m benchmarks.ruler.report "$out" --table --task core5 --no-plots
