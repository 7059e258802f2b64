"""A small speech encoder trained with CTC on the training transcripts: phonetic frame features without a
pretrained SSL model.

The paper's speech tokens are k-means units of a pretrained SSL encoder (HuBERT/XEUS), whose layers are strongly
phonetic. Where no such model can be downloaded (the demo runs offline), ``fit_ctc_encoder`` trains the closest
thing the training split allows: log-mel frames -> ``ConvSubsampler`` (to 50 Hz) -> a depthwise-conv positional
embedding -> ``layers`` pre-norm transformer encoder layers -> LayerNorm, with a linear CTC head over the
characters of the normalized transcripts (``mdus.evaluate.normalize_text``). Supervised speech tokens of this kind
(an ASR-trained encoder, then quantized) are what CosyVoice's S3 tokenizer uses.

``CTCEncoder`` is then a feature extractor like ``LogMel`` and ``SSLFeatures`` (``dim``, ``frame_rate``,
``sample_rate``, ``config``, ``encoder(wave) -> (frames, dim)``: the final normalized hidden states, what the CTC
head reads), so ``KMeansTokenizer(features=encoder)`` turns it into discrete units. ``transcribe`` decodes greedily
with the CTC head (the encoder's own character error rate, a check that it learnt the speech).

``CTCPosteriorFrontEnd`` is the other way to use it, continuous and without k-means: each utterance becomes one
position per character the greedy CTC path emits, holding the posterior distribution over the characters averaged
over that character's frames (``collapse_posteriors``). A speech LM reads it through a ``SymbolProjection`` whose
rows start as the LLM's own embeddings of those characters (``CTCPosteriorFrontEnd.token_ids``), so the frozen
LLM is handed a soft spelling of the utterance in its input space from step 0, at the rate of text characters
(about 15 per second in the demo's corpus) instead of 25-50 frames per second.

Saved as a directory (``encoder.json`` + ``encoder.safetensors``); a tokenizer that uses it refers to that
directory, as an SSL tokenizer refers to its model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mdus.evaluate import normalize_text
from mdus.speech._common import check_sample_rate, check_wave, naming, portable_path, read_config, write_config
from mdus.speech.logmel import LogMel
from mdus.speech.subsampler import ConvSubsampler

CONFIG_FILE, TENSORS_FILE = "encoder.json", "encoder.safetensors"


class CTCEncoder(nn.Module):
    """Wave (T,) -> (frames, dim) features at ``100 / stride`` Hz; see the module docstring.

    ``alphabet``: the CTC output symbols (index 0 is the blank, symbol i is ``alphabet[i - 1]``). ``mean``/``std``
    (n_mels,) standardize the log-mel frames; ``fit_ctc_encoder`` sets them from the training split.

    Example:
        >>> enc = CTCEncoder("abc ", dim=32, layers=1, heads=2)
        >>> enc(torch.randn(16000)).shape, enc.frame_rate
        (torch.Size([49, 32]), 50.0)
    """

    def __init__(self, alphabet: str, *, dim: int = 192, layers: int = 4, heads: int = 4, stride: int = 2,
                 dropout: float = 0.1, features: LogMel | None = None):
        super().__init__()
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {alphabet!r}")
        if int(dim) % int(heads):
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.alphabet = alphabet
        self.mel = LogMel() if features is None else features
        self.hparams = {"dim": int(dim), "layers": int(layers), "heads": int(heads), "stride": int(stride),
                        "dropout": float(dropout)}
        self.subsampler = ConvSubsampler(self.mel.dim, dim, stride=stride)
        self.position = nn.Conv1d(dim, dim, 15, padding=7, groups=dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(alphabet) + 1)
        self.register_buffer("mean", torch.zeros(self.mel.dim))
        self.register_buffer("std", torch.ones(self.mel.dim))
        self.path: Path | None = None

    # ------------------------------------------------------------------------------ the feature-extractor interface

    @property
    def dim(self) -> int:
        return self.hparams["dim"]

    @property
    def frame_rate(self) -> float:
        return self.mel.frame_rate / self.hparams["stride"]

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    def config(self) -> dict:
        if self.path is None:
            raise ValueError("this CTCEncoder was never saved, so a tokenizer could not reload it: save(path) first")
        return {"type": "ctc", "path": str(self.path.resolve())}

    def hidden(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized log-mel (B, T, n_mels) with ``lengths`` (B,) -> hidden states (B, T', dim) and T' (B,)."""
        x, out_lengths = self.subsampler(features, lengths)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= out_lengths[:, None]
        x = x + self.position(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(self.layers(x, src_key_padding_mask=pad)), out_lengths

    def standardized(self, wave: torch.Tensor) -> torch.Tensor:
        """(T,) samples -> (frames, n_mels) log-mel frames standardized with the training split's statistics."""
        frames = self.mel(check_wave(wave, batched=False).to(self.mean.device)).float()
        return (frames - self.mean) / self.std

    @torch.no_grad()
    def forward(self, wave) -> torch.Tensor:
        """(T,) samples -> (ceil(frames / stride), dim) float32 features (eval mode, no gradient)."""
        was_training = self.training
        self.eval()
        try:
            x = self.standardized(wave)
            h, _ = self.hidden(x[None], torch.tensor([x.shape[0]], device=x.device))
        finally:
            self.train(was_training)
        return h[0]

    @torch.no_grad()
    def transcribe(self, wave, sample_rate: int | None = None) -> str:
        """Greedy CTC decoding of one utterance: the encoder's own transcription (normalized text)."""
        check_sample_rate(sample_rate, self.sample_rate)
        ids = torch.unique_consecutive(self.head(self(wave)).argmax(-1)).tolist()
        return " ".join("".join(self.alphabet[i - 1] for i in ids if i).split())

    # ---------------------------------------------------------------------------------------------------- storage

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"alphabet": self.alphabet, **self.hparams, "features": self.mel.config()}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / TENSORS_FILE))
        self.path = path
        return path

    @classmethod
    def load(cls, path, device=None) -> CTCEncoder:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path / CONFIG_FILE} does not exist: path must be a directory written by "
                                    "CTCEncoder.save")
        config = json.loads((path / CONFIG_FILE).read_text())
        mel = dict(config.pop("features"))
        mel.pop("type", None)
        enc = cls(config.pop("alphabet"), features=LogMel(**mel), **config)
        enc.load_state_dict(load_file(str(path / TENSORS_FILE)))
        enc.path = path
        return enc.to(device or "cpu").eval()


