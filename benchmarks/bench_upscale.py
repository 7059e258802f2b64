"""Benchmark of one training step of an up-scaled model: mdus against the same model run the usual way.

One step = forward + backward + AdamW step over the trainable parameters (the inserted blocks and the speech rows;
the base is frozen), on a batch of ``--tokens`` tokens made of ``--seqs`` equal-length sequences.

Implementations:
    * ``mdus``: ``mdus.upscale`` as shipped: the batch packed (cu_seqlens), every attention call through
      ``mdus_kernels.attention``, the fused linear cross-entropy (no logits);
    * ``baseline``: the same model and weights with transformers' ``sdpa`` attention and its own MLP forward in
      every host-class layer (the base layers and transformer blocks), the batch as (seqs, tokens/seqs) with no
      padding, and the eager loss ``F.cross_entropy(F.linear(h, W), y)`` over the full logits, as a transformers
      causal LM computes it. E-Branchformer blocks run the same code in both;
    * ``baseline-rows``: ``baseline`` with the eager loss over the rows that have a target only (the logits of
      the transcript positions, per head block), the selection mdus' own forward makes before its fused loss: the
      gap between the two baselines is that selection's share, the gap to mdus the kernels';
    * ``mdus-host-mlp`` (with ``--host-mlp``): ``mdus`` with the host MLPs' own forward instead of
      ``mdus.gated_mlp``'s (which keeps two of their three activations): that change's share of the memory.

Model: random weights in a SmolLM2 shape: 360M (32 layers, d=960, 15/5 heads) on GPU, 135M (30 layers, d=576,
9/3 heads) on CPU; vocabulary 49,152 + ``--speech-vocab`` speech units; 25% of the depth inserted, interleaved.
``--autocast bf16`` runs both implementations' forward and loss under bf16 autocast (the default where
``mdus.train.fast_bf16`` says bf16 is fast: CUDA, and CPUs with AVX512-BF16/AMX, as ``mdus train`` does).
Columns: ``tokens/s`` = tokens / ms_p50 * 1e3, ``peak_mem_MB`` (one step, beyond the model and optimizer state
allocated before it; the step ends by dropping its gradients, so each measured step starts without them), and for
the other rows ``speedup`` (baseline ms / its ms) and ``mem_vs_baseline``, and for mdus ``speedup_vs_rows`` and
``mem_vs_rows`` (against ``baseline-rows``). Issue targets (GPU): speedup >= 1.5 and mem_vs_baseline <= 0.6.

Check: both implementations start from the same weights (same seed), so their first step's loss (column ``loss``,
before any update) must agree: a non-finite loss, or one more than 1e-3 (2e-2 with bf16) away from the baseline's
relatively, is recorded as ``status=mismatch`` (still timed, so that no figure of a GPU run is lost, but given no
speedup) and makes the script exit non-zero. With random weights every token's loss is ~log(V), so this catches
broken numerics (NaN, inf, garbage), not subtler errors: the kernels' tests cover those. An implementation that
raises (out of memory, anything) is recorded as ``status=skipped`` with the error in ``note``, and the sweep goes
on. This benchmark draws no plot; its figures are the table and the CSV rows.
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
from transformers import LlamaConfig, LlamaForCausalLM

import mdus
from mdus.gated_mlp import restore_gated_mlps
from mdus.train import fast_bf16

OP = "upscale_train_step"
SHAPES = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, head_dim=64),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64),
}
IMPLS = ("baseline", "baseline-rows", "mdus")
TABLE = ("impl", "block", "shape", "tokens", "autocast", "loss", "ms_p50", "tokens/s", "peak_mem_MB", "speedup",
         "mem_vs_baseline", "speedup_vs_rows", "mem_vs_rows", "status")


def build(shape: str, block: str, speech_vocab: int, dtype, device, impl: str):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **SHAPES[shape])
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    block_config = dict(cgmlp_units=4 * config.hidden_size) if block == "ebranchformer" else None
    lm = mdus.upscale(base, block=block, block_config=block_config, speech_vocab_size=speech_vocab)
    if impl != "mdus":  # the host's MLPs as transformers ships them, not mdus.gated_mlp's
        restore_gated_mlps(lm)
    if impl.startswith("baseline"):
        base.set_attn_implementation("sdpa")
        for b in lm.blocks:
            if hasattr(b, "self_attn") and hasattr(b.self_attn, "config"):
                b.self_attn.config._attn_implementation = "sdpa"
    return lm


def make_step(lm, impl, tokens, seqs, speech_vocab, device, autocast: bool):
    gen = torch.Generator().manual_seed(1)
    length = tokens // seqs
    rows = []
    for _ in range(seqs):  # ASR-like: speech units, then the transcript (the loss targets)
        n_speech = length * 2 // 3
        rows.append(torch.cat([torch.randint(49152, 49152 + speech_vocab, (n_speech,), generator=gen),
                               torch.randint(0, 49152, (length - n_speech,), generator=gen)]))
    ids = torch.stack(rows).to(device)
    loss_mask = ids < 49152
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-5)
    cu = torch.arange(seqs + 1, dtype=torch.int32, device=device) * length

    def loss_fn():
        if impl.startswith("mdus"):
            return lm(ids.reshape(-1), cu_seqlens=cu, max_seqlen=length, loss_mask=loss_mask.reshape(-1)).loss
        targets = lm._targets(ids, None, loss_mask, None, None).reshape(-1)
        if impl == "baseline":
            logits = lm(ids, return_logits=True).logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
        hidden = lm(ids, return_logits=False).hidden_states
        rows = targets != -100
        h = hidden.reshape(-1, hidden.shape[-1])[rows]
        logits = torch.cat([F.linear(h, w) for w in lm.output_weights()], dim=-1)
        return F.cross_entropy(logits.float(), targets[rows])

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # the next step (and its memory measurement) starts without gradients
        return loss

    return step


def case_row(base, impl, block, shape, tokens, seqs, dtype, autocast) -> dict:
    return dict(base, impl=impl, block=block, shape=shape, tokens=tokens, seqs=seqs,
                autocast="bf16" if autocast else "none", dtype=str(dtype).removeprefix("torch."), status="ok", note="")



def check_loss(loss: float, baseline_loss: float | None, rtol: float) -> tuple[bool, str]:
    """The first step's loss: finite, and within ``rtol`` of the baseline's (the same weights) when it ran."""
    if not math.isfinite(loss):
        return False, f"first-step loss {loss}"
    if baseline_loss is None:
        return True, f"first-step loss {loss:.6g}"
    rel = abs(loss - baseline_loss) / abs(baseline_loss)
    return rel <= rtol, f"first-step loss {loss:.6g} vs baseline {baseline_loss:.6g}: rel diff {rel:.2g}"


def run_case(shape, block, tokens, seqs, speech_vocab, dtype, device, timing, base, autocast=False, impls=IMPLS):
    rows = []
    rtol = 2e-2 if autocast or dtype != torch.float32 else 1e-3
    baseline_loss = None
    for impl in impls:
        row = case_row(base, impl, block, shape, tokens, seqs, dtype, autocast)
        note = ""
        try:
            lm = build(shape, block, speech_vocab, dtype, device, impl)
            step = make_step(lm, impl, tokens, seqs, speech_vocab, device, autocast)
            loss = step().item()  # from the initial weights; allocates the optimizer state outside the measured peak
            ok, note = check_loss(loss, baseline_loss, rtol)
            if impl == "baseline" and math.isfinite(loss):
                baseline_loss = loss
            if not ok:
                print(f"MISMATCH {impl} {shape} block={block}: {note}", file=sys.stderr)
                row["status"] = "mismatch"
            t = C.timeit(step, device=device, **timing)
            mem = C.peak_memory(step, device=device)
            rows.append(dict(row, ms_p20=t["p20"], ms_p50=t["p50"], ms_p80=t["p80"],
                             **{"tokens/s": tokens / t["p50"] * 1e3}, peak_mem_MB=mem / 1e6,
                             trainable=mdus.count_trainable(lm), loss=loss, note=note))
        except Exception as exc:  # keep the other rows
            traceback.print_exc()
            # A mismatch stays one (its loss kept in the note) when its timing then fails.
            rows.append(dict(row, status="mismatch" if row["status"] == "mismatch" else "skipped",
                             note="; ".join(filter(None, (note, C.error_note(exc))))))
        finally:
            lm = step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    for impl, ref, speedup, mem_ratio in (("baseline-rows", "baseline", "speedup", "mem_vs_baseline"),
                                          ("mdus", "baseline", "speedup", "mem_vs_baseline"),
                                          ("mdus-host-mlp", "baseline", "speedup", "mem_vs_baseline"),
                                          ("mdus", "baseline-rows", "speedup_vs_rows", "mem_vs_rows")):
        if impl in ok and ref in ok:
            ok[impl][speedup] = ok[ref]["ms_p50"] / ok[impl]["ms_p50"]
            mem = ok[ref]["peak_mem_MB"]
            ok[impl][mem_ratio] = ok[impl]["peak_mem_MB"] / mem if mem else math.nan
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--shape", choices=list(SHAPES), help="default cuda: smollm2-360m, cpu: smollm2-135m")
    p.add_argument("--blocks", nargs="+", default=["transformer", "ebranchformer"])
    p.add_argument("--tokens", type=int, help="tokens per step (default cuda: 8192, cpu: 512)")
    p.add_argument("--seqs", type=int, default=4, help="sequences per step (equal lengths)")
    p.add_argument("--speech-vocab", type=int, default=5000)
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="a 2-layer model, 128 tokens (smoke test)")
    p.add_argument("--autocast", choices=["bf16", "none"], default=None,
                   help="bf16 autocast for both implementations (default: where mdus.train.fast_bf16 says it pays)")
    p.add_argument("--host-mlp", action="store_true",
                   help="also run mdus-host-mlp: mdus with the host MLPs' own forward (the A/B of mdus.gated_mlp)")
    args = p.parse_args(argv)
    impls = IMPLS + (("mdus-host-mlp",) if args.host_mlp else ())

    device = C.resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = args.shape or ("smollm2-360m" if cuda else "smollm2-135m")
    tokens = args.tokens or (8192 if cuda else 512)
    timing = {} if cuda else dict(warmup=1, rep=3, budget_s=30.0)
    if args.quick:
        SHAPES["quick"] = dict(SHAPES["smollm2-135m"], num_hidden_layers=2)
        shape, tokens, timing = "quick", 128, dict(warmup=1, rep=2, budget_s=1.0)
    autocast = fast_bf16(device) if args.autocast is None else args.autocast == "bf16"
    tag = C.device_tag(device)
    env = C.env_info(device)
    base = dict(op=OP, run_id=env["time_utc"], **env)
    print(f"{OP} benchmark on {env['device']} | torch {env['torch']} | commit {env['commit']} | {dtype}"
          f"{' | bf16 autocast' if autocast else ''}")
    all_rows = []
    for block in args.blocks:
        print(f"case {shape} block={block} tokens={tokens}", flush=True)
        try:
            rows = run_case(shape, block, tokens, args.seqs, args.speech_vocab, dtype, device, timing, base, autocast,
                            impls)
        except Exception as exc:  # whatever escapes run_case's own handling: keep the other cases
            traceback.print_exc()
            rows = [dict(case_row(base, impl, block, shape, tokens, args.seqs, dtype, autocast), status="skipped",
                         note=f"case failed: {C.error_note(exc)}") for impl in impls]
        C.append_rows(args.out / f"{tag}.csv", rows)
        all_rows += rows
    print()
    print(C.format_table(all_rows, TABLE))
    print(f"\nrows appended to {args.out / f'{tag}.csv'}")
    return 0 if all(r["status"] == "ok" for r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
