"""Benchmark of ``mdus_kernels.linear_cross_entropy`` against the losses users would otherwise write.

Implementations (forward + backward of the mean loss over all N tokens):
    * ``eager``: ``F.cross_entropy(F.linear(hidden, weight), labels)``, which materializes the (N, V) logits and
      their gradient;
    * ``mdus``: ``mdus_kernels.linear_cross_entropy`` (chunked, logits never materialized);
    * ``liger``: ``LigerFusedLinearCrossEntropyLoss`` when liger-kernel is installed (GPU only).

Head: ``frozen`` (``weight.requires_grad=False``: no weight gradient), ``trainable``, or ``speech`` (what a speech LM
trains: the frozen text head plus a trainable speech head of ``--speech-vocab`` rows; ``mdus`` takes the two blocks,
eager the concatenated head a user would build, liger has no form for it).

Checks: before timing, every implementation (eager included) is run once and its loss and each gradient it must
produce (grad_hidden, and the trainable head blocks' gradients) are compared with a float32 reference on the same
inputs: ``F.cross_entropy(F.linear(...))`` upcast to float32, in row chunks of bounded memory. The error is the max
abs difference relative to the reference tensor's largest magnitude (the gradients of a mean loss are ~1/N small, so
an absolute tolerance would pass an all-zero or sign-flipped gradient); bounds: 1e-4 for float32, 3e-2 for bfloat16
and float16 (eager's own bf16 errors are <= ~1e-2, its bf16 loss being rounded to a few ulps; an all-zero gradient
scores 1, a sign flip 2). A missing or non-finite result, or a larger error, is recorded (``status=mismatch``, the
errors in ``note``); such a row is still timed (a bound set too tight loses no figure of a GPU run) but left out of
the ratios and the plots, and makes the script exit non-zero. Eager float16 fails at large N, rightly: its
``(p - y) / N`` gradient terms underflow (5% error at N=16384 on CPU, whose float16 loss also overflows to inf).
A case or implementation that raises (out of memory, a missing backend, anything) is recorded as
``status=skipped`` with the error in ``note``, and the sweep goes on.

FLOPs (explicit): each GEMM is 2*N*d*V: the logits, grad_hidden, and grad_weight when the head is trainable, so
fwd+bwd = 2*N*d*V * 2 + 2*N*d*(trainable rows). Softmax work is ignored. TFLOP/s = FLOPs / ms_p50 / 1e9.
``time_vs_eager`` and ``mem_vs_eager`` are ratios to eager in the same run (issue targets: memory <= 0.25x; time
<= 1.2x on CPU, <= 1.0x on GPU).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import traceback
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

import mdus_kernels as mk

OP = "linear_cross_entropy"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bound on max |got - reference| / max |reference|, for the loss and each gradient (see the module docstring).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
REF_CHUNK_BYTES = 1 << 30  # float32 logits per chunk of the reference
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
        # Per head block, logits joined: a frozen block then costs no weight-gradient GEMM (joining the weights
        # instead would make the frozen rows part of one trainable tensor).
        return lambda: F.cross_entropy(torch.cat([F.linear(hidden, w) for w in weights], dim=-1), labels)
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


def reference(hidden, weights, labels):
    """(loss, grad_hidden, grad of each head block or None when frozen) in float32 from the same inputs.

    Eager's math upcast to float32, ``REF_CHUNK_BYTES`` of logits at a time, so that it fits wherever eager runs."""
    trainable = [w.requires_grad for w in weights]
    h = hidden.detach().float().requires_grad_()
    w_all = torch.cat([w.detach() for w in weights]).float().requires_grad_(any(trainable))
    n = h.shape[0]
    rows = max(1, REF_CHUNK_BYTES // (4 * w_all.shape[0]))
    loss = 0.0
    for s in range(0, n, rows):
        part = F.cross_entropy(F.linear(h[s:s + rows], w_all), labels[s:s + rows], reduction="sum") / n
        part.backward()
        loss += part.item()
    blocks = w_all.grad.split([w.shape[0] for w in weights]) if any(trainable) else [None] * len(weights)
    grads = [g if t else None for g, t in zip(blocks, trainable, strict=True)]
    return (torch.tensor(loss, device=h.device), h.grad, *grads)



def check(got, expected, dtype, names) -> tuple[bool, str]:
    """Compares ``run``'s outputs with ``reference``'s: (all within the dtype's bound, note with the errors)."""
    errors = {name: C.max_rel_error(g, e) for name, g, e in zip(names, got, expected, strict=True) if e is not None}
    note = "max rel err vs fp32 reference: " + ", ".join(f"{k}={e:.2g}" for k, e in errors.items())
    return all(e <= TOLERANCES[dtype] for e in errors.values()), note


def run_case(n, d, v, dtype, head, impls, device, timing, base, v_speech=0):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    weights = [(torch.randn(v, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_(head == "trainable")]
    if head == "speech":
        weights.append((torch.randn(v_speech, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_())
    v_all = sum(w.shape[0] for w in weights)
    labels = torch.randint(0, v_all, (n,), generator=gen).to(device)
    flops = 2 * n * d * (2 * v_all + sum(w.shape[0] for w in weights if w.requires_grad))
    names = ("loss", "grad_hidden", *(("grad_weight",) if len(weights) == 1 else ("grad_text", "grad_speech")))
    expected = reference(hidden, weights, labels)
    rows = []
    for impl in impls:
        row = case_row(base, impl, head, n, d, v, v_speech, dtype)
        fn = make_impl(impl, hidden, weights, labels)
        if fn is None:
            rows.append(dict(row, status="skipped", note="not installed, not on this device, or no multi-block form"))
            continue
        step = lambda fn=fn: run(fn, hidden, weights)  # noqa: E731
        note = ""
        try:
            ok, note = check(step(), expected, dtype, names)
            if not ok:
                print(f"MISMATCH {impl} N={n} d={d} V={v} head={head}: {note}", file=sys.stderr)
                row["status"] = "mismatch"
            t = C.timeit(step, device=device, **timing)
            mem = C.peak_memory(step, device=device)
        except Exception as exc:  # a failing implementation must not lose the others' rows
            traceback.print_exc()
            # A mismatch stays one (its errors kept in the note) when its timing then fails.
            rows.append(dict(row, status="mismatch" if row["status"] == "mismatch" else "skipped",
                             note="; ".join(filter(None, (note, C.error_note(exc))))))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(dict(row, ms_p20=t["p20"], ms_p50=t["p50"], ms_p80=t["p80"], **{"TFLOP/s": flops / t["p50"] / 1e9},
                         peak_mem_MB=mem / 1e6, note=note))
    eager = next((r for r in rows if r["impl"] == "eager" and r["status"] == "ok"), None)  # ratios: ok rows only
    for r in rows:
        if eager and r["status"] == "ok":
            r["time_vs_eager"] = r["ms_p50"] / eager["ms_p50"]
            r["mem_vs_eager"] = r["peak_mem_MB"] / eager["peak_mem_MB"] if eager["peak_mem_MB"] else math.nan
    return rows


def case_row(base, impl, head, n, d, v, v_speech, dtype) -> dict:
    return dict(base, impl=impl, head=head, tokens=n, d=d, V=v, V_speech=v_speech if head == "speech" else 0,
                dtype=str(dtype).removeprefix("torch."), status="ok", note="")



def plot_rows(rows, out: Path, tag: str) -> None:
    """One PNG per ratio to eager: x = V, a line per (impl, d), a panel per (N, head). Works on rows read back
    from the CSV (where a missing ratio is an empty string: ``C.plot`` skips it)."""
    rows = [r for r in rows if r.get("status") == "ok" and r.get("impl") != "eager"]
    if not rows:
        return
    for metric in ("time_vs_eager", "mem_vs_eager"):
        C.plot(rows, out / f"{OP}_{metric}_{tag}.png", x="V", y=metric, series=["impl", "d"], panel_row="tokens",
               panel_col="head", title=f"{OP}: {metric} (fwd+bwd, {rows[0]['dtype']}, {rows[0]['device']})",
               hline=1.0 if metric == "time_vs_eager" else 0.25,
               hline_label="eager" if metric == "time_vs_eager" else "target 0.25x", ylabel=metric, logx=False)


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
    C.add_plot_only_arguments(p)
    args = p.parse_args(argv)
    if args.plot_only:
        C.plot_only(args, OP, plot_rows)
        return 0

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
                    except Exception as exc:  # e.g. out of memory building the case: keep the other cases
                        traceback.print_exc()
                        rows = [dict(case_row(base, impl, head, n, d, v, args.speech_vocab, dtype), status="skipped",
                                     note=f"case failed: {C.error_note(exc)}") for impl in impls]
                    finally:
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                    C.append_rows(args.out / f"{tag}.csv", rows)
                    all_rows += rows
    print()
    print(C.format_table(all_rows, TABLE))
    print(f"\nrows appended to {args.out / f'{tag}.csv'}")
    plot_rows(all_rows, args.out, tag)
    bad = [r for r in all_rows if r["status"] == "mismatch"]
    if bad:
        print(f"ERROR: {len(bad)} rows whose loss or gradients differ from the reference; see the 'note' column",
              file=sys.stderr)
    return 1 if bad or not any(r["status"] == "ok" for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
