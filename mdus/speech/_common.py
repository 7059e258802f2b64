"""Pieces every speech tokenizer shares: the audio argument check, repeat removal and the on-disk layout.

A saved tokenizer is a directory holding ``tokenizer.json`` (its kind and configuration, readable by a person) and,
for tokenizers with learnt tensors, ``tokenizer.safetensors``. ``mdus.speech.load_tokenizer`` reads the kind from
the JSON and hands the directory to the right class.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

CONFIG_NAME = "tokenizer.json"
TENSORS_NAME = "tokenizer.safetensors"
FORMAT_VERSION = 1


def check_wave(wave, name: str = "wave", *, batched: bool = True) -> torch.Tensor:
    """``wave`` as a floating-point tensor of shape (T,) or, when ``batched``, (B, T); raises naming ``name``.

    numpy arrays are accepted (soundfile and friends return them) and wrapped without a copy. Integer PCM is
    refused rather than silently scaled: whether int16 audio should become [-1, 1) or keep its int16 range
    changes every log-mel value by a constant, and only the caller knows which convention its models expect.
    """
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(wave)
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of samples, got {type(wave).__name__}")
    if not wave.dtype.is_floating_point:
        raise ValueError(f"{name} must hold floating-point samples, got dtype {str(wave.dtype).removeprefix('torch.')}"
                         f" (convert int16 PCM with `{name}.float() / 32768` or keep its range with `{name}.float()`)")
    shapes = "(T,) or (B, T)" if batched else "(T,)"
    if wave.dim() not in ((1, 2) if batched else (1,)):
        raise ValueError(f"{name} must have shape {shapes}, got shape {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(wave.shape)}): there is no audio to process")
    # NaN/inf would flow through the FFT and the distance computations and come out as arbitrary unit ids.
    if not bool(torch.isfinite(wave).all()):
        raise ValueError(f"{name} contains NaN or infinite samples")
    return wave


@contextmanager
def naming(name: str):
    """Prefixes a ValueError raised inside with ``name``: which item of a list a feature extractor's complaint
    (a wave too short for one frame, ...) is about."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def check_sample_rate(sample_rate, expected: int, name: str = "sample_rate") -> None:
    """Refuse audio at a rate the tokenizer was not built for: nothing here resamples."""
    if sample_rate is not None and int(sample_rate) != int(expected):
        raise ValueError(f"{name}={sample_rate} but this tokenizer expects {expected} Hz audio; resample it first")


def dedup(units: torch.Tensor, return_counts: bool = False):
    """Remove consecutive repeats: ``[3, 3, 7, 7, 7, 3] -> [3, 7, 3]`` (with ``return_counts``, also ``[2, 3, 1]``,
    the run lengths, from which the durations can be rebuilt).

    Example:
        >>> dedup(torch.tensor([3, 3, 7, 7, 7, 3]))
        tensor([3, 7, 3])
    """
    if not isinstance(units, torch.Tensor) or units.dim() != 1:
        raise ValueError(f"units must be a 1-D tensor, got {getattr(units, 'shape', type(units).__name__)}")
    out, counts = torch.unique_consecutive(units, return_counts=True)
    return (out, counts) if return_counts else out


def write_config(path, config: dict) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, **config}, indent=2) + "\n")
    return path


def portable_path(target, folder) -> str:
    """``target`` relative to ``folder`` when it lies inside it (so a saved tokenizer can move with what it refers
    to), else absolute."""
    target, folder = Path(target).resolve(), Path(folder).resolve()
    return str(target.relative_to(folder) if target.is_relative_to(folder) else target)


def read_config(path, kind: str | None = None) -> dict:
    """The JSON configuration of a saved tokenizer directory, checked to be of ``kind`` when given."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: `path` must be a directory written by a tokenizer's save()")
    config = json.loads(file.read_text())
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file} was written by a newer mdus (format {config['format_version']} > {FORMAT_VERSION})")
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{file} holds a {config.get('kind')!r} tokenizer, not {kind!r}")
    return config
