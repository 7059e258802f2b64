"""mdus.train: losses go down, checkpoints resume bit-exactly (also after SIGTERM), the budget stops the run."""

import json
import os
import signal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mdus import train as T

V = 80
CONFIG = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def _seqs(n, seed):
    """ASR-like toy data: each utterance's units determine its transcript, so the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        units = torch.randint(0, 12, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        text = (units[: max(1, units.shape[0] // 2)] * 5 + 3) % (V - 1)
        out.append(T.make_sequence(units, text, V, eos=V - 1))
    return out


def _model(method, init_seed=1):
    """The same frozen base every time; ``init_seed`` draws the new parameters' initialization."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG)
    torch.manual_seed(init_seed)
    cfg = dict(cgmlp_units=16, cgmlp_kernel=3, merge_kernel=3) if method == "dus-ebranchformer" else None
    return T.build_method(base, method, speech_vocab_size=12, block_config=cfg)


def _cfg(**kw):
    base = dict(lr=3e-3, warmup_steps=2, max_steps=8, max_tokens=64, eval_every=4, save_every=100, progress=False)
    return T.TrainConfig(**{**base, **kw})


def _losses(path):
    return [json.loads(ln)["loss"] for ln in open(path) if ln.strip()]


@pytest.mark.parametrize("method", T.METHODS)
def test_train_lowers_loss(tmp_path, method):
    lm = _model(method)
    result = T.train(lm, _seqs(24, 0), _seqs(4, 1), _cfg(max_steps=12), tmp_path)
    losses = _losses(result["metrics"])
    assert result["status"] == "done" and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("dev_loss" in json.loads(ln) for ln in open(result["metrics"]))


@pytest.mark.parametrize("method", ["dus-ebranchformer", "lora"])
def test_resume_after_sigterm_is_bit_exact(tmp_path, method):
    data, dev = _seqs(20, 0), _seqs(3, 1)
    full = T.train(_model(method), data, dev, _cfg(), tmp_path / "full")
    want = _losses(full["metrics"])

    def kill_at_3(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the run saves and stops after this step

    part = T.train(_model(method), data, dev, _cfg(), tmp_path / "part", on_step=kill_at_3)
    assert part["status"] == "SIGTERM" and part["step"] == 3
    # A kill mid-write leaves half a metrics line: the resume drops it with the other unconfirmed lines.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 10.')
    # A fresh process would rebuild the model with other random new parameters: the checkpoint must restore them.
    # When to save and evaluate may change on resume; what a step computes may not.
    with pytest.raises(ValueError, match=r"another recipe \(lr: 0.003 -> 0.02\)"):
        T.train(_model(method), data, dev, _cfg(lr=2e-2), tmp_path / "part", resume=True)
    resumed = T.train(_model(method, init_seed=123), data, dev, _cfg(save_every=2), tmp_path / "part", resume=True)
    assert resumed["status"] == "done"
    assert _losses(resumed["metrics"]) == want  # every step's loss, bit for bit


@pytest.mark.parametrize("method", ["dus-transformer", "lora", "full-ft"])
def test_speech_lr_moves_only_its_group(tmp_path, method):
    """speech_lr=3e-3 with lr=0: the speech rows learn, what text passes through stays put (and the reverse)."""
    for lr, speech_lr in ((0.0, 3e-3), (3e-3, 0.0)):
        lm = _model(method)
        speech = {id(p) for p in lm.speech_input_parameters()}
        assert id(lm.speech_embed.weight) in speech
        before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
        T.train(lm, _seqs(12, 0), [], _cfg(lr=lr, speech_lr=speech_lr, max_steps=3), tmp_path / f"{lr}")
        for n, p in lm.named_parameters():
            if n in before:
                moved = not torch.equal(p.detach(), before[n])
                assert moved == ((speech_lr if id(p) in speech else lr) > 0), n


def test_second_signal_interrupts_at_once(tmp_path):
    """The first SIGTERM asks the loop to save and stop after the step; a second one before then does not wait."""
    before = signal.getsignal(signal.SIGTERM)

    def twice(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="SIGTERM again"):
        T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(), tmp_path, on_step=twice)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_budget_and_errors(tmp_path):
    result = T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(budget_minutes=0.0), tmp_path)
    assert result["status"] == "budget" and result["step"] == 1
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(3e-3 * T.lr_factor(0, _cfg()))  # the rate step 1 ran at (warm-up: half)
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "checkpoint.pt.tmp").exists()
    log = (tmp_path / "metrics.jsonl").read_text()
    again = T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(budget_minutes=0.0), tmp_path, resume=True)
    assert again["status"] == "budget" and again["step"] == 1  # the budget is spent: no step is added
    assert (tmp_path / "metrics.jsonl").read_text() == log
    more = T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(), tmp_path, resume=True)  # budget lifted
    assert more["status"] == "done" and more["step"] == _cfg().max_steps
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(), tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match=r"another recipe \(speech_lr: None -> 0.01\)"):
        T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(speech_lr=1e-2), tmp_path, resume=True)
    for bad in (dict(grad_accum=0), dict(save_every=0), dict(max_tokens=0), dict(eval_every=-1)):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))} must be"):
            T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(**bad), tmp_path / "bad")
    with pytest.raises(ValueError, match="method must be one of"):
        T.build_method(LlamaForCausalLM(CONFIG), "prefix-tuning", speech_vocab_size=4)
    for bad in (dict(lr=-1.0), dict(speech_lr=float("nan")), dict(budget_minutes=-1.0)):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))} must be a finite number >= 0"):
            T.train(_model("dus-transformer"), _seqs(10, 0), [], _cfg(**bad), tmp_path / "bad")


