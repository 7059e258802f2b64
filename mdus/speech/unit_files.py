"""Units computed elsewhere (fairseq/ESPnet HuBERT k-means dumps, codec tokens): read and validated per utterance.

One file per utterance, in one of three formats, chosen by the suffix:

* ``.npy``: a 1-D integer array (``numpy.save``);
* ``.pt`` / ``.pth``: a 1-D integer tensor, or a list of ints (``torch.save``; loaded with ``weights_only=True``);
* anything else: text, integers separated by spaces or newlines (``"12 12 7 301"``).

A manifest row (a dict, e.g. one line of a JSON-lines manifest) names the file in a field (``"units"`` by default);
relative paths resolve against ``root`` (the manifest's directory, typically). The field may also hold the units
inline, as a list of ints. Every sequence is checked: 1-D, integer, non-empty, all values in ``0..vocab_size - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mdus.speech._common import dedup, portable_path, read_config, write_config

TORCH_SUFFIXES = (".pt", ".pth")


def _as_units(values, source: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        if values.dtype == object:
            raise ValueError(f"{source}: holds an object array, not integer units")
        values = torch.from_numpy(values)
    elif isinstance(values, (list, tuple)):
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
        if bad is not None:
            raise ValueError(f"{source}: units must be integers, found {bad!r} ({type(bad).__name__})")
        values = torch.tensor(values, dtype=torch.long)
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{source}: expected an integer array/tensor/list of units, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"{source}: units must have an integer dtype, got {str(values.dtype).removeprefix('torch.')}")
    if values.dim() != 1:
        raise ValueError(f"{source}: units must be 1-D (one id per frame), got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ValueError(f"{source}: holds no units (an empty utterance)")
    return values.long()


def _read_text(path: Path) -> list[int]:
    units = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        for token in line.split():
            try:
                units.append(int(token))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: {token!r} is not an integer unit id") from None
    return units


def check_units(units: torch.Tensor, vocab_size: int | None, source: str = "units") -> torch.Tensor:
    """``units`` as a 1-D int64 tensor; raises ValueError naming ``source`` and the first value out of range."""
    units = _as_units(units, source)
    if vocab_size is not None:
        bad = ((units < 0) | (units >= vocab_size)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{source}: unit {int(units[i])} at position {i} is outside 0..{vocab_size - 1} "
                             f"(vocab_size={vocab_size}; {bad.numel()} value(s) out of range)")
    return units


def read_units(path, vocab_size: int | None = None) -> torch.Tensor:
    """The units (n,) int64 stored in ``path`` (``.npy``, ``.pt``/``.pth`` or text), checked against
    ``vocab_size`` when given.

    Example:
        >>> read_units("utt1.txt", vocab_size=500)   # doctest: +SKIP
        tensor([ 12,  12,   7, 301])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"unit file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a plain numpy array ({err})") from None
    elif suffix in TORCH_SUFFIXES:
        values = torch.load(path, map_location="cpu", weights_only=True)
    else:
        values = _read_text(path)
    return check_units(values, vocab_size, str(path))


class UnitFileTokenizer:
    """The discrete-tokenizer interface over precomputed units: ``encode(entry)`` reads the units of a manifest
    row (or of a path) instead of computing them from audio.

    ``vocab_size`` (K) is required, since every file is checked against it; ``frame_rate`` is the units' nominal
    rate (HuBERT units: 50 Hz, or 25 Hz for the pooled units of SmolTolk), for duration bookkeeping only.
    ``dedup`` removes consecutive repeats after reading, for dumps that kept them.

    Example:
        >>> tok = UnitFileTokenizer(500, root="data/units")                 # doctest: +SKIP
        >>> tok.encode({"id": "utt1", "units": "utt1.npy"})                 # doctest: +SKIP
        tensor([ 12,   7, 301])
    """

    kind = "units"

    def __init__(self, vocab_size: int, *, frame_rate: float = 25.0, field: str = "units", root=None,
                 dedup: bool = False):
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if float(frame_rate) <= 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
        self._vocab_size, self._frame_rate = int(vocab_size), float(frame_rate)
        self.field, self.dedup = str(field), bool(dedup)
        self.root = None if root is None else Path(root)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def frame_rate(self) -> float:
        return self._frame_rate

    def resolve(self, path) -> Path:
        path = Path(path)
        return path if path.is_absolute() or self.root is None else self.root / path

    def encode(self, entry) -> torch.Tensor:
        """Units (n,) int64 of one utterance. ``entry``: a manifest row (a mapping whose ``field`` holds a file
        path or a list of ints) or a file path."""
        if isinstance(entry, Mapping):
            if self.field not in entry:
                raise KeyError(f"manifest entry {entry.get('id', '')!r} has no {self.field!r} field "
                               f"(fields: {', '.join(map(str, entry))})")
            value = entry[self.field]
            where = f"entry {entry.get('id', '')!r} field {self.field!r}"
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                units = check_units(list(value), self.vocab_size, where)
            elif isinstance(value, (str, Path)):
                units = read_units(self.resolve(value), self.vocab_size)
            else:
                raise ValueError(f"{where} must be a file path or a list of ints, got {type(value).__name__}")
        elif isinstance(entry, (str, Path)):
            units = read_units(self.resolve(entry), self.vocab_size)
        else:
            raise TypeError(f"entry must be a manifest row (dict) or a path, got {type(entry).__name__}")
        return dedup(units) if self.dedup else units

    __call__ = encode

    def config(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "frame_rate": self.frame_rate, "field": self.field,
                "root": None if self.root is None else str(self.root), "dedup": self.dedup}

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` (there are no tensors) into the directory ``path``; ``root`` is stored relative
        to ``path`` when it lies inside it, else absolute, so the saved tokenizer works from any directory."""
        config = self.config()
        if self.root is not None:
            config["root"] = portable_path(self.root, path)
        return write_config(path, config)

    @classmethod
    def load(cls, path, device=None) -> UnitFileTokenizer:
        config = read_config(path, cls.kind)
        root = None if config["root"] is None else Path(path) / config["root"]  # an absolute root stays as it is
        return cls(config["vocab_size"], frame_rate=config["frame_rate"], field=config["field"], root=root,
                   dedup=config["dedup"])

    def __repr__(self) -> str:
        return (f"UnitFileTokenizer(vocab_size={self.vocab_size}, frame_rate={self.frame_rate:g}, "
                f"field={self.field!r}, root={self.root}, dedup={self.dedup})")
