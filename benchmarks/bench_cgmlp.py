"""Benchmark of ``mdus_kernels.cgmlp_gate`` (the fused cgMLP gate) against the baselines users would otherwise pick.

Implementations
    * ``mdus-<backend>``: ``mdus_kernels.cgmlp_gate(x, norm_weight, norm_bias, conv_weight, conv_bias,
      cu_seqlens=[0, N])`` on packed ``(N, U)`` tokens, the backend forced with ``MDUS_KERNEL_BACKEND`` (``cpp`` on
      CPU, ``triton`` on GPU). A backend that cannot run is recorded as skipped.
    * ``eager``: ESPnet's ConvolutionalSpatialGatingUnit path on the padded ``(1, N, U)`` batch of that one
      sequence: ``x.chunk(2)`` -> ``F.layer_norm`` -> ``transpose`` -> ``F.conv1d(groups=C, padding=(k-1)//2)``
      (bias included) -> ``transpose`` -> ``x_r *``. Separate passes over memory, as in ESPnet.
    * ``compile``: ``torch.compile`` (inductor, default mode) of that same function; compilation happens before
      timing.

Data
    One sequence of N tokens (so the padded baselines waste nothing), ``x ~ N(0, 1)`` of ``--dtype``, k = 31
    (``--kernel-size``), LayerNorm eps 1e-12 (ESPnet's), random parameters in the same dtype; all parameters require
    grad. Fixed seed.

Checks
    Before timing, every implementation's output and its gradients (x and the four parameters) are compared with the
    eager implementation's on the same inputs, at the dtype's tolerance (relative to each tensor's largest value).
    tests/test_cgmlp.py shows that this eager path equals the specification (``mdus_kernels.reference.cgmlp``) for a
    single sequence; the reference itself is too slow for these sizes. A mismatch is printed and recorded
    (``status=mismatch``) and that implementation is not timed.

Modes
    ``fwd``: the forward alone, on inputs that do not require grad. ``fwd+bwd``: the forward plus
    ``torch.autograd.grad(out, [x, norm_weight, norm_bias, conv_weight, conv_bias], g)`` for a fixed random ``g``.

Peak memory
    ``_common.peak_memory``; not measured for ``compile`` on CPU (NaN): it runs the call in a forked child, where
    inductor's OpenMP kernels deadlock.

Bytes (for GB/s; the minimum traffic of any implementation: parameters and the per-token LayerNorm statistics are
negligible and ignored). N tokens, C = U/2 channels, ``elem`` bytes per element::

    fwd:      read x (2NC) + write out (NC)                           = 3 * N * C * elem
    bwd:      read dout (NC) + read x (2NC) + write dx (2NC)          = 5 * N * C * elem
    fwd+bwd = 8 * N * C * elem.    GB/s = bytes / ms_p50 / 1e6.    pct_of_copy_roofline = 100 * GB/s / copy GB/s.

FLOPs (``GFLOP/s``, the conv's multiply-adds, which make the op compute-bound on CPUs): fwd 2NCk; fwd+bwd 6NCk
(forward, input gradient and weight gradient; recomputing z in the backward is not credited).

``speedup_vs_eager`` / ``speedup_vs_compile``: that baseline's ms_p50 / this row's, same case and mode.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import traceback
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

OP = "cgmlp"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Relative to each tensor's largest magnitude: the parameter gradients are sums over all N tokens, accumulated in
# different orders by each implementation.
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}
BASELINES = ("eager", "compile")
EPS = 1e-12
TABLE_COLUMNS = ("impl", "mode", "tokens", "C", "k", "dtype", "ms_p20", "ms_p50", "ms_p80", "GB/s",
                 "pct_of_copy_roofline", "GFLOP/s", "peak_mem_MB", "speedup_vs_eager", "speedup_vs_compile",
                 "status")
GRAD_NAMES = ("x", "norm_weight", "norm_bias", "conv_weight", "conv_bias")


# ----------------------------------------------------------------------------------------------------- data


def make_case(tokens: int, channels: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale + shift).to(dtype)

    return dict(
        x=randn(tokens, 2 * channels), g=randn(tokens, channels),
        params=[randn(channels, scale=0.3, shift=1.0), randn(channels, scale=0.3),
                randn(channels, 1, k, scale=k**-0.5), randn(channels, scale=0.3, shift=1.0)],
        cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=device), tokens=tokens, channels=channels, k=k,
    )


# ----------------------------------------------------------------------------------------------------- impls


@contextlib.contextmanager
def backend_env(backend: str | None):
    """Forces ``MDUS_KERNEL_BACKEND`` (read by mdus_kernels at every call) inside the block."""
    old = os.environ.get("MDUS_KERNEL_BACKEND")
    if backend is not None:
        os.environ["MDUS_KERNEL_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MDUS_KERNEL_BACKEND", None)
        else:
            os.environ["MDUS_KERNEL_BACKEND"] = old


def espnet_gate(x: torch.Tensor, norm_weight, norm_bias, conv_weight, conv_bias) -> torch.Tensor:
    """ESPnet's CSGU forward on a padded (B, T, U) batch (no linear, identity activation)."""
    x_r, x_g = x.chunk(2, dim=-1)
    x_g = F.layer_norm(x_g, (x_g.shape[-1],), norm_weight, norm_bias, EPS)
    k = conv_weight.shape[-1]
    x_g = F.conv1d(x_g.transpose(1, 2), conv_weight, conv_bias, padding=(k - 1) // 2,
                   groups=conv_weight.shape[0]).transpose(1, 2)
    return x_r * x_g


