"""``mdus demo``: synthesize speech, train every method from the real SmolLM2-135M, evaluate, report.

Steps (each writes into ``OUT``):

1. ``OUT/data``: a TTS corpus (``mdus.data.synthesize``: fortunes sentences of at most ``--max-words`` words from
   a ``--max-vocab``-word vocabulary, espeak-ng/flite voices, held-out voices and sentences for dev/test);
2. ``OUT/tokenizer``: the speech front end fit on the training audio (``--speech-input``): the character
   posteriors (the default) or the k-means units of a CTC speech encoder trained on the training split first (kept
   in ``OUT/tokenizer/encoder``), standardized log-mel features, or log-mel k-means units;
3. ``OUT/<method>``: each method (``METHOD`` or ``METHOD@ROUTE``) trained on ``[speech] -> transcript``
   (``mdus.train``), with checkpoints, ``metrics.jsonl`` and ``trainable.safetensors``; LoRA's rank is matched to
   the up-scaled transformer model's trainable-parameter count;
4. evaluation (``mdus.evaluate.evaluate_model``): greedy ASR on the test split (WER/CER), the test transcripts'
   loss given their speech, and text degradation against a fresh copy of the base, on general English the corpus
   never spoke (40 fortunes passages, ``mdus.evaluate.general_text``) and on the test transcripts as plain text;
5. ``OUT/results.json`` (method -> wer, cer, text_ppl, text_ppl_base, text_kl, trainable_params, ...) and
   ``OUT/report.md`` with a table and PNG plots.

Every method trains the same number of steps on the same batches in the same order, with the same learning rates
(``--lr`` for what text passes through, ``--speech-lr`` for the speech embeddings and front end), schedule and text
replay (``--text-kl``: KL(base ‖ model) on general-text passages the evaluation does not use,
``mdus.train.TextReplay``; skipped for ``speech_only``, whose text path cannot change): one recipe, as the paper
compares methods (its recipe has no replay). The step count fills 70% of the budget left after the data, from each
method's timed training step (``OUT/schedule.json``); the rest goes to evaluation.

Nothing is lost to an interruption: SIGINT/SIGTERM during training save a checkpoint and exit with status 130, and
rerunning the same command into the same ``OUT`` keeps the methods already in ``results.json`` and resumes the
interrupted one from its checkpoint with its saved configuration (``OUT/<method>/train_config.json``). A rerun
must keep OUT's settings (``OUT/demo_settings.json``; only ``--budget-minutes``, ``--methods``, ``--device`` and
``--no-progress`` may change); methods it does not name stay in the results.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

DEFAULT_METHODS = ("dus-ebranchformer", "dus-ebranchformer@speech_only", "dus-transformer", "full-ft", "lora")


def parse_method(spec: str) -> tuple[str, str]:
    """``"METHOD"`` or ``"METHOD@ROUTE"`` (an up-scaled method with ``route``) -> (method, route).

    Example:
        >>> parse_method("dus-transformer@speech_only"), parse_method("lora")
        (('dus-transformer', 'speech_only'), ('lora', 'all'))
    """
    from mdus.train import METHODS
    from mdus.upscale import ROUTES

    method, _, route = spec.partition("@")
    route = route or "all"
    if method not in METHODS:
        raise ValueError(f"--methods: {spec!r}: the method must be one of {', '.join(METHODS)}")
    if route not in ROUTES or (route != "all" and not method.startswith("dus")):
        raise ValueError(f"--methods: {spec!r}: a route (one of {', '.join(ROUTES)}) applies to the dus methods only")
    return method, route


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mdus.train import (
        add_lr_arguments,
        add_speech_input_arguments,
        add_text_replay_arguments,
        nonnegative_int,
        positive_float,
        positive_int,
    )

    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--budget-minutes", type=positive_float, default=40.0, help="total time budget (default 40)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="methods to train, METHOD or METHOD@ROUTE (e.g. dus-transformer@speech_only)")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-train", type=positive_int, default=1000, help="training utterances")
    p.add_argument("--n-dev", type=positive_int, default=20)
    p.add_argument("--n-test", type=positive_int, default=30)
    p.add_argument("--max-words", type=positive_int, default=10, help="longest sentence, in words")
    p.add_argument("--max-vocab", type=nonnegative_int, default=600,
                   help="sentences made of the N most frequent words only (0: any fortunes sentence)")
    # Measured (README), the whole demo each time: with log-mel features, 200 k-means units or k-means units of a CTC
    # encoder, no method learns to transcribe in the CPU budget (WER 1.0-1.7, test transcript loss 2.5-3.0); with the
    # CTC encoder's character posteriors every method does (WER 0.62-0.80, transcript loss 1.79-2.00).
    add_speech_input_arguments(p, default="ctc-chars")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="tokens per packed batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="longest transcript decoded")
    # The same rates and replay for every method. Measured (README), 276 steps each: at 1e-3 every method but full
    # fine-tuning (a tie) transcribes better than at the paper's 1e-4; with text replay the up-scaled models keep the
    # text while full fine-tuning does not (KL ~0.5 whatever the weight); at weight 16 the up-scaled models drift 2-15x
    # less than LoRA, at weight 1 only 1.3-2.3x less (the demo at both weights: README); 2 passages cost less than 4.
    add_lr_arguments(p, lr=1e-3)
    add_text_replay_arguments(p, default=16.0, passages=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def _step_seconds(lm, seqs, cfg, device, replay=None) -> float:
    """Seconds per training step of ``lm``: two timed steps (forward, backward, clipping and an AdamW update at
    learning rate 0, which leaves every weight as it was) after an untimed warm-up step, on a typical batch (plus
    its text replay when ``cfg.text_kl > 0``)."""
    from mdus.train import autocast, collate, epoch_batches, training_loss

    batch = epoch_batches([s[0].shape[0] for s in seqs], 0, cfg)[0]
    b = collate([seqs[i] for i in batch], device)
    lm.to(device).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    for i in range(3):
        if i == 1:
            t0 = time.monotonic()
        with autocast(cfg, device):  # as train() runs
            loss = training_loss(lm, b, cfg, replay)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.monotonic() - t0) / 2 * 1.05  # + logging and the periodic dev loss


def run(args: argparse.Namespace) -> int:
    """Synthesize data, train and evaluate every method from SmolLM2-135M, write report.md and results.json."""
    from mdus import evaluate as E
    from mdus import train as T
    from mdus.data.readers import read_manifest
    from mdus.data.synth import synthesize
    from mdus.models import load_base

    try:
        specs = [parse_method(m) for m in args.methods]
    except ValueError as e:
        print(f"mdus demo: {e}")
        return 2
    if args.speech_input == "features":
        try:
            T.feature_stride(args.frame_rate)
        except ValueError as e:
            print(f"mdus demo: --frame-rate: {e}")
            return 2
    t_start = time.monotonic()
    budget_s = args.budget_minutes * 60
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # What a rerun into OUT keeps (data, tokenizer, trained methods, results) was made with OUT's first settings: a
    # rerun must use them too. Only the budget, the methods, the device and the progress bars may change.
    free = ("out", "budget_minutes", "methods", "device", "no_progress")
    settings = json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in free}, default=str))
    settings_file = out / "demo_settings.json"
    if settings_file.is_file():
        saved = json.loads(settings_file.read_text())
        changed = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in settings.items()
                   if k in saved and saved[k] != v]
        if changed:
            print(f"mdus demo: {out} was started with other settings ({', '.join(changed)}); rerun with those, or "
                  f"use a new --out")
            return 2
    else:
        settings_file.write_text(json.dumps(settings, indent=1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)

    print(f"[1/5] data -> {out / 'data'}")
    progress = not args.no_progress
    manifests = synthesize(out / "data", n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
                           max_words=args.max_words, max_vocab=args.max_vocab or None, progress=progress)

    print(f"[2/5] speech input: {_speech_input(args)}")

    tok_dir = out / "tokenizer"
    read = {}  # split -> its (utterance, waveform) pairs, where they are read here already
    train_audio = lambda: T.read_audio(list(read_manifest(manifests["train"])), progress=progress)  # noqa: E731
    try:
        tokenizer, utterances = T.speech_input_in(
            tok_dir, train_audio, args.speech_input, units=args.units, frame_rate=args.frame_rate, seed=args.seed,
            ctc_epochs=args.ctc_epochs, device=device, progress=progress)
    except ValueError as e:
        print(f"mdus demo: {e}")
        return 2
    if utterances is not None:
        read["train"] = utterances
    if args.speech_input.startswith("ctc-") and not (tok_dir / "encoder_test.json").is_file():
        # What the speech input can carry: the CTC encoder's own transcription of the test split.
        ctc = tokenizer.encoder if args.speech_input == "ctc-chars" else tokenizer.features
        tests = read["test"] = T.read_audio(list(read_manifest(manifests["test"])), progress=progress)
        rates = E.error_rates([u.text for u, _ in tests], [ctc.transcribe(w) for _, w in tests])
        (tok_dir / "encoder_test.json").write_text(json.dumps(rates, indent=1))
        print(f"      the CTC encoder alone on the test split: CER {rates['cer']:.3f}, WER {rates['wer']:.3f}")
    _, text_tok = load_base(args.model)
    encoder = T.speech_encoder_config(tokenizer, text_tok)
    (_, train_seqs), (_, dev_seqs), (test_items, test_seqs) = (
        T.sequences_from_manifest(manifests[split], tokenizer, text_tok, progress=progress, audio=read.get(split))
        for split in ("train", "dev", "test"))
    read.clear()  # the waveforms are not needed past here
    spoken = [u.text for u in read_manifest(manifests["train"])]
    general = E.general_text(spoken, seed=args.seed)

    # A rerun into the same OUT keeps what an interrupted run finished: the methods already in results.json are not
    # redone, and a method stopped mid-training resumes from its checkpoint with its saved schedule.
    done = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    lora_target = None
    if any(m == "lora" for m, _ in specs):  # match the up-scaled model even if it is not in the run
        lora_target = _count(T.build_method(load_base(args.model)[0], "dus-transformer",
                                            speech_vocab_size=tokenizer.vocab_size, speech_encoder=encoder))

    def build(method: str, route: str):
        base, _ = load_base(args.model, device=device)
        torch.manual_seed(args.seed)
        return T.build_method(base, method, speech_vocab_size=tokenizer.vocab_size, speech_encoder=encoder,
                              route=route, lora_params=lora_target)

    def config(max_steps: int, budget_s: float, route: str) -> T.TrainConfig:
        return T.TrainConfig(lr=args.lr, speech_lr=args.speech_lr, max_tokens=args.max_tokens, seed=args.seed,
                             max_steps=max_steps, warmup_steps=max(1, min(20, max_steps // 10)),
                             eval_every=max(1, max_steps // 4), save_every=25, budget_minutes=budget_s / 60,
                             text_kl=T.replay_weight(args.text_kl, route), text_kl_passages=args.text_kl_passages,
                             progress=progress)

    # Every method trains for the same steps on the same batches in the same order, with the same schedule (the
    # paper's comparison): the step count is what fits 70% of the budget left, timed on each method's real step.
    todo = [(n, s) for n, s in zip(args.methods, specs, strict=True) if n not in done]
    replay = None
    # The teacher: one more untouched copy of the base.
    if any(T.replay_weight(args.text_kl, route) > 0 for _, (_, route) in todo):
        replay = T.general_text_replay(spoken, text_tok, args.model, device=device, seed=args.seed)
    schedule_file = out / "schedule.json"
    schedule = json.loads(schedule_file.read_text()) if schedule_file.is_file() else {"step_seconds": {}}
    missing = [(n, s) for n, s in todo if n not in schedule["step_seconds"]]
    if missing:
        print(f"[3/5] timing a training step of {', '.join(n for n, _ in missing)}")
        for name, (method, route) in missing:
            lm = build(method, route)
            schedule["step_seconds"][name] = _step_seconds(lm, train_seqs, config(1, budget_s, route), device, replay)
            del lm
    if "max_steps" not in schedule:
        left = budget_s - (time.monotonic() - t_start)
        per_step = sum(schedule["step_seconds"][n] for n, _ in todo)
        schedule["max_steps"] = max(5, int(0.7 * left / max(per_step, 1e-9)))
        print(f"      {schedule['max_steps']} steps per method ({per_step:.2f} s per step of all methods together)")
    schedule_file.write_text(json.dumps(schedule, indent=1))

    # Methods an earlier run into OUT finished and this one does not name stay in the results and the report.
    results, base_ref = {n: r for n, r in done.items() if n not in args.methods}, None
    for i, (name, (method, route)) in enumerate(zip(args.methods, specs, strict=True)):
        if name in done:
            print(f"[3/5] {name}: finished by an earlier run into {out}, kept (use a new --out to redo it)")
            results[name] = done[name]
            continue
        print(f"[3/5] {name} ({i + 1}/{len(args.methods)}): {schedule['max_steps']} steps")
        lm = build(method, route)
        run_dir, cfg_file = out / name, out / name / "train_config.json"
        resume = (run_dir / "checkpoint.pt").is_file() and cfg_file.is_file()
        if resume:
            saved = json.loads(cfg_file.read_text())
            cfg = T.TrainConfig(**{**saved, "betas": tuple(saved["betas"]), "progress": progress})
            print(f"      resuming {run_dir / 'checkpoint.pt'} ({cfg.max_steps} steps in all)")
        else:  # a hard stop at twice the expected time, should a step turn out far slower than timed
            cfg = config(schedule["max_steps"], 2 * schedule["max_steps"] * schedule["step_seconds"][name] + 60,
                         route)
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(json.dumps(asdict(cfg), indent=1))
        summary = T.train(lm, train_seqs, dev_seqs, cfg, run_dir, device=device, resume=resume, replay=replay)
        if summary["status"] not in ("done", "budget"):  # SIGINT/SIGTERM: saved, stop here
            print(f"mdus demo: stopped by {summary['status']} at step {summary['step']}; rerun the same command "
                  f"to continue from {run_dir / 'checkpoint.pt'}")
            return 130
        lm.save_trainable(run_dir / "trainable.safetensors")
        print(f"[4/5] {name}: evaluating")
        if base_ref is None:
            base_ref, _ = load_base(args.model, device=device)
        scores = E.evaluate_model(lm, base_ref, test_items, text_tok, general=general, device=device,
                                  max_new_tokens=args.max_new_tokens, progress=progress)
        results[name] = {**scores, "test_loss": T.evaluate_loss(lm, test_seqs, cfg, device),
                         "trainable_params": _count(lm), "steps": summary["step"],
                         "train_seconds": summary["elapsed_s"]}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        del lm
    print("[5/5] report")
    write_report(out, results, args)
    print(f"done in {(time.monotonic() - t_start) / 60:.1f} min: {out / 'report.md'}")
    return 0


def _speech_input(args) -> str:
    what = {"units": f"{args.units} k-means units of log-mel frames",
            "features": "log-mel features + conv subsampler",
            "ctc-units": f"{args.units} k-means units of a CTC speech encoder ({args.ctc_epochs} epochs)",
            "ctc-chars": f"character posteriors of a CTC speech encoder ({args.ctc_epochs} epochs), one position "
                         "per emitted character, read through the LLM's character embeddings"}[args.speech_input]
    return what if args.speech_input == "ctc-chars" else f"{what} at {args.frame_rate:g} Hz"


def _replay(args) -> str:
    if args.text_kl <= 0:
        return ""
    return (f"; text replay: + {args.text_kl:g} x KL(base‖model) on {args.text_kl_passages} general-text passages "
            "per step, fortunes the evaluation does not use (not for speech_only, whose text path cannot change)")


def _count(lm) -> int:
    from mdus.upscale import count_trainable

    return count_trainable(lm)


def _interval(ci) -> str:
    return f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""


def write_report(out: Path, results: dict, args) -> None:
    rows = ["| method | trainable params | WER | CER | transcript loss | text ppl (base) | KL(base‖model) | "
            "greedy agreement | transcripts: KL | steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        agree = "" if r.get("greedy_agreement") is None else f"{r['greedy_agreement']:.2f}"
        rows.append(f"| {m} | {r['trainable_params']:,} | {r['wer']:.3f}{_interval(r.get('wer_ci'))} | {r['cer']:.3f} "
                    f"| {r['test_loss']:.3f} "
                    f"| {r['text_ppl']:.2f} ({r['text_ppl_base']:.2f}) | {r['text_kl']:.4f} | {agree} "
                    f"| {math.nan if r.get('transcript_kl') is None else r['transcript_kl']:.4f} | {r['steps']} |")
    plots = _plots(out, results)
    n_scored = next(iter(results.values()), {}).get("utterances", args.n_test)  # the readable ones
    lines = ["# mdus demo report", "",
             f"Command: `mdus demo --out {out} --budget-minutes {args.budget_minutes} --speech-input "
             f"{args.speech_input} --lr {args.lr:g} --text-kl {args.text_kl:g} --text-kl-passages "
             f"{args.text_kl_passages}` (speech input: "
             f"{_speech_input(args)}; {args.n_train} training utterances of at most {args.max_words} words"
             f"{f' from a {args.max_vocab}-word vocabulary' if args.max_vocab else ''}; every method: the same "
             f"steps and batches, peak learning rate {args.lr:g} for what text passes through and "
             f"{args.speech_lr:g} for the speech embeddings and front end{_replay(args)}).", "",
             f"WER/CER: greedy decoding of the test split (held-out voices and sentences); in brackets, the 95% "
             f"bootstrap interval of the WER over the {n_scored} test utterances (methods whose intervals overlap "
             f"widely are not told apart by this test set). Transcript loss: the mean "
             "next-token loss on the test transcripts given their speech (teacher forcing), which moves long before "
             "WER does. Text ppl / KL / greedy agreement: general English the corpus never spoke (40 fortunes "
             "passages of 40+ words, at most 96 tokens each), against the untouched base model; transcripts: KL: "
             "the same KL on the test sentences as plain text (the training domain). `@speech_only`: the inserted "
             "blocks update speech positions only, so text passes through the "
             "frozen base exactly.", "", *rows, ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    encoder_test = out / "tokenizer" / "encoder_test.json"
    if args.speech_input.startswith("ctc-") and encoder_test.is_file():
        rates = json.loads(encoder_test.read_text())
        lines += ["", f"The CTC speech encoder behind the speech input, alone (greedy CTC) on the test split: CER "
                      f"{rates['cer']:.3f}, WER {rates['wer']:.3f}{_interval(rates.get('wer_ci'))}: what the speech "
                      "input carries of the speech."]
    lines += ["", "Examples (test split, first utterances):", ""]
    for m, r in results.items():
        for ex in r["examples"][:2]:
            lines.append(f"- {m}: ref `{ex['ref']}` / hyp `{ex['hyp']}`")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _log_scale(ax, axis: str, vals) -> None:
    """A log axis where ``vals`` span more than 20x (text KLs do: 0 for speech_only, ~0.002 to ~0.5), symlog when
    one of them is 0 (linear below the smallest positive value); left linear otherwise."""
    pos = [v for v in vals if v > 0 and math.isfinite(v)]
    if not pos or max(pos) < 20 * min(pos):
        return
    scale = getattr(ax, f"set_{axis}scale")
    if len(pos) == len(vals):
        scale("log")
    else:
        scale("symlog", linthresh=min(pos))


def _plots(out: Path, results: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: report.md has no plots")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in results:
        log = out / m / "metrics.jsonl"
        if log.is_file():
            pts = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (transcript tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    names = list(results)
    for key, label, log in (("wer", "WER (test; bars: 95% interval)", False),
                            ("text_kl", "KL(base ‖ model) on general text", True),
                            ("trainable_params", "trainable parameters", True)):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        vals = [results[m][key] for m in names]
        cis = [results[m].get(f"{key}_ci") for m in names]
        err = None
        if all(cis):  # the bootstrap interval of the test set as error bars
            err = [[v - lo for v, (lo, _) in zip(vals, cis, strict=True)],
                   [hi - v for v, (_, hi) in zip(vals, cis, strict=True)]]
        ax.bar(names, vals, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_ylabel(label)
        if log:
            _log_scale(ax, "y", vals)
        for i, v in enumerate(vals):
            ax.text(i, v if err is None else v + err[1][i], f"{v:.3g}" if not math.isnan(v) else "nan",
                    ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.margins(y=0.12)
        fig.tight_layout()
        paths.append(out / f"{key}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # The trade-off in one picture: what each method learnt of the task against how far its text moved.
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(names):
        ax.scatter(results[m]["text_kl"], results[m]["test_loss"], color=f"C{i}", label=m)
    _log_scale(ax, "x", [results[m]["text_kl"] for m in names])
    ax.set_xlabel("KL(base ‖ model) on general text (lower: text kept)")
    ax.set_ylabel("test transcript loss given speech (lower: better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
