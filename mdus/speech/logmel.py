"""Kaldi-style log-mel filterbank features ("fbank"), in torch, batched, with no loop over frames.

The computation is Kaldi's ``compute-fbank-feats`` with ``--use-energy=false`` (what
``torchaudio.compliance.kaldi.fbank`` reproduces), frame by frame:

1. cut frames of ``frame_length_ms`` every ``frame_shift_ms`` (``snip_edges``: only whole frames inside the audio;
   otherwise ``(T + shift / 2) // shift`` frames centred on multiples of the shift, the audio mirrored at its ends);
2. add ``dither`` x N(0, 1) noise, subtract the frame's mean (DC), apply pre-emphasis ``x[i] -= 0.97 x[i - 1]``
   (``x[0] -= 0.97 x[0]``), multiply by the window (Povey's: a Hann window raised to 0.85);
3. zero-pad to the next power of two, power spectrum ``|rfft|^2``;
4. triangular mel filters, equally spaced on Kaldi's mel scale ``1127 ln(1 + f / 700)`` between ``low_freq``
   (20 Hz) and ``high_freq`` (0 or negative means Nyquist + high_freq), evaluated at the FFT bin centres;
5. ``log(max(energy, eps))`` with eps the float32 machine epsilon (Kaldi's floor, also for float64 input).

The waveform is used as given: Kaldi tools read int16 PCM as floats in [-32768, 32767], so features of audio in
[-1, 1) differ from Kaldi's by ``2 log(32768)`` in every bin where the floor does not bite.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from mdus.speech._common import check_wave

WINDOWS = ("povey", "hann", "hamming", "rectangular", "blackman")
# Kaldi floors energies at the float32 epsilon whatever the working precision.
_EPS = torch.finfo(torch.float32).eps


def _mel(freq):
    return 1127.0 * math.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=32)
def _mel_banks_cpu(n_mels: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel filters need 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), "
                         f"got low_freq={low_freq}, high_freq={high_freq}")
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (n_mels + 1)
    edges = mel_low + delta * torch.arange(n_mels + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Kaldi evaluates the triangles at the first n_fft / 2 bins only; the Nyquist bin gets weight 0.
    freqs = torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft)
    mel = 1127.0 * torch.log1p(freqs / 700.0)
    rising = (mel - left) / (centre - left)
    falling = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.cat([banks, banks.new_zeros(n_mels, 1)], dim=1)


def mel_banks(n_mels: int = 80, n_fft: int = 512, sample_rate: int = 16000, low_freq: float = 20.0,
              high_freq: float = 0.0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Kaldi's triangular mel filters as a ``(n_mels, n_fft // 2 + 1)`` matrix over the rfft bins.

    Example:
        >>> mel_banks(80, 512, 16000).shape
        torch.Size([80, 257])
    """
    if int(n_mels) < 1:
        raise ValueError(f"n_mels must be >= 1, got {n_mels}")
    banks = _mel_banks_cpu(int(n_mels), int(n_fft), float(sample_rate), float(low_freq), float(high_freq))
    return banks.to(dtype=dtype, device=device)


def _window(kind: str, length: int, dtype, device) -> torch.Tensor:
    # Kaldi's windows are symmetric (denominator length - 1), unlike torch's periodic defaults.
    n = torch.arange(length, dtype=torch.float64, device=device)
    phase = 2.0 * math.pi * n / max(length - 1, 1)
    if kind == "povey":
        w = (0.5 - 0.5 * torch.cos(phase)) ** 0.85
    elif kind == "hann":
        w = 0.5 - 0.5 * torch.cos(phase)
    elif kind == "hamming":
        w = 0.54 - 0.46 * torch.cos(phase)
    elif kind == "blackman":
        w = 0.42 - 0.5 * torch.cos(phase) + 0.08 * torch.cos(2.0 * phase)
    elif kind == "rectangular":
        w = torch.ones_like(n)
    else:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {kind!r}")
    return w.to(dtype)


def num_frames(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0, snip_edges: bool = True) -> int:
    """How many frames ``logmel`` gives for ``num_samples`` samples (Kaldi's rule)."""
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    if snip_edges:
        return 0 if num_samples < length else 1 + (num_samples - length) // shift
    return (num_samples + shift // 2) // shift


def _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms) -> tuple[int, int]:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    length = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if length < 2 or shift < 1:
        raise ValueError(f"frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} give frames of "
                         f"{length} samples every {shift} at {sample_rate} Hz; need >= 2 and >= 1")
    return length, shift


