"""The two measured ceilings every GPU run takes: bf16 matmul TFLOPS and device copy GB/s.

A kernel's efficiency is quoted as its rate over these, measured in the same
run on the same card (datasheet peaks are leads, not bars).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

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


_READ_KERNEL: list = []


def _read_kernel():
    """A trivial streaming read (defined on first use: after attention_proto chose the interpreter or not)."""
    if not _READ_KERNEL:
        import triton
        import triton.language as tl

        @triton.jit
        def read_stream_kernel(X, Out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
            pid = tl.program_id(0)
            acc = tl.zeros([BLOCK], tl.float32)
            base = pid.to(tl.int64) * BLOCK * ITERS
            for i in range(ITERS):
                offs = base + i * BLOCK + tl.arange(0, BLOCK)
                acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
            tl.store(Out + pid, tl.sum(acc, 0))

        _READ_KERNEL.append(read_stream_kernel)
    return _READ_KERNEL[0]


def read_stream_fn(nbytes: int, device: str) -> Callable[[], Any]:
    """A call that streams ``nbytes`` of contiguous 16-bit data (one fp32 written per program).

    The best any kernel can do reading that many bytes once: a size-matched companion to the copy
    ceiling, which is measured on 2 GiB and so hides the fixed costs (launch, ramp-up, the write-back
    of the L2 lines the timing protocol's cache flush left dirty) that weigh on a ~100 MB read."""
    import triton

    from .cache import KERNEL_CACHE

    gpu = device == "cuda"
    n = max(1, nbytes // 2)
    x = torch.ones(n, dtype=torch.bfloat16 if gpu else torch.float16, device=device)
    block, iters = (4096, 8) if gpu else (64, 2)
    grid = (triton.cdiv(n, block * iters),)
    out = torch.empty(grid[0], dtype=torch.float32, device=device)
    return lambda: KERNEL_CACHE.launch(_read_kernel(), grid, x, out, n, BLOCK=block, ITERS=iters,
                                       num_warps=8 if gpu else 4, num_stages=3 if gpu else 1)


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
