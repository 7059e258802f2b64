"""Training of up-scaled speech LMs and their baselines: packing, AdamW with warm-up and decay, optional text
replay against forgetting (``TextReplay``), checkpoints that resume bit-exactly, signal handling, progress and
metrics.

An *example* is ``(units, text)``: speech unit ids (0..K-1) and the transcript's text token ids. Its sequence is
``[text_vocab + units] + text (+ eos)``, trained by next-token prediction on the transcript only (ASR, as in the
paper). With continuous speech input (a ``LogMelFrontEnd`` and a model with a speech encoder) the units are
``ceil(frames / stride)`` placeholder ids 0 and the example also carries its log-mel features, which ``collate``
pads into ``speech_features``. Sequences are packed without padding into varlen batches of at most
``max_tokens`` tokens (``cu_seqlens``), in an order drawn from ``seed + epoch``, so the whole data order is a
function of the config.

**Bit-exact resume.** A checkpoint holds the trainable tensors, the optimizer and scheduler state, every RNG state
and the position in the data order, and is taken only at step boundaries. On CPU the computation is deterministic,
so a resumed run reproduces the losses of an uninterrupted one exactly (tested). Checkpoints are written to a
temporary file and renamed, so a run killed while saving never leaves a broken checkpoint; SIGINT and SIGTERM stop
the run at the next step boundary after saving one.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import mdus
from mdus.upscale import IGNORE, SpeechLM

METHODS = ("dus-transformer", "dus-ebranchformer", "full-ft", "lora")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    speech_lr: float | None = None     # peak rate of the speech input (SpeechLM.speech_input_parameters); None: lr
    min_lr_ratio: float = 0.2          # decay to lr * min_lr_ratio (the paper: 1e-4 -> 2e-5)
    warmup_steps: int = 20
    max_steps: int = 200
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_tokens: int = 2048             # tokens per micro-batch (packed)
    grad_accum: int = 1
    clip_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    budget_minutes: float | None = None
    bf16: bool | None = None           # bf16 autocast; None: on GPUs, and on CPUs with native bf16 (see fast_bf16)
    text_kl: float = 0.0               # weight of text replay's KL(base || model) (TextReplay); 0: off
    text_kl_passages: int = 4          # text replay passages per micro-batch
    progress: bool = True
    extra: dict = field(default_factory=dict)


def build_method(base, method: str, *, speech_vocab_size: int, route: str = "all", block_config: dict | None = None,
                 lora_params: int | None = None, n_insert: int | None = None,
                 placement: str | list[int] = "interleaved", speech_encoder: dict | None = None) -> SpeechLM:
    """One of ``METHODS`` around ``base``. ``lora`` matches ``lora_params`` trainable parameters (e.g. those of the
    up-scaled model), else uses rank 8. ``n_insert`` and ``placement`` go to ``mdus.upscale``. ``speech_encoder``
    (``ConvSubsampler`` options) gives continuous speech input (``speech_encoder_config`` makes it from a front
    end)."""
    speech = dict(speech_vocab_size=speech_vocab_size, speech_encoder=speech_encoder)
    if method in ("dus-transformer", "dus-ebranchformer"):
        return mdus.upscale(base, block=method.removeprefix("dus-"), route=route, block_config=block_config,
                            n_insert=n_insert, placement=placement, **speech)
    if method == "full-ft":
        return mdus.full_finetune(base, **speech)
    if method == "lora":
        if lora_params:
            return mdus.lora(base, match_params=lora_params, **speech)
        return mdus.lora(base, rank=8, **speech)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# ---------------------------------------------------------------------------------------------------- batching


def make_sequence(units: torch.Tensor, text: torch.Tensor, text_vocab: int, eos: int | None):
    """(token ids, loss mask): speech units shifted above the text vocabulary, then the transcript (+ eos)."""
    tail = text if eos is None else torch.cat([text, text.new_tensor([eos])])
    ids = torch.cat([units.long() + text_vocab, tail.long()])
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    mask[units.shape[0]:] = True
    return ids, mask


def pack(lengths: Sequence[int], order: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing of examples (in ``order``) into batches of at most ``max_tokens`` tokens; an example longer
    than the budget gets a batch of its own."""
    batches, current, used = [], [], 0
    for i in order:
        n = lengths[i]
        if current and used + n > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def speech_encoder_config(speech_tokenizer, text_tokenizer=None) -> dict | None:
    """The model's speech encoder options for a continuous front end: a ``ConvSubsampler`` for a
    ``LogMelFrontEnd``, a ``SymbolProjection`` started from ``text_tokenizer``'s embeddings of the characters for a
    ``CTCPosteriorFrontEnd``; None for units."""
    if not getattr(speech_tokenizer, "continuous", False):
        return None
    if hasattr(speech_tokenizer, "token_ids"):
        if text_tokenizer is None:
            raise ValueError("a CTCPosteriorFrontEnd needs the text tokenizer (its characters' token ids)")
        return {"type": "symbols", "token_ids": speech_tokenizer.token_ids(text_tokenizer)}
    return {"n_mels": speech_tokenizer.n_mels, "stride": speech_tokenizer.stride}


