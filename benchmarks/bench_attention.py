"""Benchmark of ``mdus_kernels.attention`` against the attention users would otherwise call.

Masks (every case has the same number of tokens, ``--tokens``, so TFLOP/s compare across masks):
    * ``causal``: ``tokens / seqlen`` sequences of ``seqlen`` tokens (padded layout);
    * ``prefix``: the same, with a bidirectional prefix of ``--prefix-frac`` of each sequence (prefix-LM / ASR);
    * ``varlen``: causal, packed sequences of mixed lengths (uniform in [seqlen/4, seqlen], fixed seed).

Implementations:
    * ``mdus``: ``mdus_kernels.attention`` (Triton on GPU, ATen's CPU kernels on CPU);
    * ``sdpa_flash``, ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` forced to that backend (GPU, causal only:
      they take no mask);
    * ``sdpa_efficient`` (GPU) / ``sdpa`` (CPU): SDPA with an explicit boolean mask (the block-diagonal mask of the
      whole pack for varlen);
    * ``flex``: ``torch.compile``'d ``flex_attention`` with the same causal / prefix-LM / document mask (GPU);
    * ``flash_attn``: ``flash_attn_varlen_func`` when flash-attn is installed.

Every implementation's output is compared with ``mdus``' before timing (``status=mismatch`` rows are not timed).

FLOPs (flash-attn's convention, counting the visible (query, key) pairs exactly): forward ``4 * pairs * H * D``;
forward+backward 3.5x that (the backward does 2.5x the forward's matmul work). ``pairs`` is ``S(S+1)/2`` per
causal sequence. TFLOP/s = FLOPs / ms_p50 / 1e9.

Issue targets (H100/H200, bf16, D=64): fwd+bwd ``mdus / sdpa_flash >= 1.1`` at seqlen >= 2k (``vs_sdpa_flash``);
prefix-LM and varlen within 10% of causal (``vs_causal``); ``mdus / flex >= 2`` with the prefix-LM mask
(``vs_flex``). All ratios are of TFLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import traceback
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

import mdus_kernels as mk

OP = "attention"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TABLE = ("impl", "mode", "mask", "D", "seqlen", "tokens", "ms_p50", "TFLOP/s", "vs_sdpa_flash", "vs_flex",
         "vs_causal", "status")


def make_lengths(mask: str, seqlen: int, tokens: int) -> list[int]:
    if mask != "varlen":
        return [seqlen] * max(1, tokens // seqlen)
    gen = torch.Generator().manual_seed(seqlen)
    lengths, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(seqlen // 4, seqlen + 1, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return lengths


def visible_pairs(lengths, prefixes) -> int:
    total = 0
    for s, p in zip(lengths, prefixes, strict=True):
        p = min(p, s)
        total += p * p + (s * (s + 1) - p * (p + 1)) // 2  # row i sees max(i + 1, p) keys
    return total


def dense_mask(lengths, prefixes, device) -> torch.Tensor:
    """(T, T) bool: block-diagonal causal / prefix-LM mask of the whole pack (for SDPA with an explicit mask)."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
    pos = torch.arange(seq.numel(), device=device) - starts[seq]
    pre = torch.tensor(prefixes, device=device)[seq]
    same = seq[:, None] == seq[None, :]
    return same & ((pos[None, :] <= pos[:, None]) | (pos[None, :] < pre[:, None]))


