"""Runs every ``benchmarks/bench_*.py`` in turn with the same ``--device``, ``--out`` and ``--quick``.

``python -m mdus bench`` runs it. With defaults it must finish on a fresh 2-core CPU machine in about 25 minutes
(patch_pool and the loss ~12, cgmlp ~7, the train step ~4, attention ~1). A failing benchmark does not stop the
others; the exit status is non-zero if any failed.

    python benchmarks/run_all.py [--device cpu|cuda] [--out benchmarks/results] [--quick] [--only patch_pool]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the CSVs and PNGs")
    p.add_argument("--quick", action="store_true", help="one tiny case per benchmark (smoke test)")
    p.add_argument("--only", nargs="+", help="benchmark names to run, e.g. patch_pool (default: all)")
    args = p.parse_args(argv)

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    if not scripts:
        print("no benchmarks to run", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for script in scripts:
        cmd = [sys.executable, str(script), "--out", str(args.out)]
        if args.device:
            cmd += ["--device", args.device]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== {script.name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)  # each in its own process: one crash cannot take down the rest
        print(f"=== {script.name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
    print(f"\nresults (CSV per device, PNG per op) in {args.out.resolve()}:")
    for f in sorted(args.out.glob("*")):
        if f.suffix in (".csv", ".png"):
            print(f"  {f.name}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
