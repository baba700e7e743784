"""Compile the linear kernels for Hopper (sm_90) without a GPU: does it compile, does it spill?

Triton compiles ahead of time for a named target and ships ptxas and cuobjdump, so a CPU
machine can check what a GPU would build: registers, spilled bytes (STACK), shared memory,
and whether the matmuls became wgmma (HGMMA). It runs in its own process, because the
kernels must be imported with ``TRITON_INTERPRET=0``::

    TRITON_INTERPRET=0 python -m attention_proto.ops.linear.aot [--all] [--json]

Default: the study's variants (bf16, K = V = 128, chunk 64, gated and not; the forward in its
default forms, :data:`.chunk.FORWARD_OPTIONS`); ``--all`` adds chunks 32 and 128 and head dims 64
and 256. Exit status 1 when a kernel fails to compile.

Pointer arguments are compiled as 16-byte aligned, as Triton specializes them at a real launch:
without that hint the bf16 tile loads cannot be vectorized and the software pipeliner leaves
them synchronous (different registers, shared memory and loop code from what runs).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _specs(name: str, BT: int, K: int, V: int, G: bool, P: str = "*bf16"):
    from . import chunk, chunk_backward, fused_recurrent

    base = dict(H=16, K=K, V=V, SK=16 * K, SV=16 * V, SG=16, IS_VARLEN=False, HEAD_FIRST=False)
    g = "*fp32" if G else None
    opts = chunk.FORWARD_OPTIONS
    cum = G and opts["gate"] == "cumsum"
    if name in ("chunk_h", "chunk_h_long"):
        return chunk.chunk_fwd_h_kernel, dict(k=P, v=P, g=g, h=P, h0="*fp32", ht="*fp32"), ["T"], [], dict(
            base, BT=BT, USE_G=G, USE_H0=True, STORE_HT=True, PREC="tf32", G_CUM=cum,
            DECAY_K=G and opts["decay_on"] == "k")
    if name == "chunk_o":
        return chunk.chunk_fwd_o_kernel, dict(q=P, k=P, v=P, h=P, g=g, o=P), ["T"], ["scale"], dict(
            base, BT=BT, USE_G=G, PREC="tf32", G_CUM=cum, EARLY=bool(opts["early_loads"]))
    if name == "chunk_cumsum":
        return chunk.chunk_cumsum_kernel, dict(g="*fp32", gc="*fp32"), ["T"], [], dict(
            H=16, SG=16, BT=BT, BH=16, IS_VARLEN=False, HEAD_FIRST=False)
    if name == "chunk_dh":
        return chunk_backward.chunk_bwd_dh_kernel, dict(q=P, do=P, g=g, dh=P, dht="*fp32", dh0="*fp32"), ["T"], \
            ["scale"], dict(base, BT=BT, USE_G=G, USE_DHT=True, STORE_DH0=True, PREC="tf32")
    if name == "chunk_dqk":
        return chunk_backward.chunk_bwd_dqk_kernel, dict(q=P, k=P, v=P, g=g, h=P, do=P, dh=P, dq=P, dk=P, dg=g), \
            ["T", "dg_stride"], ["scale"], dict(base, BT=BT, USE_G=G, STORE_DG=G, PREC="tf32")
    if name == "chunk_dqk_fp32":  # float32 inputs: IEEE dots and dg from the scores (chunk_backward.DG_FROM_SCORES)
        f = "*fp32"
        return chunk_backward.chunk_bwd_dqk_kernel, dict(q=f, k=f, v=f, g=g, h=f, do=f, dh=f, dq=f, dk=f, dg=g), \
            ["T", "dg_stride"], ["scale"], dict(base, BT=BT, USE_G=G, STORE_DG=G, PREC="ieee", DG_SCORES=int(G))
    if name == "chunk_dv":
        return chunk_backward.chunk_bwd_dv_kernel, dict(q=P, k=P, g=g, do=P, dh=P, dv=P), ["T"], ["scale"], dict(
            base, BT=BT, USE_G=G, PREC="tf32")
    if name == "recurrent":
        return fused_recurrent.fused_recurrent_fwd_kernel, dict(q=P, k=P, v=P, g=g, o=P, h0="*fp32", ht="*fp32"), \
            ["T"], ["scale"], dict(base, USE_G=G, USE_H0=True, STORE_HT=True)
    raise KeyError(name)


def compile_one(name: str, BT: int, K: int, V: int, G: bool, cfg: Dict[str, int]) -> Dict:
    """Compile one kernel for sm_90; returns registers, spilled bytes, shared memory, wgmma count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, ptrs, ints, floats, consts = _specs(name, BT, K, V, G)
    consts = dict(consts, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ptrs and ptrs[a] is not None:
            sig[a] = ptrs[a]
        elif a in ints:
            sig[a] = "i32"
        elif a in floats:
            sig[a] = "fp32"
        else:  # absent pointers (cu_seqlens, ...) are None constexprs
            sig[a], consts[a] = "constexpr", None
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"kernel": name, "BT": BT, "K": K, "V": V, "gated": G, **cfg,
            "regs": int(reg.group(1)) if reg else None, "spill_bytes": int(stack.group(1)) if stack else None,
            "smem": k.metadata.shared, "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA")}


def variants(all_: bool) -> List[Tuple[str, int, int, int, bool]]:
    shapes = [(64, 128, 128)] + ([(32, 128, 128), (128, 128, 128), (64, 64, 128), (64, 256, 256)] if all_ else [])
    names = ("chunk_h", "chunk_h_long", "chunk_o", "chunk_dh", "chunk_dqk", "chunk_dv", "recurrent", "chunk_cumsum",
             "chunk_dqk_fp32")
    return [(n, BT, K, V, G) for BT, K, V in shapes for G in (False, True) for n in names
            if (n != "recurrent" or BT == 64) and (n != "chunk_cumsum" or (G and K == 128))
            and (n != "chunk_dqk_fp32" or G)]


def main(argv: List[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET=0 (the kernels must be real Triton JIT functions)", file=sys.stderr)
        return 2
    from . import common

    common.interpreter_mode = lambda: False  # pick the GPU configs
    out, failed = [], 0
    for name, BT, K, V, G in variants("--all" in argv):
        cfg = (dict(num_warps=4, num_stages=1) if name == "chunk_cumsum"   # launched without a config
               else common.kernel_config(name.replace("_fp32", ""), BT, K, V))
        try:
            r = compile_one(name, BT, K, V, G, cfg)
        except Exception as e:  # noqa: BLE001 - report every failure, not only the first
            failed += 1
            r = {"kernel": name, "BT": BT, "K": K, "V": V, "gated": G, **cfg,
                 "error": f"{type(e).__name__}: {str(e)[:500]}"}
        out.append(r)
        if "--json" not in argv:
            print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if "--json" in argv:
        print(json.dumps(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
