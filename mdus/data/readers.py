"""Corpus readers: JSONL manifests, LibriSpeech folders, and folders of (audio, transcript) pairs.

Every reader yields the same ``Utterance(audio_path, text, speaker, duration)`` records, so training and
evaluation never care where a corpus came from. Readers only list utterances: they never decode audio (that is
``mdus.data.audio``, which also skips and counts bad files). ``duration`` comes from the manifest, or from the
file header (``soundfile.info``, no decoding) for folders; it is ``None`` when the header cannot be read, and the
file is then counted by ``AudioStream`` when it is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass(frozen=True)
class Utterance:
    """One utterance: an audio file, its transcript, its speaker id and its duration in seconds (or None)."""

    audio_path: Path
    text: str
    speaker: str
    duration: float | None = None

    def to_json(self, relative_to: Path | None = None) -> dict:
        """The manifest line for this utterance; ``audio`` relative to ``relative_to`` when it lies below it."""
        audio = self.audio_path
        if relative_to is not None:
            try:
                audio = audio.relative_to(relative_to)
            except ValueError:
                pass
        return {"audio": str(audio), "text": self.text, "speaker": self.speaker, "duration": self.duration}


def _header_duration(path: Path) -> float | None:
    try:
        info = sf.info(str(path))
    # An unreadable header means "unknown": AudioStream skips and counts the file when it is loaded.
    except (RuntimeError, OSError, ValueError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 raises ValueError naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}: "
                                 f"{raw[e.start:e.start + 4]!r})") from None


def read_manifest(path) -> Iterator[Utterance]:
    """Utterances of a JSONL manifest: one ``{"audio", "text", "speaker", "duration"}`` object per line.

    ``audio`` paths that are relative are taken relative to the manifest's folder, so a corpus folder can move.
    ``speaker`` defaults to ``""`` and ``duration`` to ``None``. Blank lines are ignored; a line that is not a JSON
    object with string ``audio`` and ``text`` (and a numeric ``duration``, if any), or is not UTF-8, raises
    ``ValueError`` naming the file and line.

    Example:
        >>> [u.text for u in read_manifest("corpus/dev.jsonl")][:1]    # doctest: +SKIP
        ['All great discoveries are made by mistake.']
    """
    path = Path(path)
    base = path.parent
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with string 'audio' and 'text', got {line!r}")
        duration = row.get("duration")
        if duration is not None:
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{lineno}: duration must be a number of seconds, got {duration!r}") from None
        yield Utterance(audio_path=base / row["audio"], text=row["text"], speaker=str(row.get("speaker", "")),
                        duration=duration)


def transcript_issues(utterances) -> dict[str, int]:
    """Counts of what a corpus may hold by mistake and readers keep: ``empty`` transcripts (blank after
    stripping; such an utterance trains speech -> end of text) and ``duplicates`` (the same audio file and
    transcript again)."""
    seen, duplicates, empty = set(), 0, 0
    for u in utterances:
        key = (str(u.audio_path), u.text)
        duplicates += key in seen
        seen.add(key)
        empty += not u.text.strip()
    return {"empty": empty, "duplicates": duplicates}


def write_manifest(utterances, path, *, relative: bool = True) -> Path:
    """Write ``utterances`` as a JSONL manifest (paths relative to its folder when ``relative``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve() if relative else None
    # Written beside the target and renamed, so that a reader never sees half a manifest.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            if relative:
                u = Utterance(Path(u.audio_path).resolve(), u.text, u.speaker, u.duration)
            f.write(json.dumps(u.to_json(base), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_librispeech(root) -> Iterator[Utterance]:
    """Utterances of a LibriSpeech-layout folder: ``<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``.

    Each transcript line is ``<utterance-id> <TEXT>``, and the audio is ``<utterance-id>.flac`` (or another
    audio suffix) beside it. A line whose audio file is absent is still yielded (with ``duration=None``) so that
    loading counts it as ``missing`` rather than losing it silently. Speakers and chapters are sorted so the order
    does not depend on the file system.

    Example:
        >>> next(read_librispeech("LibriSpeech/dev-clean")).speaker     # doctest: +SKIP
        '1272'
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"read_librispeech: root must be a folder, got {root}")
    for trans in sorted(root.glob("*/*/*.trans.txt")):
        speaker = trans.parent.parent.name
        for _, line in _text_lines(trans):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            utt_id, text = parts[0], parts[1] if len(parts) > 1 else ""
            audio = next((trans.parent / (utt_id + s) for s in AUDIO_SUFFIXES
                          if (trans.parent / (utt_id + s)).is_file()), trans.parent / (utt_id + ".flac"))
            yield Utterance(audio, text, speaker, _header_duration(audio) if audio.is_file() else None)


def read_pairs(root) -> Iterator[Utterance]:
    """Utterances of a folder (searched recursively) of audio files each with a same-named ``.txt`` transcript.

    ``a/b/utt1.wav`` + ``a/b/utt1.txt`` is one utterance whose speaker is its folder's name (``b``; the root's
    own name for files directly in it). Audio without a transcript is ignored; the transcript's whitespace is
    normalized to single spaces; a transcript that is not UTF-8 raises ValueError naming it.

    Example:
        >>> [u.speaker for u in read_pairs("my_recordings")][:1]      # doctest: +SKIP
        ['alice']
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"read_pairs: root must be a folder, got {root}")
    for audio in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        txt = audio.with_suffix(".txt")
        if not txt.is_file():
            continue
        text = " ".join(" ".join(line for _, line in _text_lines(txt)).split())
        yield Utterance(audio, text, audio.parent.name, _header_duration(audio))


def read_corpus(path) -> Iterator[Utterance]:
    """Any supported corpus: a ``.jsonl`` manifest, a LibriSpeech-layout folder, or a folder of (audio, txt) pairs.

    Example:
        >>> sum(1 for _ in read_corpus("corpus/train.jsonl"))          # doctest: +SKIP
        6
    """
    path = Path(path)
    if path.is_file():
        return read_manifest(path)
    if path.is_dir():
        if next(path.glob("*/*/*.trans.txt"), None) is not None:
            return read_librispeech(path)
        return read_pairs(path)
    raise ValueError(f"read_corpus: {path} is neither a manifest file nor a folder")
