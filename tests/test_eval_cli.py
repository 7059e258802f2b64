"""`mdus eval` and `mdus.evaluate.evaluate_model` on a tiny random Llama with a character tokenizer, and the
lm-eval-harness adapter (`mdus.harness`) against a stub `lm_eval` module (lm-eval itself is not a dependency)."""

import copy
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import mdus
from mdus import evaluate as E
from mdus import harness
from mdus.__main__ import main
from mdus.data.readers import Utterance
from mdus.data.synth import FORTUNES_DIR

SENTENCES = ["the cat sat on the mat", "a dog ran home", "we like green tea", "it is cold today",
             "birds sing at dawn", "open the door please"]
METRIC_KEYS = {"wer", "cer", "wer_ci", "cer_ci", "text_ppl", "text_ppl_base", "text_kl", "greedy_agreement",
               "transcript_ppl", "transcript_ppl_base", "transcript_kl", "examples"}
GENERAL = ["Far out in the uncharted backwaters of the galaxy lies a small sun.",
           "Time flies like an arrow; fruit flies like a banana.", "x"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: on a loaded machine, intra-op threads cost far more than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 2..96), ``<unk>`` = 0 and eos ``</s>`` = 1: decoding then
    re-encoding any non-special ids gives them back."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


TOK = char_tokenizer()
V = len(TOK)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=True)).eval()


def upscaled(perturb: float = 0.0, speech_vocab: int = 8):
    """(up-scaled tiny Llama, an untouched copy of its base); ``perturb`` moves the new blocks off identity."""
    base = tiny_llama()
    ref = copy.deepcopy(base)
    lm = mdus.upscale(base, block="transformer", speech_vocab_size=speech_vocab)
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in lm.blocks.parameters():
                p.add_(perturb * torch.randn_like(p))
    return lm.eval(), ref


def make_items(n: int = 6, speech_vocab: int = 8):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        units = torch.randint(0, speech_vocab, (5 + i,), generator=g)
        ids = torch.tensor(TOK(" " + text, add_special_tokens=False).input_ids)
        items.append((Utterance(audio_path=Path(f"{i}.wav"), text=text, speaker="s"), units, ids))
    return items


# ------------------------------------------------------------------------------------------------ evaluate_model


def test_evaluate_model_matches_its_parts():
    lm, ref = upscaled(perturb=0.3)
    items = make_items()
    out = E.evaluate_model(lm, ref, items, TOK, device="cpu", max_new_tokens=6, n_continuations=3, progress=False)
    assert set(out) == METRIC_KEYS
    hyps = E.transcribe(lm, [u for _, u, _ in items], TOK, max_new_tokens=6, progress=False)
    rates = E.error_rates([u.text for u, _, _ in items], hyps)
    assert all(out[k] == rates[k] for k in ("wer", "cer", "wer_ci", "cer_ci"))
    assert out["examples"] == [{"ref": u.text, "hyp": h} for (u, _, _), h in zip(items[:5], hyps[:5], strict=True)]
    assert out["text_kl"] > 1e-4 and 0.0 <= out["greedy_agreement"] <= 1.0
    # Without general text, both degradations are the transcripts' own.
    ids = lambda texts: [torch.tensor(TOK(t, add_special_tokens=False).input_ids[:96]) for t in texts]
    on_refs = E.text_degradation(lm, ref, ids(u.text for u, _, _ in items))
    assert out["text_kl"] == out["transcript_kl"] == pytest.approx(on_refs["text_kl"], rel=1e-6)
    assert out["transcript_ppl_base"] == pytest.approx(on_refs["text_ppl_base"], rel=1e-6)
    none = E.evaluate_model(lm, ref, items[:2], TOK, max_new_tokens=2, n_continuations=0, progress=False)
    assert none["greedy_agreement"] is None


def test_evaluate_model_general_text():
    lm, ref = upscaled(perturb=0.3)
    items = make_items(3)
    out = E.evaluate_model(lm, ref, items, TOK, general=GENERAL, max_new_tokens=4, n_continuations=2,
                           max_text_tokens=40, progress=False)
    ids = [torch.tensor(TOK(t, add_special_tokens=False).input_ids[:40]) for t in GENERAL]
    want = E.text_degradation(lm, ref, ids, continuation_prompts=[t[:16] for t in ids[:2]])
    for key in ("text_ppl", "text_ppl_base", "text_kl", "greedy_agreement"):
        assert out[key] == pytest.approx(want[key], rel=1e-6), key
    on_refs = E.text_degradation(lm, ref, [torch.tensor(TOK(u.text, add_special_tokens=False).input_ids)
                                           for u, _, _ in items])
    assert out["transcript_kl"] == pytest.approx(on_refs["text_kl"], rel=1e-6)
    assert out["transcript_kl"] != pytest.approx(out["text_kl"], rel=1e-3)
    with pytest.raises(ValueError, match="general"):
        E.evaluate_model(lm, ref, items, TOK, general=["  "], progress=False)


