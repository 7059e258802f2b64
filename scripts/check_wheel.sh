#!/usr/bin/env bash
# Builds the wheel and proves it installs and works in a fresh virtual environment: the compiled C++ kernels
# load and run. torch is installed into the venv first (here: the CPU build on disk), as a user would.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf dist
"$PY" -m build --wheel --no-isolation --outdir "$work/dist" >/dev/null
"$PY" -m venv "$work/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
torch_spec=$("$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
"$work/venv/bin/pip" install -q "$torch_spec"
"$work/venv/bin/pip" install -q "$work"/dist/*.whl
cd "$work"  # away from the checkout, so the installed package is what gets imported
MDUS_KERNEL_BACKEND=cpp "$work/venv/bin/python" -W error::RuntimeWarning - <<'PY'
import torch
import mdus_kernels as mk

x = torch.randn(10, 4, requires_grad=True)
offsets = torch.tensor([0, 3, 10])
out = mk.patch_pool(x, offsets, "max")
out.sum().backward()
assert torch.equal(out, torch.stack([x[:3].amax(0), x[3:].amax(0)])), "wrong result"
print("wheel OK:", mk.__file__, "torch", torch.__version__)
PY
