"""mdus: the model layer for multimodal depth up-scaling (built on mdus_kernels).

Importing it registers ``attn_implementation="mdus"`` with transformers (see ``mdus.attention``).
"""

from mdus import attention as _attention

_attention.register()

__version__ = "0.1.0"