def test_evaluate_model_single_token_transcripts():
    """Command words and digits are one token each: WER and CER are reported, and what cannot be scored as text
    (a single token has no next-token loss) is None, not an error after the whole split was decoded."""
    lm, ref = upscaled(perturb=0.3)
    items = []
    for i, (utt, units, _) in enumerate(make_items(3)):
        text = "abc"[i]
        assert len(TOK(text, add_special_tokens=False).input_ids) == 1
        items.append((Utterance(audio_path=utt.audio_path, text=text, speaker="s"), units,
                      torch.tensor(TOK(text, add_special_tokens=False).input_ids)))
    out = E.evaluate_model(lm, ref, items, TOK, max_new_tokens=3, n_continuations=2, progress=False)
    assert 0 <= out["wer"] and out["transcript_kl"] is None and out["text_kl"] is None
    with_general = E.evaluate_model(lm, ref, items, TOK, general=GENERAL, max_new_tokens=3, progress=False)
    assert with_general["transcript_kl"] is None and with_general["text_kl"] > 0
    with pytest.raises(ValueError, match="general holds no text of two or more tokens"):
        E.evaluate_model(lm, ref, items, TOK, general=["a"], progress=False)


def test_evaluate_model_identity_at_init():
    lm, ref = upscaled()
    out = E.evaluate_model(lm, ref, make_items(3), TOK, device="cpu", max_new_tokens=4, progress=False)
    assert out["text_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["text_ppl"] == pytest.approx(out["text_ppl_base"], rel=1e-5)
    assert out["greedy_agreement"] == 1.0
    out = E.evaluate_model(lm, ref, make_items(3), TOK, general=GENERAL, max_new_tokens=4, progress=False)
    assert out["text_kl"] == pytest.approx(0.0, abs=1e-6) and out["transcript_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["greedy_agreement"] == 1.0


# ------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory):
    """A corpus of tones (train: all sentences, test: three) and a tiny model folder with the char tokenizer."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("eval_cli")
    (root / "corpus" / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    lines = []
    for i, text in enumerate(SENTENCES):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(root / "corpus" / "wav" / f"{i}.wav", wave.astype(np.float32), 16000)
        lines.append(json.dumps({"audio": f"wav/{i}.wav", "text": text, "speaker": f"s{i % 2}", "duration": 0.5}))
    (root / "corpus" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "corpus" / "test.jsonl").write_text("\n".join(lines[:3]) + "\n")
    tiny_llama().save_pretrained(root / "tiny")
    TOK.save_pretrained(root / "tiny")
    return root


def test_eval_cli_end_to_end(corpus_and_model, tmp_path, capsys, monkeypatch):
    root = corpus_and_model
    run = tmp_path / "run"
    assert main(["train", "--data", str(root / "corpus"), "--out", str(run), "--model", str(root / "tiny"),
                 "--method", "dus-transformer", "--units", "8", "--max-steps", "2", "--max-tokens", "256",
                 "--eval-every", "0", "--save-every", "2", "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed, wherever this runs
    out_file = tmp_path / "metrics" / "eval.json"
    assert main(["eval", "--run", str(run), "--data", str(root / "corpus"), "--model", str(root / "tiny"),
                 "--max-new-tokens", "6", "--out", str(out_file), "--lm-eval", "hellaswag", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert harness.NOT_INSTALLED in printed
    result = json.loads(out_file.read_text())
    assert METRIC_KEYS <= set(result) and result["utterances"] == 3 and result["lm_eval"] is None
    assert json.loads(printed[printed.index("{"):]) == result
    assert [ex["ref"] for ex in result["examples"]] == SENTENCES[:3]
    assert result["text_ppl"] > 0 and result["wer"] >= 0 and 0 < result["test_loss"] < 30
    if FORTUNES_DIR.is_dir():  # general text: fortunes passages, so a degradation apart from the transcripts'
        assert result["text_kl"] != pytest.approx(result["transcript_kl"], rel=1e-3)

    blank = root / "corpus" / "blank.jsonl"  # transcripts with no word: refused before decoding
    blank.write_text("".join(json.dumps({"audio": f"wav/{i}.wav", "text": "?!"}) + "\n" for i in range(2)))
    assert main(["eval", "--run", str(run), "--data", str(root / "corpus"), "--split", "blank", "--model",
                 str(root / "tiny"), "--no-progress"]) == 2
    assert "every transcript in" in capsys.readouterr().out

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    assert main(["eval", "--run", str(run), "--weights", str(broken), "--data", str(root / "corpus"),
                 "--model", str(root / "tiny"), "--no-progress"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "--weights" in lines[0]


@pytest.mark.parametrize("case, flag", [("no_run", "--run"), ("no_run_folder", "--run"), ("weights", "--weights"),
                                        ("tokenizer", "--tokenizer"), ("manifest", "--data/--split")])
def test_eval_cli_errors(tmp_path, capsys, case, flag):
    run = tmp_path / "run"
    run.mkdir()
    if case in ("tokenizer", "manifest"):
        (run / "trainable.safetensors").write_bytes(b"")
    if case == "manifest":
        (run / "tokenizer").mkdir()
        (run / "tokenizer" / "tokenizer.json").write_text("{}")
    args = ["eval", "--data", str(tmp_path / "corpus")]
    if case == "no_run_folder":
        args += ["--run", str(tmp_path / "missing")]
    elif case != "no_run":
        args += ["--run", str(run)]
    assert main(args) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdus eval: ") and flag in lines[0]


# -------------------------------------------------------------------------------------------- lm-eval adapter


@dataclass
class FakeInstance:
    arguments: tuple

    @property
    def args(self) -> tuple:
        return self.arguments


def _stub_lm_eval(monkeypatch, calls: dict):
    """A minimal ``lm_eval``: ``api.model.LM`` (abstract, like the real one) and a ``simple_evaluate`` that sends
    the requests in ``calls["requests"]`` to the model, records the answers and fails for the task "offline"."""
    import abc

    class LM(abc.ABC):
        def __init__(self):
            self._rank, self._world_size = 0, 1

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

    def simple_evaluate(model, tasks, limit=None, **kwargs):
        assert isinstance(model, LM) and len(tasks) == 1
        if tasks[0] == "offline":
            raise ConnectionError("Couldn't reach 'offline' on the Hub (LocalEntryNotFoundError)")
        calls["limit"] = limit
        calls["model"] = model
        for kind, reqs in calls["requests"].items():
            calls[kind] = getattr(model, kind)([FakeInstance(a) for a in reqs])
        return {"results": {tasks[0]: {"acc,none": 0.5}}, "config": {}}

    root, api, model_mod = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.api", "lm_eval.api.model"))
    model_mod.LM = LM
    api.model = model_mod
    root.api, root.simple_evaluate = api, simple_evaluate
    for name, mod in (("lm_eval", root), ("lm_eval.api", api), ("lm_eval.api.model", model_mod)):
        monkeypatch.setitem(sys.modules, name, mod)


def _logprobs(lm, ids: list[int]) -> torch.Tensor:
    """Independent of the adapter: log_softmax over the text rows of the model's logits, one row per input id."""
    with torch.no_grad():
        logits = lm(torch.tensor([ids]), return_logits=True).logits[0, :, :lm.text_vocab_size]
    return F.log_softmax(logits.double(), -1)


def _reference_ll(lm, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    logp = _logprobs(lm, (context + continuation)[:-1])[len(context) - 1:]
    target = torch.tensor(continuation)
    return float(logp[torch.arange(len(continuation)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_lm_eval_adapter(monkeypatch, capsys):
    lm, _ = upscaled(perturb=0.3)
    enc = lambda s: TOK(s, add_special_tokens=False).input_ids
    eos = TOK.eos_token_id
    # A continuation that is greedy by construction: the model's own argmax chain after "The cat".
    greedy_ids = E.greedy_decode(lm, torch.tensor(enc("The cat")), max_new_tokens=3, allowed_vocab=V).tolist()
    greedy_text = TOK.decode(greedy_ids)
    requests = {"loglikelihood": [("The cat", " sat"), ("", "Hello"), ("abc ", "def"), ("The cat", greedy_text)],
                "loglikelihood_rolling": [("hello world",)],
                "generate_until": [("Once", {"until": ["e"], "max_gen_toks": 6}), ("Once", {"max_gen_toks": 4})]}
    calls = {"requests": requests}
    _stub_lm_eval(monkeypatch, calls)
    results = harness.run_lm_eval(lm, TOK, ["toy", "offline"], limit=3, device="cpu")
    printed = capsys.readouterr().out
    assert results == {"toy": {"acc,none": 0.5}} and calls["limit"] == 3
    assert "'offline'" in printed and "ConnectionError" in printed and "Couldn't reach" in printed

    expected = [_reference_ll(lm, enc("The cat"), enc(" sat")), _reference_ll(lm, [eos], enc("Hello")),
                _reference_ll(lm, enc("abc"), enc(" def")), _reference_ll(lm, enc("The cat"), greedy_ids)]
    for (got, got_greedy), (want, want_greedy) in zip(calls["loglikelihood"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5) and got_greedy == want_greedy
    if 0 not in greedy_ids and eos not in greedy_ids:  # special ids do not survive decode + encode
        assert calls["loglikelihood"][3][1] is True

    seq = [eos] + enc("hello world")
    logp = _logprobs(lm, seq[:-1])
    assert calls["loglikelihood_rolling"][0] == pytest.approx(float(logp[range(len(seq) - 1), seq[1:]].sum()),
                                                              rel=1e-5)

    def decoded(n):
        new = E.greedy_decode(lm, torch.tensor(enc("Once")), max_new_tokens=n, eos=eos, allowed_vocab=V)
        return TOK.decode(new.tolist(), skip_special_tokens=True)

    assert calls["generate_until"] == [decoded(6).split("e", 1)[0], decoded(4)]


def test_generate_until_stops_on_a_special_token_string():
    """A stop string that is a special token (``<|im_end|>`` where eos is another) stops generation and cuts the
    answer as lm-eval's stopping criteria do, though special tokens never show in the answer's text."""
    lm, _ = upscaled(perturb=0.3)
    tok = copy.deepcopy(TOK)
    prompt = torch.tensor(TOK("Once", add_special_tokens=False).input_ids)
    new = E.greedy_decode(lm, prompt, max_new_tokens=4, allowed_vocab=V).tolist()
    marker = tok.convert_ids_to_tokens(new[1])  # the second generated token, registered as a special one
    tok.add_special_tokens({"additional_special_tokens": [marker]})
    assert tok.convert_tokens_to_ids(marker) == new[1] and len(tok) == V
    adapter = harness.SpeechLMAdapter(lm, tok, device="cpu")
    gen = lambda kwargs: adapter.generate_until([FakeInstance(("Once", kwargs))], disable_tqdm=True)[0]  # noqa: E731
    assert gen({"until": [marker], "max_gen_toks": 4}) == tok.decode(new[:1])
    kept = [t for t in new if t != new[1]]  # no stop string: the special token is left out of the text
    assert gen({"max_gen_toks": 4}) == tok.decode(kept) and marker not in gen({"max_gen_toks": 4})
    assert gen({"until": [marker], "max_gen_toks": 0}) == ""
    with pytest.raises(ValueError, match="max_gen_toks must be >= 0"):
        gen({"max_gen_toks": -1})


def test_lm_eval_rolling_windows(monkeypatch):
    """Longer than the context: lm-eval's documented windows (tokens 0..9, context 4: (eos,0,1,2) -> 0..3,
    (3,4,5,6) -> 4..7, (5,6,7,8) -> 8,9), each token scored once."""
    lm, _ = upscaled(perturb=0.3)
    _stub_lm_eval(monkeypatch, {"requests": {}})
    model = harness.make_lm_eval_model(lm, TOK, device="cpu", max_length=4)
    toks = TOK("0123456789", add_special_tokens=False).input_ids
    seq = [TOK.eos_token_id] + toks
    want = 0.0
    for first, scored_from in ((0, 0), (4, 0), (6, 2)):  # window seq[first:first + 4] predicts seq[first + 1:...]
        logp = _logprobs(lm, seq[first:first + 4])
        want += float(logp[range(scored_from, 4), seq[first + 1 + scored_from:first + 5]].sum())
    (got,) = model.loglikelihood_rolling([FakeInstance(("0123456789",))])
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"a continuation of 10 tokens does not fit the model's context"):
        model.loglikelihood([FakeInstance(("", "0123456789"))])


def test_lm_eval_not_installed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    lm, _ = upscaled()
    assert harness.run_lm_eval(lm, TOK, ["hellaswag"], device="cpu") is None
    assert capsys.readouterr().out.strip() == harness.NOT_INSTALLED