def test_resume_refuses_another_model_or_data(tmp_path):
    """A resume continues the run it resumes: another method, block count, route or training set raises
    ResumeMismatch naming what changed, before anything is loaded."""
    data = _seqs(10, 0)
    T.train(_model("dus-transformer"), data, [], _cfg(budget_minutes=0.0), tmp_path)

    def other(method="dus-transformer", **kw):
        torch.manual_seed(0)
        base = LlamaForCausalLM(CONFIG)
        cfg = dict(cgmlp_units=16, cgmlp_kernel=3, merge_kernel=3) if method == "dus-ebranchformer" else None
        return T.build_method(base, method, speech_vocab_size=12, block_config=cfg, **kw)

    for lm, message in ((other("dus-ebranchformer"), r"another model \(block: 'transformer' -> 'ebranchformer'"),
                        (other(n_insert=2), r"another model \(positions: \[4\] -> \[2, 4\]\)"),
                        (other(route="speech_only"), r"another model \(route: 'all' -> 'speech_only'\)"),
                        (other("lora"), r"another model \(method: 'dus' -> 'lora'")):
        with pytest.raises(T.ResumeMismatch, match=message):
            T.train(lm, data, [], _cfg(), tmp_path, resume=True)
    with pytest.raises(T.ResumeMismatch, match="other training data"):
        T.train(_model("dus-transformer"), _seqs(10, 5), [], _cfg(), tmp_path, resume=True)
    assert T.train(_model("dus-transformer"), data, [], _cfg(), tmp_path, resume=True)["status"] == "done"


def test_packing():
    assert T.pack([5, 3, 9, 2, 4], [0, 1, 2, 3, 4], 8) == [[0, 1], [2], [3, 4]]
    ids, mask = T.make_sequence(torch.tensor([1, 2]), torch.tensor([7, 8]), 100, eos=0)
    assert ids.tolist() == [101, 102, 7, 8, 0] and mask.tolist() == [False, False, True, True, True]
    assert T.lr_factor(0, _cfg()) == 0.5 and abs(T.lr_factor(8, _cfg()) - 0.2) < 1e-9


