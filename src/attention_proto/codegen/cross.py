"""Cross-compile our kernels for Hopper without a GPU, to read their SASS ahead of a GPU run.

Triton's wheel ships ptxas and cuobjdump, and Triton compiles for any target it is given, so the
code of a kernel (not its speed) can be inspected on a CPU-only machine. This needs real JIT
kernels: ``TRITON_INTERPRET=0`` must be set before attention_proto's kernel modules are imported,
i.e. in a fresh process (``python -m attention_proto.codegen.cross`` does that).

:class:`compile_launches` replaces ``KERNEL_CACHE.launch`` for its duration: each launch is
compiled for the target and digested instead of run (outputs stay uninitialised). The host code
still runs, so CPU tensors of the right shapes and explicit configs (the GPU tiles, not the
interpreter's 16 x 16 ones) give the kernels a GPU run would compile. TMA descriptors built on the
host need a GPU and are out of reach here.

Usage::

    python -m attention_proto.codegen.cross [--arch 90] [--json out.json]
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .collect import KernelCode, analyze_cubin


def compile_for(kernel: Any, args: tuple, kwargs: Dict[str, Any], arch: int = 90) -> Any:
    """Compile ``kernel[grid](*args, **kwargs)`` for ``sm_<arch>`` as Triton's launcher would; returns
    the ``CompiledKernel`` (not loaded: registers and spills come from its SASS)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a JIT kernel: set TRITON_INTERPRET=0 before importing attention_proto")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


class compile_launches:
    """Context manager: launches through ``KERNEL_CACHE`` are compiled for ``arch`` and digested, not run."""

    def __init__(self, arch: int = 90) -> None:
        from ..runtime.cache import KERNEL_CACHE

        self.cache, self.arch = KERNEL_CACHE, arch
        self.kernels: List[KernelCode] = []
        self._seen: Dict[Any, KernelCode] = {}

    def __enter__(self) -> "compile_launches":
        def launch(kernel, grid, *args, **kw):
            key = self.cache.key(kernel, args, kw)
            if key in self._seen:
                return None
            ck = compile_for(kernel, args, kw, self.arch)
            md = ck.metadata
            kc = analyze_cubin(md.name, ck.asm["cubin"], "cross_compile",
                               meta={"shared": md.shared, "num_warps": md.num_warps, "num_stages": md.num_stages},
                               ptx=ck.asm.get("ptx"))
            kc.config = {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))}
            self._seen[key] = kc
            self.kernels.append(kc)
            return None

        self.cache.launch = launch
        return self

    def __exit__(self, *exc) -> bool:
        self.cache.__dict__.pop("launch", None)
        return False


def preview(arch: int = 90, D: int = 128, N: int = 512) -> Dict[str, List[Dict[str, Any]]]:
    """Our dense forward (portable path: the GPU heuristic's tile for D128 first) and backward (its
    first sweep candidates, the first being the GPU default) at D, compiled for
    ``sm_<arch>``; kernel digests by entry point. Shapes only need to be representative of the
    specialization (N's divisibility), not of a benchmark."""
    import torch

    from ..ops.dense.configs import FwdConfig

    out: Dict[str, List[Dict[str, Any]]] = {}
    dt = torch.bfloat16
    q, k, v = (torch.randn(1, 2, N, D, dtype=dt) for _ in range(3))
    fwd_cfgs = {"portable 128x64 w8 s3": FwdConfig(128, 64, 8, 3, "portable"),
                "portable 128x128 w8 s2": FwdConfig(128, 128, 8, 2, "portable"),
                "portable 64x64 w4 s3": FwdConfig(64, 64, 4, 3, "portable"),
                "tma 128x64 w8 s3": FwdConfig(128, 64, 8, 3, "tma"),
                "tma+ws 128x64 w8 s3": FwdConfig(128, 64, 8, 3, "tma+ws")}
    from ..ops.dense.forward import flash_attention_forward

    for causal in (False, True):
        for name, cfg in fwd_cfgs.items():
            key = f"attn_fwd {name}{' causal' if causal else ''}"
            try:
                with compile_launches(arch) as cl:
                    flash_attention_forward(q, k, v, causal=causal, config=cfg)
                out[key] = [kc.digest() for kc in cl.kernels]
            except Exception as e:  # noqa: BLE001 - e.g. a path whose host side needs a GPU
                out[key] = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
    try:
        from ..ops.dense.backward import bwd_config_candidates, flash_attention_backward

        o = torch.randn_like(q)
        lse = torch.randn(1, 2, N, dtype=torch.float32)
        for cfg in bwd_config_candidates(D)[:3]:  # the first one is what a GPU picks without a sweep
            for causal in (False, True):
                with compile_launches(arch) as cl:
                    flash_attention_backward(torch.randn_like(o), q, k, v, o, lse, causal=causal, config=cfg)
                name = f"attn_bwd {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"
                out[name + (" causal" if causal else "")] = [kc.digest() for kc in cl.kernels]
    except Exception as e:  # noqa: BLE001 - a preview reports what it could not do
        out["attn_bwd"] = [{"error": f"{type(e).__name__}: {e}"}]
    return out


def _line(name: str, d: Dict[str, Any]) -> str:
    if "error" in d and "name" not in d:
        return f"{name}: ERROR {d['error']}"
    ml = d.get("main_loop") or {}
    tot = d.get("total") or {}
    occ = d.get("occupancy") or {}
    return (f"{name:34s} {d.get('name', '?'):18s} HGMMA {ml.get('HGMMA', 0):>3}/{tot.get('HGMMA', 0):<3} "
            f"HMMA {ml.get('HMMA', 0):>3}/{tot.get('HMMA', 0):<3} FFMA {ml.get('FFMA', 0):>4}/{tot.get('FFMA', 0):<4} "
            f"EX2 {ml.get('MUFU.EX2', 0):>3} LDG {tot.get('LDG', 0):>3} LDGSTS {tot.get('LDGSTS', 0):>3} "
            f"spill {d.get('spill_bytes')} regs {d.get('registers')} smem {d.get('shared_bytes')} "
            f"warps/SM {occ.get('warps_per_sm')} ({occ.get('limiter')})")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Cross-compile our kernels for Hopper and print their SASS digest")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the digests here")
    args = ap.parse_args(argv)
    res = preview(args.arch, args.D)
    for name, kernels in res.items():
        for d in kernels:
            print(_line(name, d))
    if args.json:
        from ..kb.store import _clean

        with open(args.json, "w") as f:
            json.dump(_clean(res), f, indent=1)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") not in ("0",):
        raise SystemExit("run with TRITON_INTERPRET=0 (the kernels must be JIT functions, not interpreted)")
    raise SystemExit(main())
