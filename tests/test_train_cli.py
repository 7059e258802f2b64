"""`mdus train` end to end on a tiny synthesized corpus and a tiny model with SmolLM2's tokenizer."""

import json
import os
import shutil
import signal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mdus import train as T
from mdus.__main__ import main


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    if not (shutil.which("espeak-ng") and shutil.which("flite")):
        pytest.skip("espeak-ng / flite are not installed (scripts/setup.sh installs them)")
    from mdus.data.synth import synthesize
    from mdus.models import embedded_gguf, load_base

    try:
        embedded_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("train_cli")
    synthesize(root / "corpus", n_train=8, n_dev=2, n_test=0, seed=0, progress=False)
    _, tok = load_base()
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, tie_word_embeddings=True))
    tiny.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root


@pytest.mark.parametrize("speech_input", ["units", "features", "ctc-units", "ctc-chars"])
def test_train_cli_and_resume(tiny_setup, speech_input, monkeypatch):
    out = tiny_setup / f"run_{speech_input}"
    args = ["train", "--data", str(tiny_setup / "corpus"), "--out", str(out), "--model", str(tiny_setup / "tiny"),
            "--method", "dus-ebranchformer", "--speech-input", speech_input, "--units", "8", "--ctc-epochs", "2",
            "--max-steps", "4", "--max-tokens", "512", "--eval-every", "2", "--save-every", "2", "--no-progress"]
    replay = speech_input == "features"  # text replay on fortunes passages, with one of the inputs
    if replay:
        args += ["--text-kl", "1", "--text-kl-passages", "2"]
    import mdus.data.audio as A

    reads, load_audio = [], A.load_audio
    monkeypatch.setattr(A, "load_audio", lambda path, *a, **k: reads.append(path) or load_audio(path, *a, **k))
    assert main(args) == 0
    assert len(reads) == len(set(reads)) == 8 + 2  # each train and dev file read once (fitting the input included)
    assert main(args) == 2  # the folder holds a run: continuing it takes --resume
    lr_at = args.index("--max-steps")
    assert main(args[:lr_at] + ["--lr", "0.5"] + args[lr_at:] + ["--resume"]) == 2  # another recipe
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4] and "dev_loss" in lines[1]
    assert all(("text_kl" in ln) == replay for ln in lines)
    for name in ("checkpoint.pt", "trainable.safetensors", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert main(args + ["--resume"]) == 0  # already finished: nothing to redo, nothing lost
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    kind = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["kind"]
    assert kind == {"units": "kmeans", "features": "logmel_features", "ctc-units": "kmeans",
                    "ctc-chars": "ctc_posteriors"}[speech_input]
    # A CTC encoder lives in the tokenizer folder, which refers to it relatively.
    config = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    if speech_input == "ctc-units":
        assert config["features"] == {"type": "ctc", "path": "encoder"}
    if speech_input == "ctc-chars":
        assert config["encoder"] == "encoder"
    if speech_input.startswith("ctc-"):
        assert (out / "tokenizer/encoder/encoder.json").is_file()


def test_train_cli_missing_corpus(tmp_path):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2


def test_train_cli_malformed_manifest_and_transcript_issues(tmp_path, capsys):
    """A malformed manifest line is named in one line (exit 2) before anything is fitted; empty transcripts and
    duplicate lines are counted by `mdus data check`."""
    (tmp_path / "train.jsonl").write_text('{"audio": "a.wav", "text": "hi"}\n{"audio": "b.wav"}\n')
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "train.jsonl:2: expected an object with string 'audio' and 'text'" in capsys.readouterr().out
    assert not (tmp_path / "run" / "tokenizer").exists()
    rows = ['{"audio": "a.wav", "text": "hi"}', '{"audio": "b.wav", "text": "  "}', '{"audio": "a.wav", "text": "hi"}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    main(["data", "check", str(tmp_path / "train.jsonl")])
    out = capsys.readouterr().out
    assert "empty transcripts: 1" in out and "duplicates (same audio and transcript): 1" in out


def test_demo_end_to_end_and_rerun_after_interrupt(tiny_setup, monkeypatch, capsys):
    """`mdus demo` on a tiny model, with text replay: a SIGTERM mid-training saves and exits 130; the same command
    then resumes that method from its checkpoint with its saved schedule, finishes and writes the report; a third
    run keeps it. A rerun with another --text-kl is refused; speech_only trains without replay and keeps the text."""
    out = tiny_setup / "demo"
    args = ["demo", "--out", str(out), "--model", str(tiny_setup / "tiny"), "--budget-minutes", "0.5",
            "--n-train", "8", "--n-dev", "2", "--n-test", "2", "--no-progress", "--methods", "dus-transformer",
            "dus-transformer@speech_only", "--max-new-tokens", "4", "--text-kl", "1", "--text-kl-passages", "2"]
    real_train = T.train

    def interrupted(*a, **kw):
        kw["on_step"] = lambda step, _: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None
        return real_train(*a, **kw)

    monkeypatch.setattr(T, "train", interrupted)
    assert main(args) == 130
    printed = capsys.readouterr()
    assert "stopped by SIGTERM at step 2" in printed.out
    assert "%|" not in printed.err  # --no-progress: no tqdm bar anywhere (data, speech input, training)
    run = out / "dus-transformer"
    max_steps = json.loads((run / "train_config.json").read_text())["max_steps"]
    assert json.loads((out / "schedule.json").read_text())["max_steps"] == max_steps  # shared by every method
    monkeypatch.setattr(T, "train", real_train)
    assert main(args[:-4] + ["--text-kl", "0"]) == 2
    assert "was started with other settings (--text-kl 1.0 (now 0.0))" in capsys.readouterr().out
    assert main(args) == 0
    assert f"resuming {run / 'checkpoint.pt'} ({max_steps} steps in all)" in capsys.readouterr().out
    for name, replayed in (("dus-transformer", True), ("dus-transformer@speech_only", False)):
        lines = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        assert [ln["step"] for ln in lines] == list(range(1, max_steps + 1))
        assert all(("text_kl" in ln) == replayed for ln in lines)
    results = json.loads((out / "results.json").read_text())
    r = results["dus-transformer@speech_only"]
    assert r["steps"] == max_steps and r["text_kl"] == pytest.approx(0.0, abs=1e-6)  # speech_only keeps the text
    assert {"wer", "cer", "text_ppl", "text_ppl_base", "trainable_params", "test_loss"} <= set(r)
    assert results["dus-transformer"]["steps"] == max_steps
    assert "| dus-transformer@speech_only |" in (out / "report.md").read_text()
    assert "| nan |" not in (out / "report.md").read_text()  # speech_only's transcript KL is 0, printed as such
    assert "text replay: + 1 x KL(base‖model) on 2 general-text passages" in (out / "report.md").read_text()
    assert main(args) == 0
    assert "finished by an earlier run" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results
    assert main(args[:args.index("--methods") + 2] + args[args.index("--max-new-tokens"):]) == 0  # one method
    assert json.loads((out / "results.json").read_text()) == results  # the other one's results stay
    assert "| dus-transformer@speech_only |" in (out / "report.md").read_text()


@pytest.mark.parametrize("speech_input", ["ctc-units", "ctc-chars"])
def test_demo_with_ctc_encoder(tiny_setup, speech_input):
    """`mdus demo --speech-input ctc-units|ctc-chars`: the encoder is trained, stored in the tokenizer folder,
    scored alone on the test split (the same numbers jiwer gives for its transcriptions) and named in the report."""
    import jiwer

    from mdus.data.audio import AudioStream
    from mdus.data.readers import read_manifest
    from mdus.evaluate import normalize_text
    from mdus.speech import CTCEncoder

    out = tiny_setup / f"demo_{speech_input}"
    assert main(["demo", "--out", str(out), "--model", str(tiny_setup / "tiny"), "--budget-minutes", "0.3",
                 "--n-train", "8", "--n-dev", "2", "--n-test", "3", "--methods", "dus-transformer", "lora",
                 "--speech-input", speech_input, "--units", "8", "--ctc-epochs", "2", "--max-new-tokens", "4"]) == 0
    encoder = CTCEncoder.load(out / "tokenizer" / "encoder")
    tests = list(AudioStream(read_manifest(out / "data" / "test.jsonl")))
    refs = [normalize_text(u.text) for u, _ in tests]
    hyps = [normalize_text(encoder.transcribe(w)) for _, w in tests]
    rates = json.loads((out / "tokenizer" / "encoder_test.json").read_text())
    assert rates["cer"] == pytest.approx(jiwer.cer(refs, hyps)) and rates["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert f"CER {rates['cer']:.3f}, WER {rates['wer']:.3f}" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert {"ctc-units": "k-means units of a CTC speech encoder",
            "ctc-chars": "character posteriors of a CTC speech encoder"}[speech_input] in report
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"dus-transformer", "lora"} and all(r["steps"] >= 1 for r in results.values())


@pytest.mark.parametrize("placement, positions", [("top", [4, 4]), ("1,3", [1, 3])])
def test_train_cli_placement_and_speech_only_replay(tiny_setup, capsys, placement, positions):
    """--placement / --n-insert reach mdus.upscale (the saved run rebuilds with those positions); --text-kl with
    --route speech_only says it trains without replay (its text path is the frozen base's) and logs no text_kl."""
    import mdus

    out = tiny_setup / f"run_placement_{placement}"
    args = ["train", "--data", str(tiny_setup / "corpus"), "--out", str(out), "--model", str(tiny_setup / "tiny"),
            "--method", "dus-transformer", "--route", "speech_only", "--placement", placement, "--n-insert", "2",
            "--units", "8", "--max-steps", "2", "--max-tokens", "512", "--text-kl", "1", "--no-progress"]
    assert main(args) == 0
    assert "no text replay (--text-kl 1) for --route speech_only" in capsys.readouterr().out
    assert not any("text_kl" in ln for ln in (out / "metrics.jsonl").read_text().splitlines())
    lm = mdus.load(out / "trainable.safetensors", LlamaForCausalLM.from_pretrained(tiny_setup / "tiny"))
    assert lm.config.positions == positions and lm.config.route == "speech_only"


def test_train_cli_bad_placement(tiny_setup, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tiny_setup / "corpus"), "--out", str(tiny_setup / "bad"), "--placement", "left"])
    assert exc.value.code == 2 and "argument --placement: 'left' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tiny_setup / "corpus"), "--out", str(tiny_setup / "bad"), "--save-every", "0"])
    assert exc.value.code == 2 and "argument --save-every: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_setup / "corpus"), "--out", str(tiny_setup / "bad"), "--speech-input",
                 "features", "--frame-rate", "20"]) == 2
    assert "--frame-rate: frame_rate=20: continuous features need 100 / frame_rate to be an even integer" in \
        capsys.readouterr().out
    args = ["train", "--data", str(tiny_setup / "corpus"), "--out", str(tiny_setup / "bad"), "--model",
            str(tiny_setup / "tiny"), "--units", "8", "--no-progress", "--placement"]
    assert main(args + ["2,9"]) == 2  # the tiny model has 4 layers
    assert "placement positions must be in [0, 4]" in capsys.readouterr().out
    assert main(args + ["1,2", "--n-insert", "3"]) == 2
    assert "n_insert=3 does not match the 2 positions given" in capsys.readouterr().out
    assert not (tiny_setup / "bad").exists()  # refused before any tokenizer fit