def _feature_seqs(n, seed, n_mels=6, stride=4):
    """Continuous-input toy data: each utterance's transcript is read off its features' first mel bin."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        frames = int(torch.randint(9, 30, (1,), generator=g))
        feats = torch.randn(frames, n_mels, generator=g)
        n_pos = -(-frames // stride)
        text = ((feats[::stride, 0] > 0).long() * 7 + 3)[: max(1, n_pos // 2)]
        out.append((*T.make_sequence(torch.zeros(n_pos, dtype=torch.long), text, V, eos=V - 1), feats))
    return out


@pytest.mark.parametrize("method", ["dus-ebranchformer", "full-ft"])
def test_continuous_input_trains_and_resumes(tmp_path, method):
    """Log-mel features through the model's speech encoder: collate pads them, the loss falls, the encoder trains,
    and a resumed run matches an uninterrupted one exactly."""
    def model():
        torch.manual_seed(0)
        base = LlamaForCausalLM(CONFIG)
        torch.manual_seed(1)
        cfg = dict(cgmlp_units=16, cgmlp_kernel=3, merge_kernel=3) if method == "dus-ebranchformer" else None
        return T.build_method(base, method, speech_vocab_size=1, block_config=cfg,
                              speech_encoder={"n_mels": 6, "stride": 4})

    data = _feature_seqs(24, 0)
    batch = T.collate(data[:3], "cpu")
    assert batch["speech_features"].shape == (3, max(d[2].shape[0] for d in data[:3]), 6)
    assert batch["speech_feature_lengths"].tolist() == [d[2].shape[0] for d in data[:3]]
    lm = model()
    before = lm.speech_encoder.conv1.weight.detach().clone()
    full = T.train(lm, data, _feature_seqs(3, 1), _cfg(max_steps=12, eval_every=6), tmp_path / "full")
    losses = _losses(full["metrics"])
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert not torch.equal(before, lm.speech_encoder.conv1.weight)

    def stop_at_5(step, _):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(max_steps=12, eval_every=6)
    assert T.train(model(), data, _feature_seqs(3, 1), cfg, tmp_path / "part", on_step=stop_at_5)["step"] == 5
    T.train(model(), data, _feature_seqs(3, 1), cfg, tmp_path / "part", resume=True)
    assert _losses(tmp_path / "part" / "metrics.jsonl") == losses


def test_fit_speech_input_errors():
    with pytest.raises(ValueError, match="speech_input"):
        T.fit_speech_input("mfcc", [], units=4, frame_rate=25)
    with pytest.raises(ValueError, match="frame_rate"):
        T.fit_speech_input("features", [], units=4, frame_rate=30)
    with pytest.raises(ValueError, match="texts"):
        T.fit_speech_input("ctc-units", [torch.randn(16000)], units=4, frame_rate=25)


def _passages(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


def _base():
    torch.manual_seed(0)  # the same weights as _model's base
    return LlamaForCausalLM(CONFIG)


def test_text_replay_kl_matches_reference():
    """TextReplay's loss is the mean over every position of KL(base || model), the model normalizing over its
    whole vocabulary (text + speech rows): checked against each passage's eager logits, one by one."""
    lm, replay = _model("full-ft"), T.TextReplay(_base(), _passages(9, 0))
    with torch.no_grad():  # move the fine-tuned weights away from the base
        for p in lm.base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = replay.batch(_cfg(text_kl=1.0, text_kl_passages=5), step=3, micro=0, device="cpu")
    got = replay.loss(lm, batch)
    cu = batch["cu_seqlens"].tolist()
    ref, teacher = [], _base()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        ids = batch["input_ids"][a:b][None]
        log_t = teacher(ids).logits[0].log_softmax(-1)
        log_s = lm(ids, return_logits=True).logits[0].log_softmax(-1)[:, :V]
        ref.append((log_t.exp() * (log_t - log_s)).sum(-1))
    torch.testing.assert_close(got, torch.cat(ref).mean(), rtol=1e-5, atol=1e-6)
    assert got > 1e-3
    # Another step draws other passages; the same step the same ones (resume).
    again = replay.batch(_cfg(text_kl_passages=5), step=3, micro=0, device="cpu")
    other = replay.batch(_cfg(text_kl_passages=5), step=4, micro=0, device="cpu")
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert not torch.equal(other["input_ids"], batch["input_ids"])


