"""Shared harness for the op benchmarks: timing, peak memory, the copy roofline, environment, CSV rows and plots.

Every ``bench_<op>.py`` imports this module (it sits next to them, so ``python benchmarks/bench_x.py`` finds it) and
writes rows to ``<out>/<device_tag()>.csv`` through :func:`append_rows`.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import importlib.util
import math
import os
import platform
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"

# Run from a checkout without `pip install`: the scripts' own folder is sys.path[0], not the repository root.
if importlib.util.find_spec("mdus_kernels") is None:
    sys.path.insert(0, str(REPO_ROOT))

QUANTILES = (0.2, 0.5, 0.8)
CPU_CASE_BUDGET_S = 3.0  # upper bound on the timed part of one CPU case (warmup excluded)

# The compiled baselines (flex_attention, the cgMLP's torch.compile) recompile for every shape of a sweep. Past
# dynamo's default limit of 8 they would silently run uncompiled, and that slower code would be timed as the
# baseline: raise the limit, and make a hit an error (the case is then recorded as skipped, not mis-timed).
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
torch._dynamo.config.fail_on_recompile_limit_hit = True


# ----------------------------------------------------------------------------------------------------- devices


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available, else cpu. An explicit ``cuda`` without a GPU is an error."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device | str = "cpu") -> str:
    """Filesystem-safe short device name, the CSV's file stem: ``cpu-amd-epyc-2c``, ``nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    # Drop marketing noise so that the same machine always maps to the same file.
    model = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", _cpu_model(), flags=re.I)
    return f"cpu-{_slug(model) or 'unknown'}-{os.cpu_count()}c"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def env_info(device: torch.device | str = "cpu") -> dict:
    """Columns that make a CSV row reproducible: where, with what, from which commit, when."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        # torch's own huge-page allocation for every tensor (mdus' CPU kernels use huge pages for their outputs
        # regardless): "1" gives the baselines the same first-touch advantage.
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "commit": _git_commit(),
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------- timing


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks, as torch.quantile does."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timeit(fn: Callable[[], object], *, device: torch.device | str, warmup: int | None = None,
           rep: int | None = None, budget_s: float = CPU_CASE_BUDGET_S) -> dict:
    """Milliseconds per call of ``fn`` as ``{"p20", "p50", "p80"}``.

    * CUDA: ``triton.testing.do_bench`` (it flushes L2 between calls and times with CUDA events); ``warmup`` and
      ``rep`` are its **millisecond** budgets (default 25, and 100 or what 10 calls take, up to 2 s: do_bench
      times ``rep / (one call)`` calls, so a slow call would otherwise give one or two samples).
    * CPU: ``warmup`` calls (default 2; just one when a call is slow), then up to ``rep`` individually timed calls
      (default 20), ``rep`` lowered so that the timed calls take about ``budget_s``, but never below 3 (nor
      above ``rep``): a slow call's median is still a median, not one sample that interference may have inflated.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        if rep is None:
            fn()  # one-off costs (compilation, autotuning) outside the estimate
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            rep = min(max(100.0, 10 * (time.perf_counter() - t0) * 1e3), 2000.0)
        ms = triton.testing.do_bench(fn, warmup=25 if warmup is None else warmup, rep=rep, quantiles=list(QUANTILES))
        return dict(zip(("p20", "p50", "p80"), (float(v) for v in ms), strict=True))
    warmup = 2 if warmup is None else warmup
    rep = 20 if rep is None else rep
    t_warm = math.inf
    for i in range(max(warmup, 1)):  # at least one call, to size `rep` and to pay one-off costs outside timing
        if i and t_warm > budget_s / 10:
            break
        t0 = time.perf_counter()
        fn()
        t_warm = time.perf_counter() - t0
    rep = min(rep, max(3, int(budget_s / max(t_warm, 1e-9))))
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {f"p{round(q * 100)}": _quantile(times, q) for q in QUANTILES}


