"""Frame features from a hidden layer of a self-supervised speech model (HuBERT, wav2vec 2.0, WavLM, ...).

The model is any transformers audio encoder with a conv feature extractor and ``encoder.layers`` (``HubertModel``,
``Wav2Vec2Model`` and relatives), loaded with ``AutoModel.from_pretrained`` from a hub id or a local directory.
Layer ``l`` means the output of transformer layer ``l`` (1..L) and ``l = 0`` the input of the first one, which is
what transformers returns as ``hidden_states[l]`` (for the pre-norm "stable layer norm" models, whose last entry is
normalized, layer L is taken before that final norm). The forward pass stops right after the chosen layer, so
HuBERT's layer 6 costs half a forward.

Feed these to ``KMeansTokenizer(features=SSLFeatures(...))``: HuBERT layer-6/9/11 k-means units are the usual
discrete speech tokens (SmolTolk uses layer 11 of HuBERT base at 25 Hz, i.e. frame_rate=25 over its 50 Hz frames).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mdus.speech._common import check_wave


class _Captured(Exception):  # noqa: N818 (not an error: it carries the layer output out of the forward pass)
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class SSLFeatures(nn.Module):
    """Features (frames, hidden_size) of one wave (T,) from hidden layer ``layer`` of an SSL speech model.

    ``model_name_or_path``: a hub id, a local directory, or an already loaded model (then saved tokenizers refer to
    its ``config._name_or_path``). ``layer``: 0..L, negative counting from the end, default L (the last).
    ``normalize_wave``: zero-mean unit-variance audio before the model, as the wav2vec 2.0 large checkpoints were
    trained; ``None`` reads ``do_normalize`` from the checkpoint's preprocessor config (False when there is none,
    which is right for HuBERT base). The model is frozen and in eval mode.

    Example:
        >>> ssl = SSLFeatures("facebook/hubert-base-ls960", layer=6)   # doctest: +SKIP
        >>> ssl(torch.randn(16000)).shape, ssl.frame_rate                # doctest: +SKIP
        (torch.Size([49, 768]), 50.0)
    """

    def __init__(self, model_name_or_path, layer: int | None = None, *, normalize_wave: bool | None = None,
                 sample_rate: int | None = None, device=None, dtype=None):
        super().__init__()
        if isinstance(model_name_or_path, nn.Module):
            model = model_name_or_path
            name = getattr(model.config, "_name_or_path", "") or ""
        else:
            from transformers import AutoModel

            name = str(model_name_or_path)
            if isinstance(dtype, str):  # as config() saves it
                dtype = getattr(torch, dtype)
            model = AutoModel.from_pretrained(name, dtype=dtype or torch.float32)
        config = model.config
        encoder = getattr(model, "encoder", None)
        if getattr(config, "conv_stride", None) is None or not hasattr(encoder, "layers"):
            raise ValueError(f"model_name_or_path={name!r} gives a {type(model).__name__}, not a speech SSL encoder "
                             f"with a conv feature extractor and encoder.layers (HubertModel, Wav2Vec2Model, ...)")
        n_layers = len(encoder.layers)
        layer = n_layers if layer is None else int(layer)
        if layer < 0:
            layer += n_layers + 1
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer must be in 0..{n_layers} (or -{n_layers + 1}..-1) for this {n_layers}-layer "
                             f"model, got {layer}")
        if normalize_wave is None or sample_rate is None:
            extractor = self._preprocessor(name)
            if normalize_wave is None:
                normalize_wave = bool(getattr(extractor, "do_normalize", False))
            if sample_rate is None:
                sample_rate = int(getattr(extractor, "sampling_rate", 16000))
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.name, self.layer, self.normalize_wave, self._sample_rate = name, layer, bool(normalize_wave), sample_rate
        self.stride = math.prod(config.conv_stride)
        # Samples the conv stack needs for one output frame: the conv would fail on anything shorter.
        self.receptive_field = 1
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel

    @staticmethod
    def _preprocessor(name: str):
        if not name:
            return None
        try:
            from transformers import AutoFeatureExtractor

            return AutoFeatureExtractor.from_pretrained(name)
        except (OSError, ValueError, KeyError):
            # No preprocessor_config.json (a bare save_pretrained of the model, or offline): use the defaults.
            return None

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def frame_rate(self) -> float:
        return self._sample_rate / self.stride

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def config(self) -> dict:
        if not self.name:
            raise ValueError("this SSLFeatures wraps a model object without a name or path, so a saved tokenizer "
                             "could not reload it: save_pretrained the model and pass its directory")
        name = str(Path(self.name).resolve()) if Path(self.name).is_dir() else self.name
        return {"type": "ssl", "model_name_or_path": name, "layer": self.layer,
                "normalize_wave": self.normalize_wave, "sample_rate": self.sample_rate,
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def forward(self, wave) -> torch.Tensor:
        """(T,) -> (frames, hidden_size) float32, on the model's device."""
        wave = check_wave(wave, "wave", batched=False)
        if wave.shape[0] < self.receptive_field:
            raise ValueError(f"wave has {wave.shape[0]} samples, fewer than the {self.receptive_field} the model's "
                             f"conv front end needs for one frame")
        param = next(self.model.parameters())
        x = wave.to(device=param.device, dtype=torch.float32)
        if self.normalize_wave:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        x = x.to(param.dtype)[None]
        layers = self.model.encoder.layers
        if len(layers) == 0:
            return self.model(x).last_hidden_state[0].float()

        # Raising from a hook ends the forward pass at the chosen layer: the layers above it never run.
        def after(module, args, output):
            raise _Captured(_first_tensor(output))

        def before(module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        if self.layer == 0:
            handle = layers[0].register_forward_pre_hook(before, with_kwargs=True)
        else:
            handle = layers[self.layer - 1].register_forward_hook(after)
        try:
            self.model(x)
        except _Captured as captured:
            return captured.value[0].float()
        finally:
            handle.remove()
        raise RuntimeError(f"layer {self.layer} of {type(self.model).__name__} did not run (LayerDrop in training?)")