SPEECH_INPUTS = ("units", "features", "ctc-units", "ctc-chars")


def feature_stride(frame_rate: float) -> int:
    """The subsampling of 100 Hz log-mel frames to ``frame_rate`` Hz that continuous features use: an even integer
    (the conv subsampler halves twice or more), else ValueError."""
    stride = 100 / frame_rate if frame_rate > 0 else 0.0
    if stride < 2 or stride != round(stride) or round(stride) % 2:
        raise ValueError(f"frame_rate={frame_rate:g}: continuous features need 100 / frame_rate to be an even integer "
                         "(50, 25 or 12.5 Hz)")
    return round(stride)


def fit_speech_input(speech_input: str, waves, *, units: int, frame_rate: float, seed: int = 0, texts=None,
                     save_to=None, ctc_epochs: int = 12, device=None, progress: bool = True):
    """A speech front end fit on the training ``waves``:

    * ``"units"``: k-means units of log-mel frames (``units`` clusters at ``frame_rate`` Hz, de-duplicated);
    * ``"features"``: standardized log-mel frames for a speech encoder subsampling 100 Hz to ``frame_rate`` Hz
      (100 / ``frame_rate`` must be an even integer);
    * ``"ctc-units"``: k-means units (as ``"units"``) of a small encoder first trained with CTC on the training
      ``texts`` for ``ctc_epochs`` (``mdus.speech.ctc``), written to ``save_to/encoder``: phonetic units, the
      stand-in for the paper's HuBERT units where no pretrained speech model is at hand (trained on ``device``);
    * ``"ctc-chars"``: that encoder's character posteriors, one position per character of its greedy CTC path
      (``CTCPosteriorFrontEnd``), read by the model through its characters' text embeddings.

    The caller saves the returned tokenizer (into ``save_to`` for the ``ctc-`` inputs, which it then refers to)."""
    from tqdm.auto import tqdm

    from mdus.speech import CTCPosteriorFrontEnd, KMeansTokenizer, LogMelFrontEnd, fit_ctc_encoder

    def featurized(desc):  # the fits read every wave once, the long part before k-means
        return tqdm(waves, desc=desc, unit="utt", disable=not progress)

    if speech_input == "units":
        return KMeansTokenizer(units, frame_rate=frame_rate, seed=seed).fit(featurized("log-mel k-means"))
    if speech_input == "features":
        return LogMelFrontEnd(feature_stride(frame_rate)).fit(featurized("log-mel statistics"))
    if speech_input in ("ctc-units", "ctc-chars"):
        if texts is None or save_to is None:
            raise ValueError(f"speech_input={speech_input!r} needs the training transcripts (texts) and a folder "
                             "(save_to)")
        encoder = fit_ctc_encoder(waves, texts, epochs=ctc_epochs, seed=seed, device=device, progress=progress)
        encoder.save(Path(save_to) / "encoder")
        if speech_input == "ctc-chars":
            return CTCPosteriorFrontEnd(encoder)
        return KMeansTokenizer(units, features=encoder, frame_rate=frame_rate, seed=seed).fit(
            featurized("encoder k-means"))
    raise ValueError(f"speech_input must be one of {', '.join(SPEECH_INPUTS)}, got {speech_input!r}")


def read_audio(utterances: list, *, progress: bool = True) -> list:
    """The (utterance, waveform) pairs of ``utterances`` (``mdus.data.AudioStream``: bad audio skipped and
    counted), with a progress bar."""
    from tqdm.auto import tqdm

    from mdus.data.audio import AudioStream

    return list(tqdm(AudioStream(utterances), total=len(utterances), desc="read audio", unit="utt",
                     disable=not progress))


