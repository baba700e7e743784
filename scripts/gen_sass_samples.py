#!/usr/bin/env python
"""Write small, real ``cuobjdump -sass`` samples into ``tests/data/sass/`` for the SASS parser tests.

Each sample is one tiny Triton kernel compiled for Hopper (sm_90) whose code shows one thing the
codegen study counts:

- ``gen_hgmma_dot``: a bf16 ``tl.dot`` K-loop with 4 warps (one warpgroup) -> wgmma (HGMMA) in the loop;
- ``gen_hmma_dot``: the same dot with 1 warp -> Triton falls back to mma.sync (HMMA);
- ``gen_ffma_loop``: an fp32 online-max/exp2 loop without dots -> FFMA and MUFU.EX2, no MMA;
- ``gen_spill``: an 8x32 fp32 tile and its accumulator live in one warp under ``maxnreg`` -> LDL/STL spills;
- ``gen_tma_load``: loads through a device-side tensor descriptor in a loop -> UTMALDG.

Files written per sample: ``<name>.sass`` (``cuobjdump -res-usage -sass``, trimmed: the encoding
comments dropped, so a sample is a few KB), ``<name>.ptx`` (Triton's PTX without debug sections) and
``<name>.json`` (what the compiler reported:
registers, spills, shared memory, warps; plus what the sample is meant to show). The parser tests
(``tests/test_codegen_sass.py``) and the codegen study check the sidecar's ``expect`` (the qualitative
facts above) on every sample present.

Runs on the GPU machine (compiles for the GPU present) and also without a GPU: Triton's bundled
ptxas/cuobjdump cross-compile for sm_90 (``--arch 90``). Usage::

    .venv/bin/python scripts/gen_sass_samples.py [--out tests/data/sass] [--arch 90]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# kernels below must be real JIT functions, also on a machine without a GPU (cross-compiling)
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@triton.jit
def _dot_loop(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(B + (k0 + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def hgmma_dot(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    _dot_loop(A, B, C, K, BM, BN, BK)


@triton.jit
def hmma_dot(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # the same loop; with one warp there is no warpgroup, so no wgmma
    _dot_loop(A, B, C, K, BM, BN, BK)


@triton.jit
def ffma_loop(X, Y, N, BLOCK: tl.constexpr):
    # an online max / sum of exp2 (softmax's running statistics) without any dot
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for n0 in range(0, N, BLOCK):
        x = tl.load(X + n0 + offs)
        m_new = tl.maximum(m, x)
        s = s * tl.exp2(m - m_new) + tl.exp2(x - m_new) * 1.4426950408889634
        m = m_new
    tl.store(Y + offs, s)


@triton.jit
def spill(X, Y, N, BM: tl.constexpr, BN: tl.constexpr):
    # a [BM, BN] fp32 tile in one warp is BM*BN/32 live values per thread: more than maxnreg allows
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    x = tl.load(X + rm[:, None] * BN + rn[None, :])
    acc = x
    for i in range(0, N):
        w = tl.load(X + i * BN + rn)
        acc = acc * w[None, :] + x
    tl.store(Y + rm[:, None] * BN + rn[None, :], acc + tl.sum(x, axis=1)[:, None])


@triton.jit
def tma_load(X, Y, M, BM: tl.constexpr, BN: tl.constexpr):
    desc = tl.make_tensor_descriptor(X, shape=[M, BN], strides=[BN, 1], block_shape=[BM, BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for m0 in range(0, M, BM):
        acc += desc.load([m0, 0]).to(tl.float32)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    tl.store(Y + rm[:, None] * BN + rn[None, :], acc)


#: name -> (kernel, signature, constexprs, options, what it shows, expectations checked by the tests)
SAMPLES = {
    "gen_hgmma_dot": (hgmma_dot, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32"},
                      {"BM": 64, "BN": 16, "BK": 16}, {"num_warps": 4, "num_stages": 2},
                      "bf16 tl.dot in a K loop, 4 warps: HGMMA (wgmma) in the loop",
                      {"main_loop/HGMMA": ">0", "total/HMMA": "==0", "local_bytes": "==0", "registers": ">0",
                       "ptx/wgmma": ">0", "ptx/mma.sync": "==0"}),
    "gen_hmma_dot": (hmma_dot, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32"},
                     {"BM": 16, "BN": 16, "BK": 16}, {"num_warps": 1, "num_stages": 1},
                     "bf16 tl.dot with 1 warp: mma.sync (HMMA) in the loop, no HGMMA",
                     {"main_loop/HMMA": ">0", "total/HGMMA": "==0", "local_bytes": "==0",
                      "ptx/mma.sync": ">0", "ptx/wgmma": "==0"}),
    "gen_ffma_loop": (ffma_loop, {"X": "*fp32", "Y": "*fp32", "N": "i32"}, {"BLOCK": 128},
                      {"num_warps": 4, "num_stages": 1},
                      "fp32 online max / exp2 sum: FFMA and MUFU.EX2 in the loop, no MMA",
                      {"main_loop/FFMA": ">0", "main_loop/MUFU.EX2": ">0", "total/HGMMA": "==0", "total/HMMA": "==0",
                       "local_bytes": "==0", "ptx/ex2": ">0", "ptx/wgmma": "==0"}),
    "gen_spill": (spill, {"X": "*fp32", "Y": "*fp32", "N": "i32"}, {"BM": 8, "BN": 32},
                  {"num_warps": 1, "num_stages": 1, "maxnreg": 16},
                  "an 8x32 fp32 tile and its accumulator live in one warp under maxnreg=16 (ptxas raises it "
                  "to its floor of 24): local-memory spills (LDL/STL)",
                  {"local_bytes": ">0", "total/STL": ">0", "total/LDL": ">0", "main_loop/FFMA": ">0"}),
    "gen_tma_load": (tma_load, {"X": "*bf16", "Y": "*fp32", "M": "i32"}, {"BM": 16, "BN": 16},
                     {"num_warps": 4, "num_stages": 2},
                     "loads through a device-side tensor descriptor: UTMALDG in the loop, no LDG",
                     {"main_loop/UTMALDG": ">0", "total/LDG": "==0", "n_loops": ">=1", "ptx/tma_load": ">0",
                      "ptx/ld.global": "==0"}),
}


def cuobjdump_path() -> str:
    return triton.knobs.nvidia.cuobjdump.path


def trim(text: str) -> str:
    """Drop the encoding comments (half the bytes) and collapse the instruction lines' padding."""
    out = []
    for line in text.splitlines():
        if re.match(r"^\s*/\* 0x[0-9a-f]+ \*/\s*$", line):
            continue
        line = re.sub(r"\s*/\* 0x[0-9a-f]{16} \*/\s*$", "", line)
        line = re.sub(r"^(\s*/\*[0-9a-f]{4,}\*/)\s+", r"\1 ", line)
        out.append(line.rstrip())
    return "\n".join(out).strip("\n") + "\n"


