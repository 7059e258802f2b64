"""A real ASR corpus with no download: English sentences spoken by espeak-ng and flite in many voices.

Sentences come from Debian's ``fortunes`` package (or any text files), speech from the ``espeak-ng`` (8 English
accents x 16 voice variants) and ``flite`` (kal, kal16, awb, rms, slt) engines, each utterance at a random rate
and pitch. Dev and test use **held-out voices and held-out sentences**: no dev/test voice speaks in train and no
dev/test sentence is heard in train, so the test measures generalization to new speakers and new text. Everything
is a deterministic function of the seed (utterance ``i`` of a split draws from ``Random(f"{seed}/{split}/{i}")``),
so the same seed gives the same corpus in any number of processes.

Output, under ``out_dir``: ``wavs/<split>/<split>-NNNNNN.wav`` (16 kHz mono PCM16), ``<split>.jsonl`` manifests
(``{"audio", "text", "speaker", "duration"}``, audio paths relative to ``out_dir``) and ``synth_report.json``
(seed, voices per split, timing, every failed utterance).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import soundfile as sf

from mdus.data.audio import SAMPLE_RATE, resample
from mdus.data.readers import Utterance, write_manifest

log = logging.getLogger("mdus.data")

SPLITS = ("train", "dev", "test")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Not English prose: translations of foreign phrases, and pictures drawn in characters.
_SKIP_FORTUNE_FILES = {"translate-me", "ascii-art"}

ESPEAK = "espeak-ng"
FLITE = "flite"
# espeak-ng's standard voice variants ("" = the language's own voice): the numbered male/female ones and the Klatt
# formant synthesizer. The many community variants include joke voices (Demonic, robots, whisper) that would teach
# a model noise rather than speech, so they are left out; pass them in ``voices`` to use them anyway.
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3")
# awb_time is a limited-domain voice that can only say clock times.
_FLITE_LIMITED = {"awb_time"}
# Mean F0 (Hz) of each flite voice, measured here with its defaults: the pitch jitter scales around it, since flite
# takes an absolute target and a fixed one would turn slt (170 Hz) into a man or kal (95 Hz) into a child.
_FLITE_F0 = {"kal": 95.0, "kal16": 95.0, "awb": 130.0, "rms": 100.0, "slt": 170.0}
# Rate and pitch ranges: wide enough to vary prosody, narrow enough to stay intelligible.
_RATE = (0.85, 1.2)     # speaking-rate factor; espeak-ng -s 175 * rate words/min, flite duration_stretch 1 / rate
_PITCH = (-1.0, 1.0)    # espeak-ng -p 50 + 15 * pitch (of 0..99); flite F0 mean * (1 + 0.12 * pitch)
_TIMEOUT_S = 60

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "gen", "lt", "col", "capt", "sgt",
                  "rev", "no", "mt", "ft", "co", "inc", "ltd"}
# Fortunes are split into sentences at end punctuation followed by a capital; quoted speech, digits, markup and
# anything non-ASCII are dropped rather than guessed at, because the transcript must be exactly what is spoken.
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_FORTUNE_SENTENCE = re.compile(r"[A-Z][A-Za-z ,;'?!.-]*[.?!]")
_TEXT_LINE = re.compile(r"[A-Za-z0-9 ,;:'?!.-]+")
_ACRONYM = re.compile(r"\b[A-Z]{2,}")
_ATTRIBUTION = re.compile(r"^\s*(--|- [A-Z])")


def _dedupe_key(sentence: str) -> str:
    # Case and punctuation do not make a different sentence: "Hello there." in train and "hello there!" in test
    # would leak the test text.
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", sentence.lower()).split())


def _word_count_ok(sentence: str, min_words: int, max_words: int) -> bool:
    return min_words <= len(sentence.split()) <= max_words


def _clean_fortune_sentence(s: str, min_words: int, max_words: int) -> str | None:
    if not _FORTUNE_SENTENCE.fullmatch(s) or not _word_count_ok(s, min_words, max_words):
        return None
    # A period inside the sentence is an abbreviation or an ellipsis ("e.g.", "Mr.", "..."), whose reading the
    # engines and the transcript would disagree on; hyphens must join words ("--" is a dash, "- " a list).
    if "." in s[:-1] or "--" in s or " -" in s or "- " in s or "''" in s or _ACRONYM.search(s):
        return None
    if s.split()[-1].rstrip(".?!").lower() in _ABBREVIATIONS:
        return None
    return s


def fortune_sentences(root=None, *, min_words: int = 3, max_words: int = 20) -> list[str]:
    """Short single English sentences from Debian's ``fortunes`` files, deduplicated, in file order.

    Each ``%``-separated fortune loses its attribution lines (``-- Mark Twain``), has its whitespace normalized and
    is split into sentences; a sentence is kept when it starts with a capital, ends in ``.?!``, has
    ``min_words..max_words`` words, and holds only letters, spaces and ``,;'?!-`` (no digits, quotes, acronyms or
    abbreviations, whose spoken form is ambiguous). About 13,000 sentences at the defaults.

    Example:
        >>> fortune_sentences()[:1]      # doctest: +SKIP
        ['Your lucky number has been disconnected.']
    """
    root = Path(root) if root is not None else FORTUNES_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"no fortunes at {root}: install Debian's `fortunes` package (scripts/setup.sh) "
                                f"or pass text_files")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in _SKIP_FORTUNE_FILES)
    out, seen = [], set()
    for p in files:
        raw = p.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.M):
            lines = [ln for ln in entry.splitlines() if not _ATTRIBUTION.match(ln)]
            text = " ".join(" ".join(lines).split())
            for s in _SENTENCE_END.split(text):
                s = _clean_fortune_sentence(s, min_words, max_words)
                if s is not None and _dedupe_key(s) not in seen:
                    seen.add(_dedupe_key(s))
                    out.append(s)
    return out


def fortune_passages(root=None, *, min_words: int = 40, exclude=()) -> list[str]:
    """Whole ``fortunes`` entries of at least ``min_words`` words as running English text, for text degradation.

    Each ``%``-separated entry loses its attribution lines and has its whitespace normalized; ASCII entries are kept,
    deduplicated, in file order, except any that contains a sentence of ``exclude`` (compared as ``_dedupe_key``
    spells them, on word boundaries). Passing a corpus's transcripts as ``exclude`` gives general text the corpus
    never spoke. About 2,300 passages at the defaults.

    Example:
        >>> fortune_passages(exclude=["It's the truth."])[0][:40]      # doctest: +SKIP
        '7:30, Channel 5: The Bionic Dog (Action/'
    """
    root = Path(root) if root is not None else FORTUNES_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"no fortunes at {root}: install Debian's `fortunes` package (scripts/setup.sh)")
    banned = {f" {_dedupe_key(s)} " for s in exclude} - {"  "}
    out, seen = [], set()
    for p in sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in _SKIP_FORTUNE_FILES):
        raw = p.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.M):
            text = " ".join(" ".join(ln for ln in entry.splitlines() if not _ATTRIBUTION.match(ln)).split())
            key = f" {_dedupe_key(text)} "
            if (len(text.split()) < min_words or not text.isascii() or key in seen
                    or any(b in key for b in banned)):
                continue
            seen.add(key)
            out.append(text)
    return out


def text_file_sentences(paths, *, min_words: int = 3, max_words: int = 20) -> list[str]:
    """One sentence per non-blank line of each text file, whitespace-normalized, deduplicated, in file order.

    A line is kept when it has ``min_words..max_words`` words and only ASCII letters, digits, spaces and
    ``,;:'?!.-`` (case is kept as written, so normalized lowercase transcripts work too).

    Example:
        >>> text_file_sentences(["my_sentences.txt"])[:1]      # doctest: +SKIP
        ['the cat sat on the mat']
    """
    out, seen = [], set()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            s = " ".join(line.split())
            if (s and _TEXT_LINE.fullmatch(s) and re.search("[A-Za-z]", s) and not s.startswith("-")
                    and _word_count_ok(s, min_words, max_words) and _dedupe_key(s) not in seen):
                seen.add(_dedupe_key(s))
                out.append(s)
    return out


def limit_vocabulary(sentences: list[str], max_vocab: int) -> list[str]:
    """The sentences whose every word is among the ``max_vocab`` most frequent words of ``sentences`` (words
    compared as ``_dedupe_key`` spells them; ties broken by first appearance). A small-vocabulary corpus: held-out
    sentences are then new combinations of words that training speaks, which a short run can learn to transcribe.

    Example:
        >>> limit_vocabulary(["the cat sat", "the dog sat", "a zebra"], 3)
        ['the cat sat']
    """
    if max_vocab < 1:
        raise ValueError(f"max_vocab must be >= 1, got {max_vocab}")
    words = [_dedupe_key(x).split() for x in sentences]
    counts = Counter(w for ws in words for w in ws)
    vocab = {w for w, _ in counts.most_common(max_vocab)}
    return [x for x, ws in zip(sentences, words, strict=True) if all(w in vocab for w in ws)]


# ---------------------------------------------------------------------------------------------------- voices


@functools.cache
def _espeak_variant_dir() -> Path | None:
    try:
        out = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Data at:\s*(\S+)", out)
    return Path(m.group(1)) / "voices" / "!v" if m else None


@functools.cache
def _espeak_languages() -> tuple[str, ...]:
    out = subprocess.run([ESPEAK, "--voices=en"], capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    langs = []
    for row in out.splitlines()[1:]:
        parts = row.split()
        # Columns: Pty Language Age/Gender VoiceName File [Other languages]. MBROLA voices (mb/...) need their own
        # Debian packages and fail without them, and "variant" rows are voice variants, not languages.
        if len(parts) >= 5 and parts[1].startswith("en") and not parts[4].startswith("mb/") and parts[1] not in langs:
            langs.append(parts[1])
    return tuple(langs)


@functools.cache
def _flite_voices() -> tuple[str, ...]:
    out = subprocess.run([FLITE, "-lv"], capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    return tuple(out.split(":", 1)[1].split()) if ":" in out else ()


def available_voices() -> list[str]:
    """Every English voice this machine can synthesize, as ``engine:name`` ids, sorted.

    espeak-ng voices are ``espeak-ng:<accent>[+<variant>]`` (accents from ``espeak-ng --voices=en`` without the
    MBROLA ones, variants from ``ESPEAK_VARIANTS``); flite voices are ``flite:<voice>``. Empty when neither engine
    is installed.

    Example:
        >>> available_voices()[:2], len(available_voices())      # doctest: +SKIP
        (['espeak-ng:en-029', 'espeak-ng:en-029+f1'], 133)
    """
    voices = []
    if shutil.which(ESPEAK):
        vdir = _espeak_variant_dir()
        variants = [v for v in ESPEAK_VARIANTS if not v or vdir is None or (vdir / v).is_file()]
        voices += [f"{ESPEAK}:{lang}" + (f"+{v}" if v else "") for lang in _espeak_languages() for v in variants]
    if shutil.which(FLITE):
        voices += [f"{FLITE}:{v}" for v in _flite_voices() if v not in _FLITE_LIMITED]
    return sorted(voices)


def _check_voices(voices) -> list[str]:
    voices = list(dict.fromkeys(voices))
    bad = []
    for v in voices:
        engine, _, name = v.partition(":")
        if engine not in (ESPEAK, FLITE) or not name:
            bad.append(f"{v!r} (expected 'espeak-ng:<voice>[+<variant>]' or 'flite:<voice>')")
        elif shutil.which(engine) is None:
            bad.append(f"{v!r} ({engine} is not installed; run scripts/setup.sh)")
        elif engine == FLITE and name not in _flite_voices() and not Path(name).is_file():
            bad.append(f"{v!r} (flite has {', '.join(_flite_voices())}; flite silently falls back to kal otherwise)")
        elif engine == ESPEAK and "+" in name:
            # espeak-ng also ignores an unknown variant silently, so it would speak in the base voice under the
            # wrong speaker id; an unknown language does fail, and is reported per utterance.
            vdir = _espeak_variant_dir()
            if vdir is not None and not (vdir / name.split("+", 1)[1]).is_file():
                bad.append(f"{v!r} (no espeak-ng variant {name.split('+', 1)[1]!r} in {vdir})")
    if bad:
        raise ValueError("voices: unknown " + "; ".join(bad))
    return voices


def split_voices(voices, seed: int, *, held_out: float = 0.1, dev: bool = True, test: bool = True
                 ) -> dict[str, list[str]]:
    """Disjoint voice pools ``{"train", "dev", "test"}``: dev and test voices never speak in train.

    Per engine (so each engine is in every split), ``max(1, round(held_out * n))`` shuffled voices go to dev and
    as many to test, the rest to train. Engines with fewer than 3 voices go to train whole, unless no engine can
    spare any, in which case all voices are pooled and split the same way. ``dev=False`` / ``test=False`` keep
    that split's voices in train.

    Example:
        >>> pools = split_voices(available_voices(), seed=0)                # doctest: +SKIP
        >>> len(pools["train"]), len(pools["dev"]), len(pools["test"])      # doctest: +SKIP
        (106, 14, 14)
    """
    if not 0 < held_out < 0.5:
        raise ValueError(f"held_out must be in (0, 0.5), got {held_out}")
    need = int(dev) + int(test)
    groups: dict[str, list[str]] = {}
    for v in sorted(set(voices)):
        groups.setdefault(v.partition(":")[0], []).append(v)
    if need and all(len(g) < need + 1 for g in groups.values()):
        groups = {"all": sorted(set(voices))}
    pools = {s: [] for s in SPLITS}
    for engine, group in sorted(groups.items()):
        random.Random(f"{seed}/voices/{engine}").shuffle(group)
        k = max(1, round(held_out * len(group))) if need and len(group) >= need + 1 else 0
        pools["dev"] += group[:k] if dev else []
        pools["test"] += group[k * dev:k * (dev + test)] if test else []
        pools["train"] += group[k * need:]
    if need and (not pools["train"] or (dev and not pools["dev"]) or (test and not pools["test"])):
        raise ValueError(f"need at least {need + 1} voices to hold some out for dev/test, got {sorted(set(voices))}")
    return {s: sorted(p) for s, p in pools.items()}


def split_sentences(sentences, seed: int, n_dev: int, n_test: int) -> dict[str, list[str]]:
    """Disjoint sentence pools: ``n_dev`` for dev, ``n_test`` for test, the rest for train (shuffled by ``seed``).

    Sentences that differ only in case or punctuation count as one, so none straddles two splits.

    Example:
        >>> {s: len(p) for s, p in split_sentences(fortune_sentences(), 0, 100, 100).items()}     # doctest: +SKIP
        {'train': 13505, 'dev': 100, 'test': 100}
    """
    unique = list({_dedupe_key(s): s for s in sentences}.values())
    unique.sort()
    random.Random(f"{seed}/sentences").shuffle(unique)
    if n_dev + n_test >= len(unique):
        raise ValueError(f"{len(unique)} distinct sentences cannot give {n_dev} dev + {n_test} test sentences and "
                         f"leave any for train; pass more text or ask for fewer held-out utterances")
    return {"train": unique[n_dev + n_test:], "dev": unique[:n_dev], "test": unique[n_dev:n_dev + n_test]}


# ------------------------------------------------------------------------------------------------- synthesis


def _cycle_shuffled(items: list, n: int, seed: str) -> list:
    # Each pass over the items is a fresh permutation, so every item is used about equally and, when the pool is
    # smaller than n, a repeated sentence meets a different voice.
    if not items:
        raise ValueError(f"nothing to draw {n} items from ({seed})")
    out, rng = [], random.Random(seed)
    while len(out) < n:
        perm = list(items)
        rng.shuffle(perm)
        out += perm
    return out[:n]


def _plan(split: str, n: int, sentences: list[str], voices: list[str], seed: int, wav_dir: Path) -> list[dict]:
    texts = _cycle_shuffled(sentences, n, f"{seed}/{split}/texts")
    speakers = _cycle_shuffled(voices, n, f"{seed}/{split}/voices")
    jobs = []
    for i in range(n):
        rng = random.Random(f"{seed}/{split}/{i}")
        jobs.append({"split": split, "index": i, "text": texts[i], "voice": speakers[i],
                     "rate": round(rng.uniform(*_RATE), 3), "pitch": round(rng.uniform(*_PITCH), 3),
                     "wav": str(wav_dir / split / f"{split}-{i:06d}.wav")})
    return jobs


def _engine_command(job: dict, raw: Path) -> tuple[list[str], str | None]:
    """The engine's argv and its stdin for ``job``."""
    engine, _, name = job["voice"].partition(":")
    if engine == ESPEAK:
        # Text on stdin, never argv: a user's line starting with "-" would otherwise be read as an option.
        return [ESPEAK, "-v", name, "-s", str(round(175 * job["rate"])), "-p", str(round(50 + 15 * job["pitch"])),
                "-w", str(raw), "--stdin"], job["text"]
    if engine == FLITE:
        cmd = [FLITE, "-voice", name, "--setf", f"duration_stretch={1 / job['rate']:.4f}"]
        if name in _FLITE_F0:
            cmd += ["--setf", f"int_f0_target_mean={_FLITE_F0[name] * (1 + 0.12 * job['pitch']):.1f}"]
        return cmd + ["-t", job["text"], "-o", str(raw)], None
    raise ValueError(f"unknown engine in voice {job['voice']!r}")


