"""GPU timing: CUDA events via triton.testing.do_bench, median with p20/p80.

do_bench clears the L2 cache (it writes a 256 MB buffer) before every timed
repetition, so repeated runs do not measure the cache. Kernels shorter than
``SHORT_KERNEL_MS`` are dominated by launch overhead: the result carries a
warning. Under Triton's interpreter there is nothing worth timing; callers
should check :func:`attention_proto.runtime.device.interpreter_mode` first.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

SHORT_KERNEL_MS = 0.02


class ShortKernelWarning(UserWarning):
    """A timed region was too short to rise above launch overhead."""


@dataclass
class Timing:
    ms_median: float
    ms_p20: float
    ms_p80: float
    warnings: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ms_median": self.ms_median, "ms_p20": self.ms_p20, "ms_p80": self.ms_p80}


def bench(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Median/p20/p80 milliseconds of ``fn`` on the current CUDA device."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return _timing(*(float(x) for x in q))


def _timing(med: float, p20: float, p80: float) -> Timing:
    """A Timing, with the short-kernel warning (attached and raised) when the median is near launch overhead."""
    t = Timing(med, p20, p80)
    if med < SHORT_KERNEL_MS:
        msg = f"timed region of {med * 1000:.1f} us is close to launch overhead; the number is mostly overhead"
        t.warnings.append(msg)
        warnings.warn(msg, ShortKernelWarning, stacklevel=3)
    return t


_FLUSH: dict = {}  # device -> (the 256 MB buffer read to empty L2, a scalar sink); kept for the process
MAX_CLEAN_REPS = 1000


def _l2_flush(flush_bytes: int) -> Callable[[], object]:
    """A call that empties L2 by reading ``flush_bytes`` (buffer kept per device for the process)."""
    import torch

    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        buf = torch.ones(flush_bytes // 4, dtype=torch.float32, device="cuda")
        _FLUSH[dev] = (buf, torch.empty((), dtype=torch.float32, device="cuda"))
    buf, sink = _FLUSH[dev]
    return lambda: torch.sum(buf, dim=0, out=sink)


def bench_clean_l2(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
                   flush_bytes: int = 256 * 2**20) -> Timing:
    """:func:`bench` with the L2 cache emptied by *reading* ``flush_bytes`` before each repetition.

    do_bench empties L2 by writing a 256 MB buffer, so the timed region starts with L2 full of
    dirty lines (~50 MB on an H100) that its own reads evict and write back: a fixed tax of
    ~15 us, 10-25% of a memory-bound kernel reading ~100 MB (paged decode at B8 N4k). A read
    leaves clean lines: the timed kernel starts as cold, with nothing of another's to write.
    Same estimate / warm-up / repeat scheme as do_bench, events around ``fn`` only.
    """
    import torch

    flush = _l2_flush(flush_bytes)

    def timed(n: int) -> List[float]:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in ev:
            flush()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]

    fn()
    torch.cuda.synchronize()
    # repetitions sized by the flush + call time, as do_bench sizes its own (its estimate includes its
    # cache clear), and capped: a 20 us kernel beside an ~85 us flush would otherwise repeat thousands of times
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    timed(5)
    s1.record()
    torch.cuda.synchronize()
    est = max(s0.elapsed_time(s1) / 5, 1e-3)
    timed(min(MAX_CLEAN_REPS, max(1, int(warmup_ms / est))))
    ts = sorted(timed(min(MAX_CLEAN_REPS, max(1, int(rep_ms / est)))))
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return _timing(statistics.median(ts), q[1], q[7])


def kernel_times_clean_l2(fn: Callable[[], object], reps: int = 30, flush_bytes: int = 256 * 2**20) -> Dict[str, float]:
    """Mean GPU duration (us, CUPTI via torch.profiler) of each kernel ``fn`` launches, by kernel name,
    with L2 emptied by reading ``flush_bytes`` before every call (the flush's own reduction kernel is
    left out). What a wall time hides: how much is each kernel and how much is launch and replay."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    flush = _l2_flush(flush_bytes)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush()
            fn()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as ref:  # the flush alone: its kernel names
        flush()
        torch.cuda.synchronize()
    flush_names = {e.key for e in ref.key_averages() if e.device_time_total > 0}
    return {e.key: e.device_time_total / e.count for e in prof.key_averages()
            if e.device_time_total > 0 and e.count and e.key not in flush_names}


def wall_time_per_call(fn: Callable[[], object], calls: int = 2000, sync: Optional[Callable[[], None]] = None) -> float:
    """Host wall time per call in microseconds (no CUDA graph): the host-overhead measure."""
    for _ in range(min(50, calls)):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
    return statistics.median(samples)


def attention_flops(B: int, H: int, Nq: int, Nk: int, D: int, causal: bool, Dv: Optional[int] = None, mode: str = "fwd") -> float:
    """FLOPs counted as the anchors do: 4*B*H*Nq*Nk*D forward, half when causal, 3.5x for fwd+bwd.

    For causal with Nq != Nk, only the allowed (bottom-right) pairs are counted.
    """
    Dv = D if Dv is None else Dv
    if causal:
        off = Nk - Nq
        # number of (i, j) with j <= i + off, 0 <= j < Nk
        pairs = sum(min(Nk, max(0, i + off + 1)) for i in range(Nq))
    else:
        pairs = Nq * Nk
    f = 2.0 * B * H * pairs * (D + Dv)
    if causal and Nq == Nk:
        # match the anchors' convention exactly: half of the full count
        f = 2.0 * B * H * Nq * Nk * (D + Dv) / 2
    return f * (3.5 if mode == "fwd_bwd" else (2.5 if mode == "bwd" else 1.0))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
