"""`mdus train` end to end on a tiny synthesized corpus and a tiny model with SmolLM2's tokenizer."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mdus.__main__ import main


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    if not (shutil.which("espeak-ng") and shutil.which("flite")):
        pytest.skip("espeak-ng / flite are not installed (scripts/setup.sh installs them)")
    from mdus.data.synth import synthesize
    from mdus.models import embedded_gguf, load_base

    try:
        embedded_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("train_cli")
    synthesize(root / "corpus", n_train=8, n_dev=2, n_test=0, seed=0, progress=False)
    _, tok = load_base()
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, tie_word_embeddings=True))
    tiny.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root


def test_train_cli_and_resume(tiny_setup):
    out = tiny_setup / "run"
    args = ["train", "--data", str(tiny_setup / "corpus"), "--out", str(out), "--model", str(tiny_setup / "tiny"),
            "--method", "dus-ebranchformer", "--units", "8", "--max-steps", "4", "--max-tokens", "512",
            "--eval-every", "2", "--save-every", "2", "--no-progress"]
    assert main(args) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4] and "dev_loss" in lines[1]
    for name in ("checkpoint.pt", "trainable.safetensors", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert main(args + ["--resume"]) == 0  # already finished: nothing to redo, nothing lost
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_train_cli_missing_corpus(tmp_path):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