# ----------------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_measure(fn: Callable[[], object], warm_call: bool) -> float:
    """Runs in the forked child: resident bytes at fn's peak beyond those resident before it."""
    # libgomp's thread pool does not survive fork(): a parallel region in the child deadlocks (seen here with
    # torch 2.13 CPU). One thread avoids it and barely changes the memory a kernel allocates.
    torch.set_num_threads(1)
    if warm_call:
        # The single-threaded code paths map library pages the parent never touched: a few MB of file-backed RSS.
        fn()
    try:
        # Return freed heap pages to the OS so that re-used heap memory counts as new resident memory, and pin the
        # mmap threshold (glibc raises it dynamically up to 32 MiB) so that big buffers are fresh mappings.
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD = 64 KiB
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        # "5" resets the peak-RSS mark (VmHWM, which ru_maxrss reports) to the current RSS (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _rss_bytes()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return float(max(peak - before, 0))


def peak_memory(fn: Callable[[], object], *, device: torch.device | str, timeout_s: float = 300.0,
                warm_call: bool = True) -> float:
    """Extra bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it (NaN if unknown).

    * CUDA: the caching allocator's peak statistics (tensor bytes, not the allocator's reserved pool).
    * CPU: torch keeps no CPU allocator statistics, so ``fn`` runs once in a forked child, single-threaded, and the
      child reports its peak RSS minus its RSS before the call through a pipe. This counts touched pages and
      non-torch allocations; the kernel's RSS counters lag by up to ~64 pages per thread, so it is exact to about
      0.3 MB. ``warm_call=False`` skips the child's warm-up call (for slow ``fn``: its few MB of library pages are
      noise next to the buffers). A child that fails or exceeds ``timeout_s`` gives NaN.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    if not hasattr(os, "fork"):
        return math.nan
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: whatever happens, never return into the caller's code
        code = 1
        try:
            os.close(read_fd)
            os.write(write_fd, struct.pack("d", _child_measure(fn, warm_call)))
            code = 0
        except BaseException:  # noqa: BLE001 - report through the exit code, never unwind in the child
            pass
        finally:
            os._exit(code)
    os.close(write_fd)
    result = math.nan
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        if ready:
            data = os.read(read_fd, 8)
            if len(data) == 8:
                result = struct.unpack("d", data)[0]
    finally:
        os.close(read_fd)
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:  # still running: timed out or stuck after writing
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return result


# ----------------------------------------------------------------------------------------------------- roofline


def roofline_copy_gbps(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting read + write bytes (2 x size / time).

    Memory-bound kernels are reported as a percentage of this (methods.md: ~3.0 TB/s on H100, ~4.3 TB/s on H200).
    ``copy_`` into a preallocated buffer, not ``clone()``: on CPU a fresh 256 MiB buffer pays page faults every call,
    which would understate the machine's bandwidth.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)]
    buffers.append(torch.empty_like(buffers[0]))
    ms = timeit(lambda: buffers[1].copy_(buffers[0]), device=device)["p50"]
    buffers.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------- CSV


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Appends dict rows to a CSV, writing the header if the file is new.

    Rows may carry columns the file does not have yet: then the file is rewritten with the union of the columns
    (old columns first, in their order), old rows getting empty cells for the new ones.
    """
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_cols = list(dict.fromkeys(k for row in rows for k in row))
    old_rows: list[dict] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            missing = [c for c in new_cols if c not in header]
            if missing:
                old_rows = list(reader)
    missing = [c for c in new_cols if c not in header]
    if header and not missing:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerows(rows)
        return
    fieldnames = header + missing
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)
    os.replace(tmp, path)  # atomic: an interrupted rewrite never loses the old rows