def fit_ctc_encoder(waves: Sequence, texts: Sequence[str], *, dim: int = 192, layers: int = 4, heads: int = 4,
                    stride: int = 2, epochs: int = 10, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                    device=None, progress: bool = True) -> CTCEncoder:
    """Train a ``CTCEncoder`` on (wave, transcript) pairs of the training split: AdamW, linear warm-up over the
    first 5% of the steps and cosine decay, clipping at 1; deterministic in ``seed`` on the CPU. It trains on
    ``device`` (default the CPU) and stays there.

    Transcripts are normalized (``mdus.evaluate.normalize_text``); the alphabet is their characters. Utterances
    with an empty transcript are skipped; one whose audio gives fewer frames than its label needs is kept (CTC's
    infinite losses are zeroed)."""
    if len(waves) != len(texts):
        raise ValueError(f"waves and texts differ in length: {len(waves)} != {len(texts)}")
    norm = [normalize_text(t) for t in texts]
    pairs = [(f"waves[{i}]", w, t) for i, (w, t) in enumerate(zip(waves, norm, strict=True)) if t]
    if not pairs:
        raise ValueError("no utterance has a non-empty transcript: there is nothing to train the encoder on")
    torch.manual_seed(seed)
    enc = CTCEncoder("".join(sorted({c for _, _, t in pairs for c in t})), dim=dim, layers=layers, heads=heads,
                     stride=stride)
    frames = []
    for name, w, _ in pairs:
        with naming(name):
            frames.append(enc.mel(check_wave(w, name, batched=False)).float())
    stacked = torch.cat(frames).double()
    enc.mean.copy_(stacked.mean(0).float())
    enc.std.copy_(stacked.std(0).clamp_min(1e-5).float())
    feats = [(f - enc.mean) / enc.std for f in frames]
    enc.to(device or "cpu")
    index = {c: i + 1 for i, c in enumerate(enc.alphabet)}
    labels = [torch.tensor([index[c] for c in t]) for _, _, t in pairs]

    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(len(pairs) / batch_size)
    total = per_epoch * epochs
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    generator = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="CTC speech encoder", disable=not progress, unit="step")
    enc.train()
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(pairs), batch_size):
            batch = order[start:start + batch_size]
            x = nn.utils.rnn.pad_sequence([feats[i] for i in batch], batch_first=True).to(enc.mean.device)
            lengths = torch.tensor([feats[i].shape[0] for i in batch], device=x.device)
            h, out_lengths = enc.hidden(x, lengths)
            log_probs = enc.head(h).log_softmax(-1).transpose(0, 1)
            targets = [labels[i] for i in batch]
            loss = nn.functional.ctc_loss(log_probs, torch.cat(targets).to(x.device), out_lengths,
                                          torch.tensor([t.shape[0] for t in targets], device=x.device),
                                          zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return enc.eval()


def collapse_posteriors(probs: torch.Tensor) -> torch.Tensor:
    """CTC posteriors (T, 1 + S), blank first, -> (N, S): one row per symbol of the greedy CTC path.

    Frames whose most probable output is the blank are dropped; each run of consecutive frames with the same most
    probable symbol becomes one row, the mean of their symbol probabilities renormalized to sum to 1 (the blank's
    share is dropped). Row i's argmax is therefore the i-th symbol of the greedy transcription. An utterance whose
    every frame is blank-best gives a single row, the renormalized mean over all its frames, so that it still has
    a position.

    Example:
        >>> p = torch.tensor([[.1, .8, .1], [.2, .7, .1], [.9, .05, .05], [.1, .1, .8]])
        >>> collapse_posteriors(p)
        tensor([[0.8824, 0.1176],
                [0.1111, 0.8889]])
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[1] < 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a (T >= 1, 1 + S >= 2) tensor of CTC posteriors, got "
                         f"{tuple(getattr(probs, 'shape', ()))}")
    best = probs.argmax(-1)
    keep = best != 0
    if not bool(keep.any()):
        row = probs[:, 1:].mean(0, keepdim=True)
        return row / row.sum(-1, keepdim=True).clamp_min(1e-12)
    # A kept frame starts a run when its symbol differs from the previous frame's best (a blank included).
    starts = keep & torch.cat([best.new_ones(1, dtype=torch.bool), best[1:] != best[:-1]])
    run = (torch.cumsum(starts.long(), 0) - 1)[keep]
    sums = probs.new_zeros(int(starts.sum()), probs.shape[1] - 1).index_add_(0, run, probs[keep, 1:])
    return sums / sums.sum(-1, keepdim=True).clamp_min(1e-12)


class CTCPosteriorFrontEnd:
    """Continuous speech input from a ``CTCEncoder``: wave -> (N, S) character posteriors, one row per character
    of its greedy CTC path (``collapse_posteriors``); see the module docstring.

    It has the continuous front end's interface (as ``LogMelFrontEnd``: ``continuous = True``, ``vocab_size == 1``,
    the placeholder id, ``n_positions``, ``encode``, ``save``/``load``); the model reads it through a
    ``SymbolProjection`` (``speech_encoder={"type": "symbols", "token_ids": front.token_ids(text_tokenizer)}``).

    Example:
        >>> front = CTCPosteriorFrontEnd(CTCEncoder("ab ", dim=32, layers=1, heads=2))
        >>> feats = front.encode(torch.randn(16000))
        >>> feats.shape[1], front.n_positions(feats) == feats.shape[0]
        (3, True)
    """

    kind = "ctc_posteriors"
    continuous = True
    vocab_size = 1  # the placeholder id of a speech position

    def __init__(self, encoder: CTCEncoder):
        if not isinstance(encoder, CTCEncoder):
            raise TypeError(f"encoder must be a CTCEncoder, got {type(encoder).__name__}")
        self.encoder = encoder.eval()

    @property
    def alphabet(self) -> str:
        return self.encoder.alphabet

    @property
    def n_symbols(self) -> int:
        return len(self.encoder.alphabet)

    @property
    def frame_rate(self) -> float:
        """The encoder's frame rate; the positions are fewer, one per emitted character."""
        return self.encoder.frame_rate

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    def n_positions(self, features: torch.Tensor) -> int:
        return int(features.shape[0])

    @torch.no_grad()
    def encode(self, wave, sample_rate: int | None = None) -> torch.Tensor:
        """(T,) float samples -> (N, S) float32 posteriors over the alphabet, N >= 1."""
        check_sample_rate(sample_rate, self.sample_rate)
        probs = self.encoder.head(self.encoder(wave)).float().softmax(-1)
        return collapse_posteriors(probs).cpu()

    def token_ids(self, text_tokenizer) -> list[list[int]]:
        """The text tokens of each alphabet symbol (``text_tokenizer(symbol)``, e.g. ``[216]`` for SmolLM2's "Ġ"):
        the ``SymbolProjection`` starts each symbol's embedding at the mean of theirs."""
        ids = [list(text_tokenizer(c, add_special_tokens=False).input_ids) for c in self.alphabet]
        empty = [c for c, i in zip(self.alphabet, ids, strict=True) if not i]
        if empty:
            raise ValueError(f"the text tokenizer gives no token for the symbols {empty}")
        return ids

    def config(self) -> dict:
        if self.encoder.path is None:
            raise ValueError("the CTCEncoder was never saved, so this front end could not reload it: save it first")
        return {"kind": self.kind, "encoder": str(self.encoder.path.resolve())}

    def save(self, path) -> Path:
        """``tokenizer.json`` naming the encoder's folder (relative when it is inside ``path``)."""
        config = self.config()
        return write_config(path, {**config, "encoder": portable_path(config["encoder"], path)})

    @classmethod
    def load(cls, path, device=None) -> CTCPosteriorFrontEnd:
        config = read_config(path, cls.kind)
        return cls(CTCEncoder.load(Path(path) / config["encoder"], device=device))

    def __repr__(self) -> str:
        return f"CTCPosteriorFrontEnd(alphabet={self.alphabet!r}, frame_rate={self.frame_rate:g})"