def test_text_replay_keeps_text_and_resumes(tmp_path):
    data, dev, texts = _seqs(20, 0), _seqs(3, 1), _passages(30, 2)
    probe = T.TextReplay(_base(), texts).batch(_cfg(text_kl_passages=8), step=999, micro=0, device="cpu")

    def drift(text_kl, out):
        lm = _model("dus-transformer")
        replay = T.TextReplay(_base(), texts)
        result = T.train(lm, data, dev, _cfg(lr=1e-2, max_steps=10, text_kl=text_kl), out, replay=replay)
        lines = [json.loads(ln) for ln in open(result["metrics"])]
        assert all(("text_kl" in ln) == (text_kl > 0) for ln in lines)
        with torch.no_grad():
            return float(replay.loss(lm, probe)), _losses(result["metrics"])

    free, _ = drift(0.0, tmp_path / "free")
    kept, want = drift(5.0, tmp_path / "kept")
    assert kept < 0.5 * free, (kept, free)

    def kill_at_4(step, _):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg(lr=1e-2, max_steps=10, text_kl=5.0)
    part = T.train(_model("dus-transformer"), data, dev, cfg, tmp_path / "part", on_step=kill_at_4,
                   replay=T.TextReplay(_base(), texts))
    assert part["status"] == "SIGTERM"
    T.train(_model("dus-transformer", init_seed=7), data, dev, cfg, tmp_path / "part", resume=True,
            replay=T.TextReplay(_base(), texts))
    assert _losses(tmp_path / "part" / "metrics.jsonl") == want


def test_text_replay_errors(tmp_path):
    with pytest.raises(ValueError, match="needs replay"):
        T.train(_model("lora"), _seqs(4, 0), [], _cfg(text_kl=1.0), tmp_path)
    with pytest.raises(ValueError, match="2 or more tokens"):
        T.TextReplay(_base(), [torch.tensor([5])])


def test_speech_input_in_never_leaves_a_half_written_tokenizer(tmp_path, monkeypatch):
    """The tokenizer is fit into <dir>.partial and renamed into place: a run killed while saving leaves no
    tokenizer (the next run fits again), and a tokenizer that does not load is named with what to do."""
    from collections import namedtuple

    from mdus.speech import KMeansTokenizer

    utt = namedtuple("utt", "text")
    g = torch.Generator().manual_seed(0)
    audio = [(utt(f"u{i}"), torch.randn(4000 + 800 * i, generator=g) * 0.1) for i in range(4)]
    tok_dir = tmp_path / "tokenizer"
    fit = dict(units=3, frame_rate=25.0, seed=0)
    real_save = KMeansTokenizer.save

    def killed(self, path):
        real_save(self, path)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(KMeansTokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        T.speech_input_in(tok_dir, lambda: audio, "units", **fit)
    assert not tok_dir.exists() and (tmp_path / "tokenizer.partial").is_dir()
    monkeypatch.setattr(KMeansTokenizer, "save", real_save)
    tok, read = T.speech_input_in(tok_dir, lambda: audio, "units", **fit)
    assert read is audio and (tok_dir / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.partial").exists()
    again, read = T.speech_input_in(tok_dir, lambda: pytest.fail("read again"), "units", **fit)
    assert read is None and torch.equal(again.encode(audio[0][1]), tok.encode(audio[0][1]))
    for f in tok_dir.iterdir():
        if f.suffix == ".safetensors":
            f.write_bytes(b"\0\0\0")  # a tokenizer written by a version without the rename, cut short
    with pytest.raises(ValueError, match=f"the speech tokenizer in {tok_dir} does not load .*delete the folder"):
        T.speech_input_in(tok_dir, lambda: audio, "units", **fit)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty but holds no speech tokenizer"):
        T.speech_input_in(tmp_path / "other", lambda: audio, "units", **fit)
