"""Compiles every Triton kernel of mdus_kernels for Hopper (sm_90) on a machine without a GPU, and reports each
compiled variant's registers, spills (``ptxas -v``) and shared memory.

    python scripts/check_sm90.py [--quick]

The Triton launchers run as they would on a GPU (the autotuned attention kernels once per candidate config the
pruning keeps, the fixed configs of ``deterministic=True`` too) on CPU tensors of GPU dtypes, with Triton's
driver replaced by a stand-in that names an sm_90 target and a ``JITFunction.run`` that compiles (PTX, then
ptxas to a cubin) instead of launching. So a kernel that would not compile on an H100/H200, or a config that spills
registers to local memory or needs more shared memory than a Hopper block may have, shows up here, before a GPU
session spends its time on it. Nothing runs: the numbers the launchers produce are not looked at.

Exit status 1 if any variant failed to compile, spilled, or exceeded the shared memory. ``--quick`` compiles a
smaller set (the test suite's check).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path

import torch

HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


def _install_compile_only_driver():
    """Triton's driver and launches replaced: every launch compiles for sm_90 and records the kernel."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    compiled: list[tuple[str, dict, object]] = []
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        meta = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        compiled.append((self.fn.__name__, meta, kernel))
        return kernel

    def every_config(self, *args, **kwargs):  # Autotuner.run: each config the pruning keeps, instead of a benchmark
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    jit.JITFunction.run = compile_only
    autotuner.Autotuner.run = every_config
    return compiled


def _resources(kernel) -> dict:
    """Registers, spill stores / loads and stack frame bytes of a compiled kernel, from ``ptxas -v`` on its PTX
    with the ptxas Triton itself uses for sm_90, and its shared memory (static and dynamic) from Triton."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "-o", os.devnull, f.name],
                             capture_output=True, text=True, check=True)
    text = run.stdout + run.stderr
    field = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"REG": field(r"Used (\d+) registers"), "SPILL": field(r"(\d+) bytes spill stores")
            + field(r"(\d+) bytes spill loads"), "STACK": field(r"(\d+) bytes stack frame"),
            "SHARED": int(kernel.metadata.shared)}


def _attention_calls(quick: bool):
    from mdus_kernels.ops import attention as A

    dims = [64, 128] if quick else [16, 64, 80, 128, 256]
    dtypes = [torch.bfloat16, torch.float32] if quick else [torch.bfloat16, torch.float16, torch.float32]
    for d in dims:
        for dtype in dtypes:
            if quick and dtype == torch.float32 and d != 64:
                continue
            for causal, prefix in ((True, False), (True, True), (False, False)):
                if quick and not causal:
                    continue
                for deterministic in (False, True):
                    q = torch.randn(64, 4, d, dtype=dtype)
                    k = v = torch.randn(64, 2, d, dtype=dtype)
                    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
                    pre = torch.tensor([5, 9], dtype=torch.int32) if prefix else None
                    name = f"attention D={d} {str(dtype)[6:]} causal={causal} prefix={prefix} det={deterministic}"
                    yield name, partial(A.attention_fwd_triton, q, k, v, cu, cu, pre, 34, causal, 0.1, deterministic)
                    dlse = torch.randn(4, 64) if deterministic else None  # with and without d(lse)
                    yield name + " bwd", partial(A.attention_bwd_triton, torch.randn_like(q), dlse, q, k, v,
                                                 torch.randn_like(q), torch.randn(4, 64), cu, cu, pre, 34, 34,
                                                 causal, 0.1, deterministic)


def _patch_pool_calls(quick: bool):
    from mdus_kernels.ops import patch_pool as P

    for d in ([1024] if quick else [64, 1000, 1024, 2048, 4096]):
        for dtype in ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]):
            for reduce in ("mean", "max") if quick else ("mean", "max", "min", "sum"):
                x = torch.randn(100, d, dtype=dtype)
                off = torch.tensor([0, 3, 50, 100], dtype=torch.int32)
                pooled = torch.randn(3, d, dtype=dtype)
                yield f"patch_pool D={d} {str(dtype)[6:]} {reduce}", partial(P.patch_pool_fwd, x, off, reduce)
                yield f"patch_unpool D={d} {str(dtype)[6:]} {reduce}", partial(P.patch_unpool_fwd, pooled, off, 100,
                                                                               reduce, x, pooled)


def _cgmlp_calls(quick: bool):
    from mdus_kernels.ops import cgmlp as G

    for c in ([768] if quick else [8, 768, 1536, 3072]):
        for dtype in ([torch.bfloat16] if quick else [torch.bfloat16, torch.float32]):
            for ln, gate in ((True, True), (False, False)):
                x = torch.randn(50, 2 * c if gate else c, dtype=dtype)
                w, b = torch.randn(c, 31), torch.randn(c)
                cu = torch.tensor([0, 20, 50], dtype=torch.int32)
                norm = (torch.ones(c), torch.zeros(c), 1e-5) if ln else None
                name = f"cgmlp C={c} {str(dtype)[6:]} ln={ln} gate={gate}"
                yield name, partial(G.dwconv_fwd, x, w, b, cu, None, True, ln=norm, gate=gate)
                stats = (torch.ones(c), torch.zeros(c), torch.zeros(50), torch.ones(50)) if ln else None
                yield name + " bwd", partial(G.dwconv_bwd, torch.randn(50, c, dtype=dtype), x, w, b, cu, None, True,
                                             ln=stats, gate=gate)


def _loss_calls(quick: bool):
    from mdus_kernels.ops import linear_cross_entropy as L

    for v in ([49152] if quick else [100, 49152, 62344]):
        logits = torch.randn(8, v)
        labels = torch.randint(0, v, (8,))
        for smooth, softcap in ((0.0, 0.0), (0.1, 30.0)):
            yield f"ce_rows V={v} smooth={smooth} softcap={softcap}", partial(
                L.ce_rows_triton_, logits, labels, -100, smooth, softcap, None, True)
        yield f"kl_rows V={v}", partial(L.kl_rows_triton_, logits, torch.randn(8, v), torch.ones(8, dtype=torch.bool),
                                        1.0, None, True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller set of variants (the test suite's check)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    compiled = _install_compile_only_driver()
    failures, seen = [], set()
    groups = (_patch_pool_calls, _attention_calls, _cgmlp_calls, _loss_calls)
    for name, call in (c for group in groups for c in group(args.quick)):
        start = len(compiled)
        try:
            call()
        except Exception as exc:  # a compile error: the launch (and the kernel it needed) is named
            traceback.print_exc(limit=-3)
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
            continue
        for kernel_name, meta, kernel in compiled[start:]:
            key = id(kernel)  # the JIT caches (and keeps) one kernel per specialization
            if key in seen:
                continue
            seen.add(key)
            use = _resources(kernel)
            config = " ".join(f"{k}={v}" for k, v in sorted(meta.items()))
            print(f"{kernel_name:26s} REG {use['REG']:3d}  SPILL {use['SPILL']:5d}  STACK {use['STACK']:5d}  "
                  f"SHARED {use['SHARED']:6d}  ({name}; {config})")
            if use["SPILL"]:
                failures.append(f"{name}: {kernel_name} ({config}) spills {use['SPILL']} bytes of registers")
            if use["SHARED"] > HOPPER_SHARED_BYTES:
                failures.append(f"{name}: {kernel_name} ({config}) needs {use['SHARED']} bytes of shared memory")
    print(f"\n{len(seen)} kernel variants compiled for sm_90")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
