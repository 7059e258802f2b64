"""``mdus bench``: the kernel microbenchmarks (``benchmarks/run_all.py`` of the source checkout)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

_RUN_ALL = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="folder for the CSVs and PNGs (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="one tiny case per benchmark (smoke test)")
    p.add_argument("--only", nargs="+", help="benchmark names, e.g. attention cgmlp")


def run(args: argparse.Namespace) -> int:
    """Run the kernel benchmarks (CSV and PNG files in benchmarks/results/)."""
    if not _RUN_ALL.is_file():
        print(f"mdus bench needs the source checkout (no {_RUN_ALL}); the benchmarks are not part of the wheel",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, str(_RUN_ALL)]
    if args.device:
        cmd += ["--device", args.device]
    if args.out:
        cmd += ["--out", str(args.out)]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", *args.only]
    return subprocess.call(cmd)
