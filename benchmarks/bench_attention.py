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
    * ``sdpa_loop`` (varlen): one causal SDPA call per sequence of the pack, SDPA choosing its backend (what eager
      code without a varlen kernel does; no score is spent across sequences);
    * ``flex``: ``torch.compile``'d ``flex_attention`` with the same causal / prefix-LM / document mask (GPU);
    * ``flash_attn``: ``flash_attn_varlen_func`` when flash-attn is installed (causal and varlen: it takes no
      prefix).

Check: before timing, every implementation runs forward and backward once (which also compiles / autotunes it
outside the timed calls) for a fixed random upstream gradient, and its output and q/k/v gradients are compared with
the specification, ``mdus_kernels.reference.attention`` computed in fp32 from the same inputs with autograd. Error
= max abs error / max abs expected value, per tensor; the tolerance is ``TOLERANCES[dtype]``, so an all-zero
(error 1) or sign-flipped (error 2) gradient fails. The reference materializes the (H, S, S) scores of each
sequence, so it runs on a subset of the sequences and heads (``check_subset``: at most ``REF_BUDGET`` score
elements; sequences and heads are independent, so the subset's rows are exact) and the note says which share was
checked. An implementation that fails is printed and its rows get ``status=mismatch`` (``fwd`` rows on the output
alone, ``fwd+bwd`` rows on all four tensors); they are still timed, so that a mis-set tolerance on a rare GPU run
loses no figure, but they are left out of the ratios and plots and make the script exit non-zero. If the reference
itself cannot run, the rows get ``status=unchecked``. An implementation that fails to build or run (a compile
error, ``OutOfResources``, out of memory) gets ``status=skipped`` rows with the error in ``note``; the sweep goes on.

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
from mdus_kernels.reference import attention as ref

OP = "attention"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs error / max abs expected value, per checked tensor (out, dq, dk, dv). Low-precision kernels round P and
# dS to the input dtype before their matmuls; their errors stay a few units of the dtype's rounding step.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# Score elements (sum of heads * len^2 over the checked sequences) of the fp32 reference; autograd keeps a few
# tensors of that size, so about 6 GiB on GPU at 2**28. At least one head of one sequence is always checked.
REF_BUDGET = {"cuda": 1 << 28, "cpu": 1 << 24}
CHECKED = ("out", "dq", "dk", "dv")
TABLE = ("impl", "mode", "mask", "D", "seqlen", "tokens", "ms_p50", "TFLOP/s", "vs_sdpa_flash", "vs_flex",
         "vs_sdpa_loop", "vs_causal", "status")


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


# ----------------------------------------------------------------------------------------------------- impls


def impl_names(device: torch.device) -> list[str]:
    """The implementations ``make_impls`` offers on ``device`` (all of them get rows, skipped or not)."""
    if device.type == "cuda":
        return ["mdus", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_loop", "flex", "flash_attn"]
    return ["mdus", "sdpa", "sdpa_loop"]


def make_impls(mask, lengths, prefixes, q, k, v, device):
    """name -> a string saying why the implementation does not apply, or a builder: a function of no arguments that
    returns a callable giving the (T, H, D) output (or such a string). Builders do the per-implementation setup
    (flex's block mask, SDPA's dense mask), so that ``run_impl`` catches their failures for that implementation."""
    b, s = len(lengths), lengths[0]
    uniform = mask != "varlen"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    prefix_t = torch.tensor(prefixes, dtype=torch.int32, device=device) if mask == "prefix" else None
    cuda = device.type == "cuda"
    impls = {}

    def build_mdus():
        if uniform:
            shape4 = lambda t: t.view(b, s, *t.shape[1:])  # noqa: E731
            return lambda: mk.attention(shape4(q), shape4(k), shape4(v), prefix_lens=prefix_t).view(q.shape)
        return lambda: mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))

    impls["mdus"] = build_mdus
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

        def build_fixed_backend(backend=backend):
            def fn():
                with sdpa_kernel(backend):
                    return back(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))

            return fn

        impls[name] = build_fixed_backend
    name = "sdpa_efficient" if cuda else "sdpa"
    sdpa_ctx = (lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)) if cuda else contextlib.nullcontext
    if mask == "causal":
        def build_sdpa_causal():
            def fn():
                with sdpa_ctx():
                    return back(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))

            return fn

        impls[name] = build_sdpa_causal
    elif uniform and len(set(prefixes)) != 1:
        impls[name] = "per-sequence prefixes differ"
    else:
        def build_sdpa_masked():
            # uniform: one (S, S) mask, broadcast over the batch; varlen: the (T, T) mask of the whole pack
            attn_mask = dense_mask([s], prefixes[:1], device) if uniform else dense_mask(lengths, prefixes, device)

            def fn():
                with sdpa_ctx():
                    return back(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask))

            return fn

        impls[name] = build_sdpa_masked
    if mask == "varlen":
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))

        def build_sdpa_loop():
            # What eager code does without a varlen kernel: one causal SDPA call per sequence (no mask, no waste
            # on the pack's cross-sequence scores), SDPA choosing its own backend.
            def fn():
                return torch.cat([F.scaled_dot_product_attention(q[a:e].transpose(0, 1), k[a:e].transpose(0, 1),
                                                                 v[a:e].transpose(0, 1), is_causal=True).transpose(0, 1)
                                  for a, e in bounds])

            return fn

        impls["sdpa_loop"] = build_sdpa_loop
    else:
        impls["sdpa_loop"] = "for varlen packs"
    if cuda:
        impls["flex"] = lambda: make_flex(mask, lengths, prefixes, qh, kh, vh, back, device)
        if mask == "prefix":
            impls["flash_attn"] = "takes no prefix mask"
        else:
            impls["flash_attn"] = lambda: make_flash_attn(cu, max(lengths), q, k, v)
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


