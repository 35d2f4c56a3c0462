#!/usr/bin/env bash
# The reported RULER sweep as run on the GPU machine (benchmarks/RESULTS.md). Resumable: run it again
# with the same folder and it continues where it stopped.   bash benchmarks/ruler/device_sweep.sh OUT SECONDS
set -uo pipefail
out=${1:-results/ruler-4k}; seconds=${2:-540}
common=(--length 4096 --samples 50 --batch-size 50 --seed 1000 --protocols agnostic,aware --no-plots --out "$out"
        --tasks niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery)
end=$((SECONDS + seconds))
# 1. the main grid: five scorers x three budgets x four ratios (plus the uncompressed baseline)
timeout $((end - SECONDS)) python3 -m benchmarks.ruler "${common[@]}" \
  --scorers knorm,snapkv,expected_attention,tova,streaming_llm --budgets uniform,pyramid,zigzag --ratios 0.25,0.5,0.75,0.875
# 2. the span-pooling ablation
timeout $((end - SECONDS)) python3 -m benchmarks.ruler "${common[@]}" \
  --scorers tova+pool5,expected_attention+pool5 --budgets uniform,zigzag --ratios 0.5,0.75
echo "sweep stopped after $SECONDS s"
