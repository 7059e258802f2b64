"""Discrete speech units by k-means over frame features: log-mel (the default), an SSL model's hidden layer, or a CTC
speech encoder's (``mdus.speech.ctc``).

The path from audio to units, in ``encode`` and identically in ``fit``:

1. features at the extractor's native rate (100 Hz log-mel, 50 Hz HuBERT/wav2vec 2.0 and the CTC encoder), shape
   (frames, dim);
2. ``normalize="utterance"``: each dim centred and scaled by the utterance's own statistics (CMVN, which removes
   the channel and loudness of a recording), before pooling, where the frame count is largest;
3. pooling ``factor = native_rate / frame_rate`` frames into one: ``"stack"`` concatenates them (dim x factor; the
   default for log-mel, whose 10 ms frames carry no context, so averaging would blur the transitions that tell
   phones apart) or ``"mean"`` averages them (the default for SSL features, which already see the whole
   utterance). The last group is completed by repeating the last frame, so every frame of audio is covered:
   ``ceil(frames / factor)`` vectors;
4. ``normalize="global"`` (default): each pooled dim standardized with the mean/std of the training split,
   stored with the tokenizer, so that no dim dominates the Euclidean distance just by its scale;
5. the nearest of the K centroids; with ``dedup``, consecutive repeats removed (HuBERT-unit practice: the units
   then carry no duration, and sequences are ~2x shorter).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mdus.speech._common import (
    TENSORS_NAME,
    check_sample_rate,
    check_wave,
    dedup,
    naming,
    portable_path,
    read_config,
    write_config,
)
from mdus.speech.kmeans import KMeans
from mdus.speech.logmel import LogMel

POOLINGS = ("stack", "mean")
NORMALIZATIONS = ("global", "utterance", "none")


def pool_frames(features: torch.Tensor, factor: int, mode: str = "stack") -> torch.Tensor:
    """(F, D) -> (ceil(F / factor), D * factor) for ``"stack"`` or (ceil(F / factor), D) for ``"mean"``.

    Example:
        >>> pool_frames(torch.zeros(10, 80), 4).shape, pool_frames(torch.zeros(10, 80), 4, "mean").shape
        (torch.Size([3, 320]), torch.Size([3, 80]))
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")
    if factor == 1:
        return features
    n, d = features.shape
    groups = -(-n // factor)
    pad = groups * factor - n
    if pad:
        # Repeat the last frame rather than pad with zeros: zeros are a loud, flat spectrum in the log domain.
        features = torch.cat([features, features[-1:].expand(pad, d)])
    grouped = features.reshape(groups, factor, d)
    return grouped.reshape(groups, factor * d) if mode == "stack" else grouped.mean(dim=1)


def _std_floor(std: torch.Tensor) -> torch.Tensor:
    # A dim that never varied in the data (a mel bin stuck at the energy floor) would otherwise be divided by ~0 and
    # make any later deviation dominate every distance.
    return std.clamp_min(max(1e-3 * float(std.mean()), 1e-8))


def features_from_config(config: dict, device=None, root=None):
    """Rebuild a feature extractor from its ``config()`` (what a saved tokenizer stores); a relative CTC encoder
    path is taken from ``root``, the tokenizer's folder."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind == "logmel":
        return LogMel(**config)
    if kind == "ssl":
        from mdus.speech.ssl import SSLFeatures

        return SSLFeatures(**config, device=device)
    if kind == "ctc":
        from mdus.speech.ctc import CTCEncoder

        return CTCEncoder.load(Path(root or ".") / config["path"], device=device)
    raise ValueError(f"unknown feature extractor type {kind!r} (expected 'logmel', 'ssl' or 'ctc')")


class KMeansTokenizer:
    """Audio -> unit ids in ``0..n_units - 1`` by k-means over ``features`` (a ``LogMel`` by default, an
    ``SSLFeatures`` or a ``CTCEncoder``); see the module docstring for the steps.

    Interface shared by every discrete tokenizer: ``vocab_size``, ``frame_rate`` (units per second before
    de-duplication), ``encode(wave) -> LongTensor``, ``save(path)`` / ``load(path)``.

    Example:
        >>> tok = KMeansTokenizer(n_units=8, frame_rate=25).fit([torch.randn(16000) for _ in range(4)])
        >>> units = tok.encode(torch.randn(8000))   # int64, values in 0..7, on the CPU
    """

    kind = "kmeans"

    def __init__(self, n_units: int = 500, *, features=None, frame_rate: float = 25.0, pooling: str | None = None,
                 normalize: str = "global", dedup: bool = True, seed: int = 0, max_iter: int = 100,
                 tol: float = 1e-4, n_init: int = 1, init_size: int | None = None,
                 max_fit_frames: int | None = None):
        if isinstance(n_units, bool) or int(n_units) != n_units or n_units < 1:
            raise ValueError(f"n_units must be an int >= 1, got {n_units!r}")
        self.features = LogMel() if features is None else features
        for attr in ("dim", "frame_rate", "sample_rate", "config"):
            if not hasattr(self.features, attr):
                raise TypeError(f"features must be a feature extractor with .{attr} (LogMel, SSLFeatures or "
                                f"CTCEncoder), got {type(self.features).__name__}")
        if pooling is None:
            pooling = "stack" if isinstance(self.features, LogMel) else "mean"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        native = float(self.features.frame_rate)
        ratio = native / float(frame_rate) if frame_rate and frame_rate > 0 else 0.0
        if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"frame_rate must be the features' rate ({native:g} Hz) divided by a whole number "
                             f"(e.g. {native:g}, {native / 2:g}, {native / 4:g}), got {frame_rate}")
        if max_fit_frames is not None and int(max_fit_frames) < int(n_units):
            raise ValueError(f"max_fit_frames={max_fit_frames} must be >= n_units={n_units}")
        self.factor = round(ratio)
        self.n_units, self._frame_rate = int(n_units), float(frame_rate)
        self.pooling, self.normalize, self.dedup = pooling, normalize, bool(dedup)
        self.max_fit_frames = None if max_fit_frames is None else int(max_fit_frames)
        self.kmeans = KMeans(n_units, max_iter=max_iter, tol=tol, n_init=n_init, seed=seed, init_size=init_size)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------- interface

    @property
    def vocab_size(self) -> int:
        return self.n_units

    @property
    def frame_rate(self) -> float:
        return self._frame_rate

    @property
    def sample_rate(self) -> int:
        return int(self.features.sample_rate)

    @property
    def dim(self) -> int:
        """Size of the vectors k-means clusters (after pooling)."""
        return self.features.dim * (self.factor if self.pooling == "stack" else 1)

    @property
    def is_fitted(self) -> bool:
        return self.kmeans.centroids is not None

    # -------------------------------------------------------------------------------------------------- features

    def _native(self, item, name: str) -> torch.Tensor:
        """Features at the native rate, (frames, dim) float: computed from a wave (T,), or checked if given."""
        if isinstance(item, torch.Tensor) and item.dim() == 2:
            if item.shape[1] != self.features.dim or item.shape[0] == 0 or not item.dtype.is_floating_point:
                raise ValueError(f"{name} given as features must be floating point of shape (frames >= 1, "
                                 f"{self.features.dim}), got {tuple(item.shape)} {item.dtype}")
            return item
        wave = check_wave(item, name, batched=False)
        with torch.no_grad(), naming(name):
            return self.features(wave)

    def _pooled(self, native: torch.Tensor) -> torch.Tensor:
        x = native.float() if native.dtype != torch.float64 else native
        if self.normalize == "utterance":
            x = (x - x.mean(0)) / _std_floor(x.std(0, unbiased=False))
        return pool_frames(x, self.factor, self.pooling)

    def featurize(self, wave_or_features) -> torch.Tensor:
        """The vectors k-means sees for one utterance: (ceil(frames / factor), dim), normalized and pooled.
        Takes a wave (T,) or native-rate features (frames, features.dim)."""
        x = self._pooled(self._native(wave_or_features, "wave"))
        if self.normalize == "global":
            if self.mean is None:
                raise RuntimeError("this tokenizer normalizes with training-split statistics: call fit() first")
            x = (x - self.mean.to(x)) / self.std.to(x)
        return x

    # ---------------------------------------------------------------------------------------------- fit / encode

    def fit(self, data: Iterable) -> KMeansTokenizer:
        """Fit the normalization statistics and the centroids on the training split. ``data`` yields waves (T,)
        at ``sample_rate`` or native-rate features (frames, features.dim); all pooled frames are held in memory
        (``max_fit_frames`` then keeps a seeded random subset of them for k-means)."""
        if isinstance(data, torch.Tensor):
            # A lone tensor is ambiguous (one wave? a batch of waves? one utterance's features?): ask for a list.
            raise TypeError(f"data must be a list/iterable of utterances (waves (T,) or features (frames, "
                            f"{self.features.dim})), got a single tensor of shape {tuple(data.shape)}")
        pooled = [self._pooled(self._native(item, f"data[{i}]")) for i, item in enumerate(data)]
        if not pooled:
            raise ValueError("data is empty: fit needs at least one utterance")
        x = torch.cat(pooled)
        if x.shape[0] < self.n_units:
            raise ValueError(f"data gives {x.shape[0]} frames at {self.frame_rate:g} Hz, fewer than "
                             f"n_units={self.n_units}: use more audio or fewer units")
        if self.normalize == "global":
            x64 = x.double()
            self.mean = x64.mean(0).float().cpu()
            self.std = _std_floor(x64.std(0, unbiased=False)).float().cpu()
            x = (x - self.mean.to(x)) / self.std.to(x)
        if self.max_fit_frames is not None and x.shape[0] > self.max_fit_frames:
            generator = torch.Generator().manual_seed(self.kmeans.seed)
            keep = torch.randperm(x.shape[0], generator=generator)[:self.max_fit_frames]
            x = x[keep.sort().values.to(x.device)]
        self.kmeans.fit(x)
        self.kmeans.centroids = self.kmeans.centroids.float().cpu()
        return self

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Units (CPU int64) of one utterance's native-rate features (frames, features.dim)."""
        if not self.is_fitted:
            raise RuntimeError("KMeansTokenizer.encode called before fit() or load()")
        if not (isinstance(features, torch.Tensor) and features.dim() == 2):
            raise ValueError(f"features must be a (frames, {self.features.dim}) tensor, got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        units = self.kmeans.predict(self.featurize(features)).cpu()
        return dedup(units) if self.dedup else units

    def encode(self, wave, sample_rate: int | None = None) -> torch.Tensor:
        """Units (n,) int64 on the CPU, values in ``0..vocab_size - 1``, of one utterance ``wave`` (T,).

        ``sample_rate``, when given, must be the tokenizer's (nothing here resamples). Without ``dedup``,
        ``n = ceil(frames / factor)`` with ``frames`` the native feature frames of the wave.
        """
        check_sample_rate(sample_rate, self.sample_rate)
        if not self.is_fitted:
            raise RuntimeError("KMeansTokenizer.encode called before fit() or load()")
        return self.encode_features(self._native(check_wave(wave, "wave", batched=False), "wave"))

    __call__ = encode

    # --------------------------------------------------------------------------------------------------- storage

    def config(self) -> dict:
        km = self.kmeans
        return {"kind": self.kind, "n_units": self.n_units, "frame_rate": self.frame_rate, "pooling": self.pooling,
                "normalize": self.normalize, "dedup": self.dedup, "seed": km.seed, "max_iter": km.max_iter,
                "tol": km.tol, "n_init": km.n_init, "init_size": km.init_size, "max_fit_frames": self.max_fit_frames,
                "features": self.features.config()}

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` (configuration) and ``tokenizer.safetensors`` (centroids and the global
        normalization statistics) into the directory ``path``. An SSL model or CTC encoder is stored by reference
        (its ``model_name_or_path`` or folder; relative when the folder is inside ``path``), not copied."""
        if not self.is_fitted:
            raise RuntimeError("nothing to save: fit() the tokenizer first")
        tensors = {"centroids": self.kmeans.centroids.contiguous()}
        if self.mean is not None:
            tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous())
        config = {**self.config(), "inertia": self.kmeans.inertia, "n_iter": self.kmeans.n_iter}
        if config["features"]["type"] == "ctc":  # an encoder inside the folder moves with it
            config["features"] = {**config["features"], "path": portable_path(config["features"]["path"], path)}
        path = write_config(path, config)
        save_file(tensors, str(path / TENSORS_NAME))
        return path

    @classmethod
    def load(cls, path, device=None) -> KMeansTokenizer:
        """A tokenizer saved by ``save``; ``device`` is where an SSL model runs (log-mel runs on the input's)."""
        config = read_config(path, cls.kind)
        features = features_from_config(config["features"], device=device, root=path)
        kwargs = {k: config[k] for k in ("n_units", "frame_rate", "pooling", "normalize", "dedup", "seed",
                                         "max_iter", "tol", "n_init", "init_size", "max_fit_frames")}
        tok = cls(features=features, **kwargs)
        tensors = load_file(str(Path(path) / TENSORS_NAME))
        centroids = tensors["centroids"]
        if tuple(centroids.shape) != (tok.n_units, tok.dim):
            raise ValueError(f"{path}: centroids have shape {tuple(centroids.shape)}, the configuration implies "
                             f"({tok.n_units}, {tok.dim})")
        tok.kmeans.centroids = centroids
        tok.kmeans.inertia, tok.kmeans.n_iter = config.get("inertia"), config.get("n_iter")
        if tok.normalize == "global":
            tok.mean, tok.std = tensors["mean"], tensors["std"]
        return tok

    def __repr__(self) -> str:
        return (f"KMeansTokenizer(n_units={self.n_units}, frame_rate={self.frame_rate:g}, pooling={self.pooling!r}, "
                f"normalize={self.normalize!r}, dedup={self.dedup}, features={self.features.config()['type']}, "
                f"fitted={self.is_fitted})")
