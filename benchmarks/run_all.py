"""Runs every ``benchmarks/bench_*.py`` in turn with the same ``--device``, ``--out`` and ``--quick``.

``python -m mdus bench`` runs it. With defaults it must finish on a fresh 2-core CPU machine in about 25 minutes
(patch_pool and the loss ~12, cgmlp ~7, the train step ~4, attention ~1). A failing benchmark does not stop the
others; the exit status is non-zero if any failed.

    python benchmarks/run_all.py [--device cpu|cuda] [--out benchmarks/results] [--quick] [--only patch_pool ...]
                                 [--timeout-each SECONDS]
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--only", nargs="+", help="benchmark names to run, in this order, e.g. patch_pool (default: all, "
                   "alphabetically)")
    p.add_argument("--timeout-each", type=float, default=None,
                   help="seconds one benchmark may run before it is stopped (the rows it wrote are kept)")
    args = p.parse_args(argv)

    available = {s.stem.removeprefix("bench_"): s for s in sorted(HERE.glob("bench_*.py"))}
    unknown = [name for name in args.only or [] if name not in available]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; the benchmarks are {', '.join(available)}", file=sys.stderr)
        return 2
    scripts = [available[name] for name in args.only] if args.only else list(available.values())
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
        # Huge pages for every torch allocation unless the caller chose: the CPU kernels take them for their outputs
        # anyway (csrc/cpu/alloc.h), so the baselines get the same memory (the CSV's thp_alloc column says which).
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
        try:  # each in its own process: one crash cannot take down the rest
            rc = subprocess.run(cmd, cwd=HERE.parent, timeout=args.timeout_each, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout ({args.timeout_each:g} s; the cases measured before are in the CSV)"
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
