"""The CTC speech encoder (mdus.speech.ctc): it learns, it is deterministic, it saves and reloads exactly, and as a
feature extractor it gives k-means units that survive moving the tokenizer folder; as a continuous front end its
collapsed posteriors spell its greedy transcription and reach the model through its characters' text embeddings."""

import math
import shutil

import pytest
import torch

from mdus.speech import (
    CTCEncoder,
    CTCPosteriorFrontEnd,
    KMeansTokenizer,
    SymbolProjection,
    build_speech_encoder,
    collapse_posteriors,
    fit_ctc_encoder,
    load_tokenizer,
)

SR = 16000
TONES = {"a": 440.0, "b": 1900.0, "c": 4200.0}


def _utterance(text: str, generator: torch.Generator) -> torch.Tensor:
    """Each letter a 0.2-0.3 s tone of its own pitch, separated by short silences, at a random level."""
    parts = []
    for letter in text:
        n = int(SR * (0.2 + 0.1 * torch.rand((), generator=generator).item()))
        t = torch.arange(n) / SR
        parts += [torch.sin(2 * math.pi * TONES[letter] * t), torch.zeros(int(0.08 * SR))]
    wave = torch.cat([torch.zeros(int(0.05 * SR)), *parts])
    level = 0.1 + 0.4 * torch.rand((), generator=generator)
    return level * wave + 1e-3 * torch.randn(wave.shape, generator=generator)


@pytest.fixture(scope="module")
def tone_corpus():
    g = torch.Generator().manual_seed(1)
    texts = ["ab", "ba", "abc", "cab", "bca", "ac", "ca", "cb", "bc", "acb"] * 2
    return [_utterance(t, g) for t in texts], texts


@pytest.fixture(scope="module")
def fitted(tone_corpus):
    waves, texts = tone_corpus
    return fit_ctc_encoder(waves, texts, dim=32, layers=1, heads=2, epochs=40, batch_size=4, lr=3e-3,
                           progress=False)


def test_learns_held_out_sequences(fitted):
    g = torch.Generator().manual_seed(99)  # new tone lengths, levels and noise; orders never trained on
    for text in ("cba", "bac", "abca"):
        assert fitted.transcribe(_utterance(text, g)) == text


def test_features_shape_rate_and_padding(fitted):
    wave = torch.randn(12345)
    frames = fitted.mel(wave).shape[0]
    feats = fitted(wave)
    assert feats.shape == (math.ceil(frames / 2), 32) and fitted.frame_rate == 50.0 and fitted.sample_rate == SR
    # A padded batch gives each utterance what it gets alone.
    short = fitted.standardized(torch.randn(7001))
    long = fitted.standardized(wave)
    x = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)
    with torch.no_grad():
        h, lengths = fitted.hidden(x, torch.tensor([short.shape[0], long.shape[0]]))
    torch.testing.assert_close(h[0, :lengths[0]], _single(fitted, short), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[1, :lengths[1]], feats, atol=1e-5, rtol=1e-5)


def _single(enc, frames):
    with torch.no_grad():
        return enc.hidden(frames[None], torch.tensor([frames.shape[0]]))[0][0]


def test_deterministic_in_seed(tone_corpus):
    waves, texts = tone_corpus
    kw = dict(dim=16, layers=1, heads=2, epochs=2, batch_size=8, progress=False)
    a, b = fit_ctc_encoder(waves, texts, seed=3, **kw), fit_ctc_encoder(waves, texts, seed=3, **kw)
    c = fit_ctc_encoder(waves, texts, seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_and_units_in_a_moved_folder(fitted, tone_corpus, tmp_path):
    waves, _ = tone_corpus
    with pytest.raises(ValueError, match="never saved"):
        CTCEncoder("ab").config()
    tok_dir = tmp_path / "tok"
    fitted.save(tok_dir / "encoder")
    again = CTCEncoder.load(tok_dir / "encoder")
    torch.testing.assert_close(again(waves[0]), fitted(waves[0]), atol=0, rtol=0)
    assert again.alphabet == fitted.alphabet == "abc"
    tok = KMeansTokenizer(6, features=again, frame_rate=25.0).fit(waves)
    assert tok.pooling == "mean" and tok.dim == 32
    tok.save(tok_dir)
    moved = tmp_path / "elsewhere"
    shutil.move(tok_dir, moved)
    loaded = load_tokenizer(moved)
    for w in waves[:4]:
        assert torch.equal(loaded.encode(w), tok.encode(w))
    # The encoder is referred to, not copied: without it the tokenizer says where it looked.
    shutil.rmtree(moved / "encoder")
    with pytest.raises(FileNotFoundError, match="encoder"):
        load_tokenizer(moved)


def test_errors(tone_corpus):
    waves, texts = tone_corpus
    with pytest.raises(ValueError, match="differ in length"):
        fit_ctc_encoder(waves, texts[:-1])
    with pytest.raises(ValueError, match="non-empty transcript"):
        fit_ctc_encoder(waves[:2], ["", " ?! "])
    with pytest.raises(ValueError, match="alphabet"):
        CTCEncoder("aa")
    with pytest.raises(ValueError, match="multiple of heads"):
        CTCEncoder("ab", dim=30, heads=4)
    with pytest.raises(ValueError, match="fewer than one"):
        CTCEncoder("ab", dim=8, heads=2)(torch.randn(100))
    # The bad wave is named by its place in the caller's list, utterances without a transcript counted.
    with pytest.raises(ValueError, match=r"waves\[2\]: wave has 100 samples, fewer than one"):
        fit_ctc_encoder([waves[0], waves[1], torch.randn(100)], ["", texts[1], "a b"], epochs=1, progress=False)


def _collapse_loop(probs):
    """collapse_posteriors written frame by frame: the definition."""
    rows, run, last = [], [], None
    for frame in probs:
        best = int(frame.argmax())
        if best == 0 or best != last:
            if run:
                rows.append(torch.stack(run).sum(0))
            run = []
        if best != 0:
            run.append(frame[1:])
        last = best
    if run:
        rows.append(torch.stack(run).sum(0))
    if not rows:
        rows = [probs[:, 1:].sum(0)]
    out = torch.stack(rows).double()
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("frames,symbols,blank_bias", [(1, 3, 0.0), (37, 5, 1.0), (203, 28, 2.0), (9, 2, 9.0)])
def test_collapse_posteriors_matches_its_definition_and_greedy_path(frames, symbols, blank_bias):
    g = torch.Generator().manual_seed(frames)
    logits = 3 * torch.randn(frames, symbols + 1, generator=g)
    # Runs of repeated frames, as CTC gives.
    logits = logits.repeat_interleave(torch.randint(1, 4, (frames,), generator=g), 0)
    logits[:, 0] += blank_bias
    probs = logits.softmax(-1)
    rows = collapse_posteriors(probs)
    torch.testing.assert_close(rows.double(), _collapse_loop(probs), atol=1e-6, rtol=1e-6)
    best = probs.argmax(-1)
    greedy = [int(i) for i in torch.unique_consecutive(best) if i]
    if greedy:
        assert (rows.argmax(-1) + 1).tolist() == greedy
    else:
        assert rows.shape == (1, symbols)
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]))