# ----------------------------------------------------------------------------------------------------- check



def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_subset(lengths: list[int], heads: int, budget: int) -> tuple[list[int], int]:
    """(sequence indices, head count) to check: as many heads of the first sequence as ``budget`` score elements
    allow (at least one), then the last sequence and the others in order while they fit."""
    n_heads = min(heads, max(1, budget // max(lengths[0] ** 2, 1)))
    seqs, cost = [0], n_heads * lengths[0] ** 2
    for i in [len(lengths) - 1, *range(1, len(lengths) - 1)] if len(lengths) > 1 else []:
        if cost + n_heads * lengths[i] ** 2 <= budget:
            seqs.append(i)
            cost += n_heads * lengths[i] ** 2
    return sorted(seqs), n_heads


@contextlib.contextmanager
def full_fp32_matmuls():
    """The reference's matmuls in IEEE fp32, whatever the process's TF32 setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def reference(q, k, v, dout, lengths, prefixes, mask, budget) -> dict:
    """The specification's output and q/k/v gradients (fp32) on a subset of the sequences and heads.

    ``rows`` and ``heads`` index the full (T, H, D) tensors: ``t[rows][:, heads]`` is the subset's packed layout."""
    device = q.device
    seqs, n_heads = check_subset(lengths, q.shape[1], budget)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(device)
    heads = torch.linspace(0, q.shape[1] - 1, n_heads).round().long().unique().to(device)  # spread over all heads
    cu = torch.tensor([0, *torch.tensor([lengths[i] for i in seqs]).cumsum(0).tolist()])
    prefix = torch.tensor([prefixes[i] for i in seqs]) if mask == "prefix" else None
    leaves = [t.detach()[rows][:, heads].float().requires_grad_() for t in (q, k, v)]
    with full_fp32_matmuls():
        out, _ = ref.attention(*leaves, cu, cu, causal=True, prefix_lens=prefix)
        grads = torch.autograd.grad(out, leaves, dout[rows][:, heads].float())
    return dict(rows=rows, heads=heads, expected=[out.detach(), *grads],
                share=f"{len(seqs)}/{len(lengths)} seqs x {heads.numel()}/{q.shape[1]} heads")



def check(fn, q, k, v, dout, ref_data, tol) -> tuple[dict, dict]:
    """Runs ``fn`` forward and backward once and compares the output and q/k/v gradients with the reference.

    Returns ({mode: status}, {mode: note}): ``fwd`` on the output alone, ``fwd+bwd`` on all four tensors. A
    failing forward raises; a failing backward skips only the fwd+bwd rows."""
    out = fn()
    statuses, errors = {}, {}
    pick = (lambda t: t.detach()[ref_data["rows"]][:, ref_data["heads"]]) if ref_data else None
    if ref_data:
        errors["out"] = C.max_rel_error(pick(out), ref_data["expected"][0])
    bwd_error = None
    try:
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if ref_data:
            for name, g, e in zip(CHECKED[1:], grads, ref_data["expected"][1:], strict=True):
                errors[name] = C.max_rel_error(pick(g), e)
        del grads
    except Exception as exc:  # an unsupported or failing backward: the forward rows still count
        traceback.print_exc(limit=-4)
        bwd_error = f"backward failed: {C.error_note(exc)}"
    del out
    if ref_data:
        head = f"max rel err vs fp32 reference ({ref_data['share']}): "
        notes = {"fwd": head + f"out={errors['out']:.2g}",
                 "fwd+bwd": head + ", ".join(f"{n}={e:.2g}" for n, e in errors.items())}
        fwd_ok = errors["out"] <= tol
        statuses["fwd"] = "ok" if fwd_ok else "mismatch"
        statuses["fwd+bwd"] = "ok" if fwd_ok and all(e <= tol for e in errors.values()) else "mismatch"
    else:
        notes = dict.fromkeys(("fwd", "fwd+bwd"), "not checked")
        statuses = {"fwd": "unchecked", "fwd+bwd": "unchecked"}
    if bwd_error:
        statuses["fwd+bwd"] = "skipped"
        notes["fwd+bwd"] = f"{bwd_error}; {notes['fwd+bwd']}"
    return statuses, notes


# ----------------------------------------------------------------------------------------------------- running


def run_impl(name, build, case: dict, modes, timing, device, tol) -> list[dict]:
    """Checks one implementation, then times it in every mode: one row per mode, whatever fails."""
    common = dict(case["common"], impl=name)
    if isinstance(build, str):
        return [dict(common, mode=mode, status="skipped", note=build) for mode in modes]
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    error = None
    try:
        fn = build()
        if isinstance(fn, str):
            return [dict(common, mode=mode, status="skipped", note=fn) for mode in modes]
        statuses, notes = check(fn, q, k, v, dout, case["ref"], tol)
    except Exception as exc:  # a compile error, OutOfResources, OOM: only this implementation is lost
        traceback.print_exc(limit=-4)
        error = C.error_note(exc)
    if error:
        free_memory(device)
        print(f"  [skip] {name} {common['mask']}: {error}", file=sys.stderr)
        return [dict(common, mode=mode, status="skipped", note=error) for mode in modes]
    if case["ref_error"]:
        notes = {mode: f"{note} ({case['ref_error']})" for mode, note in notes.items()}
    if "mismatch" in statuses.values():
        print(f"  [ERROR] {name} {common['mask']} D={common['D']} S={common['seqlen']}: differs from the reference "
              f"({notes['fwd+bwd']})", file=sys.stderr)
    rows = []
    for mode in modes:
        if statuses[mode] == "skipped":
            rows.append(dict(common, mode=mode, status="skipped", note=notes[mode]))
            continue
        error = None
        try:
            if mode == "fwd":
                with torch.no_grad():
                    t = C.timeit(fn, device=device, **timing)
                flops = case["fwd_flops"]
            else:
                t = C.timeit(lambda: torch.autograd.grad(fn(), (q, k, v), dout), device=device, **timing)
                flops = 3.5 * case["fwd_flops"]
        except Exception as exc:
            traceback.print_exc(limit=-4)
            error = C.error_note(exc)
        if error:
            free_memory(device)
            print(f"  [skip] {name} {common['mask']} {mode}: {error}", file=sys.stderr)
            rows.append(dict(common, mode=mode, status="skipped", note=error))
            continue
        rows.append(dict(common, mode=mode, status=statuses[mode], note=notes[mode], ms_p20=t["p20"], ms_p50=t["p50"],
                         ms_p80=t["p80"], **{"TFLOP/s": flops / t["p50"] / 1e9}))
    return rows


def run_case(mask, seqlen, tokens, d, heads, dtype, device, timing, common, modes) -> list[dict]:
    lengths = make_lengths(mask, seqlen, tokens)
    prefixes = [int(n * common["prefix_frac"]) if mask == "prefix" else 0 for n in lengths]
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, heads, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(total, heads, d, generator=gen).to(device, dtype)  # the same upstream gradient for all
    case = dict(q=q, k=k, v=v, dout=dout, fwd_flops=4 * visible_pairs(lengths, prefixes) * heads * d,
                common=dict(common, tokens=total, n_seqs=len(lengths)), ref=None, ref_error="")
    try:
        case["ref"] = reference(q, k, v, dout, lengths, prefixes, mask, REF_BUDGET[device.type])
    except Exception as exc:  # time the implementations anyway, as status=unchecked
        traceback.print_exc(limit=-4)
        case["ref_error"] = f"reference failed: {C.error_note(exc)}"
        print(f"  [ERROR] {case['ref_error']}", file=sys.stderr)
    if case["ref_error"]:
        free_memory(device)
    impls = make_impls(mask, lengths, prefixes, q, k, v, device)
    rows = []
    for name, build in impls.items():
        rows += run_impl(name, build, case, modes, timing, device, TOLERANCES[dtype])
        free_memory(device)
    return rows


def add_ratios(rows) -> None:
    """vs_<baseline> = mdus TFLOP/s / baseline TFLOP/s; vs_causal = TFLOP/s / the same impl's causal TFLOP/s."""
    ok = [r for r in rows if r["status"] == "ok"]
    key = lambda r: (r["mode"], r["D"], r["seqlen"])  # noqa: E731
    by = {(r["impl"], r["mask"], *key(r)): r for r in ok}
    for r in ok:
        if r["impl"] == "mdus":
            for other in ("sdpa_flash", "flex", "sdpa_loop"):
                o = by.get((other, r["mask"], *key(r)))
                if o:
                    r[f"vs_{other}"] = r["TFLOP/s"] / o["TFLOP/s"]
        causal = by.get((r["impl"], "causal", *key(r)))
        if causal and r["mask"] != "causal":
            r["vs_causal"] = r["TFLOP/s"] / causal["TFLOP/s"]


def plot_rows(rows, out: Path, tag: str) -> None:
    """One PNG per head dim; works on the rows of a run in memory or read back by ``C.read_rows``."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        print(f"[plot] no ok {OP} rows to draw")
        return
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
    C.add_plot_only_arguments(p)
    args = p.parse_args(argv)
    if args.plot_only:
        C.plot_only(args, OP, plot_rows)
        return 0

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
    # causal first: vs_causal needs it, and each mask's rows are written as soon as they are measured.
    masks = sorted(dict.fromkeys(args.masks), key=lambda m: m != "causal")
    tag = C.device_tag(device)
    csv_path = args.out / f"{tag}.csv"
    env = C.env_info(device)
    base = dict(op=OP, run_id=env["time_utc"], prefix_frac=args.prefix_frac, **env)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} | commit {env['commit']} | {dtype}")
    all_rows = []
    for d in dims:
        for seqlen in seqlens:
            group = []  # this (D, seqlen)'s rows, for vs_causal
            for mask in masks:
                print(f"case D={d} seqlen={seqlen} mask={mask}", flush=True)
                case_tokens, heads = max(tokens, seqlen), max(1, hidden // d)
                common = dict(base, mask=mask, D=d, H=heads, seqlen=seqlen, tokens=case_tokens,
                              dtype=str(dtype).removeprefix("torch."))
                error = None
                try:
                    rows = run_case(mask, seqlen, case_tokens, d, heads, dtype, device, timing, common, args.modes)
                except Exception as exc:  # a broken case must not lose the other cases' rows
                    traceback.print_exc(limit=-4)
                    error = C.error_note(exc)
                if error:
                    print(f"[skip] D={d} seqlen={seqlen} mask={mask}: {error}", file=sys.stderr)
                    rows = [dict(common, impl=name, mode=mode, status="skipped", note=f"case failed: {error}")
                            for name in impl_names(device) for mode in args.modes]
                free_memory(device)
                group += rows
                add_ratios(group)
                C.append_rows(csv_path, rows)
                all_rows += rows
    print()
    print(C.format_table([r for r in all_rows if r["status"] != "skipped"], TABLE))
    print(f"\nrows appended to {csv_path}")
    plot_rows(all_rows, args.out, tag)
    skipped = [r for r in all_rows if r["status"] == "skipped"]
    if skipped:
        print(f"{len(skipped)} rows skipped: " + "; ".join(sorted({f"{r['impl']}: {r['note']}" for r in skipped})))
    bad = [r for r in all_rows if r["status"] in ("mismatch", "unchecked")]
    if bad:
        print(f"ERROR: {len(bad)} rows differ from the reference or were not checked; see the 'note' column",
              file=sys.stderr)
    return 1 if bad or not any(r["status"] == "ok" for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