_COMPILED = {}


def make_impl(impl: str, case: dict):
    """``forward(x, *params) -> (N, C)`` on the packed ``x``; the baselines view it as a (1, N, U) batch."""
    if impl.startswith("mdus-"):
        import mdus_kernels

        cu = case["cu_seqlens"]

        def fwd(x, *params):
            return mdus_kernels.cgmlp_gate(x, *params, cu_seqlens=cu, eps=EPS)

        return fwd
    if impl == "eager":
        return lambda x, *params: espnet_gate(x.unsqueeze(0), *params)[0]
    if impl == "compile":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(espnet_gate)
        compiled = _COMPILED["fn"]
        return lambda x, *params: compiled(x.unsqueeze(0), *params)[0]
    raise ValueError(impl)


def traffic_bytes(mode: str, tokens: int, channels: int, elem: int) -> int:
    """Minimum bytes moved; the formulas are in the module docstring."""
    return (3 if mode == "fwd" else 8) * tokens * channels * elem


def flops(mode: str, tokens: int, channels: int, k: int) -> int:
    return (2 if mode == "fwd" else 6) * tokens * channels * k



# ----------------------------------------------------------------------------------------------------- running



def forward_backward(fwd, case: dict):
    leaves = [t.detach().requires_grad_(True) for t in (case["x"], *case["params"])]
    out = fwd(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, case["g"])


