#!/usr/bin/env bash
# Third round (head-wise budgets, merge-on-evict, and the query-aware protocol for the best ZigZag variant), on the
# reported seed, for the configuration the development run picked (expected_attention+pool25):
#
#   bash benchmarks/ruler/followup_sweep.sh OUT [SECONDS]
#
# in order of priority, each part resumable (run again with the same OUT to continue):
# 1. head-wise budgets: adakv and zigzag_heads, four ratios;
# 2. merge-on-evict: cosine, with uniform and zigzag+skip2 budgets, four ratios;
# 3. the query-aware protocol for uniform and zigzag+skip2, four ratios.
# OUT may hold the earlier rounds' records (same seed): the report then sets them side by side.
set -uo pipefail
out=$1; seconds=${2:-540}
end=$((SECONDS + seconds))
core=niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery
common=(--length 4096 --samples 50 --batch-size 50 --seed 1000 --no-plots --out "$out" --tasks $core
        --scorers expected_attention+pool25 --ratios 0.25,0.5,0.75,0.875)
run() { local left=$((end - SECONDS)); (( left > 0 )) && timeout "$left" python3 -m benchmarks.ruler "${common[@]}" "$@"; }
run --protocols agnostic --budgets adakv,zigzag_heads
run --protocols agnostic --budgets uniform,zigzag+skip2 --merge cosine
run --protocols aware --budgets uniform,zigzag+skip2
echo "follow-up sweep stopped after $SECONDS s"
python3 -m benchmarks.ruler.report "$out" --table --task core5 --no-plots
