"""Study 3 (`paged`): PagedAttention decode, bandwidth against the copy ceiling.

Rate = unique KV bytes read / time (K and V of every token of every sequence),
against the copy ceiling measured in the same run. bf16, GQA 32:8, D=128 and
page 16 unless a sweep says otherwise; pools are scattered (shuffled block
tables); ours runs with ``check_inputs=False`` (no host sync), as a serving loop.

On a GPU (full mode about 90 s on an H100; every section logs its time):
- grid (B x N): V1, V2 (dispatch's partition count), auto, and the peers on
  contiguous K/V ``[B, Hkv, N, D]``: SDPA cuDNN and SDPA FLASH (enable_gqa);
- V2 partition sweep at small batches (B <= 8): how the count should scale;
- page sizes 8..256 at B8 N32k, against ours on one page per sequence
  (contiguous) and the kernels' shared memory / registers per page size;
- mixed lengths in one batch (SDPA pads to the longest), MHA 32:32, D=64;
- FlexAttention decoding at the bar shapes; a small tile-config sweep.
Under the interpreter: correctness of V1/V2/auto against the float64 reference
at tiny shapes (fp16/fp32, shuffled pages, modifiers) and a short decode loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, median, pct, ratio, speedup_verdict
from . import peers

OP = "paged_decode"
OURS = "attention_proto"


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
    bench_ms: Tuple[float, float] = (10.0, 40.0)  # warmup, rep

    @staticmethod
    def full() -> "Sweep":
        return Sweep(
            grid=[(1, 4096), (1, 16384), (1, 65536), (1, 131072), (8, 1024), (8, 4096), (8, 32768), (8, 131072),
                  (32, 1024), (32, 4096), (32, 32768), (128, 1024), (128, 4096), (128, 8192)],
            part_counts=(2, 8, 32, 128), part_sweep_max_b=8,
            page_shape=(8, 32768), pages=(8, 16, 32, 64, 128, 256),
            mixed=(32, 1024, 32768), mha=(8, 4096), d64=(8, 32768),
            flex=[(8, 4096), (8, 32768)],
            configs=[(32, 4, 4), (64, 4, 2), (64, 4, 4), (128, 4, 2), (128, 8, 3)], config_shape=(8, 32768),
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
                                                  self.mha[0] * self.mha[1] * 4, self.d64[0] * self.d64[1]]
        return max(cands)


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

        gen = torch.Generator().manual_seed(0)
        pools = _Pools(sw.max_tokens() * sw.Hkv * sw.D, device, sw.dtype)
        dname = str(sw.dtype).split(".")[-1]
        n_steps = (len(sw.grid) + len(sw.pages) + 4 + len(sw.flex) + len(sw.configs))
        bar = ctx.progress(n_steps, "paged")
        bench = lambda fn: ctx.bench(fn, *sw.bench_ms)  # noqa: E731

        def ours(tag: str, q, kc, vc, bt, sl, lens, N, *, sweep, Hkv, D, version="auto", parts=None, config=None,
                 extra=None):
            with ctx.guard(f"{tag} {version}{'/' + str(parts) if parts else ''}"):
                p = explain(q, kc, bt, max_seq_len=max(lens), version=version, num_partitions=parts, config=config)
                kw = dict(version=version, num_partitions=parts, max_seq_len=max(lens), check_inputs=False,
                          config=config)
                t = bench(lambda: paged_attention(q, kc, vc, bt, sl, **kw))
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
                ex.update(extra or {})
                return ctx.record(op=OP, impl=OURS, variant=variant, B=len(lens), H=q.shape[1], Hkv=Hkv, N=1,
                                  Nk=max(lens), D=D, dtype=dname, causal=True, timing=t,
                                  nbytes=_kv_bytes(lens, Hkv, D), extra=ex)

        def peer(impl: str, q, k, v, lens, *, sweep, variant="contiguous", extra=None):
            with ctx.guard(f"{impl} {sweep} B{len(lens)} N{max(lens)}"):
                if impl == "flex":
                    fn, why = peers.make_flex(q, k, v, causal=False)
                else:
                    fn, why = peers.make_sdpa(impl, q, k, v, causal=False)
                t = bench(fn) if fn else None
                ex = {"sweep": sweep, "kv_bytes": _kv_bytes(lens, k.shape[1], k.shape[-1]), "read_bytes":
                      2.0 * k.numel() * k.element_size()}
                if why:
                    ex["unsupported"] = why
                ex.update(extra or {})
                ctx.record(op=OP, impl=impl, variant=variant, B=len(lens), H=q.shape[1], Hkv=k.shape[1], N=1,
                           Nk=max(lens), D=k.shape[-1], dtype=dname, causal=False, timing=t,
                           nbytes=_kv_bytes(lens, k.shape[1], k.shape[-1]), extra=ex)

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
            if (B, N) in sw.flex:
                peer("flex", q, k, v, lens, sweep="grid")
            bar.update(1, f"grid B{B} N{N}")
        section("grid")
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
        u = torch.rand(B, generator=gen)
        lens = [int(round(math.exp(math.log(lo) + float(x) * (math.log(hi) - math.log(lo))))) for x in u]
        lens[0] = hi  # the longest is in the batch: padding reads up to it
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

    # ------------------------------------------------------------------ analyze
    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        f = correctness_finding(self.name, data, OP)
        if f:
            out.append(f)
        if data.mode != "gpu":
            return out
        copy = (data.ceilings or {}).get("copy_gbps")
        for fn in (self._bars, self._v1_v2, self._partitions, self._pages, self._smem, self._mixed, self._others,
                   self._configs):
            try:
                out.extend(fn(data, copy))
            except Exception as e:  # noqa: BLE001 - one broken finding must not hide the others
                out.append(Finding(id=f"paged-analysis-{fn.__name__.strip('_')}", title="analysis failed",
                                   claim=f"{fn.__name__} failed: {type(e).__name__}: {e}", verdict="inconclusive"))
        return out

    @staticmethod
    def _grid(data: RunData, variant: str, B: int, N: int, impl: str = OURS, sweep: str = "grid"):
        rows = [r for r in data.rows(op=OP, impl=impl, variant=variant, B=B, Nk=N, extra__sweep=sweep) if r["gbps"]]
        return rows[-1] if rows else None

    def _bars(self, data: RunData, copy) -> List[Finding]:
        out = []
        pts = [(r, self._grid(data, "contiguous", r["B"], r["Nk"], impl="sdpa_cudnn"))
               for r in data.rows(op=OP, impl=OURS, variant="auto", extra__sweep="grid")
               if r["gbps"] and r["B"] >= 8 and r["Nk"] in (4096, 32768) and (r["H"], r["Hkv"], r["D"]) == (32, 8, 128)]
        if pts:
            fr = [(ratio(r["gbps"], copy), r) for r, _ in pts]
            worst = min((x for x, _ in fr if x is not None), default=None)
            desc = ", ".join(f"{fmt(r['gbps'], 0)} GB/s ({_pt(r)}, {r['extra']['version']})" for _, r in fr)
            out.append(Finding(
                id="paged-bar-copy", title="Paged decode (page 16, GQA 32:8, D128) reaches 85% of the copy ceiling",
                claim=(f"At B >= 8 and N in {{4k, 32k}}, auto paged decode reads KV at {desc}; the worst is "
                       f"{pct(worst)} of the {fmt(copy, 0)} GB/s copy ceiling (bar 85%)."),
                verdict=speedup_verdict(worst, 0.85),
                metrics={"worst_fraction": worst, "copy_gbps": copy,
                         "points": [{"B": r["B"], "N": r["Nk"], "gbps": r["gbps"], "fraction": x} for x, r in fr]},
                evidence=[r["id"] for _, r in fr]))
            cr = [(ratio(r["gbps"], c["gbps"]) if c else None, r) for r, c in pts]
            worst = min((x for x, _ in cr if x is not None), default=None)
            desc = ", ".join(f"{fmt(x)}x ({_pt(r)})" for x, r in cr)
            out.append(Finding(
                id="paged-bar-cudnn", title="Paged decode against SDPA cuDNN on contiguous K/V (bar 0.9x)",
                claim=(f"Auto paged decode runs at {desc} of SDPA cuDNN's bandwidth over the same K/V stored "
                       f"contiguously; worst {fmt(worst)}x (bar 0.9x; n/a where cuDNN did not run)."),
                verdict=speedup_verdict(worst, 0.9),
                metrics={"worst_ratio": worst, "points": [{"B": r["B"], "N": r["Nk"], "ratio": x} for x, r in cr]},
                evidence=[r["id"] for _, r in pts] + [c["id"] for _, c in pts if c]))
        v2, v1 = self._grid(data, "v2", 1, 65536), self._grid(data, "v1", 1, 65536)
        if v2:
            f_copy = ratio(v2["gbps"], copy)
            sp = ratio(v1["ms_median"], v2["ms_median"]) if v1 else None
            best = max([r for r in data.rows(op=OP, impl=OURS, B=1, Nk=65536, extra__sweep="grid")
                        if r["gbps"] and r["extra"].get("version") == "v2"], key=lambda r: r["gbps"])
            a, b = speedup_verdict(f_copy, 0.80), speedup_verdict(sp, 4.0)
            out.append(Finding(
                id="paged-bar-v2-long", title="One long sequence (B1, N64k): V2 >= 80% of copy and >= 4x V1",
                claim=(f"At B1 N64k, V2 with the dispatch's {v2['extra']['num_partitions']} partitions reads "
                       f"{fmt(v2['gbps'], 0)} GB/s, {pct(f_copy)} of the copy ceiling (bar 80%), and is {fmt(sp)}x "
                       f"faster than V1 ({fmt(v1['gbps'] if v1 else None, 0)} GB/s; bar 4x); the best partition count "
                       f"measured ({best['extra']['num_partitions']}) reaches {fmt(best['gbps'], 0)} GB/s."),
                verdict=("refuted" if "refuted" in (a, b) else "supported" if a == b == "supported" else "inconclusive"),
                metrics={"v2_gbps": v2["gbps"], "fraction_of_copy": f_copy, "speedup_vs_v1": sp,
                         "best_partitions": best["extra"]["num_partitions"], "best_gbps": best["gbps"]},
                evidence=[v2["id"], best["id"]] + ([v1["id"]] if v1 else [])))
        return out

    def _grid_points(self, data: RunData) -> Dict[Tuple[int, int], Dict]:
        """{(B, N): {"v1": row, "v2best": row, "auto": row}} over the grid."""
        pts: Dict[Tuple[int, int], Dict] = {}
        for r in data.rows(op=OP, impl=OURS, extra__sweep="grid"):
            if not r["gbps"]:
                continue
            d = pts.setdefault((r["B"], r["Nk"]), {})
            if r["variant"] in ("v1", "auto"):
                d[r["variant"]] = r
            if r["extra"].get("version") == "v2" and r["variant"] != "auto":
                if "v2best" not in d or r["gbps"] > d["v2best"]["gbps"]:
                    d["v2best"] = r
        return {k: d for k, d in pts.items() if "v1" in d and "v2best" in d}

    def _v1_v2(self, data: RunData, copy) -> List[Finding]:
        pts = self._grid_points(data)
        if not pts:
            return []
        any_row = next(iter(pts.values()))["v1"]
        sms, hkv = any_row["extra"].get("sm_count"), any_row["Hkv"]
        wins, loses = [], []
        for (B, N), d in sorted(pts.items()):
            sp = d["v1"]["ms_median"] / d["v2best"]["ms_median"]
            (wins if sp > 1.05 else loses).append((B, N, sp))
        desc = lambda xs: ", ".join(f"B{B} N{_n(N)} {fmt(sp)}x" for B, N, sp in xs) or "none"  # noqa: E731
        top_win = max((B * hkv for B, _, _ in wins), default=None)
        out = [Finding(
            id="paged-v2-overtakes-v1", title="Where split-KV (V2) overtakes V1",
            claim=(f"V2 at its best measured partition count is more than 5% faster than V1 at {len(wins)} of "
                   f"{len(pts)} grid points ({desc(wins)}); it ties or loses at {desc(loses)}. V1 runs B x {hkv} "
                   f"programs on {sms} SMs; "
                   + (f"V2 wins up to {top_win} V1 programs." if top_win else "V2 never wins by more than 5%.")),
            verdict="observation", metrics={"wins": wins, "ties_or_losses": loses, "sm_count": sms},
            evidence=[r["id"] for d in pts.values() for r in (d["v1"], d["v2best"])])]
        good = []
        for (B, N), d in sorted(pts.items()):
            if "auto" in d:
                best = d["v2best"] if d["v2best"]["gbps"] >= d["v1"]["gbps"] else d["v1"]
                good.append((B, N, d["auto"]["gbps"] / best["gbps"], d["auto"], best))
        if good:
            bad = [g for g in good if g[2] < 0.95]
            worst = min(g[2] for g in good)
            miss = ", ".join(f"B{B} N{_n(N)} (auto {a['extra']['version']}/{a['extra']['num_partitions']}, best "
                             f"{b['extra']['version']}/{b['extra']['num_partitions']})" for B, N, _, a, b in bad)
            out.append(Finding(
                id="paged-dispatch-choice", title="The automatic V1/V2 choice against the best measured",
                claim=(f"Auto reaches >= 95% of the best of V1 and every measured V2 at {len(good) - len(bad)} of "
                       f"{len(good)} grid points (worst {fmt(worst)}x{'; below at ' + miss if bad else ''})."),
                verdict="supported" if not bad else "refuted",
                metrics={"points": len(good), "below_95": len(bad), "worst": worst},
                evidence=[g[3]["id"] for g in good] + [g[4]["id"] for g in good]))
        return out

    def _partitions(self, data: RunData, copy) -> List[Finding]:
        per: Dict[Tuple[int, int], List[Dict]] = {}
        for r in data.rows(op=OP, impl=OURS, extra__sweep="grid"):
            if r["gbps"] and r["variant"] != "auto":
                per.setdefault((r["B"], r["Nk"]), []).append(r)
        lines, ev, progs, toks = [], [], [], []
        for (B, N), rows in sorted(per.items()):
            if not any(r["variant"].startswith("v2-p") for r in rows):
                continue  # no partition sweep at this shape
            best = max(rows, key=lambda r: r["gbps"])
            sms = best["extra"].get("sm_count") or 132
            progs.append(best["extra"]["programs"] / sms)
            toks.append(best["extra"]["tokens_per_partition"])
            lines.append(f"B{B} N{_n(N)}: P={best['extra']['num_partitions']} "
                         f"({fmt(progs[-1], 1)} programs/SM, {toks[-1]} tokens each)")
            ev += [r["id"] for r in rows]
        if not lines:
            return []
        return [Finding(
            id="paged-partition-scaling", title="How V2's partition count should scale",
            claim=(f"The fastest partition count per shape (P=1 is V1): {'; '.join(lines)}. Median best: "
                   f"{fmt(median(progs), 1)} programs per SM and {fmt(median(toks), 0)} tokens per partition "
                   f"(the dispatch aims at 2 programs per SM with >= 512 tokens per partition)."),
            verdict="observation",
            metrics={"median_programs_per_sm": median(progs), "median_tokens_per_partition": median(toks),
                     "per_shape": lines},
            evidence=ev)]

    def _pages(self, data: RunData, copy) -> List[Finding]:
        rows = sorted([r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size") if r["gbps"]],
                      key=lambda r: r["extra"]["page_size"])
        base = next((r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size_baseline") if r["gbps"]), None)
        cud = next((r for r in data.rows(op=OP, impl="sdpa_cudnn", extra__sweep="page_size_baseline") if r["gbps"]), None)
        if not rows or not base:
            return []
        within = [r for r in rows if r["gbps"] >= 0.95 * base["gbps"]]
        smallest = within[0]["extra"]["page_size"] if within else None
        desc = ", ".join(f"{fmt(r['gbps'], 0)} GB/s at page {r['extra']['page_size']}" for r in rows)
        tail = (f"The smallest page within 5% of contiguous is {smallest}." if smallest else
                "No page size comes within 5% of contiguous.")
        return [Finding(
            id="paged-page-size", title="Bandwidth against page size (smallest page within 5% of contiguous)",
            claim=(f"At {_pt(base)}, paged decode reads {desc}; on one page per sequence (contiguous) "
                   f"{fmt(base['gbps'], 0)} GB/s ({pct(ratio(base['gbps'], copy))} of copy), SDPA cuDNN "
                   f"{fmt(cud['gbps'] if cud else None, 0)} GB/s. {tail}"),
            verdict="observation",
            metrics={"smallest_within_5pct": smallest, "contiguous_gbps": base["gbps"],
                     "by_page": {r["extra"]["page_size"]: r["gbps"] for r in rows},
                     "cudnn_gbps": cud["gbps"] if cud else None},
            evidence=[r["id"] for r in rows] + [base["id"]] + ([cud["id"]] if cud else []))]

    def _smem(self, data: RunData, copy) -> List[Finding]:
        facts = {r["extra"]["page_size"]: r for r in data.rows(op="paged_kernel_facts")}
        rows = {r["extra"]["page_size"]: r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size") if r["gbps"]}
        if not rows:
            return []
        best = max(rows.values(), key=lambda r: r["gbps"])
        frac = ratio(rows[min(rows)]["gbps"], best["gbps"])
        smem = {p: facts[p]["extra"].get("smem_bytes") for p in sorted(facts)}
        opt_in = data.env.get("shared_memory_per_block_optin")
        known = {b for b in smem.values() if b}
        if len(known) == 1 and len(smem) == len(rows):
            smem_txt = f"uses {fmt(known.pop() / 1024, 0)} KB of shared memory at every page size"
        else:
            smem_txt = "uses " + (", ".join(f"{fmt((b or 0) / 1024, 0)} KB at page {p}" for p, b in smem.items())
                                  or "an unknown amount of shared memory")
        return [Finding(
            id="paged-shared-memory", title="What shared memory limits: small pages on Hopper",
            claim=(f"The plan feared that small pages would confine the kernel to small tiles (under 32 KB of shared "
                   f"memory). This kernel gathers a tile's rows across pages: it {smem_txt} (opt-in limit "
                   f"{fmt((opt_in or 0) / 1024, 0)} KB per block); the smallest page ({min(rows)}) reaches {pct(frac)} "
                   f"of the best page's bandwidth (page {best['extra']['page_size']}, {fmt(best['gbps'], 0)} GB/s); "
                   f"the fear is refuted when the smallest page keeps >= 90% of the best page's bandwidth."),
            verdict=("inconclusive" if frac is None else "refuted" if frac >= 0.9 else "supported"),
            metrics={"smem_by_page": smem, "smallest_page_fraction_of_best": frac, "smem_optin": opt_in,
                     "regs_by_page": {p: facts[p]["extra"].get("regs") for p in sorted(facts)}},
            evidence=[r["id"] for r in rows.values()] + [r["id"] for r in facts.values()])]

    def _mixed(self, data: RunData, copy) -> List[Finding]:
        rows = {r["variant"]: r for r in data.rows(op=OP, impl=OURS, extra__sweep="mixed") if r["gbps"]}
        pad = next((r for r in data.rows(op=OP, impl="sdpa_cudnn", extra__sweep="mixed") if r["gbps"]), None)
        a = rows.get("auto")
        if not a:
            return []
        g = lambda k: fmt(rows[k]["gbps"] if k in rows else None, 0)  # noqa: E731
        sp = ratio(pad["ms_median"], a["ms_median"]) if pad else None
        return [Finding(
            id="paged-mixed-lengths", title="Mixed lengths in one batch",
            claim=(f"B{a['B']} with lengths {a['extra'].get('min_len')} to {a['Nk']} (mean "
                   f"{fmt(a['extra']['mean_len'], 0)}): auto ({a['extra']['version']}, {a['extra']['num_partitions']} "
                   f"partitions) reads {g('auto')} GB/s of unique KV ({pct(ratio(a['gbps'], copy))} of copy); V1 "
                   f"{g('v1')}, V2 {g('v2')} GB/s. SDPA cuDNN over the batch padded to the longest (no mask: a lower "
                   f"bound of its cost) takes {fmt(pad['ms_median'] if pad else None, 3)} ms against our "
                   f"{fmt(a['ms_median'], 3)} ms ({fmt(sp)}x)."),
            verdict="observation",
            metrics={"auto_gbps": a["gbps"], "fraction_of_copy": ratio(a["gbps"], copy), "speedup_vs_padded_cudnn": sp},
            evidence=[r["id"] for r in rows.values()] + ([pad["id"]] if pad else []))]

    def _others(self, data: RunData, copy) -> List[Finding]:
        out = []
        first = lambda impl, sweep: next((r for r in data.rows(op=OP, impl=impl, extra__sweep=sweep)  # noqa: E731
                                          if r["gbps"]), None)
        for sweep, title in (("mha", "MHA (32:32)"), ("d64", "GQA 32:8 at D=64")):
            a, cud, fl = first(OURS, sweep), first("sdpa_cudnn", sweep), first("sdpa_flash", sweep)
            if not a:
                continue
            out.append(Finding(
                id=f"paged-{sweep}", title=f"Paged decode, {title}",
                claim=(f"{title}, {_pt(a)}: ours ({a['extra']['version']}) {fmt(a['gbps'], 0)} GB/s "
                       f"({pct(ratio(a['gbps'], copy))} of copy); on contiguous K/V SDPA cuDNN "
                       f"{fmt(cud['gbps'] if cud else None, 0)}, SDPA FLASH {fmt(fl['gbps'] if fl else None, 0)} GB/s."),
                verdict="observation",
                metrics={"gbps": a["gbps"], "cudnn_gbps": cud["gbps"] if cud else None,
                         "flash_gbps": fl["gbps"] if fl else None, "fraction_of_copy": ratio(a["gbps"], copy)},
                evidence=[r["id"] for r in (a, cud, fl) if r]))
        flex = data.rows(op=OP, impl="flex", extra__sweep="grid")
        if flex:
            parts = []
            for r in flex:
                a = self._grid(data, "auto", r["B"], r["Nk"])
                parts.append(f"{_pt(r)}: {fmt(r['gbps'], 0)} GB/s (ours {fmt(a['gbps'] if a else None, 0)})"
                             if r["gbps"] else f"{_pt(r)}: did not run ({r['extra'].get('unsupported')})")
            out.append(Finding(id="paged-flex", title="FlexAttention decoding on contiguous K/V",
                               claim="FlexAttention decoding, " + "; ".join(parts) + ".", verdict="observation",
                               metrics={"points": parts}, evidence=[r["id"] for r in flex]))
        return out

    def _configs(self, data: RunData, copy) -> List[Finding]:
        rows = [r for r in data.rows(op=OP, impl=OURS, extra__sweep="config") if r["gbps"]]
        default = next((r for r in rows if r["variant"] == "auto"), None)
        if len(rows) < 2 or not default:
            return []
        best = max(rows, key=lambda r: r["gbps"])
        cfg = lambda r: f"BLOCK_N {r['extra']['BLOCK_N']}, {r['extra']['num_warps']} warps, {r['extra']['num_stages']} stages"  # noqa: E731
        return [Finding(
            id="paged-tile-config", title="Decode tile configuration",
            claim=(f"At {_pt(best)}, the fastest tile measured is {cfg(best)} at {fmt(best['gbps'], 0)} GB/s; the "
                   f"default ({cfg(default)}) reaches {fmt(default['gbps'], 0)} GB/s "
                   f"({fmt(ratio(default['gbps'], best['gbps']))}x of the best)."),
            verdict="observation",
            metrics={"best": {k: best["extra"][k] for k in ("BLOCK_N", "num_warps", "num_stages")},
                     "best_gbps": best["gbps"], "default_gbps": default["gbps"]},
            evidence=[r["id"] for r in rows])]


def _n(n: int) -> str:
    """32768 -> '32k', 100 -> '100'."""
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def _pt(r: Dict) -> str:
    """'B8 N32k' for a row."""
    return f"B{r['B']} N{_n(r['Nk'])}"


STUDY = PagedStudy()