def _synth_one(job: dict) -> tuple[str, int, float | None, str | None]:
    """Synthesize one job to its 16 kHz mono wav: ``(split, index, duration, None)`` or ``(.., None, error)``."""
    out = Path(job["wav"])
    raw = out.with_name(out.stem + ".raw.wav")
    try:
        cmd, stdin = _engine_command(job, raw)
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT_S)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise RuntimeError(f"{cmd[0]} exited with {r.returncode}: {msg[-1] if msg else 'no message'}")
        x, sr = sf.read(str(raw), dtype="float32", always_2d=True)
        x = resample(x.mean(axis=1), sr, SAMPLE_RATE)
        if x.size == 0 or float(np.abs(x).max()) < 1e-4:
            raise RuntimeError(f"{cmd[0]} produced {'no' if x.size == 0 else 'silent'} audio")
        # The resampling filter can overshoot full scale by a little on loud engine output; PCM16 would wrap.
        sf.write(str(out), np.clip(x, -1.0, 32767 / 32768), SAMPLE_RATE, subtype="PCM_16")
        return job["split"], job["index"], x.size / SAMPLE_RATE, None
    # Any failure of one utterance (engine error, timeout, unreadable output, full disk) is that utterance's only:
    # it is reported and the run goes on.
    except Exception as e:
        return job["split"], job["index"], None, f"{type(e).__name__}: {e}"
    finally:
        raw.unlink(missing_ok=True)


