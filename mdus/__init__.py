"""mdus: the model layer for multimodal depth up-scaling (built on mdus_kernels)."""

__version__ = "0.1.0"
