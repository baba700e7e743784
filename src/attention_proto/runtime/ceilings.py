"""The two measured ceilings every GPU run takes: bf16 matmul TFLOPS and device copy GB/s.

A kernel's efficiency is quoted as its rate over these, measured in the same
run on the same card (datasheet peaks are leads, not bars).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from .timing import Timing, bench

MATMUL_N = 8192
COPY_BYTES = 2 * 2**30


def measure_matmul(n: int = MATMUL_N) -> tuple[float, Timing]:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: torch.matmul(a, b, out=c), warmup_ms=100, rep_ms=300)
    return 2.0 * n**3 / (t.ms_median * 1e-3) / 1e12, t


def measure_copy(nbytes: int = COPY_BYTES) -> tuple[float, Timing]:
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup_ms=100, rep_ms=300)
    # bytes read + bytes written
    return 2.0 * nbytes / (t.ms_median * 1e-3) / 1e9, t


def measure_ceilings() -> Dict[str, Any]:
    """{'matmul_tflops', 'copy_gbps', plus timings}; empty under the interpreter."""
    if not torch.cuda.is_available():
        return {}
    mm, tm = measure_matmul()
    cp, tc = measure_copy()
    return {
        "matmul_tflops": mm, "matmul_shape": [MATMUL_N] * 3, "matmul_ms": tm.as_dict(),
        "copy_gbps": cp, "copy_bytes": COPY_BYTES, "copy_ms": tc.as_dict(),
    }