def _synth_chunk(jobs: list[dict]) -> list[tuple]:
    return [_synth_one(j) for j in jobs]


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _run(jobs: list[dict], n_proc: int, progress: bool) -> list[tuple]:
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(jobs), desc="synth", unit="utt", disable=not progress) as bar:
        if n_proc <= 1 or len(jobs) <= 1:
            for j in jobs:
                results.append(_synth_one(j))
                bar.update(1)
            return results
        # Chunks amortize the inter-process round trip (an utterance takes only tens of ms) while leaving several
        # chunks per worker for load balancing and a smooth progress bar.
        size = max(1, min(32, math.ceil(len(jobs) / (8 * n_proc))))
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        # fork: the workers only run the engines, numpy and soundfile (never torch), so inheriting a parent that has
        # torch loaded is safe, and it avoids the ~10 s re-import of mdus (transformers) that spawn would cost.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        # Imported once here, so the forked workers inherit it instead of each paying for the import.
        import scipy.signal  # noqa: F401
        with ProcessPoolExecutor(max_workers=min(n_proc, len(chunks)), mp_context=ctx) as pool:
            futures = {pool.submit(_synth_chunk, c): c for c in chunks}
            for f in as_completed(futures):
                try:
                    res = f.result()
                # A dead worker (BrokenProcessPool) fails its own jobs, not the run.
                except Exception as e:
                    res = [(j["split"], j["index"], None, f"worker failed: {type(e).__name__}: {e}")
                           for j in futures[f]]
                results += res
                bar.update(len(res))
    return results