def make_impls(mask, lengths, prefixes, q, k, v, device):
    """name -> callable returning the (T, H, D) output, or a string saying why it does not apply."""
    b, s = len(lengths), lengths[0]
    uniform = mask != "varlen"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    prefix_t = torch.tensor(prefixes, dtype=torch.int32, device=device) if mask == "prefix" else None
    cuda = device.type == "cuda"
    impls = {}
    if uniform:
        shape4 = lambda t: t.view(b, s, *t.shape[1:])  # noqa: E731
        impls["mdus"] = lambda: mk.attention(shape4(q), shape4(k), shape4(v), prefix_lens=prefix_t).view(q.shape)
    else:
        impls["mdus"] = lambda: mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))

    heads_first = lambda t: t.view(b, s, *t.shape[1:]).transpose(1, 2) if uniform else t.transpose(0, 1)[None]  # noqa: E731
    back = lambda o: o.transpose(1, 2).reshape(q.shape) if uniform else o[0].transpose(0, 1)  # noqa: E731
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        if not cuda:
            continue
        if mask != "causal":
            impls[name] = "takes no mask"
            continue

        def fn(backend=backend):
            with sdpa_kernel(backend):
                return back(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))

        impls[name] = fn
    name = "sdpa_efficient" if cuda else "sdpa"
    if mask == "causal":
        def sdpa_causal():
            ctx = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if cuda else contextlib.nullcontext()
            with ctx:
                return back(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))
        impls[name] = sdpa_causal
    else:
        full = dense_mask(lengths, prefixes, device)
        m = full[:s, :s] if uniform and mask == "prefix" and len(set(prefixes)) == 1 else None
        attn_mask = m if m is not None else (full if not uniform else None)
        if attn_mask is None:
            impls[name] = "per-sequence prefixes differ"
        else:
            def sdpa_masked():
                ctx = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if cuda else contextlib.nullcontext()
                with ctx:
                    return back(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask))
            impls[name] = sdpa_masked
    if cuda:
        impls["flex"] = make_flex(mask, lengths, prefixes, qh, kh, vh, back, device)
        impls["flash_attn"] = make_flash_attn(cu, max(lengths), q, k, v)
    return impls


