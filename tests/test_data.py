"""mdus.data: the synthetic corpus (espeak-ng + flite), the corpus readers, bad-audio handling and the CLI."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mdus.__main__ import main
from mdus.data import (
    AudioStream,
    BadAudio,
    Utterance,
    available_voices,
    fortune_passages,
    fortune_sentences,
    load_audio,
    read_corpus,
    read_librispeech,
    read_manifest,
    read_pairs,
    resample,
    split_sentences,
    split_voices,
    synthesize,
    text_file_sentences,
    write_manifest,
)
from mdus.data.synth import FORTUNES_DIR, _dedupe_key, limit_vocabulary

HAVE_ENGINES = shutil.which("espeak-ng") is not None and shutil.which("flite") is not None
needs_engines = pytest.mark.skipif(not HAVE_ENGINES, reason="espeak-ng and flite are not installed (scripts/setup.sh "
                                                            "installs them with apt)")
needs_fortunes = pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian's fortunes package is not installed "
                                                                      "(scripts/setup.sh installs it)")
# Both engines, and flite's kal at 8 kHz next to 16 kHz voices and espeak-ng's 22.05 kHz, so resampling from every
# engine rate is exercised; 4 per engine gives one held-out voice per engine to each of dev and test.
VOICES = ["espeak-ng:en-us", "espeak-ng:en-gb+f2", "espeak-ng:en-gb-scotland+m3", "espeak-ng:en-029+klatt",
          "flite:kal", "flite:kal16", "flite:slt", "flite:awb"]
COUNTS = {"train": 6, "dev": 2, "test": 2}


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not HAVE_ENGINES:
        pytest.skip("espeak-ng and flite are not installed (scripts/setup.sh installs them with apt)")
    if not FORTUNES_DIR.is_dir():
        pytest.skip("Debian's fortunes package is not installed (scripts/setup.sh installs it)")
    out = tmp_path_factory.mktemp("corpus")
    manifests = synthesize(out, n_train=COUNTS["train"], n_dev=COUNTS["dev"], n_test=COUNTS["test"], seed=3,
                           voices=VOICES, jobs=2, progress=False)
    return out, manifests


# ------------------------------------------------------------------------------------------------- synthesis


def test_synth_files_are_16k_mono_with_true_durations(corpus):
    out, manifests = corpus
    assert set(manifests) == {"train", "dev", "test"}
    for split, path in manifests.items():
        assert path == out / f"{split}.jsonl"
        rows = _rows(path)
        assert len(rows) == COUNTS[split]
        for row in rows:
            assert set(row) == {"audio", "text", "speaker", "duration"}
            assert not Path(row["audio"]).is_absolute()  # relative to the manifest, so the folder can move
            info = sf.info(str(out / row["audio"]))
            assert (info.samplerate, info.channels) == (16000, 1)
            assert row["duration"] == pytest.approx(info.frames / 16000, abs=1e-9)
            assert 0.5 < row["duration"] < 15
            assert row["speaker"] in VOICES and row["text"]
    report = json.loads((out / "synth_report.json").read_text())
    assert report["synthesized"] == sum(COUNTS.values()) and report["failed"] == 0
    # Every engine rate was resampled to 16 kHz: the train split mixes espeak-ng (22.05 kHz) and flite.
    engines = {r["speaker"].split(":")[0] for split in manifests for r in _rows(manifests[split])}
    assert engines == {"espeak-ng", "flite"}


def test_synth_audio_is_speech_not_silence(corpus):
    out, manifests = corpus
    for row in _rows(manifests["dev"]):
        x = load_audio(out / row["audio"]).numpy()
        assert np.abs(x).max() > 0.05 and np.sqrt(np.mean(x ** 2)) > 0.005


def test_synth_holds_out_voices_and_sentences(corpus):
    out, manifests = corpus
    rows = {split: _rows(path) for split, path in manifests.items()}
    pools = json.loads((out / "synth_report.json").read_text())["voices"]
    train_voices, train_texts = set(pools["train"]), {_dedupe_key(r["text"]) for r in rows["train"]}
    for held in ("dev", "test"):
        assert pools[held] and not set(pools[held]) & train_voices
        assert {r["speaker"] for r in rows[held]} <= set(pools[held])
        assert not {_dedupe_key(r["text"]) for r in rows[held]} & train_texts
    assert not set(pools["dev"]) & set(pools["test"])
    assert not {r["text"] for r in rows["dev"]} & {r["text"] for r in rows["test"]}
    # Each held-out utterance has a sentence of its own.
    assert len({r["text"] for r in rows["dev"] + rows["test"]}) == COUNTS["dev"] + COUNTS["test"]


def test_synth_is_deterministic(corpus, tmp_path):
    out, manifests = corpus
    again = synthesize(tmp_path / "again", n_train=COUNTS["train"], n_dev=COUNTS["dev"], n_test=COUNTS["test"],
                       seed=3, voices=VOICES, jobs=1, progress=False)  # one process this time: same corpus
    for split in manifests:
        a, b = _rows(manifests[split]), _rows(again[split])
        assert [(r["text"], r["speaker"], r["duration"]) for r in a] == [(r["text"], r["speaker"], r["duration"])
                                                                          for r in b]
    row = _rows(manifests["train"])[0]
    assert np.array_equal(sf.read(str(out / row["audio"]))[0], sf.read(str(tmp_path / "again" / row["audio"]))[0])
    other = synthesize(tmp_path / "other", n_train=COUNTS["train"], n_dev=0, n_test=0, seed=4, voices=VOICES, jobs=1,
                       progress=False)
    assert [r["text"] for r in _rows(other["train"])] != [r["text"] for r in _rows(manifests["train"])]


@needs_engines
@needs_fortunes
def test_synth_failed_utterance_is_skipped_counted_reported(tmp_path, caplog):
    # espeak-ng rejects an unknown language (exit status 1): that voice's utterance fails, the others are kept.
    voices = ["espeak-ng:xx-nosuch", "flite:kal", "flite:slt", "espeak-ng:en-us"]
    with caplog.at_level("WARNING", logger="mdus.data"):
        manifests = synthesize(tmp_path, n_train=4, n_dev=0, n_test=0, seed=0, voices=voices, jobs=2, progress=False)
    rows = _rows(manifests["train"])
    assert len(rows) == 3 and "espeak-ng:xx-nosuch" not in {r["speaker"] for r in rows}
    report = json.loads((tmp_path / "synth_report.json").read_text())
    assert (report["synthesized"], report["failed"]) == (3, 1)
    assert report["failures"][0]["voice"] == "espeak-ng:xx-nosuch" and "exited with 1" in report["failures"][0]["error"]
    assert "1 utterance(s) failed" in caplog.text
    assert _rows(manifests["dev"]) == [] and _rows(manifests["test"]) == []


@needs_engines
@needs_fortunes
def test_synth_rejects_bad_arguments(tmp_path):
    for voices in (["flite:nosuch", "flite:kal"], ["espeak-ng:en-us+nosuch"], ["festival:kal"]):
        with pytest.raises(ValueError, match="voices"):
            synthesize(tmp_path, n_train=1, n_dev=0, n_test=0, voices=voices, progress=False)
    with pytest.raises(ValueError, match="n_dev"):
        synthesize(tmp_path, n_train=1, n_dev=-1, n_test=0, progress=False)
    with pytest.raises(ValueError, match="at least 3 voices"):
        synthesize(tmp_path, n_train=1, n_dev=1, n_test=1, voices=["flite:kal", "flite:slt"], progress=False)


@needs_engines
def test_default_voices_and_their_split():
    voices = available_voices()
    assert "flite:slt" in voices and "espeak-ng:en-us+f3" in voices and "flite:awb_time" not in voices
    assert not any("mbrola" in v for v in voices)
    pools = split_voices(voices, seed=0)
    assert sorted(pools["train"] + pools["dev"] + pools["test"]) == sorted(voices)
    for held in ("dev", "test"):
        assert not set(pools[held]) & set(pools["train"])
        assert {v.split(":")[0] for v in pools[held]} == {"espeak-ng", "flite"}  # every engine in every split
    assert split_voices(voices, seed=0) == pools and split_voices(voices, seed=1) != pools


@needs_fortunes
def test_fortune_sentences_are_clean_single_sentences():
    sentences = fortune_sentences(max_words=20)
    assert len(sentences) > 5000
    assert len({_dedupe_key(s) for s in sentences}) == len(sentences)
    for s in sentences:
        assert s.isascii() and s[0].isupper() and s[-1] in ".?!" and 3 <= len(s.split()) <= 20
        assert "  " not in s and "." not in s[:-1] and '"' not in s and not any(c.isdigit() for c in s)
    pools = split_sentences(sentences, seed=0, n_dev=50, n_test=50)
    keys = {split: {_dedupe_key(s) for s in p} for split, p in pools.items()}
    assert len(keys["dev"]) == len(keys["test"]) == 50 and len(keys["train"]) == len(sentences) - 100
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    with pytest.raises(ValueError, match="distinct sentences"):
        split_sentences(sentences[:10], seed=0, n_dev=5, n_test=5)


def test_fortune_passages(tmp_path):
    long_a = "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals."
    long_b = "Once upon a time there lived a king who had three daughters, and the youngest was the fairest."
    (tmp_path / "tales").write_text(f"Short one.\n%\n{long_a}\n\t-- Someone\n%\n{long_b}\n%\n{long_a.upper()}\n%\n"
                                    "Caf\u00e9 au lait is served here in the morning with bread and jam today.\n%\n")
    (tmp_path / "ascii-art").write_text(long_b.replace("king", "queen") + "\n")  # a skipped file
    assert fortune_passages(tmp_path, min_words=10) == [long_a, long_b]  # attribution gone, case-blind dedup
    # A passage holding a training sentence (compared case- and punctuation-blind, on word boundaries) is dropped.
    assert fortune_passages(tmp_path, min_words=10, exclude=["THE RAIN fell in torrents!"]) == [long_b]
    assert fortune_passages(tmp_path, min_words=10, exclude=["rain fell in torrent"]) == [long_a, long_b]
    assert fortune_passages(tmp_path, min_words=18) == [long_b]
    with pytest.raises(FileNotFoundError, match="fortunes"):
        fortune_passages(tmp_path / "missing")


@needs_fortunes
def test_fortune_passages_never_hold_corpus_sentences():
    spoken = fortune_sentences(max_words=10)[::7]
    passages = fortune_passages(exclude=spoken)
    assert 1000 < len(passages) < len(fortune_passages())
    keys = [f" {_dedupe_key(s)} " for s in spoken]
    for p in passages:
        assert len(p.split()) >= 40 and p.isascii()
        assert not any(k in f" {_dedupe_key(p)} " for k in keys)


def test_text_file_sentences(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat on the mat.\n\n  the   CAT sat on the mat!  \nToo short\n"
                                    "Odd <markup> here now\nNon ascii caf\u00e9 is here\n-starts with a dash\n"
                                    "a plain lowercase line with 42 in it\n")
    assert text_file_sentences([tmp_path / "a.txt"]) == ["The cat sat on the mat.",
                                                         "a plain lowercase line with 42 in it"]
    assert text_file_sentences([tmp_path / "a.txt"], max_words=5) == []


def test_limit_vocabulary():
    sentences = ["The cat sat.", "the dog sat!", "A cat ran", "zebra", "The cat, the dog."]
    # Counts: the 4, cat 3, sat 2, dog 2, a 1, ran 1, zebra 1 -> the top 3 are {the, cat, sat}.
    assert limit_vocabulary(sentences, 3) == ["The cat sat."]
    assert limit_vocabulary(sentences, 4) == ["The cat sat.", "the dog sat!", "The cat, the dog."]
    assert limit_vocabulary(sentences, 100) == sentences
    with pytest.raises(ValueError, match="max_vocab"):
        limit_vocabulary(sentences, 0)


@needs_engines
def test_synth_from_text_files_and_cli(tmp_path, capsys):
    lines = [f"Sentence number {w} is spoken here." for w in ("one", "two", "three", "four", "five", "six")]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    rc = main(["data", "synth", "--out", str(tmp_path / "c"), "--n-train", "2", "--n-dev", "1", "--n-test", "1",
               "--text-file", str(tmp_path / "s.txt"), "--voices", "flite:kal,flite:slt,flite:awb", "--jobs", "1",
               "--no-progress"])
    assert rc == 0
    rows = {s: _rows(tmp_path / "c" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert {r["text"] for rs in rows.values() for r in rs} <= set(lines)
    assert len({r["speaker"] for rs in rows.values() for r in rs}) == 3  # 3 voices: one per split
    assert main(["data", "check", str(tmp_path / "c" / "train.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "utterances: 2" in out and "loaded: 2" in out and "skipped: 0" in out
    assert "duration mismatches (> 0.05 s): 0" in out
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n-train", "1", "--voices", "flite:nosuch",
                 "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["data", "synth", "--list-voices"]) == 0  # alone: no --out or --n-train needed
    assert "flite:slt" in capsys.readouterr().out.split()
    assert main(["data", "synth", "--n-train", "3"]) == 2
    assert "--out required" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- readers


def _tone(seconds, sr, channels=1, freq=440.0):
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_read_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, ch, utts in (("19", "198", {"19-198-0000": 1.0, "19-198-0001": 0.5}), ("26", "495", {"26-495-0003": 2.0})):
        d = root / spk / ch
        d.mkdir(parents=True)
        for uid, sec in utts.items():
            sf.write(str(d / f"{uid}.flac"), _tone(sec, 16000), 16000, format="FLAC")
        (d / f"{spk}-{ch}.trans.txt").write_text("".join(f"{uid} WORDS OF {uid[-1]}\n" for uid in utts)
                                                 + ("19-198-0002 AUDIO IS MISSING\n" if spk == "19" else ""))
    utts = list(read_librispeech(root))
    assert [(u.audio_path.name, u.text, u.speaker) for u in utts] == [
        ("19-198-0000.flac", "WORDS OF 0", "19"), ("19-198-0001.flac", "WORDS OF 1", "19"),
        ("19-198-0002.flac", "AUDIO IS MISSING", "19"), ("26-495-0003.flac", "WORDS OF 3", "26")]
    assert [u.duration for u in utts] == [1.0, 0.5, None, 2.0]
    assert list(read_corpus(root)) == utts
    stream = AudioStream(utts)
    assert [w.numel() for _, w in stream] == [16000, 8000, 32000]
    assert stream.skipped == {"missing": 1} and stream.loaded == 3 and stream.seconds == pytest.approx(3.5)


def test_read_pairs(tmp_path):
    root = tmp_path / "recordings"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    sf.write(str(root / "alice" / "a1.wav"), _tone(1.0, 16000), 16000)
    (root / "alice" / "a1.txt").write_text("hello\n  world \n")
    sf.write(str(root / "bob" / "b1.flac"), _tone(0.25, 16000), 16000)
    (root / "bob" / "b1.txt").write_text("good morning")
    sf.write(str(root / "bob" / "b2.wav"), _tone(0.25, 16000), 16000)  # no transcript: not an utterance
    sf.write(str(root / "top.wav"), _tone(0.5, 22050), 22050)
    (root / "top.txt").write_text("at the top")
    utts = list(read_pairs(root))
    assert [(u.audio_path.relative_to(root).as_posix(), u.text, u.speaker, u.duration) for u in utts] == [
        ("alice/a1.wav", "hello world", "alice", 1.0), ("bob/b1.flac", "good morning", "bob", 0.25),
        ("top.wav", "at the top", "recordings", 0.5)]
    assert list(read_corpus(root)) == utts
    with pytest.raises(ValueError, match="folder"):
        list(read_pairs(root / "top.wav"))


def test_manifest_round_trip_and_errors(tmp_path):
    d = tmp_path / "corpus"
    (d / "wavs").mkdir(parents=True)
    sf.write(str(d / "wavs" / "u.wav"), _tone(0.5, 16000), 16000)
    utts = [Utterance(d / "wavs" / "u.wav", "a text", "spk", 0.5), Utterance(d / "wavs" / "v.wav", "b", "s2", None)]
    path = write_manifest(utts, d / "m.jsonl")
    assert _rows(path)[0] == {"audio": "wavs/u.wav", "text": "a text", "speaker": "spk", "duration": 0.5}
    assert list(read_manifest(path)) == utts
    moved = tmp_path / "moved"
    d.rename(moved)
    assert [u.audio_path for u in read_corpus(moved / "m.jsonl")] == [moved / "wavs" / "u.wav",
                                                                      moved / "wavs" / "v.wav"]
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav", "text": "x"}\n\n{"audio": "b.wav"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        list(read_manifest(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: not JSON"):
        list(read_manifest(tmp_path / "bad2.jsonl"))
    with pytest.raises(ValueError, match="neither"):
        read_corpus(tmp_path / "nothing_here")
    (tmp_path / "bad3.jsonl").write_bytes(b'{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad3.jsonl:2: not UTF-8 text"):
        list(read_manifest(tmp_path / "bad3.jsonl"))
    (tmp_path / "bad4.jsonl").write_text('{"audio": "a.wav", "text": "x", "duration": "n/a"}\n')
    with pytest.raises(ValueError, match=r"bad4.jsonl:1: duration must be a number of seconds, got 'n/a'"):
        list(read_manifest(tmp_path / "bad4.jsonl"))
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    sf.write(str(pairs / "u1.wav"), _tone(0.5, 16000), 16000)
    (pairs / "u1.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"u1.txt:1: not UTF-8 text"):
        list(read_corpus(pairs))


# ------------------------------------------------------------------------------------------------- bad audio


@pytest.fixture
def bad_corpus(tmp_path):
    """A manifest over good, repairable and broken audio files."""
    d = tmp_path / "bad"
    d.mkdir()
    sf.write(str(d / "good.wav"), _tone(1.0, 16000), 16000)
    sf.write(str(d / "stereo8k.wav"), _tone(1.5, 8000, channels=2), 8000)
    (d / "corrupt.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "empty.wav").write_bytes(b"")
    sf.write(str(d / "zero.wav"), np.zeros(0, np.float32), 16000)
    sf.write(str(d / "nan.wav"), np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    (d / "a_folder.wav").mkdir()
    sf.write(str(d / "tiny.wav"), np.full(300, 0.1, np.float32), 16000)  # decodes, but under one 25 ms frame
    names = ["good", "stereo8k", "corrupt", "empty", "zero", "missing", "nan", "a_folder", "tiny"]
    utts = [Utterance(d / f"{n}.wav", n, "s", 1.5 if n == "stereo8k" else 1.0) for n in names]
    return write_manifest(utts, d / "m.jsonl"), d


def test_load_audio_resamples_and_downmixes(bad_corpus):
    _, d = bad_corpus
    fixes = Counter()
    x = load_audio(d / "stereo8k.wav", fixes=fixes)
    assert x.dtype == torch.float32 and x.ndim == 1 and x.numel() == 24000  # 1.5 s at 16 kHz
    assert fixes == {"resampled": 1, "downmixed": 1}
    # The 440 Hz tone survives the 8 -> 16 kHz polyphase filter (away from the filter's edge transients).
    t = np.arange(24000) / 16000
    assert np.abs(x.numpy()[500:-500] - 0.5 * np.sin(2 * np.pi * 440 * t)[500:-500]).max() < 0.01
    assert load_audio(d / "good.wav", fixes=fixes).numel() == 16000 and fixes == {"resampled": 1, "downmixed": 1}
    assert resample(np.zeros(22050, np.float32), 22050, 16000).shape == (16000,)


@pytest.mark.parametrize("name,reason", [("corrupt", "corrupt"), ("empty", "empty"), ("zero", "empty"),
                                         ("missing", "missing"), ("nan", "nonfinite"), ("a_folder", "unreadable"),
                                         ("tiny", "short")])
def test_load_audio_bad_files_raise_bad_audio(bad_corpus, name, reason):
    _, d = bad_corpus
    with pytest.raises(BadAudio) as e:
        load_audio(d / f"{name}.wav")
    assert e.value.reason == reason and isinstance(e.value, ValueError) and name in str(e.value)


def test_audio_stream_counts_and_check_cli(bad_corpus, capsys, caplog):
    manifest, _ = bad_corpus
    stream = AudioStream(read_manifest(manifest))
    with caplog.at_level("WARNING", logger="mdus.data"):
        got = [(u.text, w.numel()) for u, w in stream]
    assert got == [("good", 16000), ("stereo8k", 24000)]
    assert stream.loaded == 2 and stream.seconds == pytest.approx(2.5)
    assert stream.skipped == {"corrupt": 1, "empty": 2, "missing": 1, "nonfinite": 1, "unreadable": 1, "short": 1}
    assert stream.fixed == {"resampled": 1, "downmixed": 1} and stream.n_skipped == 7
    assert "7 skipped" in stream.summary() and "corrupt: 1" in caplog.text
    assert main(["data", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    for line in ("utterances: 9", "loaded: 2", "skipped: 7", "corrupt: 1", "empty: 2", "missing: 1", "nonfinite: 1",
                 "unreadable: 1", "short: 1", "fixed: downmixed: 1, resampled: 1", "duration mismatches (> 0.05 s): 0"):
        assert line in out
    assert main(["data", "check", "--strict", str(manifest)]) == 1
