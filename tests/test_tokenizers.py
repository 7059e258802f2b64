"""mdus.speech: the Kaldi log-mel front end, k-means units (log-mel and SSL features), precomputed unit files, the
conv subsampler and the tokenizer factory."""

import copy
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from mdus.speech import (
    ConvSubsampler,
    KMeans,
    KMeansTokenizer,
    LogMel,
    LogMelFrontEnd,
    SpeechTokenizer,
    UnitFileTokenizer,
    build_tokenizer,
    dedup,
    load_tokenizer,
    logmel,
    num_frames,
    pool_frames,
    read_units,
)

SR = 16000


def _tone(freq, seconds=0.5, sr=SR, phase=0.0):
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    return 0.4 * torch.sin(2 * math.pi * freq * t + phase)


def _speechlike(seconds=1.5, sr=SR, seed=0):
    """Tones, broadband noise and a run of exact zeros (where Kaldi's energy floor bites)."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n, dtype=torch.float64) / sr
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.sin(2 * math.pi * 2300 * t)
    wave = wave + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    wave[n // 4:n // 4 + 3000] = 0.0
    return wave


# ------------------------------------------------------------------------------------- an independent fbank

def _kaldi_fbank_numpy(wave, sr=SR, n_mels=80, frame_length_ms=25.0, frame_shift_ms=10.0, low_freq=20.0,
                       high_freq=0.0, snip_edges=True, preemph=0.97, remove_dc=True):
    """Kaldi's fbank written from its definition, one frame at a time, in float64 numpy."""
    x = np.asarray(wave, dtype=np.float64)
    win, hop = int(sr * frame_length_ms / 1000), int(sr * frame_shift_ms / 1000)
    nfft = 1
    while nfft < win:
        nfft *= 2
    n = len(x)
    if snip_edges:
        count = 1 + (n - win) // hop
        starts = [i * hop for i in range(count)]
    else:
        count = (n + hop // 2) // hop
        starts = [i * hop + hop // 2 - win // 2 for i in range(count)]

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    high = high_freq if high_freq > 0 else sr / 2 + high_freq
    m_lo, m_hi = mel(low_freq), mel(high)
    step = (m_hi - m_lo) / (n_mels + 1)
    weights = np.zeros((n_mels, nfft // 2 + 1))
    for b in range(n_mels):
        left, centre, right = m_lo + b * step, m_lo + (b + 1) * step, m_lo + (b + 2) * step
        for k in range(nfft // 2):
            m = mel(k * sr / nfft)
            if left < m <= centre:
                weights[b, k] = (m - left) / (centre - left)
            elif centre < m < right:
                weights[b, k] = (right - m) / (right - centre)
    povey = np.array([(0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1))) ** 0.85 for i in range(win)])
    out = np.empty((count, n_mels))
    for f, start in enumerate(starts):
        frame = np.empty(win)
        for i in range(win):
            j = start + i
            while j < 0 or j >= n:  # mirror at both ends
                j = -j - 1 if j < 0 else 2 * n - 1 - j
            frame[i] = x[j]
        if remove_dc:
            frame -= frame.mean()
        for i in range(win - 1, 0, -1):
            frame[i] -= preemph * frame[i - 1]
        frame[0] -= preemph * frame[0]
        spectrum = np.abs(np.fft.rfft(frame * povey, nfft)) ** 2
        out[f] = np.log(np.maximum(weights @ spectrum, np.finfo(np.float32).eps))
    return out


LOGMEL_CASES = [
    {},
    {"snip_edges": False},
    {"n_mels": 40, "frame_length_ms": 20.0, "frame_shift_ms": 12.5},
    {"sample_rate": 8000, "n_mels": 23, "low_freq": 64.0, "high_freq": -200.0},
    {"preemphasis": 0.0, "remove_dc_offset": False},
]


def _numpy_kwargs(kw):
    return dict(sr=kw.get("sample_rate", SR), n_mels=kw.get("n_mels", 80),
                frame_length_ms=kw.get("frame_length_ms", 25.0), frame_shift_ms=kw.get("frame_shift_ms", 10.0),
                low_freq=kw.get("low_freq", 20.0), high_freq=kw.get("high_freq", 0.0),
                snip_edges=kw.get("snip_edges", True), preemph=kw.get("preemphasis", 0.97),
                remove_dc=kw.get("remove_dc_offset", True))


@pytest.mark.parametrize("kw", LOGMEL_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_logmel_matches_independent_formula(kw):
    wave = _speechlike(1.0 if kw.get("sample_rate") != 8000 else 2.0)
    expected = _kaldi_fbank_numpy(wave.numpy(), **_numpy_kwargs(kw))
    got64 = logmel(wave, **kw)
    assert got64.dtype == torch.float64 and got64.shape == expected.shape
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-7, rtol=0)
    got32 = logmel(wave.float(), **kw)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, atol=2e-3, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="torchaudio is not installed")
@pytest.mark.parametrize("kw", LOGMEL_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_logmel_matches_torchaudio(kw):
    from torchaudio.compliance.kaldi import fbank

    wave = _speechlike(1.0 if kw.get("sample_rate") != 8000 else 2.0).float()
    ref = fbank(wave[None], num_mel_bins=kw.get("n_mels", 80), sample_frequency=kw.get("sample_rate", SR),
                frame_length=kw.get("frame_length_ms", 25.0), frame_shift=kw.get("frame_shift_ms", 10.0),
                low_freq=kw.get("low_freq", 20.0), high_freq=kw.get("high_freq", 0.0),
                snip_edges=kw.get("snip_edges", True), preemphasis_coefficient=kw.get("preemphasis", 0.97),
                remove_dc_offset=kw.get("remove_dc_offset", True), dither=0.0, window_type="povey")
    got = logmel(wave, **kw)
    assert got.shape == ref.shape
    # torchaudio builds its mel filters in float32; ours in float64, hence ~1e-4 in the logs.
    torch.testing.assert_close(got, ref, atol=5e-4, rtol=0)


def test_logmel_batched_module_and_frame_count():
    waves = torch.stack([_speechlike(1.0, seed=s) for s in range(3)]).float()
    batched = logmel(waves)
    assert batched.shape == (3, num_frames(SR), 80) == (3, 98, 80)
    for i in range(3):
        torch.testing.assert_close(batched[i], logmel(waves[i]), atol=1e-5, rtol=0)
    mod = LogMel(n_mels=40, snip_edges=False)
    assert mod.frame_rate == 100.0 and mod.dim == 40 and mod.config()["type"] == "logmel"
    torch.testing.assert_close(mod(waves[0]), logmel(waves[0], n_mels=40, snip_edges=False))
    assert mod(waves[0]).shape[0] == num_frames(SR, snip_edges=False) == 100
    assert logmel(np.asarray(waves[0])).shape == (98, 80)  # numpy audio is accepted as is


@pytest.mark.parametrize("n", [80, 101, 139, 250, 399, 401])
def test_logmel_short_audio_without_snipped_edges(n):
    """Audio shorter than a frame is mirrored again and again, as Kaldi does, down to the one frame that half a
    frame shift gives."""
    wave = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = _kaldi_fbank_numpy(wave.numpy(), snip_edges=False)
    assert expected.shape[0] == num_frames(n, snip_edges=False) >= 1
    np.testing.assert_allclose(logmel(wave, snip_edges=False).numpy(), expected, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="79 samples, fewer than half a 10.0 ms frame shift.*80 samples at 16000"):
        logmel(wave[:79], snip_edges=False)


def test_logmel_dither_is_seeded():
    wave = _speechlike(0.5).float()
    a = logmel(wave, dither=1e-3, generator=torch.Generator().manual_seed(3))
    b = logmel(wave, dither=1e-3, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, logmel(wave))
    # dither lifts the zero run above the energy floor
    assert float(logmel(wave)[20].max()) == pytest.approx(math.log(torch.finfo(torch.float32).eps))
    assert float(a[20].min()) > math.log(torch.finfo(torch.float32).eps)


def test_dithered_tokenizers_are_deterministic():
    """A feature extractor with dither still maps a wave to one output: fitting twice with a seed gives the same
    tokenizer, and encoding twice the same units (the global RNG, drawn between the calls, plays no part)."""
    waves = [_speechlike(0.6, seed=s).float() for s in range(4)]
    fits = []
    for _ in range(2):
        torch.rand(7)  # moves the global RNG
        tok = build_tokenizer("logmel_kmeans", n_units=6, n_mels=20, dither=1.0, seed=3)
        tok.fit(waves)
        fits.append(tok)
    torch.testing.assert_close(fits[0].kmeans.centroids, fits[1].kmeans.centroids, rtol=0, atol=0)
    first = fits[0].encode(waves[1])
    torch.rand(3)
    assert torch.equal(fits[0].encode(waves[1]), first) and torch.equal(fits[1].encode(waves[1]), first)
    front = LogMelFrontEnd(features=LogMel(n_mels=20, dither=1.0))
    front.fit(waves)
    torch.testing.assert_close(front.encode(waves[2]), front.encode(waves[2]), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, words", [
    (torch.zeros(16000, dtype=torch.int16), ValueError, ["wave", "floating-point", "int16"]),
    (torch.zeros(1, 2, 16000), ValueError, ["wave", "shape", "(1, 2, 16000)"]),
    (torch.zeros(0), ValueError, ["wave", "empty"]),
    (torch.zeros(3, 0), ValueError, ["wave", "empty"]),
    (torch.zeros(300), ValueError, ["wave", "300 samples", "frame"]),
    (torch.tensor([0.0, float("nan")] * 400), ValueError, ["wave", "NaN"]),
    ([0.0] * 16000, TypeError, ["wave", "list"]),
])
def test_logmel_bad_input(bad, error, words):
    with pytest.raises(error) as info:
        logmel(bad)
    for word in words:
        assert word in str(info.value)


def test_logmel_bad_settings():
    with pytest.raises(ValueError, match="window"):
        LogMel(window="kaiser")
    with pytest.raises(ValueError, match="high_freq"):
        LogMel(high_freq=9000.0)
    with pytest.raises(ValueError, match="sample_rate"):
        logmel(torch.zeros(1000), sample_rate=0)


# ------------------------------------------------------------------------------------------------- k-means

def _blobs(n_clusters=5, per=60, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.randn(n_clusters, dim, generator=g)
    labels = torch.arange(n_clusters).repeat_interleave(per)
    x = centres[labels] + torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], centres


def test_kmeans_recovers_separated_clusters():
    x, labels, centres = _blobs()
    km = KMeans(5, seed=0).fit(x)
    pred = km.predict(x)
    # one predicted id per true cluster, and different ids for different clusters
    mapping = {int(t): set(pred[labels == t].tolist()) for t in range(5)}
    assert all(len(ids) == 1 for ids in mapping.values())
    assert len({next(iter(ids)) for ids in mapping.values()}) == 5
    for t, ids in mapping.items():
        assert torch.dist(km.centroids[next(iter(ids))], centres[t]) < 0.6
    assert km.inertia == pytest.approx(float(((x - km.centroids[pred]) ** 2).sum()), rel=1e-4)


def test_kmeans_deterministic_and_degenerate_data():
    x, _, _ = _blobs(seed=1)
    a, b = KMeans(7, seed=5).fit(x), KMeans(7, seed=5).fit(x)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.predict(x), b.predict(x))
    # fewer distinct points than clusters: no crash, every point still gets a valid id
    dup = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(10, 1)
    km = KMeans(4, seed=0).fit(dup)
    assert km.predict(dup).max() < 4 and km.inertia == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        KMeans(50).fit(dup)
    with pytest.raises(ValueError, match="x must"):
        KMeans(2).fit(torch.zeros(10, dtype=torch.long))


# ------------------------------------------------------------------------------------- log-mel k-means units

# Pure tones: well separated clusters. (Added white noise would not be: in the log domain every noise-only mel bin
# fluctuates by ~5 dB whatever the noise level, and after normalization those ~75 bins outweigh the few that
# tell the tones apart.)
TONES = (300.0, 900.0, 2000.0, 4500.0)


def _train_tones():
    return [_tone(f).float() for f in TONES]


@pytest.fixture(scope="module")
def tone_tokenizer():
    train = _train_tones()
    return KMeansTokenizer(n_units=4, frame_rate=25, dedup=False, seed=0).fit(train)


def test_kmeans_tokenizer_separates_tones(tone_tokenizer):
    tok = tone_tokenizer
    assert tok.vocab_size == 4 and tok.frame_rate == 25.0 and tok.dim == 320
    seen = []
    for i, f in enumerate(TONES):
        units = tok.encode(_tone(f, phase=1.0 + i).float())  # unseen phases
        assert units.dtype == torch.long and units.device.type == "cpu"
        assert units.shape == (math.ceil(num_frames(SR // 2) / 4),)
        assert len(set(units.tolist())) == 1
        seen.append(int(units[0]))
    assert sorted(seen) == [0, 1, 2, 3]


def test_kmeans_tokenizer_dedup(tone_tokenizer):
    wave = torch.cat([_tone(300.0), _tone(2000.0), _tone(300.0, phase=2.0)]).float()
    plain = tone_tokenizer.encode(wave)
    deduped = copy.copy(tone_tokenizer)
    deduped.dedup = True
    units = deduped.encode(wave)
    assert torch.equal(units, dedup(plain))
    assert bool((units[1:] != units[:-1]).all()) and len(units) >= 3 and units[0] == units[-1]
    out, counts = dedup(torch.tensor([3, 3, 7, 7, 7, 3]), return_counts=True)
    assert out.tolist() == [3, 7, 3] and counts.tolist() == [2, 3, 1]


@pytest.mark.parametrize("frame_rate, pooling, n_out, dim", [
    (100, "stack", 98, 80), (50, "stack", 49, 160), (25, "stack", 25, 320), (12.5, "stack", 13, 640),
    (25, "mean", 25, 80), (12.5, "mean", 13, 80),
])
def test_frame_rate_pooling_shapes(frame_rate, pooling, n_out, dim):
    tok = KMeansTokenizer(n_units=3, frame_rate=frame_rate, pooling=pooling, normalize="none", dedup=False)
    feats = tok.featurize(_speechlike(1.0).float())  # 98 log-mel frames
    assert feats.shape == (n_out, dim) and tok.dim == dim
    tok.fit([_speechlike(1.0, seed=s).float() for s in range(2)])
    assert tok.encode(_speechlike(1.0, seed=5).float()).shape == (n_out,)


def test_pool_frames_content():
    x = torch.arange(10.0)[:, None].repeat(1, 2)  # frame i = [i, i]
    stacked = pool_frames(x, 4)
    assert stacked.shape == (3, 8)
    assert stacked[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stacked[2].tolist() == [8, 8, 9, 9, 9, 9, 9, 9]  # tail completed with the last frame
    assert pool_frames(x, 4, "mean")[2].tolist() == [8.75, 8.75]


def test_kmeans_tokenizer_deterministic_save_load(tmp_path, tone_tokenizer):
    train = _train_tones()
    again = KMeansTokenizer(n_units=4, frame_rate=25, dedup=False, seed=0).fit(train)
    assert torch.equal(again.kmeans.centroids, tone_tokenizer.kmeans.centroids)
    # features given instead of waves: the same fit
    from_feats = KMeansTokenizer(n_units=4, frame_rate=25, dedup=False, seed=0).fit([logmel(w) for w in train])
    assert torch.equal(from_feats.kmeans.centroids, tone_tokenizer.kmeans.centroids)

    tone_tokenizer.save(tmp_path / "tok")
    loaded = KMeansTokenizer.load(tmp_path / "tok")
    assert loaded.config() == tone_tokenizer.config()
    for name in ("centroids",):
        assert torch.equal(getattr(loaded.kmeans, name), getattr(tone_tokenizer.kmeans, name))
    assert torch.equal(loaded.mean, tone_tokenizer.mean) and torch.equal(loaded.std, tone_tokenizer.std)
    probe = _speechlike(1.0, seed=9).float()
    assert torch.equal(loaded.encode(probe), tone_tokenizer.encode(probe))
    assert isinstance(load_tokenizer(tmp_path / "tok"), KMeansTokenizer)
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["features"]["n_mels"] == 80


def test_utterance_normalization_removes_gain():
    train = _train_tones()
    tok = KMeansTokenizer(n_units=4, frame_rate=25, normalize="utterance", dedup=False).fit(train)
    # broadband noise keeps every mel bin above the energy floor, where a gain is exactly a constant per bin in the
    # log domain, which the per-utterance mean removes
    noise = 0.02 * torch.randn(SR, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = (torch.cat([_tone(300.0, phase=0.5), _tone(2000.0, phase=1.5)]) + noise).float()
    feats = tok.featurize(probe)
    assert tok.mean is None
    torch.testing.assert_close(tok.featurize(3.0 * probe), feats, atol=1e-3, rtol=0)
    assert torch.equal(tok.encode(3.0 * probe), tok.encode(probe))


def test_kmeans_tokenizer_errors():
    with pytest.raises(ValueError, match="frame_rate"):
        KMeansTokenizer(frame_rate=30)
    with pytest.raises(ValueError, match="pooling"):
        KMeansTokenizer(pooling="max")
    with pytest.raises(ValueError, match="normalize"):
        KMeansTokenizer(normalize="zscore")
    tok = KMeansTokenizer(n_units=4, frame_rate=25)
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode(_tone(300.0).float())
    with pytest.raises(TypeError, match="list"):
        tok.fit(_tone(300.0).float())
    with pytest.raises(ValueError, match="fewer than n_units"):
        tok.fit([torch.randn(800)])
    with pytest.raises(ValueError, match=r"data\[1\]"):
        tok.fit([torch.randn(SR), torch.zeros(SR, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"data\[2\]: wave has 300 samples, fewer than one 25.0 ms frame"):
        tok.fit([torch.randn(SR), torch.randn(SR), torch.randn(300)])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"n_units must be an int >= 1, got {bad}"):
            KMeansTokenizer(n_units=bad)
    with pytest.raises(ValueError, match="features"):
        tok.fit([torch.randn(20, 40)])  # 40-dim features for an 80-mel tokenizer
    with pytest.raises(ValueError, match="data is empty"):
        tok.fit([])
    tok.fit([_speechlike(1.0).float()])
    with pytest.raises(ValueError, match="8000 Hz|16000 Hz"):
        tok.encode(_tone(300.0).float(), sample_rate=8000)
    with pytest.raises(ValueError, match="wave"):
        tok.encode(torch.zeros(2, SR))
    with pytest.raises(ValueError, match="empty"):
        tok.encode(torch.zeros(0))


# ------------------------------------------------------------------------------------------- SSL features

SSL_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


@pytest.fixture(scope="module")
def tiny_ssl(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    paths = {}
    for name, cfg_cls, model_cls in (("hubert", "HubertConfig", "HubertModel"),
                                     ("wav2vec2", "Wav2Vec2Config", "Wav2Vec2Model")):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**SSL_SHAPE)).eval()
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("name", ["hubert", "wav2vec2"])
def test_ssl_features_match_hidden_states(tiny_ssl, name):
    from transformers import AutoModel

    from mdus.speech import SSLFeatures

    model = AutoModel.from_pretrained(tiny_ssl[name]).eval()
    wave = _speechlike(0.5).float()
    with torch.no_grad():
        hidden = model(wave[None], output_hidden_states=True).hidden_states
    by_path = SSLFeatures(str(tiny_ssl[name]), layer=1)
    assert by_path.frame_rate == 50.0 and by_path.dim == 32 and by_path.sample_rate == SR
    assert by_path(wave).shape == (24, 32)
    torch.testing.assert_close(by_path(wave), hidden[1][0], atol=1e-5, rtol=1e-5)
    for layer in (0, 2, -1):
        feats = SSLFeatures(model, layer=layer)  # an already loaded model works too
        torch.testing.assert_close(feats(wave), hidden[layer][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        SSLFeatures(model, layer=3)
    with pytest.raises(ValueError, match="400"):
        by_path(torch.randn(300))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_ssl_kmeans_round_trip(tiny_ssl, tmp_path, dtype):
    tok = build_tokenizer("ssl_kmeans", model_name_or_path=str(tiny_ssl["hubert"]), layer=1, n_units=4,
                          frame_rate=25, dedup=False, seed=0, dtype=dtype)
    assert tok.features.model.dtype == (dtype or torch.float32)
    assert tok.pooling == "mean" and tok.dim == 32
    tok.fit([_speechlike(0.5, seed=s).float() for s in range(3)])
    probe = _speechlike(0.5, seed=7).float()
    units = tok.encode(probe)
    assert units.shape == (12,) and int(units.max()) < 4  # 24 HuBERT frames at 50 Hz -> 12 at 25 Hz
    tok.save(tmp_path / "ssl_tok")
    loaded = load_tokenizer(tmp_path / "ssl_tok")
    assert loaded.config() == tok.config() and loaded.features.layer == 1
    assert loaded.features.model.dtype == tok.features.model.dtype  # the model runs as it was fitted
    assert torch.equal(loaded.kmeans.centroids, tok.kmeans.centroids)
    assert torch.equal(loaded.encode(probe), units)


def test_ssl_rejects_non_speech_model(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    from mdus.speech import SSLFeatures

    LlamaModel(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="speech SSL encoder"):
        SSLFeatures(str(tmp_path))


# ------------------------------------------------------------------------------------------------ unit files

def test_unit_files_valid(tmp_path):
    units = [5, 5, 0, 9, 3]
    np.save(tmp_path / "a.npy", np.array(units, dtype=np.int16))
    torch.save(torch.tensor(units, dtype=torch.int32), tmp_path / "b.pt")
    (tmp_path / "c.txt").write_text("5 5 0\n9 3\n")
    for name in ("a.npy", "b.pt", "c.txt"):
        got = read_units(tmp_path / name, vocab_size=10)
        assert got.dtype == torch.long and got.tolist() == units
    tok = UnitFileTokenizer(10, root=tmp_path, dedup=True, frame_rate=50)
    assert tok.encode({"id": "u1", "units": "a.npy"}).tolist() == [5, 0, 9, 3]
    assert tok.encode(tmp_path / "c.txt").tolist() == [5, 0, 9, 3]
    assert tok.encode({"id": "u2", "units": [1, 1, 2]}).tolist() == [1, 2]
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, UnitFileTokenizer) and loaded.config() == tok.config()


def test_unit_file_root_survives_the_working_directory_and_a_move(tmp_path, monkeypatch):
    """A relative ``root`` is taken from the working directory when given, and saved so that the tokenizer reloads
    from anywhere; units kept inside the tokenizer's folder move with it."""
    (tmp_path / "run" / "units").mkdir(parents=True)
    (tmp_path / "run" / "units" / "u.txt").write_text("3 1 4\n")
    monkeypatch.chdir(tmp_path)
    UnitFileTokenizer(5, root="run/units").save("run")
    monkeypatch.chdir(tmp_path / "run" / "units")  # elsewhere
    assert load_tokenizer(tmp_path / "run").encode("u.txt").tolist() == [3, 1, 4]
    (tmp_path / "run").rename(tmp_path / "moved")
    assert load_tokenizer(tmp_path / "moved").encode("u.txt").tolist() == [3, 1, 4]
    outside = UnitFileTokenizer(5, root=tmp_path / "moved" / "units")
    outside.save(tmp_path / "elsewhere")  # units outside the folder: stored absolute
    assert load_tokenizer(tmp_path / "elsewhere").root == (tmp_path / "moved" / "units").resolve()


@pytest.mark.parametrize("content, words", [
    (np.array([1, 10, 2]), ["unit 10 at position 1", "0..9"]),
    (np.array([1, -1]), ["unit -1 at position 1"]),
    (np.array([1.0, 2.0]), ["integer dtype", "float64"]),
    (np.array([[1, 2], [3, 4]]), ["1-D", "(2, 2)"]),
    (np.array([], dtype=np.int64), ["no units"]),
    ("1 2 x3", [":1:", "'x3'", "not an integer"]),
    ("", ["no units"]),
    (torch.tensor([0.5]), ["integer dtype"]),
])
def test_unit_files_invalid(tmp_path, content, words):
    if isinstance(content, str):
        path = tmp_path / "u.txt"
        path.write_text(content)
    elif isinstance(content, torch.Tensor):
        path = tmp_path / "u.pt"
        torch.save(content, path)
    else:
        path = tmp_path / "u.npy"
        np.save(path, content)
    with pytest.raises(ValueError) as info:
        read_units(path, vocab_size=10)
    for word in words:
        assert word in str(info.value)
    assert path.name in str(info.value)


def test_unit_files_manifest_errors(tmp_path):
    tok = UnitFileTokenizer(10, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        tok.encode({"id": "u", "units": "missing.npy"})
    with pytest.raises(KeyError, match="'units'"):
        tok.encode({"id": "u", "audio": "x.wav"})
    with pytest.raises(ValueError, match="integers"):
        tok.encode({"id": "u", "units": [1, True]})
    with pytest.raises(ValueError, match="outside 0..9"):
        tok.encode({"id": "u", "units": [1, 12]})
    with pytest.raises(TypeError, match="entry"):
        tok.encode(3)
    with pytest.raises(ValueError, match="vocab_size"):
        UnitFileTokenizer(0)


# ---------------------------------------------------------------------------------------- conv subsampler

@pytest.mark.parametrize("stride", [4, 8])
def test_subsampler_shapes_and_gradients(stride):
    torch.manual_seed(0)
    sub = ConvSubsampler(80, 48, stride=stride)
    feats = logmel(torch.stack([_speechlike(1.0, seed=s) for s in range(2)]).float())  # (2, 98, 80)
    feats.requires_grad_(True)
    out = sub(feats)
    assert out.shape == (2, math.ceil(98 / stride), 48)
    assert sub(feats[0]).shape == (math.ceil(98 / stride), 48)
    out.square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, p in sub.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_subsampler_padded_batch_matches_single():
    torch.manual_seed(0)
    sub = ConvSubsampler(16, 24, stride=8).eval()
    a, b = torch.randn(37, 16), torch.randn(23, 16)
    batch = torch.stack([a, torch.cat([b, torch.full((14, 16), 99.0)])])  # padding garbage must not leak
    out, lengths = sub(batch, torch.tensor([37, 23]))
    assert lengths.tolist() == [5, 3] and out.shape == (2, 5, 24)
    torch.testing.assert_close(out[0], sub(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :3], sub(b), atol=1e-5, rtol=0)
    assert out[1, 3:].abs().sum() == 0


def test_subsampler_errors():
    with pytest.raises(ValueError, match="stride"):
        ConvSubsampler(80, 32, stride=3)
    sub = ConvSubsampler(80, 32)
    with pytest.raises(ValueError, match="features must have shape"):
        sub(torch.randn(2, 10, 40))
    with pytest.raises(ValueError, match="floating point"):
        sub(torch.zeros(10, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="0 frames"):
        sub(torch.zeros(0, 80))
    with pytest.raises(ValueError, match="lengths"):
        sub(torch.randn(2, 10, 80), torch.tensor([10, 11]))


# ---------------------------------------------------------------------------------------------------- factory

def test_factory(tmp_path):
    tok = build_tokenizer("logmel_kmeans", n_units=100, frame_rate=12.5, n_mels=40, dedup=False)
    assert isinstance(tok, KMeansTokenizer) and tok.features.dim == 40 and tok.factor == 8
    assert (tok.vocab_size, tok.frame_rate) == (100, 12.5)
    units = build_tokenizer("units", vocab_size=500, root=tmp_path)
    assert isinstance(units, UnitFileTokenizer) and units.frame_rate == 25.0
    for t in (tok, units):
        assert isinstance(t, SpeechTokenizer)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_tokenizer("encodec")
    with pytest.raises(ValueError, match="model_name_or_path"):
        build_tokenizer("ssl_kmeans", n_units=10)
    with pytest.raises(TypeError):
        build_tokenizer("logmel_kmeans", n_unit=10)  # a typo is an error, not a silent default
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    wave = _speechlike(1.0).float()
    torch.testing.assert_close(logmel(wave.cuda()).cpu(), logmel(wave), atol=2e-3, rtol=0)
    x, labels, _ = _blobs()
    cpu, gpu = KMeans(5, seed=0).fit(x), KMeans(5, seed=0).fit(x.cuda())
    assert gpu.centroids.is_cuda
    # the same clusters, possibly numbered differently if float rounding made k-means++ keep another candidate
    dist, mapping = torch.cdist(gpu.centroids.cpu(), cpu.centroids).min(dim=1)
    assert sorted(mapping.tolist()) == list(range(5)) and float(dist.max()) < 1e-3
    assert torch.equal(mapping[gpu.predict(x.cuda()).cpu()], cpu.predict(x))


def test_logmel_front_end(tmp_path):
    """Continuous input: standardized with the training split's per-bin statistics (checked against the frames
    computed independently by ``logmel``), as many positions as the model's ConvSubsampler outputs, and a
    save/load round trip through ``load_tokenizer``."""
    g = torch.Generator().manual_seed(5)
    waves = [0.1 * torch.randn(n, generator=g) for n in (4000, 7321, 16000)]
    fe = build_tokenizer("features", stride=8, n_mels=24).fit(waves)
    assert isinstance(fe, LogMelFrontEnd) and fe.continuous and fe.vocab_size == 1 and fe.frame_rate == 12.5
    frames = torch.cat([logmel(w, n_mels=24) for w in waves]).double()
    torch.testing.assert_close(fe.mean.double(), frames.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fe.std.double(), frames.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    feats = fe.encode(waves[1])
    torch.testing.assert_close(feats, ((logmel(waves[1], n_mels=24) - fe.mean) / fe.std), atol=1e-5, rtol=1e-5)
    sub = ConvSubsampler(24, 16, stride=8)
    assert fe.n_positions(feats) == sub(feats).shape[0]
    loaded = load_tokenizer(fe.save(tmp_path / "fe"))
    assert isinstance(loaded, LogMelFrontEnd) and torch.equal(loaded.encode(waves[0]), fe.encode(waves[0]))
    with pytest.raises(RuntimeError, match="before fit"):
        LogMelFrontEnd().encode(waves[0])
    with pytest.raises(ValueError, match="stride"):
        LogMelFrontEnd(stride=3)
    with pytest.raises(ValueError, match="at least two frames"):
        LogMelFrontEnd().fit([])
