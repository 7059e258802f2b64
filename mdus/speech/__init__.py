"""Speech front ends: audio -> discrete unit ids (placed above the text vocabulary by the model), or continuous
embeddings.

One capability per module:

* ``logmel``: Kaldi-style log-mel filterbanks in torch (``logmel``, ``LogMel``, ``mel_banks``);
* ``kmeans``: k-means++ and Lloyd in torch, deterministic given a seed (``KMeans``);
* ``kmeans_tokenizer``: units by k-means over frame features, pooled to a chosen rate (``KMeansTokenizer``);
* ``ctc``: a small speech encoder trained with CTC on the training transcripts, as frame features
  (``CTCEncoder``, ``fit_ctc_encoder``): phonetic units without a pretrained SSL model; or as a continuous front
  end of character posteriors, one position per emitted character (``CTCPosteriorFrontEnd``,
  ``collapse_posteriors``);
* ``ssl``: a hidden layer of HuBERT / wav2vec 2.0 as frame features (``SSLFeatures``);
* ``unit_files``: units precomputed elsewhere, read from files named in a manifest (``read_units``,
  ``UnitFileTokenizer``);
* ``subsampler``: the model side of continuous input: log-mel -> embeddings through a trainable strided conv
  stack (``ConvSubsampler``), symbol posteriors -> expected embeddings (``SymbolProjection``);
* ``features``: the continuous front end, standardized log-mel frames for that subsampler (``LogMelFrontEnd``);
* ``factory``: the shared interface (``SpeechTokenizer``), ``build_tokenizer`` and ``load_tokenizer``.

``SSLFeatures`` imports transformers only when it is used.
"""

from mdus.speech._common import dedup
from mdus.speech.ctc import CTCEncoder, CTCPosteriorFrontEnd, collapse_posteriors, fit_ctc_encoder
from mdus.speech.factory import KINDS, SpeechTokenizer, build_tokenizer, load_tokenizer
from mdus.speech.features import LogMelFrontEnd
from mdus.speech.kmeans import KMeans
from mdus.speech.kmeans_tokenizer import KMeansTokenizer, pool_frames
from mdus.speech.logmel import LogMel, logmel, mel_banks, num_frames
from mdus.speech.subsampler import ConvSubsampler, SymbolProjection, build_speech_encoder
from mdus.speech.unit_files import UnitFileTokenizer, check_units, read_units


def __getattr__(name):
    # SSLFeatures pulls in transformers (seconds to import); load it on first use only.
    if name == "SSLFeatures":
        from mdus.speech.ssl import SSLFeatures

        return SSLFeatures
    raise AttributeError(f"module 'mdus.speech' has no attribute {name!r}")


__all__ = ["KINDS", "CTCEncoder", "CTCPosteriorFrontEnd", "ConvSubsampler", "KMeans", "KMeansTokenizer", "LogMel",
           "LogMelFrontEnd", "SSLFeatures", "SpeechTokenizer", "SymbolProjection", "UnitFileTokenizer",
           "build_speech_encoder", "build_tokenizer", "check_units", "collapse_posteriors", "dedup",
           "fit_ctc_encoder", "load_tokenizer", "logmel", "mel_banks", "num_frames", "pool_frames", "read_units"]