def make_flex(mask, lengths, prefixes, qh, kh, vh, back, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return "flex_attention not available"
    flex = torch.compile(flex_attention, dynamic=False)
    if mask == "varlen":
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

        def mask_mod(b, h, q_idx, kv_idx):
            return (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)

        block = create_block_mask(mask_mod, 1, None, seq.numel(), seq.numel(), device=device)
    else:
        prefix = torch.tensor(prefixes, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < prefix[b])

        block = create_block_mask(mask_mod, len(lengths), None, lengths[0], lengths[0], device=device)
    return lambda: back(flex(qh, kh, vh, block_mask=block))


def make_flash_attn(cu, max_len, q, k, v):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return "flash-attn not installed"
    return lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def run_case(mask, seqlen, tokens, d, heads, dtype, device, timing, base, modes):
    lengths = make_lengths(mask, seqlen, tokens)
    prefixes = [int(n * base["prefix_frac"]) if mask == "prefix" else 0 for n in lengths]
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, heads, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    fwd_flops = 4 * visible_pairs(lengths, prefixes) * heads * d
    impls = make_impls(mask, lengths, prefixes, q, k, v, device)
    expected = impls["mdus"]().detach()
    rows = []
    for name, fn in impls.items():
        common = dict(base, impl=name, mask=mask, D=d, H=heads, seqlen=seqlen, tokens=total, n_seqs=len(lengths),
                      dtype=str(dtype).removeprefix("torch."), status="ok", note="")
        if isinstance(fn, str):
            rows += [dict(common, mode=mode, status="skipped", note=fn) for mode in modes]
            continue
        try:
            got = fn()
            err = (got.float() - expected.float()).abs().max().item()
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            if not err <= tol:
                rows += [dict(common, mode=mode, status="mismatch", note=f"max abs error vs mdus {err:.3g}")
                         for mode in modes]
                print(f"MISMATCH {name} {mask} S={seqlen}: {err}", file=sys.stderr)
                continue
            dout = torch.randn_like(got)
            for mode in modes:
                if mode == "fwd":
                    step = lambda fn=fn: fn()  # noqa: E731
                    with torch.no_grad():
                        t = C.timeit(step, device=device, **timing)
                    flops = fwd_flops
                else:
                    step = lambda fn=fn, dout=dout: torch.autograd.grad(fn(), (q, k, v), dout)  # noqa: E731
                    t = C.timeit(step, device=device, **timing)
                    flops = 3.5 * fwd_flops
                rows.append(dict(common, mode=mode, ms_p20=t["p20"], ms_p50=t["p50"], ms_p80=t["p80"],
                                 **{"TFLOP/s": flops / t["p50"] / 1e9}, note=f"max abs error vs mdus {err:.3g}"))
        except Exception as exc:  # one failing baseline must not lose the other rows
            traceback.print_exc()
            rows += [dict(common, mode=mode, status="skipped", note=f"{type(exc).__name__}: {exc}"[:200])
                     for mode in modes]
    return rows


def add_ratios(rows) -> None:
    """vs_<baseline> = mdus TFLOP/s / baseline TFLOP/s; vs_causal = TFLOP/s / the same impl's causal TFLOP/s."""
    ok = [r for r in rows if r["status"] == "ok"]
    key = lambda r: (r["mode"], r["D"], r["seqlen"])  # noqa: E731
    by = {(r["impl"], r["mask"], *key(r)): r for r in ok}
    for r in ok:
        if r["impl"] == "mdus":
            for other in ("sdpa_flash", "flex"):
                o = by.get((other, r["mask"], *key(r)))
                if o:
                    r[f"vs_{other}"] = r["TFLOP/s"] / o["TFLOP/s"]
        causal = by.get((r["impl"], "causal", *key(r)))
        if causal and r["mask"] != "causal":
            r["vs_causal"] = r["TFLOP/s"] / causal["TFLOP/s"]


def plot_rows(rows, out: Path, tag: str) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    for d in sorted({r["D"] for r in ok}):
        sub = [r for r in ok if r["D"] == d]
        C.plot(sub, out / f"{OP}_d{d}_{tag}.png", x="seqlen", y="TFLOP/s", series="impl", panel_row="mode",
                      panel_col="mask", title=f"{OP}: TFLOP/s, head dim {d}, {sub[0]['tokens']} tokens per case, "
                      f"{sub[0]['dtype']}, {sub[0]['device']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seqlens", type=int, nargs="+", help="default cuda: 512 ... 16384; cpu: 512 1024")
    p.add_argument("--tokens", type=int, help="tokens per case (default cuda: 16384; cpu: 2048)")
    p.add_argument("--dims", type=int, nargs="+", help="head dims (default cuda: 64 128; cpu: 64)")
    p.add_argument("--hidden", type=int, default=None, help="heads = hidden / D (default cuda 2048, cpu 512)")
    p.add_argument("--masks", nargs="+", default=["causal", "prefix", "varlen"], choices=["causal", "prefix", "varlen"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--prefix-frac", type=float, default=0.5, help="prefix share of each sequence for 'prefix'")
    p.add_argument("--dtype", choices=list(DTYPES), help="default cuda: bfloat16, cpu: float32")
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    args = p.parse_args(argv)

    device = C.resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    if args.quick:
        seqlens, tokens, dims, hidden, timing = [256], 512, [64], 256, dict(warmup=1, rep=3, budget_s=0.5)
    else:
        seqlens = args.seqlens or ([512, 1024, 2048, 4096, 8192, 16384] if cuda else [512, 1024])
        tokens = args.tokens or (16384 if cuda else 2048)
        dims = args.dims or ([64, 128] if cuda else [64])
        hidden = args.hidden or (2048 if cuda else 512)
        timing = {} if cuda else dict(budget_s=1.0)
    tag = C.device_tag(device)
    env = C.env_info(device)
    base = dict(op=OP, run_id=env["time_utc"], prefix_frac=args.prefix_frac, **env)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} | commit {env['commit']} | {dtype}")
    all_rows = []
    for d in dims:
        for seqlen in seqlens:
            case_rows = []
            for mask in args.masks:
                print(f"case D={d} seqlen={seqlen} mask={mask}", flush=True)
                try:
                    case_rows += run_case(mask, seqlen, max(tokens, seqlen), d, hidden // d, dtype, device, timing,
                                          base, args.modes)
                except torch.OutOfMemoryError as exc:
                    print(f"[skip] out of memory: {exc}", file=sys.stderr)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            add_ratios(case_rows)
            C.append_rows(args.out / f"{tag}.csv", case_rows)
            all_rows += case_rows
    print()
    print(C.format_table([r for r in all_rows if r["status"] != "skipped"], TABLE))
    print(f"\nrows appended to {args.out / f'{tag}.csv'}")
    plot_rows(all_rows, args.out, tag)
    return 1 if any(r["status"] == "mismatch" for r in all_rows) or not all_rows else 0


if __name__ == "__main__":
    sys.exit(main())
