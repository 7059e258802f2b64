"""Benchmark of ``mdus_kernels.patch_pool`` against the baselines users would otherwise pick.

Implementations
    * ``mdus-<backend>``: ``mdus_kernels.patch_pool(x, offsets, reduce)`` on packed ``(N, D)`` tokens with int32
      offsets, the backend forced with ``MDUS_KERNEL_BACKEND`` (``cpp`` on CPU; ``triton`` and ``cuda`` on GPU).
      A backend that cannot run is recorded as skipped.
    * ``scatter_reduce``: the Byte Latent Transformer's ``patch_reduce``: ``torch.zeros(B, max_patches, D)
      .scatter_reduce(1, patch_ids.unsqueeze(-1).expand(-1, -1, D), h, reduce, include_self=False)`` on a padded
      ``(B, S, D)`` batch. It gets its natural input: the padded batch and its ``(B, S)`` patch ids are built
      from the same tokens *outside* the timed region, and its output stays padded ``(B, max_patches, D)``; pad
      tokens go to a dummy patch that is sliced off, as BLT's docstring describes. Packing/unpacking costs are
      therefore *not* charged to it. Sequences are ``--seq-len`` tokens (BLT trains on fixed-length rows), so
      only the last row is padded.
    * ``segment_reduce``: ``torch.segment_reduce(x, reduce, lengths=lengths, axis=0, unsafe=True)`` on the packed
      tokens (``unsafe=True`` skips its length validation, the baseline's fastest form).

Data
    ``x ~ N(0, 1)`` of ``--dtype``; tokens are cut into sequences of ``--seq-len`` tokens (the last one shorter),
    each sequence into patches of random length uniform in ``[1, 2 * mean_len - 1]`` (mean ``mean_len``), the last
    patch of a sequence truncated at its end, so patches never cross sequences. Fixed seed.

Checks
    Before timing, every implementation's forward output and input gradient are compared with
    ``mdus_kernels.patch_pool`` under ``MDUS_KERNEL_BACKEND=reference``, the op's specification, at the dtype's
    tolerance. A mismatch is printed and recorded (``status=mismatch``) and that implementation is not timed.
    Max's gradient is compared exactly for mdus, structurally for the baselines, because ties are broken
    differently (mdus gives the whole gradient to the first arg-max, torch splits it; bf16 data has many ties and
    even fp32 ``randn`` data has a few among 10^8 values): it must be 0 wherever ``x`` is not its patch's max,
    and sum per patch to the upstream gradient. The sum is not compared on tied patch columns (torch 2.13 CPU
    ``segment_reduce`` max gives a *negative* upstream gradient in full to every tied element, a positive one
    split) nor where the max is exactly 0 (``scatter_reduce(..., include_self=False)`` backward counts the
    zero-initialised output as a tie and halves the gradient). The note column says how many patch columns were
    left out.

Modes
    ``fwd``: the forward alone, on an input that does not require grad. ``fwd+bwd``: forward plus
    ``torch.autograd.grad(out, x, g)`` for a fixed random ``g`` (``out.backward(g)`` without accumulating into
    ``x.grad`` on every repetition).

Bytes (for GB/s; the minimum traffic of any implementation, so GB/s is comparable across implementations; the
padded baseline's extra pad traffic is not credited, and offsets/index reads are ignored)
    fwd, mean or max:  read x (N*D) + write out (P*D)                        = (N + P) * D * elem
    bwd, mean:         read grad (P*D) + write dx (N*D)                      = (N + P) * D * elem
    bwd, max:          read grad (P*D) + write dx (N*D) + read x (N*D) + read out (P*D) = 2 * (N + P) * D * elem
    fwd+bwd = fwd + bwd.   GB/s = bytes / ms_p50 / 1e6.   pct_of_copy_roofline = 100 * GB/s / copy GB/s.
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

OP = "patch_pool"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# (rtol, atol): both sides accumulate differently (scatter_reduce accumulates in the input dtype, mdus in fp32).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2),
              torch.float16: (5e-3, 5e-3)}
BASELINES = ("scatter_reduce", "segment_reduce")
TABLE_COLUMNS = ("impl", "mode", "reduce", "tokens", "D", "dtype", "mean_len", "patches", "ms_p20", "ms_p50",
                 "ms_p80", "GB/s", "pct_of_copy_roofline", "peak_mem_MB", "speedup_vs_best_baseline", "status")


# ----------------------------------------------------------------------------------------------------- data


def make_case(tokens: int, dim: int, dtype: torch.dtype, mean_len: int, seq_len: int, device: torch.device,
              seed: int = 0) -> dict:
    """Packed tokens, their patches and the padded view of the same data (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
    patch_lens, patches_per_seq = [], []
    for length in seq_lens:
        # `length` draws always suffice since every patch has at least one token.
        draws = torch.randint(1, 2 * mean_len, (length,), generator=gen)
        ends = draws.cumsum(0)
        k = int(torch.searchsorted(ends, length)) + 1  # patches needed to cover the sequence
        lens = draws[:k].clone()
        lens[-1] -= int(ends[k - 1]) - length  # truncate the last patch at the sequence end
        patch_lens.append(lens)
        patches_per_seq.append(k)
    lengths = torch.cat(patch_lens)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    assert int(offsets[-1]) == tokens and int(lengths.min()) >= 1

    # Padded layout: token t of sequence b sits at (b, s); its patch id within the sequence indexes the output.
    batch, width, max_patches = len(seq_lens), max(seq_lens), max(patches_per_seq)
    seq_of_token = torch.repeat_interleave(torch.arange(batch), torch.tensor(seq_lens))
    seq_start = torch.tensor([0] + seq_lens).cumsum(0)
    pos_in_seq = torch.arange(tokens) - seq_start[seq_of_token]
    patch_of_token = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first_patch = torch.tensor([0] + patches_per_seq).cumsum(0)
    padded = width * batch != tokens
    # Pad tokens go to an extra dummy patch (index max_patches) that is sliced off afterwards, as in BLT.
    patch_ids = torch.full((batch, width), max_patches, dtype=torch.int64)
    patch_ids[seq_of_token, pos_in_seq] = patch_of_token - first_patch[seq_of_token]
    valid_rows = torch.cat([b * max_patches + torch.arange(k) for b, k in enumerate(patches_per_seq)])

    # Drawn on the device: a 1M x 2048 case drawn on the host takes seconds and 8 GiB of host memory.
    dev_gen = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(tokens, dim, generator=dev_gen, device=device, dtype=dtype)
    g = torch.randn(lengths.numel(), dim, generator=dev_gen, device=device, dtype=dtype)
    flat_pos = (seq_of_token * width + pos_in_seq).to(device)
    x_pad = x.new_zeros(batch * width, dim)
    x_pad[flat_pos] = x
    valid_rows = valid_rows.to(device)
    g_pad = g.new_zeros(batch * max_patches, dim)
    g_pad[valid_rows] = g  # the same upstream gradient; rows of non-existent patches get 0
    return dict(
        x=x, g=g, offsets=offsets.to(device=device, dtype=torch.int32), lengths=lengths.to(device),
        x_pad=x_pad.view(batch, width, dim), g_pad=g_pad.view(batch, max_patches, dim),
        patch_ids=patch_ids.to(device), flat_pos=flat_pos, valid_rows=valid_rows, max_patches=max_patches,
        dummy=int(padded), tokens=tokens, patches=lengths.numel(), dim=dim,
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


def blt_patch_reduce(h: torch.Tensor, patch_ids: torch.Tensor, max_patches: int, dummy: int, reduce: str):
    """BLT's ``patch_reduce``: scatter a padded (B, S, D) batch into (B, max_patches, D)."""
    bs, _, dim = h.shape
    idx = patch_ids.unsqueeze(-1).expand(-1, -1, dim)
    out = torch.zeros((bs, max_patches + dummy, dim), dtype=h.dtype, device=h.device)
    out = out.scatter_reduce(1, idx, h, "mean" if reduce == "mean" else "amax", include_self=False)
    return out[:, :max_patches]


def make_impl(impl: str, case: dict, reduce: str):
    """``(forward(requires_grad) -> (out, input), grad_out, to_packed(out) -> (P, D), to_packed_dx)``."""
    if impl.startswith("mdus-"):
        import mdus_kernels

        offsets = case["offsets"]

        def fwd(x):
            return mdus_kernels.patch_pool(x, offsets, reduce)

        return fwd, case["x"], case["g"], (lambda out: out), (lambda dx: dx)
    if impl == "scatter_reduce":
        ids, mp, dummy = case["patch_ids"], case["max_patches"], case["dummy"]

        def fwd(h):
            return blt_patch_reduce(h, ids, mp, dummy, reduce)

        dim = case["dim"]
        return (fwd, case["x_pad"], case["g_pad"],
                lambda out: out.reshape(-1, dim)[case["valid_rows"]],
                lambda dx: dx.reshape(-1, dim)[case["flat_pos"]])
    if impl == "segment_reduce":
        lengths = case["lengths"]

        def fwd(x):
            return torch.segment_reduce(x, reduce, lengths=lengths, axis=0, unsafe=True)

        return fwd, case["x"], case["g"], (lambda out: out), (lambda dx: dx)
    raise ValueError(impl)


def traffic_bytes(mode: str, reduce: str, tokens: int, patches: int, dim: int, elem: int) -> int:
    """Minimum bytes moved; the formulas are in the module docstring."""
    fwd = (tokens + patches) * dim * elem
    if mode == "fwd":
        return fwd
    bwd = (tokens + patches) * dim * elem * (2 if reduce == "max" else 1)
    return fwd + bwd


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    rtol, atol = TOLERANCES[dtype]
    a, e = actual.float(), expected.float()
    if a.shape != e.shape:
        return False, math.inf
    err = (a - e).abs()
    ok = bool((err <= atol + rtol * e.abs()).all()) and bool((a.isnan() == e.isnan()).all())
    return ok, float(err.nan_to_num(0.0).max()) if err.numel() else 0.0


# ----------------------------------------------------------------------------------------------------- running



def reference_outputs(case: dict, reduce: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The specification's forward output and input gradient, via the public entry point."""
    import mdus_kernels

    with backend_env("reference"):
        xr = case["x"].detach().requires_grad_(True)
        out = mdus_kernels.patch_pool(xr, case["offsets"], reduce)
        dx = torch.autograd.grad(out, xr, case["g"])[0]
    return out.detach(), dx


def check_max_grad(dx: torch.Tensor, case: dict, pooled: torch.Tensor,
                   dtype: torch.dtype) -> tuple[bool, float, int]:
    """Whether ``dx`` is a valid max-pool gradient under any tie-breaking (see the module docstring).

    Returns (ok, max abs error, number of tied or zero-max patch columns whose gradient sum was not compared)."""
    x, g, lengths = case["x"], case["g"], case["lengths"]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.shape[0])
    at_max = x == pooled[seg]
    stray = float(dx.masked_fill(at_max, 0).abs().max())
    ties = torch.zeros(g.shape, dtype=torch.int32, device=g.device).index_add_(0, seg, at_max.int())
    skip = (ties > 1) | (pooled == 0)
    mass = torch.zeros(g.shape, dtype=torch.float32, device=g.device).index_add_(0, seg, dx.float())
    ok, err = compare(mass.masked_fill(skip, 0), g.masked_fill(skip, 0), dtype)
    return ok and stray == 0, max(err, stray), int(skip.sum())


def run_impl(impl: str, case: dict, reduce: str, modes: list[str], ref: tuple, device: torch.device,
             dtype: torch.dtype, timing: dict, roof: float, base: dict) -> list[dict]:
    """Checks ``impl`` against the reference, then times and measures it in every mode: one row per mode."""
    row_base = dict(base, impl=impl, reduce=reduce)
    ref_out, ref_dx = ref

    def row(mode, status, note="", **metrics):
        return dict(row_base, mode=mode, status=status, note=note, **metrics)

    fwd, inp, grad_out, to_packed, to_packed_dx = make_impl(impl, case, reduce)
    # ---- check
    bwd_error = None
    try:
        inp_g = inp.detach().requires_grad_(True)
        out = fwd(inp_g)
        ok, err = compare(to_packed(out.detach()), ref_out, dtype)
        note = f"fwd max_abs_err={err:.3g}"
        if ok:
            try:
                dx = to_packed_dx(torch.autograd.grad(out, inp_g, grad_out)[0])
                if reduce == "mean" or impl.startswith("mdus-"):  # mdus must match the spec's tie-breaking
                    ok, err_b = compare(dx, ref_dx, dtype)
                    note += f"; bwd max_abs_err={err_b:.3g}"
                else:
                    ok, err_b, n_skip = check_max_grad(dx, case, ref_out, dtype)
                    note += f"; bwd max_abs_err={err_b:.3g} ({n_skip} tied/zero patch columns not summed)"
                del dx
            except Exception as exc:  # backward unsupported: the forward rows still count
                bwd_error = f"backward failed: {C.error_note(exc)}"
        del out
    except Exception as exc:
        print(f"  [skip] {impl} {reduce}: {C.error_note(exc)}", file=sys.stderr)
        return [row(mode, "skipped", C.error_note(exc)) for mode in modes]
    if not ok:
        print(f"  [ERROR] {impl} {reduce} tokens={case['tokens']} D={case['dim']}: output differs from the reference "
              f"({note})", file=sys.stderr)
        return [row(mode, "mismatch", note) for mode in modes]
    # ---- time and measure
    rows = []
    for mode in modes:
        if mode == "fwd+bwd" and bwd_error:
            print(f"  [skip] {impl} {reduce} fwd+bwd: {bwd_error}", file=sys.stderr)
            rows.append(row(mode, "skipped", bwd_error))
            continue
        if mode == "fwd":
            xi = inp.detach()

            def fn(xi=xi):
                return fwd(xi)
        else:
            xi = inp.detach().requires_grad_(True)

            def fn(xi=xi):
                return torch.autograd.grad(fwd(xi), xi, grad_out)

        try:
            ms = C.timeit(fn, device=device, **timing)
            mem = C.peak_memory(fn, device=device, warm_call=ms["p50"] < 200)
        except Exception as exc:
            print(f"  [skip] {impl} {reduce} {mode}: {C.error_note(exc)}", file=sys.stderr)
            rows.append(row(mode, "skipped", C.error_note(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        nbytes = traffic_bytes(mode, reduce, case["tokens"], case["patches"], case["dim"], case["x"].element_size())
        gbps = nbytes / (ms["p50"] * 1e-3) / 1e9
        rows.append(row(mode, "ok", note, ms_p20=ms["p20"], ms_p50=ms["p50"], ms_p80=ms["p80"], bytes=nbytes,
                        **{"GB/s": gbps}, pct_of_copy_roofline=100 * gbps / roof, peak_mem_MB=mem / 1e6))
    return rows


def run_case(case: dict, reduce: str, impls: list[str], modes: list[str], device: torch.device, dtype: torch.dtype,
             timing: dict, roof: float, base: dict) -> list[dict]:
    ref = reference_outputs(case, reduce)
    rows = []
    for impl in impls:
        backend = impl.removeprefix("mdus-") if impl.startswith("mdus-") else None
        with backend_env(backend):
            rows += run_impl(impl, case, reduce, modes, ref, device, dtype, timing, roof, base)
    # Speedup of each mdus row over the fastest baseline that ran the same (mode, reduce) correctly.
    for mode in modes:
        best = min((r["ms_p50"] for r in rows if r["mode"] == mode and r["impl"] in BASELINES
                    and r["status"] == "ok"), default=math.nan)
        for r in rows:
            if r["mode"] == mode and r["impl"].startswith("mdus-") and r["status"] == "ok":
                r["speedup_vs_best_baseline"] = best / r["ms_p50"]
    return rows


def default_impls(device: torch.device) -> list[str]:
    backends = ["cpp"] if device.type == "cpu" else ["triton", "cuda"]
    return [f"mdus-{b}" for b in backends] + list(BASELINES)


def plot_rows(rows: list[dict], out: Path, tag: str) -> None:
    rows = [r for r in rows if r.get("reduce") == "mean" and r.get("status") == "ok"]
    if not rows:
        return
    mean_len = min(r["mean_len"] for r in rows)
    rows = [r for r in rows if r["mean_len"] == mean_len]
    roof = rows[0].get("copy_roofline_GB/s")
    C.plot(rows, out / f"{OP}_{tag}.png", x="tokens", y="GB/s", series="impl", panel_row="mode",
                  panel_col="D", title=f"patch_pool mean, {rows[0]['dtype']}, mean patch length {mean_len} "
                  f"({rows[0]['device']})", hline=roof if isinstance(roof, float) else None,
                  hline_label="copy roofline", ylabel="GB/s (p50)", logy=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, nargs="+", help="N (default cpu: 65536 262144; cuda: also 1048576)")
    p.add_argument("--dims", type=int, nargs="+", help="D (default cpu: 512 1024; cuda: 512 1024 2048)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default cpu: float32, cuda: bfloat16")
    p.add_argument("--mean-len", type=int, nargs="+", default=[4, 6], help="mean patch lengths (default 4 6)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--impls", nargs="+", help="subset of implementations (default: all for the device)")
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
    if args.quick:
        # Three short sequences, the last one shorter, so the padded path and its dummy patch are exercised.
        tokens, dims, mean_lens, seq_len = args.tokens or [3000], args.dims or [64], args.mean_len[:1], 1024
        timing = dict(warmup=5, rep=20) if cuda else dict(warmup=1, rep=5, budget_s=0.2)
    else:
        tokens = args.tokens or ([65536, 262144, 1048576] if cuda else [65536, 262144])
        dims = args.dims or ([512, 1024, 2048] if cuda else [512, 1024])
        mean_lens, seq_len, timing = args.mean_len, args.seq_len, {}
    impls = args.impls or default_impls(device)
    modes = ["fwd", "fwd+bwd"]
    # "max" is the secondary reduction: measured at one representative (middle) size only.
    rep_case = (tokens[(len(tokens) - 1) // 2], dims[(len(dims) - 1) // 2], mean_lens[0])

    env = C.env_info(device)
    roof = C.roofline_copy_gbps(device)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} triton {env['triton']} | commit "
          f"{env['commit']} | copy roofline {roof:.1f} GB/s | {dtype} | impls: {', '.join(impls)}")
    base_env = dict(op=OP, run_id=env["time_utc"], **env, **{"copy_roofline_GB/s": roof})
    all_rows = []
    for n in tokens:
        for d in dims:
            for m in mean_lens:
                try:
                    case = make_case(n, d, dtype, m, seq_len, device)
                except torch.OutOfMemoryError as exc:
                    print(f"[skip] tokens={n} D={d}: cannot build the case: {exc}", file=sys.stderr)
                    continue
                base = dict(base_env, tokens=n, D=d, dtype=str(dtype).removeprefix("torch."), mean_len=m,
                            seq_len=seq_len, patches=case["patches"])
                reduces = ["mean"] + (["max"] if (n, d, m) == rep_case else [])
                for reduce in reduces:
                    print(f"case tokens={n} D={d} mean_len={m} patches={case['patches']} reduce={reduce}",
                          flush=True)
                    try:
                        rows = run_case(case, reduce, impls, modes, device, dtype, timing, roof, base)
                    except Exception:  # a broken case must not lose the other cases' rows
                        traceback.print_exc()
                        continue
                    C.append_rows(csv_path, rows)
                    all_rows += rows
                del case
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    print()
    print(C.format_table(all_rows, TABLE_COLUMNS))
    print(f"\nrows appended to {csv_path}")
    plot_rows(all_rows, args.out, tag)
    bad = [r for r in all_rows if r["status"] == "mismatch"]
    if bad:
        print(f"ERROR: {len(bad)} rows whose output differs from the reference; see the 'note' column",
              file=sys.stderr)
    return 1 if bad or not all_rows else 0


if __name__ == "__main__":
    sys.exit(main())
