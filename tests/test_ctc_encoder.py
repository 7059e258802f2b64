"""The CTC speech encoder (mdus.speech.ctc): it learns, it is deterministic, it saves and reloads exactly, and as a
feature extractor it gives k-means units that survive moving the tokenizer folder."""

import math
import shutil

import pytest
import torch

from mdus.speech import CTCEncoder, KMeansTokenizer, fit_ctc_encoder, load_tokenizer

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