def run_impl(impl: str, case: dict, modes: list[str], expected, device: torch.device, dtype: torch.dtype,
             timing: dict, roof: float, base: dict) -> list[dict]:
    """Checks ``impl`` against the eager outputs, then times and measures it in every mode: one row per mode."""

    def row(mode, status, note="", **metrics):
        return dict(base, impl=impl, mode=mode, status=status, note=note, **metrics)

    try:
        fwd = make_impl(impl, case)
        # The check also runs each implementation once in both modes' graph flavours, which for `compile` means that
        # compilation (tens of seconds) happens here and not in the timed calls.
        out, grads = forward_backward(fwd, case)
        with torch.no_grad():
            fwd(case["x"], *case["params"])
    except Exception as exc:  # an OOM or a missing backend: the other implementations still run
        print(f"  [skip] {impl}: {C.error_note(exc)}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [row(mode, "skipped", C.error_note(exc)) for mode in modes]
    errors = [C.max_rel_error(out, expected[0])] + [C.max_rel_error(a, e) for a, e in zip(grads, expected[1],
                                                                                     strict=True)]
    note = "max rel err vs eager: " + ", ".join(f"{n}={e:.2g}" for n, e in zip(("out", *GRAD_NAMES), errors,
                                                                               strict=True))
    del out, grads
    if max(errors) > TOLERANCES[dtype]:
        print(f"  [ERROR] {impl} tokens={case['tokens']} C={case['channels']}: differs from eager ({note})",
              file=sys.stderr)
        return [row(mode, "mismatch", note) for mode in modes]
    rows = []
    leaves = [t.detach().requires_grad_(True) for t in (case["x"], *case["params"])]
    for mode in modes:
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return fwd(case["x"], *case["params"])
        else:
            def fn():
                return torch.autograd.grad(fwd(*leaves), leaves, case["g"])

        row_note = note
        try:
            ms = C.timeit(fn, device=device, **timing)
            if impl == "compile" and device.type == "cpu":
                # C.peak_memory runs fn in a forked child, where inductor's OpenMP kernels (their thread count fixed
                # at compile time) deadlock: no figure rather than a 5-minute timeout per row.
                mem = math.nan
                row_note += "; peak memory not measured (compiled CPU code cannot run in a forked child)"
            else:
                mem = C.peak_memory(fn, device=device, warm_call=ms["p50"] < 200)
        except Exception as exc:
            print(f"  [skip] {impl} {mode}: {C.error_note(exc)}", file=sys.stderr)
            rows.append(row(mode, "skipped", C.error_note(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        nbytes = traffic_bytes(mode, case["tokens"], case["channels"], case["x"].element_size())
        gbps = nbytes / (ms["p50"] * 1e-3) / 1e9
        rows.append(row(mode, "ok", row_note, ms_p20=ms["p20"], ms_p50=ms["p50"], ms_p80=ms["p80"], bytes=nbytes,
                        **{"GB/s": gbps, "GFLOP/s": flops(mode, case["tokens"], case["channels"], case["k"])
                           / (ms["p50"] * 1e-3) / 1e9},
                        pct_of_copy_roofline=100 * gbps / roof, peak_mem_MB=mem / 1e6))
    return rows


def run_case(case: dict, impls: list[str], modes: list[str], device: torch.device, dtype: torch.dtype,
             timing: dict, roof: float, base: dict) -> list[dict]:
    expected = forward_backward(make_impl("eager", case), case)
    rows = []
    for impl in impls:
        backend = impl.removeprefix("mdus-") if impl.startswith("mdus-") else None
        with backend_env(backend):
            rows += run_impl(impl, case, modes, expected, device, dtype, timing, roof, base)
    del expected
    for mode in modes:
        for baseline in BASELINES:
            ref_row = next((r for r in rows if r["mode"] == mode and r["impl"] == baseline and r["status"] == "ok"),
                           None)
            for r in rows:
                if ref_row and r["mode"] == mode and r["impl"].startswith("mdus-") and r["status"] == "ok":
                    r[f"speedup_vs_{baseline}"] = ref_row["ms_p50"] / r["ms_p50"]
    return rows


def default_impls(device: torch.device) -> list[str]:
    return ["mdus-cpp" if device.type == "cpu" else "mdus-triton", *BASELINES]


def plot_rows(rows: list[dict], out: Path, tag: str) -> None:
    rows = [r for r in rows if r.get("status") == "ok"]
    if not rows:
        return
    roof = rows[0].get("copy_roofline_GB/s")
    C.plot(rows, out / f"{OP}_{tag}.png", x="tokens", y="GB/s", series="impl", panel_row="mode",
                  panel_col="C", title=f"cgMLP gate (LayerNorm + depthwise conv k={rows[0]['k']} + gate), "
                  f"{rows[0]['dtype']} ({rows[0]['device']})", hline=roof if isinstance(roof, float) else None,
                  hline_label="copy roofline", ylabel="GB/s (p50, minimum bytes)", logy=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, nargs="+",
                   help="N (default cpu: 16384 65536; cuda and --full: 16384 65536 262144)")
    p.add_argument("--dims", type=int, nargs="+",
                   help="C = U/2 (default cpu: 768 1024; cuda and --full: 768 1024 1536 2048 3072 4096)")
    p.add_argument("--kernel-size", type=int, default=31, help="k (default 31)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default cpu: float32, cuda: bfloat16")
    p.add_argument("--impls", nargs="+", help="subset of implementations (default: all for the device)")
    p.add_argument("--full", action="store_true", help="the issue's sweep on CPU too (long: hours for the baselines)")
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT, help="folder for <device_tag>.csv and the PNG")
    p.add_argument("--quick", action="store_true", help="one tiny case per implementation (smoke test)")
    C.add_plot_only_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        C.plot_only(args, OP, plot_rows)
        return 0
    device = C.resolve_device(args.device)
    tag = C.device_tag(device)
    csv_path = args.out / f"{tag}.csv"
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    big = cuda or args.full
    if args.quick:
        tokens, dims = args.tokens or [2048], args.dims or [64]
        timing = dict(warmup=5, rep=20) if cuda else dict(warmup=1, rep=5, budget_s=0.2)
    else:
        tokens = args.tokens or ([16384, 65536, 262144] if big else [16384, 65536])
        dims = args.dims or ([768, 1024, 1536, 2048, 3072, 4096] if big else [768, 1024])
        timing = {}
    impls = args.impls or default_impls(device)
    modes = ["fwd", "fwd+bwd"]

    env = C.env_info(device)
    roof = C.roofline_copy_gbps(device)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} triton {env['triton']} | commit "
          f"{env['commit']} | copy roofline {roof:.1f} GB/s | {dtype} | k={args.kernel_size} | impls: "
          f"{', '.join(impls)}")
    base_env = dict(op=OP, run_id=env["time_utc"], **env, **{"copy_roofline_GB/s": roof})
    all_rows = []
    for n in tokens:
        for c in dims:
            print(f"case tokens={n} C={c} k={args.kernel_size}", flush=True)
            try:
                case = make_case(n, c, args.kernel_size, dtype, device)
                base = dict(base_env, tokens=n, C=c, U=2 * c, k=args.kernel_size,
                            dtype=str(dtype).removeprefix("torch."))
                rows = run_case(case, impls, modes, device, dtype, timing, roof, base)
            except Exception:  # a broken case (e.g. out of memory building it) must not lose the other cases
                traceback.print_exc()
                continue
            finally:
                case = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            C.append_rows(csv_path, rows)
            all_rows += rows
    print()
    print(C.format_table(all_rows, TABLE_COLUMNS))
    print(f"\nrows appended to {csv_path}")
    plot_rows(all_rows, args.out, tag)
    bad = [r for r in all_rows if r["status"] == "mismatch"]
    if bad:
        print(f"ERROR: {len(bad)} rows whose output differs from eager; see the 'note' column", file=sys.stderr)
    return 1 if bad or not all_rows else 0


if __name__ == "__main__":
    sys.exit(main())