def _parse_cell(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by :func:`append_rows`, numbers parsed back into int/float."""
    with open(path, newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------- plots


def plot(rows: Sequence[dict], path: str | os.PathLike, *, x: str, y: str, series: str | Sequence[str],
         panel_row: str | None = None, panel_col: str | None = None, title: str = "", logx: bool = True,
         logy: bool = False, ylabel: str | None = None, hline: float | None = None,
         hline_label: str = "") -> Path | None:
    """Draws ``y`` against ``x`` with one line per ``series`` value, one subplot per (``panel_row``, ``panel_col``).

    Rows whose ``y`` is missing or NaN are skipped. Prints and returns the PNG path, or None when matplotlib is
    missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless machines have no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[plot] matplotlib is not installed; not drawing {path} (pip install matplotlib, then re-plot from "
              "the CSV with --plot-only --csv <file>)")
        return None
    series_keys = [series] if isinstance(series, str) else list(series)

    def value(row, key):
        return row.get(key) if key else None

    def finite(v):
        return isinstance(v, int | float) and math.isfinite(v)

    rows = [r for r in rows if finite(r.get(y)) and finite(r.get(x))]
    prow = sorted({value(r, panel_row) for r in rows}, key=str)
    pcol = sorted({value(r, panel_col) for r in rows}, key=lambda v: (not isinstance(v, int | float), v))
    if not rows:
        print(f"[plot] no finite '{y}' values; not drawing {path}")
        return None
    fig, axes = plt.subplots(len(prow), len(pcol), figsize=(4.8 * len(pcol), 3.6 * len(prow)), squeeze=False)
    labels = sorted({tuple(r.get(k) for k in series_keys) for r in rows}, key=str)
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for i, rv in enumerate(prow):
        for j, cv in enumerate(pcol):
            ax = axes[i][j]
            sub = [r for r in rows if value(r, panel_row) == rv and value(r, panel_col) == cv]
            for lab in labels:
                pts = sorted((r[x], r[y]) for r in sub if tuple(r.get(k) for k in series_keys) == lab)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=colors[lab],
                            label="/".join(str(v) for v in lab))
            if hline is not None:
                ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=hline_label or None)
            head = ", ".join(f"{k}={v}" for k, v in ((panel_row, rv), (panel_col, cv)) if k)
            ax.set_title(head, fontsize=9)
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel or y)
            if logx:
                ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return path


def add_plot_only_arguments(p) -> None:
    """``--plot-only``, ``--csv`` and ``--run-id``: redraw a benchmark's PNG from a CSV without timing anything."""
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV's latest run, no timing")
    p.add_argument("--csv", type=Path, help="with --plot-only: the CSV to plot (default <out>/<device_tag>.csv), "
                   "e.g. one written on a GPU machine")
    p.add_argument("--run-id", nargs="+", help="with --plot-only: the runs to draw together (their run_id column; "
                   "default the latest run)")


def plot_only(args, op: str, plot_rows: Callable) -> None:
    """The ``--plot-only`` path: ``plot_rows(rows, out, tag)`` on ``op``'s rows in ``--csv`` (default
    ``<out>/<device_tag>.csv``) of the runs named by ``--run-id`` (default the latest run), e.g. two runs that
    measured different cases."""
    csv_path = args.csv or args.out / f"{device_tag(resolve_device(args.device))}.csv"
    rows = [r for r in read_rows(csv_path) if r.get("op") == op]
    if not rows:
        raise SystemExit(f"--plot-only: no {op} rows in {csv_path}")
    runs = set(args.run_id or [max(r["run_id"] for r in rows)])
    unknown = runs - {r["run_id"] for r in rows}
    if unknown:
        raise SystemExit(f"--run-id: no {op} rows of run {', '.join(sorted(unknown))} in {csv_path}")
    plot_rows([r for r in rows if r["run_id"] in runs], args.out, csv_path.stem)


# ----------------------------------------------------------------------------------------------------- checks


def max_rel_error(actual: torch.Tensor | None, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: relative to the expected tensor's own scale, so an all-zero (1) or
    sign-flipped (2) result fails whatever its magnitude; inf when ``actual`` is missing, misshapen or not finite
    (NaN would pass a ``> tol`` test)."""
    if actual is None or actual.shape != expected.shape:
        return math.inf
    if not actual.numel():
        return 0.0
    scale = float(expected.float().abs().max().clamp(min=1e-30))
    err = float((actual.float() - expected.float()).abs().max()) / scale
    return err if math.isfinite(err) else math.inf


def error_note(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it): a skipped row's note."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


# ----------------------------------------------------------------------------------------------------- tables


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table of ``columns`` (floats with 3 significant decimals, missing cells empty)."""

    def cell(v):
        if isinstance(v, float):
            if not math.isfinite(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