def synthesize(out_dir, *, n_train: int, n_dev: int, n_test: int, seed: int = 0, voices=None, text_files=None,
               min_words: int = 3, max_words: int = 20, max_vocab: int | None = None, held_out_voices: float = 0.1,
               jobs: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Synthesize a train/dev/test speech corpus into ``out_dir``; returns ``{split: manifest path}``.

    Args:
        out_dir: output folder (created); see the module docstring for its layout. Manifests are rewritten on
            every run and are the authority: wavs of an earlier, larger run are not removed.
        n_train, n_dev, n_test: utterances per split (0 allowed). Each dev/test utterance has its own sentence;
            train reuses its sentence pool, with new voices, only when ``n_train`` exceeds it.
        seed: the corpus is a deterministic function of it (and of the sentences and voices).
        voices: ``engine:name`` ids (``available_voices()`` when None) to split into held-out pools, see
            ``split_voices`` (``held_out_voices`` is its fraction per engine for each of dev and test).
        text_files: text files with one sentence per line, instead of the ``fortunes`` sentences.
        min_words, max_words: sentence length bounds in words.
        max_vocab: keep only the sentences made of the ``max_vocab`` most frequent words (``limit_vocabulary``).
        jobs: worker processes (default: the CPUs this process may use).
        progress: show a tqdm bar.

    A failed utterance (engine error, silence, timeout) is left out of its manifest, counted, logged and listed
    in ``synth_report.json``; it never stops the run. Raises ``ValueError`` for bad arguments and
    ``FileNotFoundError``/``RuntimeError`` when the sentences or the engines are missing.

    Example:
        >>> manifests = synthesize("corpus", n_train=1000, n_dev=100, n_test=100, seed=0)    # doctest: +SKIP
        >>> manifests["dev"]                                                                  # doctest: +SKIP
        PosixPath('corpus/dev.jsonl')
    """
    counts = {"train": n_train, "dev": n_dev, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n_{split} must be an int >= 0, got {n!r}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    if voices is None:
        voices = available_voices()
        if not voices:
            raise RuntimeError("neither espeak-ng nor flite is installed: run scripts/setup.sh (apt-get install "
                               "espeak-ng flite fortunes)")
    voices = _check_voices(voices)
    sentences = (text_file_sentences(text_files, min_words=min_words, max_words=max_words) if text_files
                 else fortune_sentences(min_words=min_words, max_words=max_words))
    if max_vocab is not None:
        sentences = limit_vocabulary(sentences, max_vocab)
    sentence_pools = split_sentences(sentences, seed, n_dev, n_test)
    voice_pools = split_voices(voices, seed, held_out=held_out_voices, dev=n_dev > 0, test=n_test > 0)

    out_dir = Path(out_dir)
    wav_dir = out_dir / "wavs"
    plan = []
    for split in SPLITS:
        (wav_dir / split).mkdir(parents=True, exist_ok=True)
        if counts[split]:
            plan += _plan(split, counts[split], sentence_pools[split], voice_pools[split], seed, wav_dir)
    n_proc = jobs if jobs is not None else _default_jobs()
    if n_proc < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")

    t0 = time.perf_counter()
    results = _run(plan, n_proc, progress)
    elapsed = time.perf_counter() - t0

    by_key = {(s, i): (d, err) for s, i, d, err in results}
    manifests, failures, seconds = {}, [], 0.0
    for split in SPLITS:
        utts = []
        for job in (j for j in plan if j["split"] == split):
            duration, err = by_key.get((split, job["index"]), (None, "no result"))
            if err is not None:
                failures.append({k: job[k] for k in ("split", "index", "voice", "text")} | {"error": err})
                continue
            seconds += duration
            utts.append(Utterance(Path(job["wav"]), job["text"], job["voice"], duration))
        manifests[split] = write_manifest(utts, out_dir / f"{split}.jsonl")

    ok = len(plan) - len(failures)
    summary = (f"synthesized {ok}/{len(plan)} utterances ({seconds / 3600:.3f} h of audio) in {elapsed:.1f} s "
               f"with {n_proc} process(es): {1000 * elapsed / max(1, len(plan)):.1f} ms per utterance; "
               f"{len(failures)} failed")
    report = {"seed": seed, "counts": counts, "max_vocab": max_vocab, "synthesized": ok, "failed": len(failures),
              "audio_hours": seconds / 3600,
              "elapsed_s": elapsed, "jobs": n_proc, "n_sentences": {s: len(p) for s, p in sentence_pools.items()},
              "voices": voice_pools, "failure_kinds": dict(Counter(f["error"].split(":")[0] for f in failures)),
              "failures": failures}
    (out_dir / "synth_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("%s", summary)
    if failures:
        log.warning("%d utterance(s) failed and were left out (all listed in %s), e.g.:\n%s", len(failures),
                    out_dir / "synth_report.json",
                    "\n".join(f"  {f['split']}-{f['index']:06d} {f['voice']}: {f['error']}" for f in failures[:5]))
    return manifests
