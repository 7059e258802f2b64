"""The benchmark harness's ``--plot-only`` path: which rows of a CSV it hands to a benchmark's plotter."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "_common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("mdus_bench_common", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _args(common, argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cpu")
    common.add_plot_only_arguments(p)
    return p.parse_args(argv)


def test_plot_only_draws_the_named_runs(common, tmp_path):
    csv_path = tmp_path / "dev.csv"
    runs = ["2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00", "2026-01-03T00:00:00+00:00"]
    for i, run in enumerate(runs):
        common.append_rows(csv_path, [dict(op="demo_op", run_id=run, d=64 * (i + 1), ms_p50=1.5 + i),
                                      dict(op="other_op", run_id=run, d=1, ms_p50=9.0)])
    drawn = []

    def plot_rows(rows, out, tag):
        drawn.append((sorted(r["d"] for r in rows), {r["op"] for r in rows}, out, tag))

    common.plot_only(_args(common, ["--out", str(tmp_path), "--csv", str(csv_path)]), "demo_op", plot_rows)
    assert drawn[-1] == ([192], {"demo_op"}, tmp_path, "dev")  # default: the latest run only
    common.plot_only(_args(common, ["--out", str(tmp_path), "--csv", str(csv_path), "--run-id", runs[0], runs[2]]),
                     "demo_op", plot_rows)
    assert drawn[-1][:2] == ([64, 192], {"demo_op"})
    with pytest.raises(SystemExit, match="--run-id: no demo_op rows of run 2025"):
        common.plot_only(_args(common, ["--out", str(tmp_path), "--csv", str(csv_path), "--run-id", runs[1],
                                        "2025"]), "demo_op", plot_rows)
    with pytest.raises(SystemExit, match="no missing_op rows"):
        common.plot_only(_args(common, ["--out", str(tmp_path), "--csv", str(csv_path)]), "missing_op", plot_rows)
    assert len(drawn) == 2
