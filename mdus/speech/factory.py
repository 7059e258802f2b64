"""One entry point for every discrete speech tokenizer: ``build_tokenizer(kind, **cfg)`` and ``load_tokenizer``.

Kinds (aliases in brackets):

* ``"logmel_kmeans"`` [``"kmeans"``, ``"logmel"``]: ``KMeansTokenizer`` over ``LogMel``; ``cfg`` takes the
  tokenizer's options (``n_units``, ``frame_rate``, ``pooling``, ``normalize``, ``dedup``, ``seed``, ...) and
  ``LogMel``'s (``n_mels``, ``sample_rate``, ``frame_length_ms``, ...);
* ``"ssl_kmeans"`` [``"ssl"``, ``"hubert"``]: ``KMeansTokenizer`` over ``SSLFeatures``; ``cfg`` needs
  ``model_name_or_path`` and takes ``layer``, ``normalize_wave``, ``device``, ``dtype`` besides the tokenizer's;
* ``"units"`` [``"unit_files"``]: ``UnitFileTokenizer`` (``vocab_size``, ``frame_rate``, ``field``, ``root``).

The k-means kinds must be ``fit`` before they encode.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from mdus.speech._common import read_config
from mdus.speech.ctc import CTCPosteriorFrontEnd
from mdus.speech.features import LogMelFrontEnd
from mdus.speech.kmeans_tokenizer import KMeansTokenizer
from mdus.speech.logmel import LogMel
from mdus.speech.unit_files import UnitFileTokenizer

KINDS = {"logmel_kmeans": "logmel_kmeans", "kmeans": "logmel_kmeans", "logmel": "logmel_kmeans",
         "ssl_kmeans": "ssl_kmeans", "ssl": "ssl_kmeans", "hubert": "ssl_kmeans",
         "units": "units", "unit_files": "units",
         "logmel_features": "logmel_features", "features": "logmel_features", "continuous": "logmel_features"}
_SAVED = {KMeansTokenizer.kind: KMeansTokenizer, UnitFileTokenizer.kind: UnitFileTokenizer,
          LogMelFrontEnd.kind: LogMelFrontEnd, CTCPosteriorFrontEnd.kind: CTCPosteriorFrontEnd}
_SSL_KEYS = ("model_name_or_path", "layer", "normalize_wave", "sample_rate", "device", "dtype")


@runtime_checkable
class SpeechTokenizer(Protocol):
    """What a speech LM needs from a discrete tokenizer: ids in ``0..vocab_size - 1`` (placed above the text
    vocabulary by the model), their nominal rate, and a way to store and restore the tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    def encode(self, wave) -> torch.Tensor: ...

    def save(self, path): ...

    @classmethod
    def load(cls, path, device=None): ...


def _split(cfg: dict, keys) -> tuple[dict, dict]:
    inside = {k: v for k, v in cfg.items() if k in keys}
    return inside, {k: v for k, v in cfg.items() if k not in keys}


def build_tokenizer(kind: str, **cfg) -> SpeechTokenizer:
    """A new (unfitted, for k-means kinds) tokenizer of ``kind`` with options ``cfg``; see the module docstring.

    Example:
        >>> tok = build_tokenizer("logmel_kmeans", n_units=100, frame_rate=12.5, n_mels=40)
        >>> tok.vocab_size, tok.frame_rate, tok.features.dim
        (100, 12.5, 40)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    kind = KINDS[kind]
    if kind == "units":
        return UnitFileTokenizer(**cfg)
    if kind in ("logmel_kmeans", "logmel_features"):
        mel_cfg, rest = _split(cfg, inspect.signature(LogMel).parameters)
        cls = KMeansTokenizer if kind == "logmel_kmeans" else LogMelFrontEnd
        return cls(features=LogMel(**mel_cfg), **rest)
    from mdus.speech.ssl import SSLFeatures

    ssl_cfg, rest = _split(cfg, _SSL_KEYS)
    if "model_name_or_path" not in ssl_cfg:
        raise ValueError("kind='ssl_kmeans' needs model_name_or_path (a hub id, a local directory or a model)")
    return KMeansTokenizer(features=SSLFeatures(**ssl_cfg), **rest)


def load_tokenizer(path, device=None) -> SpeechTokenizer:
    """Any tokenizer written by ``save(path)``, of whichever kind its ``tokenizer.json`` says."""
    kind = read_config(path).get("kind")
    if kind not in _SAVED:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(_SAVED)})")
    return _SAVED[kind].load(path, device=device)
