"""Audio IO that survives bad files: load, down-mix, resample; skip and count what cannot be read.

``load_audio`` returns a mono float32 waveform at the target rate or raises ``BadAudio`` with a short reason
(``missing``, ``unreadable``, ``empty``, ``corrupt``, ``nonfinite``). ``AudioStream`` walks utterances, yields
``(utterance, waveform)`` for the good ones and counts the rest, so one broken file in a corpus of thousands costs
one line in a summary rather than a crashed run.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

log = logging.getLogger("mdus.data")

SAMPLE_RATE = 16000
REASONS = ("missing", "unreadable", "empty", "short", "corrupt", "nonfinite")
# The shortest waveform any speech front end here can read: one 25 ms analysis frame (log-mel and SSL features).
MIN_SECONDS = 0.025


class BadAudio(ValueError):
    """An audio file that cannot give a waveform; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, path, detail: str = ""):
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample the last axis of ``x`` from ``sr_from`` to ``sr_to`` Hz (polyphase, anti-aliased).

    scipy's ``resample_poly`` filters with a Kaiser-windowed sinc at the exact rational ratio (22050 -> 16000 is
    320/441), so there is no drift in length and no aliasing from a naive interpolation. The output length is
    ``ceil(n * sr_to / sr_from)``.

    Example:
        >>> resample(np.zeros(22050, np.float32), 22050, 16000).shape
        (16000,)
    """
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got sr_from={sr_from}, sr_to={sr_to}")
    if sr_from == sr_to:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_from), int(sr_to))
    y = resample_poly(x, int(sr_to) // g, int(sr_from) // g, axis=-1)
    return y.astype(np.float32, copy=False)


def load_audio(path, target_sr: int = SAMPLE_RATE, *, fixes: Counter | None = None) -> torch.Tensor:
    """Mono float32 waveform of ``path`` at ``target_sr`` Hz, shape ``(samples,)``, values in about [-1, 1].

    Multi-channel audio is averaged to mono and any other rate is resampled; each such repair adds one to
    ``fixes["downmixed"]`` / ``fixes["resampled"]`` when a counter is given. Anything that cannot give a
    waveform raises ``BadAudio`` (a ``ValueError``) whose ``reason`` is ``missing`` (no such file),
    ``unreadable`` (a permission error, a directory), ``empty`` (0 bytes or 0 frames), ``short`` (under
    ``MIN_SECONDS``: not one analysis frame), ``corrupt`` (libsndfile cannot decode it) or ``nonfinite`` (NaN/inf
    samples in a float file).

    Example:
        >>> wav = load_audio("utt.flac")          # doctest: +SKIP
        >>> wav.shape, wav.dtype                   # doctest: +SKIP
        (torch.Size([51200]), torch.float32)
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as e:
        raise BadAudio("missing", path) from e
    except OSError as e:
        raise BadAudio("unreadable", path, type(e).__name__) from e
    if path.is_dir():
        raise BadAudio("unreadable", path, "a directory")
    if size == 0:
        raise BadAudio("empty", path, "0 bytes")
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except PermissionError as e:
        raise BadAudio("unreadable", path, "permission denied") from e
    # libsndfile reports every decoding failure (unknown format, truncated header, bad chunk) as one error type;
    # older soundfile versions raise RuntimeError instead of its LibsndfileError subclass.
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise BadAudio("corrupt", path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
    if x.shape[0] == 0:
        raise BadAudio("empty", path, "0 frames")
    if not np.isfinite(x).all():
        raise BadAudio("nonfinite", path)
    if x.shape[1] > 1:
        x = x.mean(axis=1, keepdims=True)
        if fixes is not None:
            fixes["downmixed"] += 1
    x = x[:, 0]
    if x.shape[0] < MIN_SECONDS * sr:
        raise BadAudio("short", path, f"{x.shape[0]} samples at {sr} Hz, under {MIN_SECONDS * 1000:g} ms")
    if sr != target_sr:
        x = resample(x, sr, target_sr)
        if fixes is not None:
            fixes["resampled"] += 1
    return torch.from_numpy(np.ascontiguousarray(x))


class AudioStream:
    """Iterate ``(utterance, waveform)`` over ``utterances``, skipping and counting bad audio.

    Anything with an ``audio_path`` attribute works as an utterance (``mdus.data.Utterance`` from the readers).
    After (or during) iteration:

    * ``loaded``: utterances yielded; ``seconds``: their total audio at ``target_sr``;
    * ``skipped``: ``{reason: count}`` for the files that gave no waveform (see ``load_audio``);
    * ``fixed``: ``{"resampled": n, "downmixed": n}`` for files repaired on the way;
    * ``examples``: the first few ``(path, reason, detail)`` of skipped files, for the report.

    A summary is logged (a warning on the ``mdus.data`` logger) once at the end of a full pass when anything was
    skipped, unless ``log_summary=False`` (for a caller that prints its own), and ``summary()`` gives it as text.
    Counters accumulate over repeated passes. In a ``DataLoader`` with worker processes each worker keeps its own
    counts, so count in the main process (or with ``num_workers=0``).

    Example:
        >>> stream = AudioStream(read_corpus("dev.jsonl"))   # doctest: +SKIP
        >>> for utt, wav in stream: ...                        # doctest: +SKIP
        >>> stream.skipped                                     # doctest: +SKIP
        Counter({'corrupt': 2, 'empty': 1})
    """

    def __init__(self, utterances: Iterable, target_sr: int = SAMPLE_RATE, *, max_examples: int = 20,
                 log_summary: bool = True):
        self.utterances = utterances
        self.log_summary = log_summary
        self.target_sr = target_sr
        self.max_examples = max_examples
        self.loaded = 0
        self.seconds = 0.0
        self.skipped: Counter = Counter()
        self.fixed: Counter = Counter()
        self.examples: list[tuple[str, str, str]] = []

    def __iter__(self) -> Iterator[tuple[object, torch.Tensor]]:
        for utt in self.utterances:
            try:
                wav = load_audio(utt.audio_path, self.target_sr, fixes=self.fixed)
            except BadAudio as e:
                self.skipped[e.reason] += 1
                if len(self.examples) < self.max_examples:
                    self.examples.append((e.path, e.reason, e.detail))
                log.debug("skipped %s", e)
                continue
            self.loaded += 1
            self.seconds += wav.numel() / self.target_sr
            yield utt, wav
        if self.skipped and self.log_summary:
            log.warning("%s", self.summary())

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One paragraph: loaded count and hours, skipped by reason, repairs, and a few skipped files."""
        lines = [f"audio: {self.loaded} loaded ({self.seconds / 3600:.3f} h at {self.target_sr} Hz), "
                 f"{self.n_skipped} skipped"
                 + (" (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) + ")" if self.skipped
                    else "")
                 + (", fixed: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.fixed.items())) if self.fixed
                    else "")]
        lines += [f"  {reason}: {path}" + (f" ({detail})" if detail else "") for path, reason, detail in self.examples]
        return "\n".join(lines)
