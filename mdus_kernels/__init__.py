"""mdus_kernels: fused kernels for multimodal depth up-scaling, as torch ops that work under torch.compile.

Backends per call: Triton on CUDA tensors (or CUDA C++ where faster), C++ on CPU tensors, the PyTorch reference
as the last resort; ``MDUS_KERNEL_BACKEND`` forces one (see ``mdus_kernels._backend``).
"""

from mdus_kernels import _backend

# Load the C++/CUDA kernels before the Python ops register into the same `mdus` namespace. Never raises.
_backend.load_extension()

from mdus_kernels.ops.attention import attention  # noqa: E402
from mdus_kernels.ops.cgmlp import cgmlp_gate, depthwise_conv1d  # noqa: E402
from mdus_kernels.ops.linear_cross_entropy import linear_cross_entropy, linear_kl_div  # noqa: E402
from mdus_kernels.ops.patch_pool import (  # noqa: E402
    boundary_patch_offsets,
    patch_pool,
    patch_unpool,
    static_patch_offsets,
)

__all__ = [
    "attention",
    "boundary_patch_offsets",
    "cgmlp_gate",
    "depthwise_conv1d",
    "linear_cross_entropy",
    "linear_kl_div",
    "patch_pool",
    "patch_unpool",
    "static_patch_offsets",
]
__version__ = "0.1.0"
