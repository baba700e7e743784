"""Study 3 (`paged`): PagedAttention decode, bandwidth against the copy ceiling.

Rate = unique KV bytes read / time (K and V of every token of every sequence),
against the copy ceiling measured in the same run. bf16, GQA 32:8, D=128 and
page 16 unless a sweep says otherwise; pools are scattered (shuffled block
tables); ours runs with ``check_inputs=False`` (no host sync), as a serving
loop would. Every implementation is timed as a replayed CUDA graph (decode
kernels last tens of microseconds; host overhead is measured on its own).

On a GPU (full mode aimed at ~90 s on an H100; every section logs its time;
:class:`Sweep` holds every shape):
- grid (B x N): V1, V2 (dispatch's partition count), auto, and the peers on
  contiguous K/V ``[B, Hkv, N, D]``: SDPA cuDNN and SDPA FLASH (enable_gqa);
  a V2 partition sweep at small batches (B <= 8): how the count should scale;
- the bar shapes again with L2 emptied by a read (and a trivial read of the same bytes), and at
  B8 N4k each kernel's GPU time (CUPTI) against the read's: where the time beyond the read goes;
- host time per eager call (checks on / off) against SDPA cuDNN;
- page sizes 8..256 at B8 N32k, against ours on one page per sequence
  (contiguous), with the compiled kernels' shared memory / registers;
- mixed lengths in one batch (SDPA pads to the longest), MHA 32:32, D=64;
- FlexAttention decoding at a bar shape; a small tile-config sweep.
Under the interpreter: correctness of V1/V2/auto against the float64 reference
at tiny shapes (fp16/fp32, shuffled pages, modifiers) and a short decode loop.
Findings: :mod:`attention_proto.studies.paged_findings`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import peers
from .base import Finding, RunData, Study, StudyContext
from .paged_findings import CLEAN_SWEEP, OP, OURS


@dataclass
class Sweep:
    """Every shape the GPU half measures (one place to trim when the run is too long)."""

    grid: List[Tuple[int, int]]
    part_counts: Tuple[int, ...]
    part_sweep_max_b: int
    page_shape: Tuple[int, int]
    pages: Tuple[int, ...]
    mixed: Tuple[int, int, int]  # (B, shortest, longest), log-uniform lengths
    mha: Tuple[int, int]
    d64: Tuple[int, int]
    flex: List[Tuple[int, int]]
    configs: List[Tuple[int, int, int]]  # (BLOCK_N, num_warps, num_stages)
    config_shape: Tuple[int, int]
    Hq: int = 32
    Hkv: int = 8
    D: int = 128
    page: int = 16
    dtype: torch.dtype = torch.bfloat16  # fp16 only for the CPU dry run (no bf16 math in the interpreter)
    check_lens: Tuple[int, ...] = (1, 300, 1000, 2048, 4099, 777)  # the bf16 correctness check
    host_shape: Tuple[int, int] = (1, 512)  # tiny: the wall time per call is the host's
    host_calls: int = 500
    bench_ms: Tuple[float, float] = (10.0, 40.0)  # warmup, rep
    # the bar shapes, where a trivial read of the same bytes is timed beside ours (a size-matched ceiling)
    stream_shapes: Tuple[Tuple[int, int], ...] = ((1, 65536), (8, 4096), (8, 32768), (32, 4096), (32, 32768),
                                                  (128, 4096))
    # the bar shape whose time is taken apart by kernel (CUPTI durations, L2 emptied by a read); None: skip
    breakdown_shape: Optional[Tuple[int, int]] = (8, 4096)

    @staticmethod
    def full() -> "Sweep":
        return Sweep(
            grid=[(1, 4096), (1, 16384), (1, 65536), (1, 131072), (8, 1024), (8, 4096), (8, 32768), (8, 131072),
                  (32, 1024), (32, 4096), (32, 32768), (128, 1024), (128, 4096), (128, 8192)],
            part_counts=(2, 8, 32, 128), part_sweep_max_b=8,
            page_shape=(8, 32768), pages=(8, 16, 32, 64, 128, 256),
            mixed=(32, 1024, 32768), mha=(8, 4096), d64=(8, 32768),
            flex=[(8, 32768)],
            # the page-id load takes a pipeline stage: 5 stages give two K/V buffers, 7 give three
            configs=[(32, 4, 5), (64, 4, 3), (64, 4, 5), (64, 4, 7), (128, 8, 5)], config_shape=(8, 32768),
        )

    @staticmethod
    def quick() -> "Sweep":
        return Sweep(
            grid=[(1, 65536), (8, 4096), (8, 32768), (32, 4096), (128, 4096)],
            part_counts=(8, 32), part_sweep_max_b=8,
            page_shape=(8, 32768), pages=(8, 16, 64, 256),
            mixed=(32, 1024, 32768), mha=(8, 4096), d64=(8, 32768),
            flex=[], configs=[], config_shape=(8, 32768),
        )

    def max_tokens(self) -> int:
        lo, hi = self.mixed[1], self.mixed[2]
        cands = [B * N for B, N in self.grid] + [self.page_shape[0] * self.page_shape[1], self.mixed[0] * hi,
                                                  self.mha[0] * self.mha[1] * (self.Hq // self.Hkv), self.d64[0] * self.d64[1]]
        return max(cands)


def _protocol(clean: bool) -> str:
    return "clean_l2 (L2 emptied by a 256 MB read)" if clean else "do_bench (L2 emptied by a 256 MB write)"


def _kv_bytes(lens: Sequence[int], Hkv: int, D: int, elem: int = 2) -> float:
    return 2.0 * sum(lens) * Hkv * D * elem


class _Pools:
    """Flat random buffers, viewed as page pools or contiguous K/V of any shape (no re-allocation)."""

    def __init__(self, elems: int, device: str, dtype=torch.bfloat16) -> None:
        g = torch.Generator(device=device)
        g.manual_seed(1234)
        self.k = torch.randn(elems, device=device, dtype=dtype, generator=g)
        self.v = torch.randn(elems, device=device, dtype=dtype, generator=g)
        self.kc = torch.randn(elems, device=device, dtype=dtype, generator=g)
        self.vc = torch.randn(elems, device=device, dtype=dtype, generator=g)

    def pool(self, tokens: int, page: int, Hkv: int, D: int):
        n = (tokens // page) * page * Hkv * D
        shape = (tokens // page, page, Hkv, D)
        return self.k[:n].view(shape), self.v[:n].view(shape)

    def contiguous(self, B: int, Hkv: int, N: int, D: int):
        n = B * Hkv * N * D
        return self.kc[:n].view(B, Hkv, N, D), self.vc[:n].view(B, Hkv, N, D)


def _mixed_lengths(B: int, lo: int, hi: int, gen: torch.Generator) -> List[int]:
    """B lengths drawn log-uniformly from [lo, hi]; the first is hi (padding reads up to the longest)."""
    u = torch.rand(B, generator=gen)
    lens = [int(round(math.exp(math.log(lo) + float(x) * (math.log(hi) - math.log(lo))))) for x in u]
    lens[0] = hi
    return lens


def _block_table(lens: Sequence[int], page: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Each sequence's pages, drawn from a shuffled pool holding exactly the batch's pages."""
    need = [-(-n // page) for n in lens]
    perm = torch.randperm(sum(need), generator=gen)
    bt = torch.zeros(len(lens), max(need), dtype=torch.int32)
    o = 0
    for b, k in enumerate(need):
        bt[b, :k] = perm[o:o + k]
        o += k
    return bt.to(device)


def _graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up that compiles); returns the replay."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def _kernel_facts(page_size: int, split: bool, block_n: Optional[int] = None) -> Dict:
    """Shared memory, registers and spills of the compiled decode kernel (GPU only; {} if unknown)."""
    from ..runtime.cache import KERNEL_CACHE

    for e in reversed(KERNEL_CACHE.find("_paged_decode_kernel")):
        c = dict(e.constexprs)
        if c.get("PAGE_SIZE") != page_size or c.get("SPLIT") != split or (block_n and c.get("BLOCK_N") != block_n):
            continue
        k = e.compiled
        if k is None:
            return {}
        try:
            k._init_handles()
        except Exception:  # noqa: BLE001 - facts are best effort
            pass
        return {"smem_bytes": getattr(getattr(k, "metadata", None), "shared", None),
                "regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None)}
    return {}


class PagedStudy(Study):
    name = "paged"
    title = "PagedAttention decode: bandwidth vs the copy ceiling, V1 vs V2, page size"

    # ------------------------------------------------------------------ measure
    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._measure_interpreter(ctx)
            return
        self.measure_gpu(ctx, Sweep.quick() if ctx.quick else Sweep.full())

    def measure_gpu(self, ctx: StudyContext, sw: Sweep, device: str = "cuda") -> None:
        """The timed sweep (``device`` and a tiny ``sw`` let a CPU dry run walk the same code)."""
        from ..ops.paged import explain, paged_attention
        from ..runtime.ceilings import read_stream_fn

        gen = torch.Generator().manual_seed(0)
        pools = _Pools(sw.max_tokens() * sw.Hkv * sw.D, device, sw.dtype)
        dname = str(sw.dtype).split(".")[-1]
        n_steps = (len(sw.grid) + len(sw.pages) + 4 + len(sw.flex) + len(sw.configs))
        bar = ctx.progress(n_steps, "paged")
        use_graphs = device == "cuda"

        def bench(fn, clean=False):
            # decode kernels last tens of microseconds: replay a CUDA graph so that no implementation's host
            # overhead (ours validates, plans and launches two kernels from Python) leaks into its time
            mode = "eager"
            if use_graphs:
                try:
                    fn, mode = _graphed(fn), "cuda_graph"
                except Exception as e:  # noqa: BLE001 - time it eagerly and say so
                    mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:80]})"
                    torch.cuda.synchronize()
            bench.mode = mode
            # clean: L2 emptied by a read, not do_bench's write (whose dirty lines the kernel would write back)
            return (ctx.bench_clean_l2 if clean else ctx.bench)(fn, *sw.bench_ms)

        def ours(tag: str, q, kc, vc, bt, sl, lens, N, *, sweep, Hkv, D, version="auto", parts=None, config=None,
                 extra=None, clean=False):
            with ctx.guard(f"{tag} {version}{'/' + str(parts) if parts else ''}"):
                # the checks (off here: timed) would count the tokens; mixed batches are split by them
                p = explain(q, kc, bt, max_seq_len=max(lens), version=version, num_partitions=parts, config=config,
                            total_tokens=sum(lens))
                kw = dict(version=version, num_partitions=parts, max_seq_len=max(lens), check_inputs=False,
                          config=config, total_tokens=sum(lens))
                t = bench(lambda: paged_attention(q, kc, vc, bt, sl, **kw), clean=clean)
                variant = version if parts is None else f"v2-p{parts}"
                if config is not None:
                    variant = f"cfg n{config.BLOCK_N} w{config.num_warps} s{config.num_stages}"
                ex = {"sweep": sweep, "page_size": kc.shape[1], "version": p.version,
                      "num_partitions": p.num_partitions, "tokens_per_partition": p.tokens_per_partition,
                      "programs": p.programs, "sm_count": p.sm_count, "reason": p.reason,
                      "kv_bytes": _kv_bytes(lens, Hkv, D), "mean_len": sum(lens) / len(lens),
                      "BLOCK_N": p.config.BLOCK_N if config is None else config.BLOCK_N,
                      "num_warps": p.config.num_warps if config is None else config.num_warps,
                      "num_stages": p.config.num_stages if config is None else config.num_stages}
                ex.update(extra or {}, timing_mode=bench.mode, timing_protocol=_protocol(clean))
                return ctx.record(op=OP, impl=OURS, variant=variant, B=len(lens), H=q.shape[1], Hkv=Hkv, N=1,
                                  Nk=max(lens), D=D, dtype=dname, causal=True, timing=t,
                                  nbytes=_kv_bytes(lens, Hkv, D), extra=ex)

        def peer(impl: str, q, k, v, lens, *, sweep, variant="contiguous", extra=None, clean=False):
            with ctx.guard(f"{impl} {sweep} B{len(lens)} N{max(lens)}"):
                if impl == "flex":
                    fn, why = peers.make_flex(q, k, v, causal=False)
                else:
                    fn, why = peers.make_sdpa(impl, q, k, v, causal=False)
                t = bench(fn, clean=clean) if fn else None
                ex = {"sweep": sweep, "kv_bytes": _kv_bytes(lens, k.shape[1], k.shape[-1]), "read_bytes":
                      2.0 * k.numel() * k.element_size(), "timing_protocol": _protocol(clean)}
                if why:
                    ex["unsupported"] = why
                else:
                    ex["timing_mode"] = bench.mode
                ex.update(extra or {})
                ctx.record(op=OP, impl=impl, variant=variant, B=len(lens), H=q.shape[1], Hkv=k.shape[1], N=1,
                           Nk=max(lens), D=k.shape[-1], dtype=dname, causal=False, timing=t,
                           nbytes=_kv_bytes(lens, k.shape[1], k.shape[-1]), extra=ex)

        def stream(lens, Hkv, D, sweep="grid", clean=False):
            # the bar shapes' size-matched ceiling: a trivial read of the same bytes, same protocol
            nbytes = _kv_bytes(lens, Hkv, D)
            with ctx.guard(f"read stream B{len(lens)} N{max(lens)}"):
                t = bench(read_stream_fn(int(nbytes), device), clean=clean)
                ctx.record(op="read_stream", impl="triton_read", variant="contiguous", B=len(lens), H=Hq, Hkv=Hkv,
                           N=1, Nk=max(lens), D=D, dtype=dname, timing=t, nbytes=nbytes,
                           extra={"sweep": sweep, "timing_mode": bench.mode, "timing_protocol": _protocol(clean)})

        def section(label: str):
            ctx.log(f"{label}: {time.perf_counter() - t0:.1f} s")

        def setup(B, N, page, Hq, Hkv, D, lens=None):
            lens = lens or [N] * B
            kc, vc = pools.pool(sum(-(-n // page) * page for n in lens), page, Hkv, D)
            bt = _block_table(lens, page, gen, device)
            sl = torch.tensor(lens, dtype=torch.int32, device=device)
            q = torch.randn(B, Hq, 1, D, device=device, dtype=sw.dtype)
            return q, kc, vc, bt, sl, lens

        t0 = time.perf_counter()
        self._check_gpu(ctx, device, sw)
        section("correctness")
        Hq, Hkv, D, page = sw.Hq, sw.Hkv, sw.D, sw.page
        # ---- grid: V1 / V2 / auto / partitions / peers ------------------------------------------
        for B, N in sw.grid:
            q, kc, vc, bt, sl, lens = setup(B, N, page, Hq, Hkv, D)
            args = (q, kc, vc, bt, sl, lens, N)
            for version in ("v1", "v2", "auto"):
                ours(f"grid B{B} N{N}", *args, sweep="grid", Hkv=Hkv, D=D, version=version)
            if B <= sw.part_sweep_max_b:
                for P in sw.part_counts:
                    if P * 256 <= N:
                        ours(f"parts B{B} N{N}", *args, sweep="grid", Hkv=Hkv, D=D, version="v2", parts=P)
            k, v = pools.contiguous(B, Hkv, N, D)
            for impl in ("sdpa_cudnn", "sdpa_flash"):
                peer(impl, q, k, v, lens, sweep="grid")
            if (B, N) in sw.stream_shapes:
                stream(lens, Hkv, D)
            if (B, N) in sw.flex:
                peer("flex", q, k, v, lens, sweep="grid")
            bar.update(1, f"grid B{B} N{N}")
        section("grid")
        # ---- the bar shapes again, L2 emptied by a read (timing.bench_clean_l2) --------------------
        for B, N in sw.grid:
            if (B, N) not in sw.stream_shapes:
                continue
            q, kc, vc, bt, sl, lens = setup(B, N, page, Hq, Hkv, D)
            args = (q, kc, vc, bt, sl, lens, N)
            for version in (("v1", "v2", "auto") if B == 1 else ("auto",)):
                ours(f"clean B{B} N{N}", *args, sweep=CLEAN_SWEEP, Hkv=Hkv, D=D, version=version, clean=True)
            k, v = pools.contiguous(B, Hkv, N, D)
            peer("sdpa_cudnn", q, k, v, lens, sweep=CLEAN_SWEEP, clean=True)
            stream(lens, Hkv, D, sweep=CLEAN_SWEEP, clean=True)
        section("bar shapes, clean L2")
        # ---- where the worst bar shape's time goes: each kernel's GPU time against the read's ----------
        if use_graphs and sw.breakdown_shape:
            from ..runtime.timing import kernel_times_clean_l2

            B, N = sw.breakdown_shape
            q, kc, vc, bt, sl, lens = setup(B, N, page, Hq, Hkv, D)
            kw = dict(max_seq_len=N, check_inputs=False, total_tokens=sum(lens))
            nbytes = _kv_bytes(lens, Hkv, D)
            with ctx.guard(f"kernel times B{B} N{N}"):
                ours_fn = _graphed(lambda: paged_attention(q, kc, vc, bt, sl, **kw))
                read_fn = _graphed(read_stream_fn(int(nbytes), device))
                k_ours, k_read = kernel_times_clean_l2(ours_fn), kernel_times_clean_l2(read_fn)
                w_ours = ctx.bench_clean_l2(ours_fn, *sw.bench_ms).ms_median * 1e3
                w_read = ctx.bench_clean_l2(read_fn, *sw.bench_ms).ms_median * 1e3
                p = explain(q, kc, bt, max_seq_len=N, total_tokens=sum(lens))
                ctx.record(op="paged_kernel_times", impl=OURS, variant="auto", B=B, H=Hq, Hkv=Hkv, N=1, Nk=N, D=D,
                           dtype=dname, causal=True, nbytes=nbytes,
                           extra={"sweep": "kernel_times", "kernels_us": k_ours, "read_kernels_us": k_read,
                                  "wall_us": w_ours, "read_wall_us": w_read, "version": p.version,
                                  "num_partitions": p.num_partitions, "kv_bytes": nbytes,
                                  "timing_protocol": _protocol(True) + "; kernels: CUPTI durations"})
            section("kernel times")
        # ---- host overhead (eager calls, no graph) -------------------------------------------
        from ..runtime.timing import wall_time_per_call

        B, N = sw.host_shape
        q, kc, vc, bt, sl, lens = setup(B, N, page, Hq, Hkv, D)
        sync = torch.cuda.synchronize if device == "cuda" else None
        k, v = pools.contiguous(B, Hkv, N, D)
        host = [("attention_proto", "checks off", lambda: paged_attention(q, kc, vc, bt, sl, max_seq_len=N,
                                                                           check_inputs=False)),
                ("attention_proto", "checks on", lambda: paged_attention(q, kc, vc, bt, sl)),
                ("sdpa_cudnn", "contiguous", peers.make_sdpa("sdpa_cudnn", q, k, v, causal=False)[0])]
        for impl, variant, fn in host:
            with ctx.guard(f"host {impl} {variant}"):
                if fn is None:
                    continue
                us = wall_time_per_call(fn, calls=sw.host_calls, sync=sync)
                ctx.record(op="paged_host", impl=impl, variant=variant, B=B, H=Hq, Hkv=Hkv, N=1, Nk=N, D=D,
                           dtype=dname, causal=True, extra={"us_per_call": us, "sweep": "host"})
        section("host overhead")
        # ---- page sizes ---------------------------------------------------------------------
        B, N = sw.page_shape
        for ps in sw.pages:
            q, kc, vc, bt, sl, lens = setup(B, N, ps, Hq, Hkv, D)
            rid = ours(f"page {ps}", q, kc, vc, bt, sl, lens, N, sweep="page_size", Hkv=Hkv, D=D)
            if rid is not None:
                p = explain(q, kc, bt, max_seq_len=N)
                facts = _kernel_facts(ps, p.version == "v2")
                if facts:
                    ctx.record(op="paged_kernel_facts", impl=OURS, variant=f"page {ps}", B=B, H=Hq, Hkv=Hkv, N=1,
                               Nk=N, D=D, dtype=dname, extra={"page_size": ps, **facts, "version": p.version})
            bar.update(1, f"page {ps}")
        # contiguous baseline: ours with one page per sequence (the tile never leaves a page)
        q, kc, vc, bt, sl, lens = setup(B, N, N, Hq, Hkv, D)
        ours("contiguous", q, kc, vc, bt, sl, lens, N, sweep="page_size_baseline", Hkv=Hkv, D=D)
        k, v = pools.contiguous(B, Hkv, N, D)
        peer("sdpa_cudnn", q, k, v, lens, sweep="page_size_baseline")
        section("page sizes")
        # ---- mixed lengths ------------------------------------------------------------------
        B, lo, hi = sw.mixed
        lens = _mixed_lengths(B, lo, hi, gen)
        q, kc, vc, bt, sl, lens = setup(B, hi, page, Hq, Hkv, D, lens=lens)
        for version in ("v1", "v2", "auto"):
            ours("mixed", q, kc, vc, bt, sl, lens, hi, sweep="mixed", Hkv=Hkv, D=D, version=version,
                 extra={"min_len": min(lens)})
        k, v = pools.contiguous(B, Hkv, hi, D)
        peer("sdpa_cudnn", q, k, v, lens, sweep="mixed", variant="padded to the longest",
             extra={"padded_bytes": 2.0 * k.numel() * k.element_size()})
        bar.update(1, "mixed")
        # ---- MHA and D=64 ----------------------------------------------------------------------
        for tag, (B, N), hq, hkv, d in (("mha", sw.mha, Hq, Hq, D), ("d64", sw.d64, Hq, Hkv, 64)):
            q, kc, vc, bt, sl, lens = setup(B, N, page, hq, hkv, d)
            ours(tag, q, kc, vc, bt, sl, lens, N, sweep=tag, Hkv=hkv, D=d)
            k, v = pools.contiguous(B, hkv, N, d)
            for impl in ("sdpa_cudnn", "sdpa_flash"):
                peer(impl, q, k, v, lens, sweep=tag)
            bar.update(1, tag)
        section("mixed, mha, d64")
        # ---- tile configs ---------------------------------------------------------------------
        if sw.configs:
            from ..ops.paged import PagedConfig

            B, N = sw.config_shape
            q, kc, vc, bt, sl, lens = setup(B, N, page, Hq, Hkv, D)
            ours("config default", q, kc, vc, bt, sl, lens, N, sweep="config", Hkv=Hkv, D=D)
            for bn, w, s in sw.configs:
                cfg = PagedConfig(16, bn, max(16, 1 << (D - 1).bit_length()), w, s)
                ours(f"config {bn}/{w}/{s}", q, kc, vc, bt, sl, lens, N, sweep="config", Hkv=Hkv, D=D, config=cfg)
                bar.update(1, f"config {bn}/{w}/{s}")
            section("configs")
        del pools

    def _check_gpu(self, ctx: StudyContext, device: str, sw: Sweep) -> None:
        """bf16 correctness of V1 / V2 / auto at a mixed-length shape (the timed kernels' variants)."""
        from ..ops.paged.testing import check_paged, make_paged

        gen = torch.Generator().manual_seed(7)
        lens = list(sw.check_lens)
        dtype = sw.dtype
        q, kc, vc, bt, sl = make_paged(len(lens), sw.Hq, sw.Hkv, 1, sw.D, sw.page, lens, dtype, device, gen)
        for version in ("v1", "v2", "auto"):
            with ctx.guard(f"correctness {version}"):
                res = check_paged(q, kc, vc, bt, sl, dtype, version=version)
                self._record_check(ctx, res, f"{version} {sw.Hq}:{sw.Hkv} page{sw.page} mixed", len(lens), sw.Hq,
                                   sw.Hkv, 1, max(lens), sw.D, str(dtype).split(".")[-1])

    @staticmethod
    def _record_check(ctx, res, variant, B, Hq, Hkv, Nq, Nk, D, dtype):
        ctx.record(op=OP, impl=OURS, variant=variant, B=B, H=Hq, Hkv=Hkv, N=Nq, Nk=Nk, D=D, dtype=dtype,
                   causal=True, extra={"ok": res.ok, "max_err": res.out.ours, "bound": res.out.bound,
                                       "err_ratio": res.err_ratio, "lse_err": res.lse_err, "sweep": "correctness"})

    def _measure_interpreter(self, ctx: StudyContext) -> None:
        """Correctness only: tiny shapes against the float64 reference, and an 8-step decode loop."""
        from ..ops.paged import PagedKVCache
        from ..ops.paged.testing import check_paged, compare_paged, make_paged

        gen = torch.Generator().manual_seed(11)
        cases = [
            # (dtype, Hq, Hkv, Nq, D, page, lens, version, parts, mods)
            (torch.float16, 4, 2, 1, 32, 8, [1, 9, 40], "v1", None, {}),
            (torch.float16, 4, 2, 1, 32, 8, [1, 9, 40], "v2", 3, {}),
            (torch.float32, 2, 2, 3, 24, 16, [3, 16, 33], "v1", None, {}),
            (torch.float32, 2, 2, 3, 24, 16, [3, 16, 33], "v2", 2, {}),
            (torch.float16, 8, 2, 4, 16, 32, [4, 70], "auto", None, {}),
            (torch.float16, 4, 2, 2, 32, 8, [2, 23, 45], "v2", 4,
             {"softcap": 2.0, "alibi_slopes": "rand", "window": 9}),
        ]
        for dtype, Hq, Hkv, Nq, D, page, lens, version, parts, mods in cases:
            name = f"{version}{'/' + str(parts) if parts else ''} {Hq}:{Hkv} Nq{Nq} D{D} page{page}" + (
                f" {'+'.join(mods)}" if mods else "")
            with ctx.guard(name):
                if mods.get("alibi_slopes") == "rand":
                    mods = dict(mods, alibi_slopes=torch.rand(Hq, generator=gen))
                q, kc, vc, bt, sl = make_paged(len(lens), Hq, Hkv, Nq, D, page, lens, dtype, ctx.device, gen)
                res = check_paged(q, kc, vc, bt, sl, dtype, version=version, num_partitions=parts, **mods)
                self._record_check(ctx, res, name, len(lens), Hq, Hkv, Nq, max(lens), D, str(dtype).split(".")[-1])
        with ctx.guard("decode loop"):
            cache = PagedKVCache(32, 8, 2, 16, max_seqs=3, dtype=torch.float16, seed=5, device=ctx.device)
            ids = [cache.add_sequence() for _ in range(3)]
            prompt = [1, 10, 25]
            kp = torch.randn(3, 2, 25, 16, generator=gen).half()
            cache.append(ids, kp, torch.randn(kp.shape, generator=gen).half(), counts=prompt)
            worst = None
            for step in range(8):
                kn = torch.randn(3, 2, 1, 16, generator=gen).half()
                cache.append(ids, kn, torch.randn(kn.shape, generator=gen).half())
                q = torch.randn(3, 4, 1, 16, generator=gen).half()
                out, lse = cache.attend(ids, q, return_lse=True, version="v2" if step % 2 else "auto")
                bt, sl = cache.batch(ids)
                res = compare_paged(out, lse, q, cache.k_cache, cache.v_cache, bt, sl, torch.float16)
                if worst is None or res.err_ratio > worst.err_ratio or not res.ok:
                    worst = res
            self._record_check(ctx, worst, "decode loop 8 steps (worst step)", 3, 4, 2, 1, 33, 16, "float16")

    def analyze(self, data: RunData) -> List[Finding]:
        from .paged_findings import analyze

        return analyze(data)


STUDY = PagedStudy()
