#!/usr/bin/env bash
# Development sweep of the retrieval design variants (ZigZag budgets, head-wise budgets, protected
# prefix/suffix, wider span pooling, head-shared selection, merge) against the baseline
# ExpectedAttention+pool5 with uniform and ZigZag budgets. DEVELOPMENT seed: never report these numbers.
#
#   bash benchmarks/ruler/dev_sweep.sh OUT [SECONDS]          # the H100 run: SmolLM2, 4096 tokens, 20 samples x 5 tasks
#   LENGTH=1024 SAMPLES=2 TASKS=niah_single_1 bash benchmarks/ruler/dev_sweep.sh /tmp/smoke   # CPU smoke test
#
# 34 compressed settings + the uncompressed baseline = 35 settings x 100 samples = 3500 records
# (one prefill per batch and group below, many compressions). Resumable: run it again with the same
# OUT and it continues. Prints the core5 table (or, with fewer tasks, the average) at the end.
set -uo pipefail
out=${1:-results/ruler-dev}; seconds=${2:-1800}
LENGTH=${LENGTH:-4096}; SAMPLES=${SAMPLES:-20}; SEED=${SEED:-11}; BATCH=${BATCH:-50}
TASKS=${TASKS:-niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery}
RATIOS=${RATIOS:-0.5,0.75}
common=(--length "$LENGTH" --samples "$SAMPLES" --batch-size "$BATCH" --seed "$SEED" --protocols agnostic
        --tasks "$TASKS" --ratios "$RATIOS" --no-plots --out "$out")
end=$((SECONDS + seconds))
run() { local left=$((end - SECONDS)); (( left > 0 )) && timeout "$left" python3 -m benchmarks.ruler "${common[@]}" "$@"; }

EA=expected_attention+pool5
WIDE=expected_attention+pool15+first64+last32
# A. budgets, baseline scorer: the baseline (uniform, zigzag) and the ZigZag variants.
#    skip2: layers 0-1 keep the average; cap2: no layer above 2x the average; gamma0.5: sqrt(LMBA);
#    zigzag_heads: Eq. 6 over layers x KV heads.
run --scorers "$EA" --budgets uniform,zigzag,zigzag+skip2,zigzag+cap2,zigzag+gamma0.5,zigzag_heads,zigzag_heads+skip2+cap2
# B. scorers, uniform budgets: wider span pooling, protected instruction prefix and recency, heads sharing
#    their tokens (max of rank-normalized scores)
run --scorers "expected_attention+pool9,expected_attention+pool15,expected_attention+pool25,$EA+first64+last32,$EA+sharedmax" --budgets uniform
# C. the combinations: wide pooling + protection, with uniform and the two best-guess ZigZag variants
run --scorers "$WIDE" --budgets uniform,zigzag+skip2+cap2,zigzag_heads+skip2+cap2
run --scorers "expected_attention+pool15+sharedmax+first64+last32" --budgets uniform
# D. merge-on-evict on top of the combination
run --scorers "$WIDE" --budgets uniform --merge cosine+mass

echo "dev sweep stopped after $SECONDS s (seed $SEED: development, do not report)"
task=core5
[[ "$TASKS" == *niah_single_1*niah_single_2*niah_multikey_1*niah_multivalue*niah_multiquery* ]] || task=avg
python3 -m benchmarks.ruler.report "$out" --table --task "$task" --no-plots
