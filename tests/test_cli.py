"""The mdus command line: every command is registered with help, and `bench` reaches the benchmark runner."""

import pytest

from mdus.__main__ import COMMANDS, main
from mdus.demo import parse_method


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("data", "train", "eval", "demo", "bench"):
        assert name in COMMANDS and name in out


def test_bench_unknown_name_fails(capsys):
    assert main(["bench", "--only", "no_such_benchmark"]) != 0


def test_demo_method_specs(capsys, tmp_path):
    assert parse_method("dus-ebranchformer@speech_only") == ("dus-ebranchformer", "speech_only")
    assert parse_method("full-ft") == ("full-ft", "all")
    for bad, words in (("dus-transformer@text_only", "route"), ("lora@speech_only", "dus methods only"),
                       ("prompt-tuning", "must be one of")):
        with pytest.raises(ValueError, match=words):
            parse_method(bad)
        # The command refuses it before doing any work.
        assert main(["demo", "--out", str(tmp_path / "out"), "--methods", bad]) == 2
        assert bad in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
