"""Benchmark of ``mdus_kernels.linear_cross_entropy`` against the losses users would otherwise write.

Implementations (forward + backward of the mean loss over all N tokens):
    * ``eager``: ``F.cross_entropy(F.linear(hidden, weight), labels)``, which materializes the (N, V) logits and
      their gradient;
    * ``mdus``: ``mdus_kernels.linear_cross_entropy`` (chunked, logits never materialized);
    * ``liger``: ``LigerFusedLinearCrossEntropyLoss`` when liger-kernel is installed (GPU only).

Head: ``frozen`` (``weight.requires_grad=False``: no weight gradient), ``trainable``, or ``speech`` (what a speech LM
trains: the frozen text head plus a trainable speech head of ``--speech-vocab`` rows; ``mdus`` takes the two blocks,
eager the concatenated head a user would build, liger has no form for it).
Before timing, each implementation's loss and gradients are compared with eager's (at the dtype's tolerance); a
mismatch is recorded (``status=mismatch``) and not timed.

FLOPs (explicit): each GEMM is 2*N*d*V: the logits, grad_hidden, and grad_weight when the head is trainable, so
fwd+bwd = 2*N*d*V * 2 + 2*N*d*(trainable rows). Softmax work is ignored. TFLOP/s = FLOPs / ms_p50 / 1e9.
``time_vs_eager`` and ``mem_vs_eager`` are ratios to eager in the same run (issue targets: memory <= 0.25x; time
<= 1.2x on CPU, <= 1.0x on GPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

import mdus_kernels as mk

OP = "linear_cross_entropy"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1e-3), torch.float16: (1e-2, 1e-4)}
TABLE = ("impl", "head", "tokens", "d", "V", "V_speech", "dtype", "ms_p20", "ms_p50", "ms_p80", "TFLOP/s",
         "peak_mem_MB", "time_vs_eager", "mem_vs_eager", "status")


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def make_impl(impl: str, hidden, weights, labels):
    if impl == "eager":
        return lambda: F.cross_entropy(F.linear(hidden, torch.cat(weights) if len(weights) > 1 else weights[0]),
                                       labels)
    if impl == "mdus":
        return lambda: mk.linear_cross_entropy(hidden, tuple(weights) if len(weights) > 1 else weights[0], labels)
    loss = liger_loss()
    if loss is None or hidden.device.type != "cuda" or len(weights) > 1:
        return None
    return lambda: loss(weights[0], hidden, labels)


def run(fn, hidden, weights):
    """One fwd+bwd; returns (loss, grad_hidden, grad of each head block) and clears the gradients."""
    loss = fn()
    loss.backward()
    out = (loss.detach().float(), hidden.grad, *(w.grad for w in weights))
    hidden.grad = None
    for w in weights:
        w.grad = None
    return out


def run_case(n, d, v, dtype, head, impls, device, timing, base, v_speech=0):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    weights = [(torch.randn(v, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_(head == "trainable")]
    if head == "speech":
        weights.append((torch.randn(v_speech, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_())
    v_all = sum(w.shape[0] for w in weights)
    labels = torch.randint(0, v_all, (n,), generator=gen).to(device)
    flops = 2 * n * d * (2 * v_all + sum(w.shape[0] for w in weights if w.requires_grad))
    expected = run(make_impl("eager", hidden, weights, labels), hidden, weights)
    rows = []
    for impl in impls:
        row = dict(base, impl=impl, head=head, tokens=n, d=d, V=v, V_speech=v_speech if head == "speech" else 0,
                   dtype=str(dtype).removeprefix("torch."), status="ok", note="")
        fn = make_impl(impl, hidden, weights, labels)
        if fn is None:
            rows.append(dict(row, status="skipped", note="not installed, not on this device, or no multi-block form"))
            continue
        step = lambda fn=fn: run(fn, hidden, weights)  # noqa: E731
        try:
            got = step()
            rtol, atol = TOL[dtype]
            errors = [(g.float() - e.float()).abs().max().item() for g, e in zip(got, expected, strict=True)
                      if e is not None]
            if not all(torch.allclose(g.float(), e.float(), rtol=rtol, atol=atol)
                       for g, e in zip(got, expected, strict=True) if e is not None):
                rows.append(dict(row, status="mismatch", note=f"max abs errors {errors}"))
                print(f"MISMATCH {impl}: {errors}", file=sys.stderr)
                continue
            t = C.timeit(step, device=device, **timing)
            mem = C.peak_memory(step, device=device)
        except Exception as exc:  # a failing implementation must not lose the others' rows
            traceback.print_exc()
            rows.append(dict(row, status="skipped", note=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(dict(row, ms_p20=t["p20"], ms_p50=t["p50"], ms_p80=t["p80"], **{"TFLOP/s": flops / t["p50"] / 1e9},
                         peak_mem_MB=mem / 1e6, note=f"max abs errors vs eager {errors}"))
    eager = next((r for r in rows if r["impl"] == "eager" and r["status"] == "ok"), None)
    for r in rows:
        if eager and r["status"] == "ok":
            r["time_vs_eager"] = r["ms_p50"] / eager["ms_p50"]
            r["mem_vs_eager"] = r["peak_mem_MB"] / eager["peak_mem_MB"]
    return rows


def plot_rows(rows, out: Path, tag: str) -> None:
    rows = [r for r in rows if r.get("status") == "ok" and r["impl"] != "eager" and "time_vs_eager" in r]
    if not rows:
        return
    for metric in ("time_vs_eager", "mem_vs_eager"):
        C.plot(rows, out / f"{OP}_{metric}_{tag}.png", x="V", y=metric, series=["impl", "d"],
                      panel_col="head", title=f"{OP}: {metric} (fwd+bwd, N={rows[0]['tokens']}, "
                      f"{rows[0]['dtype']}, {rows[0]['device']})", hline=1.0 if metric == "time_vs_eager" else 0.25,
                      hline_label="eager" if metric == "time_vs_eager" else "target 0.25x", ylabel=metric,
                      logx=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, nargs="+", help="N (default cpu: 4096; cuda: 4096 8192 16384 32768)")
    p.add_argument("--dims", type=int, nargs="+", help="d (default cpu: 576; cuda: 576 960 2048)")
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 62344], help="V (default 49152 62344)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default cpu: float32, cuda: bfloat16")
    p.add_argument("--heads", nargs="+", default=["frozen", "trainable"], choices=["frozen", "trainable", "speech"],
                   help="default frozen trainable (speech: opt-in, to keep the GPU sweep's case count)")
    p.add_argument("--speech-vocab", type=int, default=5000,
                   help="rows of the speech head for --heads speech (default 5000: the paper's k-means units)")
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    args = p.parse_args(argv)

    device = C.resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    if args.quick:
        tokens, dims, vocab, timing = [256], [64], [4096], dict(warmup=1, rep=3, budget_s=0.5)
    else:
        tokens = args.tokens or ([4096, 8192, 16384, 32768] if cuda else [4096])
        dims = args.dims or ([576, 960, 2048] if cuda else [576])
        vocab, timing = args.vocab, {}
    impls = ["eager", "mdus"] + (["liger"] if cuda else [])
    tag = C.device_tag(device)
    env = C.env_info(device)
    base = dict(op=OP, run_id=env["time_utc"], **env)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} | commit {env['commit']} | {dtype}")
    all_rows = []
    for n in tokens:
        for d in dims:
            for v in vocab:
                for head in args.heads:
                    print(f"case N={n} d={d} V={v} head={head}", flush=True)
                    try:
                        rows = run_case(n, d, v, dtype, head, impls, device, timing, base,
                                        v_speech=args.speech_vocab)
                    except torch.OutOfMemoryError as exc:
                        print(f"[skip] out of memory: {exc}", file=sys.stderr)
                        continue
                    C.append_rows(args.out / f"{tag}.csv", rows)
                    all_rows += rows
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
    print()
    print(C.format_table(all_rows, TABLE))
    print(f"\nrows appended to {args.out / f'{tag}.csv'}")
    plot_rows(all_rows, args.out, tag)
    return 1 if any(r["status"] == "mismatch" for r in all_rows) or not all_rows else 0


if __name__ == "__main__":
    sys.exit(main())
