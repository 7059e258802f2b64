"""Test set-up shared by every op's tests.

Without a GPU, the Triton kernels run under Triton's CPU interpreter. It must be switched on before the kernel
modules are imported, so this happens here, before anything imports mdus_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mdus_kernels  # noqa: E402, F401  (registers the ops with the interpreter setting above)
from mdus_kernels import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str, native_op: str) -> list[str]:
    """Every backend that can run ``native_op``'s op on ``device`` here (the reference included)."""
    out = []
    for backend in ("reference", "cpp", "cuda", "triton"):
        if _backend._available(backend, native_op, torch.device(device)) is None:
            out.append(backend)
    return out


@pytest.fixture
def use_backend(monkeypatch):
    """``use_backend("cpp")`` forces that backend for the rest of the test."""

    def _use(name: str) -> None:
        monkeypatch.setenv("MDUS_KERNEL_BACKEND", name)

    return _use
