"""mdus: the model layer for multimodal depth up-scaling (built on mdus_kernels).

Importing it registers ``attn_implementation="mdus"`` with transformers (see ``mdus.attention``).
"""

from mdus import attention as _attention

_attention.register()

from mdus.upscale import (  # noqa: E402
    SpeechLM,
    count_trainable,
    describe,
    full_finetune,
    insertion_positions,
    load,
    lora,
    upscale,
)

__all__ = ["SpeechLM", "count_trainable", "describe", "full_finetune", "insertion_positions", "load", "lora",
           "upscale"]

__version__ = "0.1.0"
