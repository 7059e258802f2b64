"""Continuous speech input: normalized log-mel frames that a speech LM's trainable ``ConvSubsampler`` turns into
input embeddings, the alternative to discrete units.

``LogMelFrontEnd`` has the tokenizer interface (``vocab_size``, ``frame_rate``, ``encode``, ``fit``, ``save``,
``load``) so that the training and evaluation code takes either kind, with two differences, flagged by
``continuous = True``:

* ``encode(wave)`` returns float features (frames, n_mels), not ids;
* the speech positions of a sequence are ``n_positions(features) = ceil(frames / stride)`` copies of one
  placeholder id (``vocab_size == 1``); the model replaces their embeddings with the subsampler's outputs.

Features are standardized per mel bin with the mean and standard deviation of the training split (``fit``), so
the subsampler starts from unit-scale inputs whatever the recording level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mdus.speech._common import TENSORS_NAME, check_sample_rate, check_wave, naming, read_config, write_config
from mdus.speech.logmel import LogMel


class LogMelFrontEnd:
    """Audio -> standardized log-mel frames (frames, n_mels) for a model with a ``ConvSubsampler`` of ``stride``.

    Example:
        >>> fe = LogMelFrontEnd(stride=4).fit([torch.randn(16000)])
        >>> feats = fe.encode(torch.randn(8000))
        >>> feats.shape, fe.n_positions(feats), fe.frame_rate
        (torch.Size([48, 80]), 12, 25.0)
    """

    kind = "logmel_features"
    continuous = True

    def __init__(self, stride: int = 4, *, features: LogMel | None = None):
        if int(stride) < 2 or int(stride) % 2:
            raise ValueError(f"stride must be an even integer >= 2 (4 gives 25 Hz, 8 gives 12.5 Hz), got {stride}")
        self.stride = int(stride)
        self.features = LogMel() if features is None else features
        if not isinstance(self.features, LogMel):
            raise TypeError(f"features must be a LogMel, got {type(self.features).__name__}")
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return 1  # the placeholder id of a speech position

    @property
    def n_mels(self) -> int:
        return self.features.dim

    @property
    def frame_rate(self) -> float:
        """Speech positions per second (after the model's subsampling)."""
        return self.features.frame_rate / self.stride

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def n_positions(self, features: torch.Tensor) -> int:
        """Speech positions of an utterance: ``ceil(frames / stride)``, what ``ConvSubsampler`` outputs."""
        return math.ceil(features.shape[0] / self.stride)

    def fit(self, data: Iterable) -> LogMelFrontEnd:
        """Per-bin mean and standard deviation of the log-mel frames of ``data`` (an iterable of waves)."""
        total, total_sq, count = None, None, 0
        for i, wave in enumerate(data):
            with naming(f"data[{i}]"):
                frames = self.features(check_wave(wave, f"data[{i}]", batched=False)).double()
            total = frames.sum(0) if total is None else total + frames.sum(0)
            total_sq = frames.square().sum(0) if total_sq is None else total_sq + frames.square().sum(0)
            count += frames.shape[0]
        if count < 2:
            raise ValueError("fit needs at least two frames of audio (data is empty or too short)")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp(min=0)
        self.mean, self.std = mean.float(), var.sqrt().clamp(min=1e-5).float()
        return self

    def encode(self, wave, sample_rate: int | None = None) -> torch.Tensor:
        """(T,) float samples at the front end's rate -> (frames, n_mels) float32 standardized features."""
        if not self.is_fitted:
            raise RuntimeError("LogMelFrontEnd.encode before fit(): the normalization statistics are unknown")
        check_sample_rate(sample_rate, self.features.sample_rate)
        frames = self.features(check_wave(wave, batched=False)).float()
        if frames.shape[0] == 0:
            raise ValueError("wave is shorter than one analysis window: it has no log-mel frame")
        return (frames - self.mean.to(frames.device)) / self.std.to(frames.device)

    def config(self) -> dict:
        return {"kind": self.kind, "stride": self.stride, "features": self.features.config()}

    def save(self, path) -> Path:
        """``tokenizer.json`` (configuration) and ``tokenizer.safetensors`` (the normalization statistics)."""
        if not self.is_fitted:
            raise RuntimeError("nothing to save: fit() the front end first")
        path = write_config(path, self.config())
        save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous()}, str(path / TENSORS_NAME))
        return path

    @classmethod
    def load(cls, path, device=None) -> LogMelFrontEnd:
        config = read_config(path, cls.kind)
        mel = dict(config["features"])
        if mel.pop("type", "logmel") != "logmel":
            raise ValueError(f"{path}: a {cls.kind} front end needs log-mel features")
        fe = cls(config["stride"], features=LogMel(**mel))
        tensors = load_file(str(Path(path) / TENSORS_NAME))
        if tuple(tensors["mean"].shape) != (fe.n_mels,) or tuple(tensors["std"].shape) != (fe.n_mels,):
            raise ValueError(f"{path}: normalization statistics do not have ({fe.n_mels},) entries")
        fe.mean, fe.std = tensors["mean"], tensors["std"]
        return fe

    def __repr__(self) -> str:
        return f"LogMelFrontEnd(stride={self.stride}, n_mels={self.n_mels}, fitted={self.is_fitted})"