def test_collapse_posteriors_errors():
    for bad in (torch.rand(0, 3), torch.rand(5, 1), torch.rand(5)):
        with pytest.raises(ValueError, match="probs"):
            collapse_posteriors(bad)


class _CharTokenizer:
    """What a text tokenizer returns for a single character: its code point (and none for '?')."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [] if text == "?" else [ord(text), ord(text) + 1]})


def test_posterior_front_end(fitted, tone_corpus, tmp_path):
    waves, _ = tone_corpus
    front = CTCPosteriorFrontEnd(fitted)
    for w in waves[:5]:
        feats = front.encode(w)
        assert feats.shape[1] == 3 and front.n_positions(feats) == feats.shape[0] >= 1
        # Its positions spell what the encoder transcribes.
        assert "".join(front.alphabet[i] for i in feats.argmax(-1).tolist()) == fitted.transcribe(w)
    assert front.token_ids(_CharTokenizer()) == [[97, 98], [98, 99], [99, 100]]
    with pytest.raises(ValueError, match="no token"):
        CTCPosteriorFrontEnd(CTCEncoder("a?")).token_ids(_CharTokenizer())
    with pytest.raises(TypeError, match="CTCEncoder"):
        CTCPosteriorFrontEnd(object())
    with pytest.raises(ValueError, match="sample_rate"):
        front.encode(waves[0], sample_rate=8000)
    fitted.save(tmp_path / "tok" / "encoder")
    front.save(tmp_path / "tok")
    shutil.move(tmp_path / "tok", tmp_path / "moved")
    loaded = load_tokenizer(tmp_path / "moved")
    assert isinstance(loaded, CTCPosteriorFrontEnd) and loaded.continuous and loaded.vocab_size == 1
    assert torch.equal(loaded.encode(waves[1]), front.encode(waves[1]))


def test_symbol_projection():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(11, 6, generator=g)
    token_ids = [[3], [0, 7], [10, 2, 5]]
    proj = build_speech_encoder(6, {"type": "symbols", "token_ids": token_ids}, table)
    assert isinstance(proj, SymbolProjection) and proj.stride == 1
    # A one-hot row is that symbol's embedding: the mean of its tokens' text embeddings.
    expected = torch.stack([table[ids].mean(0) for ids in token_ids])
    torch.testing.assert_close(proj(torch.eye(3)), expected)
    # A distribution gives the expected embedding; a padded batch zeroes its padding and keeps the lengths.
    p = torch.rand(2, 4, 3, generator=g).softmax(-1)
    y, lengths = proj(p, torch.tensor([4, 2]))
    torch.testing.assert_close(y[0], p[0] @ expected)
    torch.testing.assert_close(y[1, :2], p[1, :2] @ expected)
    assert torch.equal(y[1, 2:], torch.zeros(2, 6)) and lengths.tolist() == [4, 2]
    assert torch.equal(proj.output_lengths(torch.tensor([5, 1])), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="shape"):
        proj(torch.rand(4, 5))
    with pytest.raises(TypeError, match="floating"):
        proj(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids"):
        build_speech_encoder(6, {"type": "symbols", "token_ids": [[1], []]}, table)
    with pytest.raises(ValueError, match="token_ids only"):
        build_speech_encoder(6, {"type": "symbols", "token_ids": [[1]], "stride": 2})
    with pytest.raises(ValueError, match="type"):
        build_speech_encoder(6, {"type": "rnn"})
