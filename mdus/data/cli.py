"""``mdus data``: synthesize the embedded speech corpus (``synth``) and check a corpus's audio (``check``)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("synth", help="synthesize a train/dev/test corpus with espeak-ng and flite",
                       description="Synthesize English sentences (Debian fortunes, or --text-file) with espeak-ng and "
                                   "flite voices into 16 kHz wavs and JSONL manifests; dev/test voices and sentences "
                                   "are held out of train.")
    p.add_argument("--out", help="output folder (required, except with --list-voices)")
    p.add_argument("--n-train", type=int, help="train utterances (required, except with --list-voices)")
    p.add_argument("--n-dev", type=int, default=0, help="dev utterances (held-out voices and sentences)")
    p.add_argument("--n-test", type=int, default=0, help="test utterances (held-out voices and sentences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voices", default=None,
                   help="comma-separated voice ids (engine:name, e.g. flite:slt,espeak-ng:en-us+f3); default: all, "
                        "see --list-voices")
    p.add_argument("--text-file", action="append", default=None, dest="text_files",
                   help="sentences, one per line, instead of fortunes (repeatable)")
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--max-vocab", type=int, default=None,
                   help="keep only sentences made of the N most frequent words (a small-vocabulary corpus)")
    p.add_argument("--held-out-voices", type=float, default=0.1,
                   help="fraction of each engine's voices held out for each of dev and test")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-voices", action="store_true", help="print the available voices and exit")

    p = sub.add_parser("check", help="load every utterance of a corpus and count bad audio",
                       description="Load every utterance of a manifest, LibriSpeech folder or (audio, txt) folder at "
                                   "the target rate and print what loaded, what was skipped (by reason), what was "
                                   "resampled or down-mixed, and durations that disagree with the manifest.")
    p.add_argument("corpus", help="a .jsonl manifest, a LibriSpeech-layout folder, or a folder of (audio, txt) pairs")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="seconds a loaded duration may differ from the manifest's before it is counted")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any file was skipped")


def run(args: argparse.Namespace) -> int:
    """Speech data: synthesize a corpus, check a corpus."""
    # The library reports through logging; on the command line its summaries are the output.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.data_command == "synth":
        return _synth(args)
    return _check(args)


def _synth(args) -> int:
    from mdus.data.synth import available_voices, synthesize

    if args.list_voices:
        print("\n".join(available_voices()))
        return 0
    missing = [flag for flag, value in (("--out", args.out), ("--n-train", args.n_train)) if value is None]
    if missing:
        print(f"mdus data synth: {' and '.join(missing)} required")
        return 2
    voices = [v.strip() for v in args.voices.split(",") if v.strip()] if args.voices else None
    try:
        manifests = synthesize(args.out, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
                               voices=voices, text_files=args.text_files, min_words=args.min_words,
                               max_words=args.max_words, max_vocab=args.max_vocab,
                               held_out_voices=args.held_out_voices, jobs=args.jobs,
                               progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"mdus data synth: {e}", file=sys.stderr)
        return 2
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return 0


def _check(args) -> int:
    from mdus.data.audio import AudioStream
    from mdus.data.readers import read_corpus, transcript_issues

    try:
        utts = list(read_corpus(args.corpus))
    except (ValueError, OSError) as e:
        print(f"mdus data check: {e}", file=sys.stderr)
        return 2
    stream = AudioStream(utts, args.sample_rate, log_summary=False)  # the report below says it all
    mismatched = []
    for utt, wav in stream:
        if utt.duration is not None and abs(wav.numel() / args.sample_rate - utt.duration) > args.tolerance:
            mismatched.append((utt.audio_path, utt.duration, wav.numel() / args.sample_rate))
    print(f"corpus: {args.corpus}")
    print(f"utterances: {len(utts)} ({len({u.speaker for u in utts})} speakers)")
    print(f"loaded: {stream.loaded} ({stream.seconds / 3600:.3f} h at {args.sample_rate} Hz)")
    print(f"skipped: {stream.n_skipped}" + "".join(f"\n  {r}: {n}" for r, n in sorted(stream.skipped.items())))
    print("fixed: " + (", ".join(f"{k}: {n}" for k, n in sorted(stream.fixed.items())) or "none"))
    issues = transcript_issues(utts)
    print(f"empty transcripts: {issues['empty']}")
    print(f"duplicates (same audio and transcript): {issues['duplicates']}")
    print(f"duration mismatches (> {args.tolerance} s): {len(mismatched)}")
    for path, want, got in mismatched[:10]:
        print(f"  {path}: manifest {want:.3f} s, audio {got:.3f} s")
    if stream.examples:
        print("skipped files:")
        for path, reason, detail in stream.examples:
            print(f"  {reason}: {path}" + (f" ({detail})" if detail else ""))
    return 1 if args.strict and stream.n_skipped else 0