def speech_input_in(tok_dir: Path, read_utterances: Callable[[], list], speech_input: str, **fit_kwargs):
    """(speech tokenizer, the training utterances if they were read): the one saved in ``tok_dir``, or one fit by
    ``fit_speech_input(speech_input, ...)`` on ``read_utterances()`` ((utterance, waveform) pairs) and saved there.
    The fit is written to ``<tok_dir>.partial`` and renamed into place, so a run killed while fitting or saving
    leaves no half-written tokenizer behind (the next run fits again). Raises ValueError naming the folder when it
    holds something else or a tokenizer that does not load."""
    from mdus.speech import load_tokenizer

    if (tok_dir / "tokenizer.json").is_file():
        try:
            return load_tokenizer(tok_dir), None
        except Exception as exc:
            raise ValueError(f"the speech tokenizer in {tok_dir} does not load ({type(exc).__name__}: {exc}): delete "
                             "the folder to fit a new one") from None
    if tok_dir.exists() and any(tok_dir.iterdir()):
        raise ValueError(f"{tok_dir} is not empty but holds no speech tokenizer (tokenizer.json): delete it or "
                         "choose another folder")
    utterances = read_utterances()
    partial = tok_dir.with_name(tok_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while fitting
    tokenizer = fit_speech_input(speech_input, [w for _, w in utterances], texts=[u.text for u, _ in utterances],
                                 save_to=partial, **fit_kwargs)
    tokenizer.save(partial)
    if tok_dir.exists():
        tok_dir.rmdir()  # empty (checked above)
    partial.rename(tok_dir)
    # Reloaded from its final place, as every later run (a resume) will load it: what it refers to is found there.
    return load_tokenizer(tok_dir), utterances


def collate(seqs: Sequence[tuple], device) -> dict:
    """Packs examples ``(ids, loss mask)`` or ``(ids, loss mask, features)`` into one varlen batch."""
    ids = torch.cat([s[0] for s in seqs]).to(device)
    mask = torch.cat([s[1] for s in seqs]).to(device)
    lengths = torch.tensor([s[0].shape[0] for s in seqs])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    batch = dict(input_ids=ids, cu_seqlens=cu, max_seqlen=int(lengths.max()), loss_mask=mask)
    if len(seqs[0]) == 3:
        feats = [s[2] for s in seqs]
        batch["speech_features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)
        batch["speech_feature_lengths"] = torch.tensor([f.shape[0] for f in feats], device=device)
    return batch


def epoch_batches(lengths, epoch: int, cfg: TrainConfig) -> list[list[int]]:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return pack(lengths, torch.randperm(len(lengths), generator=g).tolist(), cfg.max_tokens)


def _param_groups(lm, params: list, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the speech input at ``cfg.speech_lr``, everything else (what text passes through: inserted
    blocks, adapters, base weights) at ``cfg.lr``. Empty groups are left out; the order is fixed (checkpoints)."""
    if cfg.speech_lr is None:
        return [{"params": params, "lr": cfg.lr}]
    speech = {id(p) for p in lm.speech_input_parameters()}
    groups = [{"params": [p for p in params if id(p) not in speech], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in speech], "lr": cfg.speech_lr}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on ``device``: on CUDA, and on CPUs with native bf16 arithmetic
    (AVX512-BF16 or AMX), where oneDNN's bf16 GEMMs run ~2.8x faster than fp32 ones (measured on a 2-core Zen 4:
    375 vs 136 GFLOP/s at 1024 x 576 x 1536), so a 1024-token up-scaled SmolLM2 step takes 3.97 s instead of 4.94 s
    (``benchmarks/bench_upscale.py --tokens 1024``). Other CPUs emulate bf16 and would be slower."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16())


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context a training step runs in: bf16 per ``cfg.bf16`` (None: where ``fast_bf16``)."""
    enabled = fast_bf16(device) if cfg.bf16 is None else cfg.bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class TextReplay:
    """Text replay against forgetting: SALAD's forgetting term, KL(base || model) on text input, as a regularizer.

    Each micro-batch also runs ``TrainConfig.text_kl_passages`` general-text passages (``texts``, token id
    tensors, e.g. ``mdus.evaluate.replay_text``) through the model and adds ``TrainConfig.text_kl`` times the
    mean KL from the untouched base model's next-token distribution to the model's, over every position
    (``mdus_kernels.linear_kl_div``: no logits). ``base`` is a separate, untouched copy of the base model (the
    teacher); the passages come from a generator seeded by (seed, step, micro-batch), so a resumed run draws the
    same ones.
    """

    def __init__(self, base, texts: Sequence[torch.Tensor]):
        self.texts = [t.long() for t in texts if t.numel() >= 2]
        if not self.texts:
            raise ValueError("TextReplay: texts holds no passage of 2 or more tokens")
        # The untouched base behind SpeechLM's packed forward: no inserted block, nothing trainable.
        self.teacher = mdus.upscale(base, placement=[]).eval()

    def batch(self, cfg: TrainConfig, step: int, micro: int, device) -> dict:
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + micro)
        picks = torch.randint(len(self.texts), (cfg.text_kl_passages,), generator=g).tolist()
        b = collate([(self.texts[i], torch.zeros(self.texts[i].shape, dtype=torch.bool)) for i in picks], device)
        del b["loss_mask"]
        return b

    def loss(self, lm: SpeechLM, batch: dict) -> torch.Tensor:
        import mdus_kernels

        student = lm(**batch, return_logits=False).hidden_states
        with torch.no_grad():
            teacher = self.teacher(**batch, return_logits=False).hidden_states
        return mdus_kernels.linear_kl_div(student, lm.output_weights(), teacher, self.teacher.output_weights()[0])


def text_replay(passages: Sequence[str], text_tokenizer, base, *, max_tokens: int = 96) -> TextReplay:
    """A ``TextReplay`` of ``passages`` (strings, each cut to its first ``max_tokens`` tokens, as the evaluation
    cuts its general text) against ``base``, a separate untouched copy of the base model."""
    return TextReplay(base, [torch.tensor(text_tokenizer(t, add_special_tokens=False).input_ids[:max_tokens])
                             for t in passages])


def general_text_replay(spoken: Sequence[str], text_tokenizer, model: str | None = None, *, device=None,
                        seed: int = 0) -> TextReplay:
    """The text replay of ``mdus train`` and ``mdus demo``: ``mdus.evaluate.replay_text(spoken, seed=seed)`` (general
    English that neither the corpus, whose training transcripts are ``spoken``, nor the evaluation uses) against a
    fresh, untouched copy of the base model ``model`` (``mdus.models.load_base``; default the embedded one)."""
    from mdus.evaluate import replay_text
    from mdus.models import load_base

    return text_replay(replay_text(spoken, seed=seed), text_tokenizer, load_base(model, device=device)[0])


def replay_weight(text_kl: float, route: str) -> float:
    """The text replay weight a method trains with: ``text_kl``, except 0 for ``route="speech_only"``, whose text
    path cannot change (text passes through the frozen base exactly, so the replay would only cost time)."""
    return 0.0 if route == "speech_only" else text_kl


# ------------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeMismatch(ValueError):
    """A checkpoint that the run asked to resume was written under another recipe or optimizer layout."""


# TrainConfig fields a resumed run may change: they decide when to save, evaluate or stop, not what a step does.
RESUME_MAY_CHANGE = ("eval_every", "save_every", "budget_minutes", "progress")


def save_checkpoint(path: Path, lm: SpeechLM, opt, sched, state: dict, cfg: TrainConfig | None = None) -> None:
    """Atomic: written to ``<path>.tmp`` and renamed, so the previous checkpoint survives a kill mid-save."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"trainable": lm.trainable_state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "state": state,
                "config": asdict(lm.config), "train_config": None if cfg is None else asdict(cfg)}, tmp)
    tmp.replace(path)


def _check_resumed_config(path: Path, saved: dict | None, cfg: TrainConfig) -> None:
    """A resumed run continues bit-exactly only under the recipe it started with: any other change raises."""
    if saved is None:  # written without its TrainConfig
        return
    now = asdict(cfg)
    changed = _changed(saved, now, [k for k in now if k not in RESUME_MAY_CHANGE and k in saved])
    if changed:
        raise ResumeMismatch(f"checkpoint {path} was written by a run with another recipe ({'; '.join(changed)}): "
                             f"resume with the original settings (only {', '.join(RESUME_MAY_CHANGE)} may change), "
                             f"or start a new run in another folder")


def _changed(saved: dict, now: dict, fields) -> list[str]:
    """``"field: saved -> now"`` for each of ``fields`` whose values differ, compared as JSON gives them back (a
    tuple equals its list, at any depth)."""
    plain = lambda v: json.loads(json.dumps(v))  # noqa: E731
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in fields if plain(saved.get(k)) != plain(now[k])]


def data_fingerprint(seqs) -> str:
    """A hash of training sequences (every tensor of every ``make_sequence`` result, in order): a resumed run
    must see the data the interrupted one saw."""
    h = hashlib.sha256()
    for seq in seqs:
        for t in seq if isinstance(seq, (tuple, list)) else (seq,):
            if isinstance(t, torch.Tensor):
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(path: Path, lm: SpeechLM, opt, sched, cfg: TrainConfig | None = None,
                    data: str | None = None) -> dict:
    """Restores ``lm``'s trainable tensors, the optimizer, the schedule and the RNGs; returns the loop state.
    Raises ``ResumeMismatch`` first, changing nothing, if the checkpoint was written for another model (method,
    blocks, placement, route, speech vocabulary: ``lm.config``), with ``cfg`` under another recipe
    (``RESUME_MAY_CHANGE`` may differ), or with ``data`` (``data_fingerprint``) on other training data."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    now_model = asdict(lm.config)
    changed = [] if ckpt.get("config") is None else _changed(ckpt["config"], now_model, list(now_model))
    if changed:
        raise ResumeMismatch(f"checkpoint {path} was written for another model ({'; '.join(changed)}): resume with "
                             "the original method and model options, or start a new run in another folder")
    if cfg is not None:
        _check_resumed_config(path, ckpt.get("train_config"), cfg)
    saved_data = ckpt["state"].get("data")
    if data is not None and saved_data is not None and saved_data != data:
        raise ResumeMismatch(f"checkpoint {path} was written by a run on other training data (a different corpus, "
                             "speech input or tokenizer): resume on the same data, or start a new run in another "
                             "folder")
    params, expected = dict(lm.named_parameters()), lm.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(ckpt["trainable"])), sorted(set(ckpt["trainable"]) - set(expected))
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in ckpt["trainable"].items()
             if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ResumeMismatch(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, other shapes {wrong[:5]}")
    with torch.no_grad():
        for name, value in ckpt["trainable"].items():
            params[name].copy_(value)
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # e.g. speech_lr set in one run and not the other: a different number of groups
        raise ResumeMismatch(f"checkpoint {path} was written with other optimizer parameter groups "
                             f"(TrainConfig.lr / speech_lr must match the interrupted run's): {e}") from None
    sched.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    return ckpt["state"]


# ---------------------------------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGINT/SIGTERM set a flag instead of killing the process: the loop saves and stops at the next step. A second
    signal before then interrupts at once (``KeyboardInterrupt``), leaving the last checkpoint."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop at once (the last checkpoint stays)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again while stopping")
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate_loss(lm: SpeechLM, seqs, cfg: TrainConfig, device) -> float:
    """Mean transcript loss over ``seqs`` (token-weighted)."""
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    lengths = [s[0].shape[0] for s in seqs]
    for batch in pack(lengths, range(len(seqs)), cfg.max_tokens):
        b = collate([seqs[i] for i in batch], device)
        # Weight by the targets the loss averages over: the same ones SpeechLM's own target builder makes.
        targets = SpeechLM._targets(b["input_ids"][None], None, b["loss_mask"], None, b["cu_seqlens"])
        n = int((targets != IGNORE).sum())
        if n:
            total += float(lm(**b).loss) * n
            count += n
    lm.train(was_training)
    return total / max(count, 1)


def training_loss(lm: SpeechLM, batch: dict, cfg: TrainConfig, replay: TextReplay | None = None, step: int = 0,
                  micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What micro-batch ``micro`` of step ``step`` backpropagates (run it under ``autocast``): ``(total, transcript
    loss, text KL or None)``, total = transcript loss + ``cfg.text_kl`` x ``replay``'s KL."""
    loss = lm(**batch).loss
    if cfg.text_kl <= 0:
        return loss, loss, None
    kl = replay.loss(lm, replay.batch(cfg, step, micro, batch["input_ids"].device))
    return loss + cfg.text_kl * kl, loss, kl


def train(lm: SpeechLM, train_seqs, dev_seqs, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          device: str | torch.device = "cpu", on_step: Callable[[int, dict], None] | None = None,
          replay: TextReplay | None = None) -> dict:
    """Trains the trainable parameters of ``lm`` on ``train_seqs`` (a list of ``make_sequence`` results), plus
    ``cfg.text_kl`` times ``replay``'s text KL when ``cfg.text_kl > 0``.

    Writes ``out_dir/checkpoint.pt`` (every ``save_every`` steps, at the end, and on SIGINT/SIGTERM or when the
    time budget runs out) and ``out_dir/metrics.jsonl`` (one line per step, plus eval lines). With ``resume=True``
    it continues from the checkpoint exactly where it stopped. Returns a summary dict with ``status``
    ("done", "budget", or the signal's name), ``step`` and the last losses.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    device = torch.device(device)
    lm.to(device).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    for name in ("max_steps", "max_tokens", "grad_accum", "save_every", "warmup_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0:
        raise ValueError(f"TrainConfig.eval_every must be >= 0 (0: no dev loss), got {cfg.eval_every}")
    for name in ("lr", "speech_lr", "budget_minutes"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value}")
    if cfg.text_kl > 0 and cfg.text_kl_passages < 1:
        raise ValueError(f"TrainConfig.text_kl_passages must be >= 1 with text_kl > 0, got {cfg.text_kl_passages}")
    if cfg.text_kl < 0 or (cfg.text_kl > 0 and replay is None):
        raise ValueError(f"TrainConfig.text_kl={cfg.text_kl}: must be >= 0, and > 0 needs replay (a TextReplay)")
    if cfg.text_kl > 0:
        replay.teacher.to(device)
    opt = torch.optim.AdamW(_param_groups(lm, params, cfg), lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    lengths = [s[0].shape[0] for s in train_seqs]
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "elapsed_s": 0.0, "data": data_fingerprint(train_seqs)}
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        data = state["data"]
        state = load_checkpoint(ckpt_path, lm, opt, sched, cfg, data=data)
        state.setdefault("data", data)  # a checkpoint from before the data was fingerprinted
        # Metrics of steps after the checkpoint were never confirmed by one: drop them, they will be redone (as is
        # a line cut short by the kill).
        if metrics_path.is_file():
            kept = [ln for ln in metrics_path.read_text(errors="replace").splitlines()
                    if (row := _json_or_none(ln)) is not None and row.get("step", 0) <= state["step"]]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
    elif metrics_path.exists():
        metrics_path.unlink()
    step_autocast = autocast(cfg, device)
    start, t0_elapsed = time.monotonic(), state["elapsed_s"]
    spent = lambda: cfg.budget_minutes is not None and state["elapsed_s"] > cfg.budget_minutes * 60  # noqa: E731
    batches = epoch_batches(lengths, state["epoch"], cfg)
    status, last = "done", {}
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not cfg.progress, desc="train", unit="step")
    with _StopFlag() as stop, open(metrics_path, "a") as log:
        while state["step"] < cfg.max_steps:
            if spent():
                status = "budget"  # a resume with the budget already spent: nothing to add (raise it to go on)
                break
            opt.zero_grad(set_to_none=True)
            loss_sum, kl_sum, n_tok = 0.0, 0.0, 0
            for micro in range(cfg.grad_accum):
                if state["batch"] >= len(batches):
                    state["epoch"] += 1
                    state["batch"] = 0
                    batches = epoch_batches(lengths, state["epoch"], cfg)
                b = collate([train_seqs[i] for i in batches[state["batch"]]], device)
                state["batch"] += 1
                with step_autocast:
                    total, loss, kl = training_loss(lm, b, cfg, replay, state["step"], micro)
                (total / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
                kl_sum += 0.0 if kl is None else float(kl.detach())
                n_tok += int(b["input_ids"].shape[0])
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
            lr = sched.get_last_lr()[0]  # the rate this step uses (after sched.step(), the next step's)
            opt.step()
            sched.step()
            state["step"] += 1
            state["tokens"] += n_tok
            state["elapsed_s"] = t0_elapsed + time.monotonic() - start
            last = {"step": state["step"], "loss": loss_sum / cfg.grad_accum, "lr": lr,
                    "grad_norm": grad_norm, "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 3)}
            if cfg.text_kl > 0:
                last["text_kl"] = kl_sum / cfg.grad_accum
            if cfg.eval_every and dev_seqs and state["step"] % cfg.eval_every == 0:
                last["dev_loss"] = evaluate_loss(lm, dev_seqs, cfg, device)
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            if on_step is not None:
                on_step(state["step"], last)
            if stop.signal or spent() or state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps:
                save_checkpoint(ckpt_path, lm, opt, sched, dict(state), cfg)
            if stop.signal:
                status = stop.signal
                break
    bar.close()
    return {"status": status, **{k: v for k, v in state.items() if k != "data"}, "last": last,
            "checkpoint": str(ckpt_path), "metrics": str(metrics_path)}


def _json_or_none(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


# ------------------------------------------------------------------------------------------------ command line


def sequences_from_manifest(manifest, speech_tokenizer, text_tokenizer, *, progress: bool = True,
                            audio: list | None = None):
    """``[(utterance, speech, text ids)]`` and the training examples of a manifest's utterances (bad audio is
    skipped, counted and reported: ``AudioStream`` logs a warning). ``speech`` is unit ids, or log-mel features
    for a continuous front end. ``audio``: the manifest's ``(utterance, waveform)`` pairs when the caller has
    already read them (to fit the speech input), so that the files are not read again."""
    from tqdm.auto import tqdm

    from mdus.data.audio import AudioStream
    from mdus.data.readers import read_manifest

    stream = AudioStream(read_manifest(manifest)) if audio is None else audio
    items = []
    for utt, wave in tqdm(stream, desc=f"speech {Path(manifest).stem}", disable=not progress,
                          total=None if audio is None else len(audio)):
        speech = speech_tokenizer.encode(wave)
        text = torch.tensor(text_tokenizer(" " + utt.text.strip(), add_special_tokens=False).input_ids)
        items.append((utt, speech, text))
    continuous = getattr(speech_tokenizer, "continuous", False)
    seqs = []
    for _, speech, text in items:
        units = torch.zeros(speech_tokenizer.n_positions(speech), dtype=torch.long) if continuous else speech
        seq = make_sequence(units, text, len(text_tokenizer), text_tokenizer.eos_token_id)
        seqs.append((*seq, speech) if continuous else seq)
    return items, seqs


def add_lr_arguments(p, *, lr: float = 1e-4) -> None:
    """``--lr`` (default ``lr``) and ``--speech-lr`` (``TrainConfig.lr`` / ``speech_lr``), shared by ``mdus train``
    and ``mdus demo``."""
    p.add_argument("--lr", type=nonnegative_float, default=lr,
                   help=f"peak learning rate of what text passes through: inserted blocks, LoRA adapters, full "
                        f"fine-tuning's weights (default {lr:g}; the paper's is 1e-4)")
    p.add_argument("--speech-lr", type=nonnegative_float, default=2e-3,
                   help="peak learning rate of the speech embeddings and front end, which every method trains from "
                        "scratch (default 2e-3)")


def add_text_replay_arguments(p, *, default: float, passages: int = 4) -> None:
    """``--text-kl`` and ``--text-kl-passages`` (``TrainConfig.text_kl`` / ``text_kl_passages``, ``TextReplay``),
    shared by ``mdus train`` and ``mdus demo``."""
    p.add_argument("--text-kl", type=nonnegative_float, default=default, metavar="W",
                   help=f"text replay against forgetting: add W x KL(base || model) on general-text passages "
                        f"(fortunes the corpus never spoke, except those the evaluation holds out) to every step's "
                        f"loss (default {default:g}; 0: off)")
    p.add_argument("--text-kl-passages", type=positive_int, default=passages,
                   help=f"text replay passages per micro-batch (default {passages})")


def add_speech_input_arguments(p, *, default: str) -> None:
    """``--speech-input`` (``fit_speech_input``'s kinds, ``default`` first) and its options ``--ctc-epochs``,
    ``--units`` and ``--frame-rate``, shared by ``mdus train`` and ``mdus demo``."""
    p.add_argument("--speech-input", default=default, choices=SPEECH_INPUTS,
                   help=f"k-means units of log-mel frames (units), log-mel features through a trainable conv "
                        f"subsampler (features), or, from a CTC speech encoder trained on the training split first, "
                        f"k-means units of its last layer (ctc-units) or its character posteriors (ctc-chars); "
                        f"default {default}")
    p.add_argument("--ctc-epochs", type=positive_int, default=12,
                   help="epochs of the CTC speech encoder (ctc-units, ctc-chars)")
    p.add_argument("--units", type=positive_int, default=200, help="k-means speech units (units, ctc-units)")
    p.add_argument("--frame-rate", type=positive_float, default=25.0,
                   help="speech positions per second of units and features (for features 100 / rate must be an "
                        "even integer: 50, 25, 12.5, ...)")


def _int_at_least(low: int):
    """An argparse type: an int >= ``low``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)


def _float_above(low: float, *, inclusive: bool):
    """An argparse type: a finite float > ``low`` (>= with ``inclusive``)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not math.isfinite(x) or x < low or (x == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, got "
                                             f"{value}")
        return x

    return parse


nonnegative_float, positive_float = _float_above(0.0, inclusive=True), _float_above(0.0, inclusive=False)


def _placement(value: str) -> str | list[int]:
    """``--placement``: a name from ``mdus.upscale.PLACEMENTS`` or comma-separated layer positions."""
    from mdus.upscale import PLACEMENTS

    if value in PLACEMENTS:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(PLACEMENTS)} nor comma-separated "
                                         f"layer positions such as 10,20,30") from None


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, required=True, help="corpus folder with train.jsonl and dev.jsonl")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, metrics.jsonl, ...)")
    p.add_argument("--method", default="dus-ebranchformer", choices=METHODS)
    p.add_argument("--route", default="all", choices=["all", "speech_only"])
    p.add_argument("--placement", type=_placement, default="interleaved",
                   help="dus-*: where the new blocks go: interleaved (best ASR), sandwich, top (keeps most text "
                        "ability), middle, bottom, or comma-separated positions (original layers before each block, "
                        "e.g. 10,20,30); default interleaved")
    p.add_argument("--n-insert", type=nonnegative_int, default=None,
                   help="dus-*: number of new blocks (default 25%% of the depth; with positions: their count)")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="speech tokenizer folder; fit on the training audio and saved there when absent "
                        "(default OUT/tokenizer)")
    add_speech_input_arguments(p, default="units")
    p.add_argument("--lora-params", type=positive_int, default=None, help="lora: match this trainable-parameter count")
    p.add_argument("--max-steps", type=positive_int, default=200)
    add_lr_arguments(p)
    p.add_argument("--max-tokens", type=positive_int, default=1024)
    add_text_replay_arguments(p, default=0.0)  # the paper's recipe: none
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--eval-every", type=nonnegative_int, default=50, help="steps between dev losses (0: none)")
    p.add_argument("--save-every", type=positive_int, default=50)
    p.add_argument("--budget-minutes", type=nonnegative_float, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt, bit-exactly (with the same settings; only --eval-every, "
                        "--save-every, --budget-minutes and --no-progress may change)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    """Train one method on a corpus (speech units -> transcript); --resume continues a stopped run exactly."""
    from mdus.models import load_base

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifests = {s: args.data / f"{s}.jsonl" for s in ("train", "dev")}
    if not manifests["train"].is_file():
        print(f"mdus train: no {manifests['train']} (make one with `mdus data synth --out {args.data}`)")
        return 2
    if not args.resume and (args.out / "checkpoint.pt").is_file():
        print(f"mdus train: {args.out} already holds a run (checkpoint.pt): pass --resume to continue it, or use "
              f"another --out")
        return 2
    if args.resume and not (args.out / "checkpoint.pt").is_file():
        print(f"mdus train --resume: no checkpoint at {args.out / 'checkpoint.pt'}")
        return 2
    from mdus.data.readers import read_manifest, transcript_issues

    try:  # every line up front: a malformed one stops the run before anything is fitted or trained
        listed = {s: list(read_manifest(m)) for s, m in manifests.items() if m.is_file()}
    except ValueError as exc:
        print(f"mdus train: {exc}")
        return 2
    issues = transcript_issues(listed["train"])
    if any(issues.values()):
        print(f"mdus train: {manifests['train']} holds {issues['empty']} empty transcripts (trained as speech -> end "
              f"of text) and {issues['duplicates']} duplicate utterances (trained twice as often); see `mdus data "
              "check`")
    try:
        if args.speech_input == "features":
            feature_stride(args.frame_rate)
    except ValueError as exc:
        print(f"mdus train: --frame-rate: {exc}")
        return 2
    base, text_tok = load_base(args.model, device=device)
    if args.method.startswith("dus-"):  # before any tokenizer fit: --placement / --n-insert that do not fit the model
        from mdus.upscale import insertion_positions

        try:
            insertion_positions(len(base.get_decoder().layers), args.n_insert, args.placement)
        except ValueError as exc:
            print(f"mdus train: {exc}")
            return 2
    tok_dir = args.tokenizer or args.out / "tokenizer"
    if args.resume and not (tok_dir / "tokenizer.json").is_file():
        print(f"mdus train --resume: the run's speech tokenizer {tok_dir} is missing")
        return 2
    fitted = not (tok_dir / "tokenizer.json").is_file()

    def read_training_audio():
        utterances = read_audio(listed["train"], progress=not args.no_progress)
        if not utterances:
            raise ValueError(f"{manifests['train']} has no readable utterance (see `mdus data check`)")
        return utterances

    try:
        speech_tok, utterances = speech_input_in(tok_dir, read_training_audio, args.speech_input, units=args.units,
                                                 frame_rate=args.frame_rate, seed=args.seed,
                                                 ctc_epochs=args.ctc_epochs, device=device,
                                                 progress=not args.no_progress)
    except ValueError as exc:
        print(f"mdus train: {exc}")
        return 2
    if not fitted and args.tokenizer is None:
        print(f"mdus train: using the speech tokenizer {'of the run' if args.resume else 'an earlier run fitted'} in "
              f"{tok_dir} (--speech-input, --units and --frame-rate do not apply; delete it to fit a new one)")
    from mdus.speech.unit_files import UnitFileTokenizer

    if isinstance(speech_tok, UnitFileTokenizer):
        print(f"mdus train: {tok_dir} holds a unit-file tokenizer, which reads precomputed unit files, not "
              f"audio; mdus train reads audio (train on such units with mdus.train.train)")
        return 2
    progress = not args.no_progress
    _, train_seqs = sequences_from_manifest(manifests["train"], speech_tok, text_tok, progress=progress,
                                            audio=utterances)
    del utterances  # the waveforms are not needed past here
    if not train_seqs:
        print(f"mdus train: {manifests['train']} has no readable utterance (see `mdus data check`)")
        return 2
    dev_seqs = (sequences_from_manifest(manifests["dev"], speech_tok, text_tok, progress=progress)[1]
                if manifests["dev"].is_file() else [])
    torch.manual_seed(args.seed)
    lm = build_method(base, args.method, speech_vocab_size=speech_tok.vocab_size, route=args.route,
                      lora_params=args.lora_params, n_insert=args.n_insert, placement=args.placement,
                      speech_encoder=speech_encoder_config(speech_tok, text_tok))
    cfg = TrainConfig(lr=args.lr, speech_lr=args.speech_lr, max_steps=args.max_steps, max_tokens=args.max_tokens,
                      grad_accum=args.grad_accum, eval_every=args.eval_every, save_every=args.save_every,
                      seed=args.seed, budget_minutes=args.budget_minutes, progress=progress,
                      warmup_steps=max(1, min(20, args.max_steps // 10)),
                      text_kl=replay_weight(args.text_kl, args.route), text_kl_passages=args.text_kl_passages)
    if cfg.text_kl != args.text_kl:
        print(f"mdus train: no text replay (--text-kl {args.text_kl:g}) for --route speech_only: its text path is "
              f"the frozen base's")
    replay = None
    if cfg.text_kl > 0:
        # Every manifest sentence (not only those with readable audio) and seed 0, as `mdus eval` takes them: the
        # replay then leaves out exactly the passages the evaluation holds out.
        spoken = [u.text for u in listed["train"]]
        replay = general_text_replay(spoken, text_tok, args.model, device=device)
    try:
        summary = train(lm, train_seqs, dev_seqs, cfg, args.out, resume=args.resume, device=device, replay=replay)
    except ResumeMismatch as exc:
        print(f"mdus train --resume: {exc}")
        return 2
    lm.save_trainable(args.out / "trainable.safetensors")
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}), json.dumps(summary["last"]))
    return 0 if summary["status"] in ("done", "budget") else 130