def trim_ptx(ptx: str) -> str:
    """Drop PTX's debug sections and comments (``.section .debug_*``, ``//`` lines): keeps the code."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("//")).strip() + "\n"


def current_target(arch: int | None) -> tuple[GPUTarget, str]:
    """The GPU present (unless ``arch`` is given), else Hopper; and where the code was compiled."""
    if arch is None:
        try:
            import torch

            if torch.cuda.is_available():
                return triton.runtime.driver.active.get_current_target(), f"gpu: {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - no usable GPU: cross-compile
            pass
        arch = 90
    return GPUTarget("cuda", arch, 32), "cross-compiled (ptxas from the triton wheel)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "sass")
    ap.add_argument("--arch", type=int, default=None, help="compute capability x10 (default: the GPU present, else 90)")
    ap.add_argument("--cubin", action="store_true", help="also keep each sample's cubin (<name>.cubin)")
    args = ap.parse_args(argv)
    target, where = current_target(args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    tool = cuobjdump_path()
    for name, (fn, sig, consts, opts, what, expect) in SAMPLES.items():
        sig = dict(sig)
        sig.update({k: "constexpr" for k in consts})
        ck = triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(opts))
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(ck.asm["cubin"])
            if args.cubin:
                (args.out / f"{name}.cubin").write_bytes(ck.asm["cubin"])
            text = subprocess.run([tool, "-res-usage", "-sass", str(cubin)], check=True, capture_output=True,
                                  text=True).stdout
        sass = trim(text)
        (args.out / f"{name}.sass").write_text(sass)
        (args.out / f"{name}.ptx").write_text(trim_ptx(ck.asm["ptx"]))
        md = ck.metadata
        meta = {
            "name": md.name, "what": what, "arch": f"sm_{target.arch}", "compiled": where,
            "triton": triton.__version__,
            "num_warps": md.num_warps, "shared": md.shared, "options": opts, "constexprs": consts,
            "expect": {"*": expect},
        }
        try:  # registers and spills come from the driver: only where a GPU loaded the cubin
            meta.update(n_regs=ck.n_regs, n_spills=ck.n_spills)
        except Exception:  # noqa: BLE001
            pass
        (args.out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {len(sass)} bytes, {sass.count(chr(10))} lines -> {args.out / (name + '.sass')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
