"""The plain CUDA device code (csrc/cuda/*_kernels.cu) compiles with nvcc, for sm_80 and sm_90, without a GPU.

These files include no torch headers, so they are checked on any machine with the CUDA toolkit; their ATen bindings
(csrc/cuda/<op>.cpp) need a CUDA build of torch and are only compiled by setup.py on a CUDA machine. The flags are
the ones torch's CUDAExtension adds (no implicit half/bfloat16 conversions), so code that builds here builds there.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*_kernels.cu"))

try:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
except ImportError:  # pragma: no cover - torch is a dependency; this keeps the check usable without it
    COMMON_NVCC_FLAGS = [
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
    ]


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile(source: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA toolkit is needed to compile csrc/cuda/*_kernels.cu")
    cmd = [
        nvcc,
        "-c",
        "-std=c++17",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_80,code=sm_80",
        *COMMON_NVCC_FLAGS,
        "-Xptxas=--warn-on-spills",
        "-I",
        str(ROOT / "csrc"),
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{' '.join(cmd)}\n{result.stderr}"
    # Warnings in our own sources, and register spills (ptxas names the kernel, not the file), are bugs here too.
    warned = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    ours = [line for line in warned if str(ROOT / "csrc") in line or "spill" in line.lower()]
    assert not ours, f"nvcc warned on {source.name}:\n" + "\n".join(ours)
