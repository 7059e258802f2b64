"""The mdus command line: every command is registered with help, and `bench` reaches the benchmark runner."""

import pytest

from mdus.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("data", "demo", "bench"):
        assert name in COMMANDS and name in out


def test_bench_unknown_name_fails(capsys):
    assert main(["bench", "--only", "no_such_benchmark"]) != 0


def test_demo_rejects_unknown_route():
    with pytest.raises(SystemExit):
        main(["demo", "--route", "text_only"])
