"""Speech data: the embedded synthetic corpus (``synthesize``), corpus readers, and audio IO that survives bad files.

* ``synthesize(out_dir, n_train=..., n_dev=..., n_test=..., seed=...)``: English sentences from Debian's
  ``fortunes`` spoken by espeak-ng and flite in many voices, with held-out voices and sentences for dev/test.
* ``fortune_passages(exclude=...)``: whole fortunes as general English text a corpus never spoke (for text
  degradation).
* ``read_corpus(path)``: ``Utterance`` records from a JSONL manifest, a LibriSpeech folder or (audio, txt) pairs.
* ``load_audio(path)`` / ``AudioStream(utterances)``: 16 kHz mono waveforms; bad files are skipped and counted.

Command line: ``mdus data synth --out DIR ...`` and ``mdus data check MANIFEST``.
"""

from mdus.data.audio import SAMPLE_RATE, AudioStream, BadAudio, load_audio, resample
from mdus.data.readers import Utterance, read_corpus, read_librispeech, read_manifest, read_pairs, write_manifest
from mdus.data.synth import (
    available_voices,
    fortune_passages,
    fortune_sentences,
    split_sentences,
    split_voices,
    synthesize,
    text_file_sentences,
)

__all__ = ["SAMPLE_RATE", "AudioStream", "BadAudio", "Utterance", "available_voices", "fortune_passages",
           "fortune_sentences", "load_audio", "read_corpus", "read_librispeech", "read_manifest", "read_pairs",
           "resample", "split_sentences", "split_voices", "synthesize", "text_file_sentences", "write_manifest"]