def logmel(wave, sample_rate: int = 16000, n_mels: int = 80, frame_length_ms: float = 25.0,
           frame_shift_ms: float = 10.0, dither: float = 0.0, *, preemphasis: float = 0.97,
           remove_dc_offset: bool = True, window: str = "povey", low_freq: float = 20.0, high_freq: float = 0.0,
           round_to_power_of_two: bool = True, snip_edges: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaldi fbank features of ``wave`` (T,) -> (frames, n_mels), or (B, T) -> (B, frames, n_mels).

    Computes in ``wave``'s dtype (float32 or float64; half precision is upcast to float32, since a log of power
    sums in fp16 overflows for loud audio) on ``wave``'s device. ``dither`` draws from ``generator`` (default: the
    global RNG), so a seeded generator makes dithered features reproducible. See the module docstring for the
    steps and for the scale convention.

    Example:
        >>> logmel(torch.randn(16000)).shape   # 1 s at 16 kHz: 1 + (16000 - 400) // 160 frames
        torch.Size([98, 80])
    """
    wave = check_wave(wave, "wave")
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    if wave.dtype not in (torch.float32, torch.float64):
        wave = wave.float()
    n_samples = wave.shape[-1]
    n_frames = num_frames(n_samples, sample_rate, frame_length_ms, frame_shift_ms, snip_edges)
    if n_frames == 0:
        need = (f"one {frame_length_ms} ms frame ({length} samples" if snip_edges else
                f"half a {frame_shift_ms} ms frame shift, what snip_edges=False needs for one frame "
                f"({shift - shift // 2} samples")
        raise ValueError(f"wave has {n_samples} samples, fewer than {need} at {sample_rate} Hz)")
    if not 0.0 <= preemphasis <= 1.0:
        raise ValueError(f"preemphasis must be in [0, 1], got {preemphasis}")
    if dither < 0.0:
        raise ValueError(f"dither must be >= 0, got {dither}")

    if snip_edges:
        frames = wave.unfold(-1, length, shift)[..., :n_frames, :]
    else:
        # Kaldi centres frame f on sample f * shift + shift / 2 and mirrors indices that fall outside the audio
        # (-1 -> 0, -2 -> 1, ..., T -> T - 1), again and again for audio shorter than a frame: a mirror image
        # with period 2T. One gather builds every frame at once.
        start = torch.arange(n_frames, device=wave.device) * shift + shift // 2 - length // 2
        idx = torch.remainder(start[:, None] + torch.arange(length, device=wave.device), 2 * n_samples)
        idx = torch.where(idx >= n_samples, 2 * n_samples - 1 - idx, idx)
        frames = wave[..., idx]

    if dither > 0.0:
        noise = torch.randn(frames.shape, generator=generator, dtype=frames.dtype,
                            device=frames.device if generator is None else generator.device)
        frames = frames + dither * noise.to(frames.device)
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if preemphasis > 0.0:
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * previous
    frames = frames * _window(window, length, frames.dtype, frames.device)

    n_fft = 1 << (length - 1).bit_length() if round_to_power_of_two else length
    power = torch.fft.rfft(frames, n=n_fft, dim=-1).abs().square()
    banks = mel_banks(n_mels, n_fft, sample_rate, low_freq, high_freq, dtype=power.dtype, device=power.device)
    energies = power @ banks.T
    return energies.clamp_min(_EPS).log()


class LogMel(nn.Module):
    """``logmel`` as a parameter-free module with its settings stored, and the feature-extractor interface the
    k-means tokenizer uses: ``dim`` (n_mels), ``frame_rate`` (frames per second), ``sample_rate``, ``config()``.
    With ``dither``, the noise comes from a generator seeded afresh at every call unless one is passed, so a
    wave always gives the same features (and a tokenizer the same units), as a feature extractor must.

    Example:
        >>> LogMel(n_mels=40)(torch.randn(8000)).shape
        torch.Size([48, 40])
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, dither: float = 0.0, preemphasis: float = 0.97,
                 remove_dc_offset: bool = True, window: str = "povey", low_freq: float = 20.0,
                 high_freq: float = 0.0, round_to_power_of_two: bool = True, snip_edges: bool = True):
        super().__init__()
        self.kwargs = dict(sample_rate=int(sample_rate), n_mels=int(n_mels), frame_length_ms=float(frame_length_ms),
                           frame_shift_ms=float(frame_shift_ms), dither=float(dither), preemphasis=float(preemphasis),
                           remove_dc_offset=bool(remove_dc_offset), window=str(window), low_freq=float(low_freq),
                           high_freq=float(high_freq), round_to_power_of_two=bool(round_to_power_of_two),
                           snip_edges=bool(snip_edges))
        # Fail at construction, not at the first batch, on settings that cannot work.
        _window(window, 2, torch.float64, None)
        length, _ = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
        n_fft = 1 << (length - 1).bit_length() if round_to_power_of_two else length
        mel_banks(n_mels, n_fft, sample_rate, low_freq, high_freq)

    @property
    def sample_rate(self) -> int:
        return self.kwargs["sample_rate"]

    @property
    def dim(self) -> int:
        return self.kwargs["n_mels"]

    @property
    def frame_rate(self) -> float:
        return 1000.0 / self.kwargs["frame_shift_ms"]

    def config(self) -> dict:
        return {"type": "logmel", **self.kwargs}

    def forward(self, wave, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None and self.kwargs["dither"] > 0.0:
            generator = torch.Generator().manual_seed(0)
        return logmel(wave, generator=generator, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
