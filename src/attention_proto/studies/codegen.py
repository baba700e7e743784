"""Study 5 (`codegen`): do the Python paths to an H100 use its matrix units, and what does their code cost?

For each implementation, at bf16 B4 H16 N4096 D128, causal and not, in one run:

- the compiled code: every kernel's cubin, disassembled (``cuobjdump -sass``) and counted by
  :mod:`attention_proto.codegen.sass` -- HGMMA (wgmma) / HMMA (mma.sync) / FFMA in the main loop
  and in total, TMA / cp.async / plain loads in loops, local memory (spills), registers, shared
  memory, occupancy;
- its speed on the same shape (``ctx.bench``), as TFLOPS (GB/s for decode).

Implementations: ours (dense forward per path: auto, portable, tma, tma+ws; backward; paged
decode V1/V2; chunked linear attention), FlexAttention (compiled), ``torch.compile`` of the
written-out softmax(QK^T)V (default, and with max-autotune restricted to Triton GEMM templates),
Helion (if its wheel is installed), and SDPA cuDNN / FLASH for speed only (closed library
kernels: no SASS read). Rows: ``study: codegen``, ``op: attn_fwd | attn_bwd | paged_decode |
linear_fwd``, counts in ``extra`` (see :func:`attention_proto.codegen.collect.row_extra`).

Time: compiles dominate (Flex, Inductor, Helion compile afresh: their kernels must land in an
empty cache to be read). Quick mode runs those peers causal only and skips the extras; full mode
ends with the extras (Inductor max-autotune with Triton GEMMs, Helion at our own tile).

Under the interpreter: the SASS parser on the stored samples in ``tests/data/sass`` against their
expected counts, and (when Triton's ptxas/cuobjdump are there) a fresh cross-compile of the
generated samples for sm_90 through ``scripts/gen_sass_samples.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..runtime.timing import attention_flops
from ..codegen import findings as F
from .base import Finding, RunData, Study, StudyContext

B, H, N, D = 4, 16, 4096, 128
ROOT = Path(__file__).resolve().parents[3]
SAMPLES_DIR = Path(os.environ.get("ATTENTION_PROTO_SASS_SAMPLES", ROOT / "tests" / "data" / "sass"))
GEN_SCRIPT = ROOT / "scripts" / "gen_sass_samples.py"
NO_SASS = "closed library kernel (cuDNN / FlashAttention-2 in libtorch): no cubin to read"


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v written out, the way a model without a fused kernel does it."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def naive_attention_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    n, m = s.shape[-2], s.shape[-1]
    keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def linear_flops(B: int, N: int, H: int, K: int, V: int, chunk: int) -> float:
    """Chunked linear attention forward, counted as its matmuls: per chunk of C tokens, q k^T (C*C*K),
    (q k^T) v (C*C*V), q S (C*K*V) and the state update k^T v (K*C*V); 2 flops per multiply-add."""
    return 2.0 * B * H * N * (chunk * (K + V) + 2 * K * V)


class CodegenStudy(Study):
    name = "codegen"
    title = "Codegen quality: do the Python paths use the Hopper matrix units?"

    # what the GPU run measures (instance attributes, so a CPU smoke test can shrink them)
    shape = (B, H, N, D)
    paged_shape = (8, 32, 8, 4096, 128, 16)   # B, Hq, Hkv, tokens per sequence, D, page size
    linear_shape = (4, 4096, 16, 128, 64)     # B, N, H, D, chunk
    dtype = torch.bfloat16
    device = "cuda"
    tool: Optional[str] = None   # cuobjdump (set by measure)
    limits: Any = None           # codegen.sass.SmLimits of the GPU (set by measure; Hopper's by default)

    # ------------------------------------------------------------------ measure (GPU)

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._measure_interpreter(ctx)
            return
        from ..codegen import collect, sass

        tool = collect.cuobjdump_path()
        ver = ""
        if tool:
            try:
                ver = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
                ver = ver.splitlines()[-1] if ver else ""
            except (OSError, subprocess.SubprocessError):
                pass
        ctx.record(op="toolchain", impl="attention_proto", variant="cuobjdump",
                   extra={"cuobjdump": tool, "version": ver, "ok": bool(tool)})
        if not tool:
            ctx.log("no cuobjdump: cannot read any SASS; codegen study skipped")
            return
        self.limits = sass.limits_from_device(ctx.facts)
        self.tool = tool
        with ctx.guard("stored samples"):  # the parser's own check, as in CI (a fraction of a second)
            self._check_stored(ctx)
        causals = (False, True)
        parts = (("ours fwd", self._ours_forward), ("ours bwd", self._ours_backward), ("sdpa", self._sdpa),
                 ("flex", self._flex), ("inductor", self._inductor), ("helion", self._helion))
        # quick mode: the peers that compile through Inductor / Helion (seconds per compile) only causal
        slow = {"flex", "inductor", "helion"}
        bar = ctx.progress(len(causals) * (len(parts) + 1) + 2, "codegen")  # (+ the full-mode extras, unbarred)
        b, h, n, d = self.shape
        for causal in causals:
            q, k, v = self._bhsd()
            flops = attention_flops(b, h, n, n, d, causal)
            for part, fn in parts:
                if not (ctx.quick and part in slow and not causal):
                    with ctx.guard(f"{part} causal={causal}"):
                        fn(ctx, q, k, v, causal, flops)
                bar.update(1, f"{part} causal={causal}")
            del q, k, v
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bar.update(1)
        with ctx.guard("paged decode"):
            self._paged(ctx)
        bar.update(1, "paged")
        with ctx.guard("linear attention"):
            self._linear(ctx)
        bar.update(1, "linear")
        if not ctx.quick:
            # last, full mode only: the slow or risky extras
            q, k, v = self._bhsd()
            with ctx.guard("inductor max-autotune"):
                # Triton GEMM templates instead of cuBLAS: what Inductor's own matmul code looks like
                self._inductor_one(ctx, q, k, v, True, attention_flops(b, h, n, n, d, True), "max-autotune triton-gemm",
                                   {"max_autotune": True, "max_autotune_gemm_backends": "TRITON",
                                    "triton.cudagraphs": False})
            with ctx.guard("helion at our tile"):
                # Helion at our own tile, which Triton 3.6 failed to compile when cross-compiled on a CPU
                self._helion(ctx, q, k, v, False, attention_flops(b, h, n, n, d, False), tile="ours")

    def _record(self, ctx: StudyContext, *, op: str, impl: str, variant: str, causal: Optional[bool], kernels,
                timing=None, flops=None, nbytes=None, shape=None, **more) -> int:
        from ..codegen import collect

        if shape is None:
            b, h, n, d = self.shape
            shape = (b, h, h, n, n, d)
        b, h, hkv, n, nk, d = shape
        from ..codegen.sass import HOPPER

        extra = collect.row_extra(kernels, self.limits or HOPPER, **more)
        return ctx.record(op=op, impl=impl, variant=variant, B=b, H=h, Hkv=hkv, N=n, Nk=nk, D=d,
                          dtype=str(self.dtype).replace("torch.", ""),
                          causal=causal, timing=timing, flops=flops, nbytes=nbytes, extra=extra)

    def _ours(self, ctx: StudyContext, fn: Callable[[], Any], **rec) -> None:
        """Run one of our public calls once (recording the kernels it launched), time it, record the row."""
        from ..codegen import collect

        try:
            with collect.record_launches() as launched:
                fn()
                _sync()
        except Exception as e:  # noqa: BLE001 - a path that cannot run here is a recorded fact
            self._record(ctx, impl="attention_proto", kernels=[],
                         unavailable=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", **rec)
            return
        kernels = launched.kernel_codes(self.tool)
        self._record(ctx, impl="attention_proto", kernels=kernels, timing=ctx.bench(fn), **rec)

    def _ours_forward(self, ctx, q, k, v, causal, flops) -> None:
        from ..ops.dense.configs import PATHS, pick_forward_config
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.interface import attention

        self._ours(ctx, lambda: attention(q, k, v, causal=causal), op="attn_fwd", variant="auto", causal=causal,
                   flops=flops)
        n, d = q.shape[2], q.shape[3]
        for path in PATHS:
            cfg = pick_forward_config(d, q.dtype, causal, n, path)
            self._ours(ctx, lambda cfg=cfg: flash_attention_forward(q, k, v, causal=causal, config=cfg),
                       op="attn_fwd", variant=path, causal=causal, flops=flops, config=_cfg(cfg))

    def _ours_backward(self, ctx, q, k, v, causal, flops) -> None:
        from ..ops.dense.backward import flash_attention_backward
        from ..ops.dense.forward import flash_attention_forward

        o, lse = flash_attention_forward(q, k, v, causal=causal)
        do = torch.randn_like(o)
        b, h, n, d = q.shape
        bflops = attention_flops(b, h, n, n, d, causal, mode="bwd")
        modes = (("deterministic", True),) if ctx.quick else (("deterministic", True), ("atomic", False))
        for name, det in modes:
            self._ours(ctx, lambda det=det: flash_attention_backward(do, q, k, v, o, lse, causal=causal,
                                                                     deterministic=det),
                       op="attn_bwd", variant=name, causal=causal, flops=bflops)

    def _sdpa(self, ctx, q, k, v, causal, flops) -> None:
        from . import peers

        for impl in ("sdpa_cudnn", "sdpa_flash"):
            fn, why = peers.make_sdpa(impl, q, k, v, causal)
            self._record(ctx, op="attn_fwd", impl=impl, variant="", causal=causal, kernels=[],
                         timing=ctx.bench(fn) if fn else None, flops=flops, sass=NO_SASS,
                         **({"unavailable": why} if why else {}))

    def _flex(self, ctx, q, k, v, causal, flops) -> None:
        from torch._inductor.utils import run_and_get_code

        from ..codegen import collect
        from . import peers

        with collect.fresh_compile_caches() as cap:
            (fn, why), codes = run_and_get_code(peers.make_flex, q, k, v, causal)
            calls = collect.inductor_calls(codes)
            kernels = collect.triton_cache_kernels(cap.folder, calls["triton_kernels"] or None, self.tool)
            t = ctx.bench(fn) if fn else None
        self._record(ctx, op="attn_fwd", impl="flex", variant="compiled", causal=causal, kernels=kernels, timing=t,
                     flops=flops, inductor_calls=calls, capture_notes=cap.notes,
                     **({"unavailable": why} if why else {}))

    def _inductor(self, ctx, q, k, v, causal, flops) -> None:
        self._inductor_one(ctx, q, k, v, causal, flops, "default", {})

    def _inductor_one(self, ctx, q, k, v, causal, flops, name, opts) -> None:
        from torch._inductor.utils import run_and_get_code

        from ..codegen import collect

        f = naive_attention_causal if causal else naive_attention
        with collect.fresh_compile_caches() as cap:
            compiled = torch.compile(f, dynamic=False, options=opts or None)
            with torch.no_grad():
                _, codes = run_and_get_code(compiled, q, k, v)
            calls = collect.inductor_calls(codes)
            kernels = collect.triton_cache_kernels(cap.folder, calls["triton_kernels"], self.tool)

            def run():
                with torch.no_grad():
                    return compiled(q, k, v)

            t = ctx.bench(run)
        self._record(ctx, op="attn_fwd", impl="inductor", variant=name, causal=causal, kernels=kernels, timing=t,
                     flops=flops, inductor_calls=calls, sdpa_rewrite=collect.sdpa_rewrites(calls),
                     capture_notes=cap.notes)

    def _helion(self, ctx, q, k, v, causal, flops, tile: str = "config") -> None:
        """Helion's attention at its fixed config (``tile="config"``) or at our own D128 tile ("our tile")."""
        from ..codegen import collect

        variant = "fixed config" if tile == "config" else "our tile"
        try:
            from ..codegen import helion_attention as ha
        except Exception as e:  # noqa: BLE001 - no wheel, or a wheel that does not fit this torch/triton
            self._record(ctx, op="attn_fwd", impl="helion", variant=variant, causal=causal, kernels=[],
                         flops=flops, unavailable=f"import helion failed: {type(e).__name__}: {str(e)[:200]}")
            return
        cfg = ha.CONFIG if tile == "config" else ha.OUR_TILE
        kern = ha.kernel(causal, cfg)
        with collect.fresh_compile_caches(reset_dynamo=False) as cap:
            try:
                kern(q, k, v)
                _sync()
            except Exception as e:  # noqa: BLE001 - e.g. Triton failing on the generated code
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                self._record(ctx, op="attn_fwd", impl="helion", variant=variant, causal=causal, kernels=[],
                             flops=flops, config=str(cfg),
                             unavailable=f"helion kernel failed: {type(e).__name__}: {msg}")
                return
            kernels = collect.triton_cache_kernels(cap.folder, None, self.tool)
            t = ctx.bench(lambda: kern(q, k, v))
        self._record(ctx, op="attn_fwd", impl="helion", variant=variant, causal=causal, kernels=kernels,
                     timing=t, flops=flops, config=str(cfg),
                     note="causal: masked with torch.where, every key tile visited" if causal else "")

    def _paged(self, ctx: StudyContext) -> None:
        from ..ops.paged.interface import paged_attention

        Bp, Hq, Hkv, Nk, Dp, page = self.paged_shape
        per_seq = Nk // page
        dev, dt = self.device, self.dtype
        g = torch.Generator(device=dev).manual_seed(5)
        kc = torch.randn(Bp * per_seq, page, Hkv, Dp, device=dev, dtype=dt, generator=g)
        vc = torch.randn_like(kc)
        table = torch.randperm(Bp * per_seq, device=dev, generator=g).view(Bp, per_seq).to(torch.int32)
        lens = torch.full((Bp,), Nk, device=dev, dtype=torch.int32)
        q = torch.randn(Bp, Hq, 1, Dp, device=dev, dtype=dt, generator=g)
        nbytes = 2.0 * Bp * Nk * Hkv * Dp * kc.element_size()
        for version in ("v1", "v2"):
            self._ours(ctx, lambda version=version: paged_attention(q, kc, vc, table, lens, version=version,
                                                                    check_inputs=False, max_seq_len=Nk),
                       op="paged_decode", variant=version, causal=True, nbytes=nbytes,
                       shape=(Bp, Hq, Hkv, 1, Nk, Dp), page_size=page)

    def _linear(self, ctx: StudyContext) -> None:
        from ..ops.linear.interface import linear_attention

        Bl, Nl, Hl, Dl, C = self.linear_shape
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(6)
        q, k, v = (torch.randn(Bl, Nl, Hl, Dl, device=dev, dtype=self.dtype, generator=g) * 0.1
                   for _ in range(3))
        gates = torch.nn.functional.logsigmoid(torch.randn(Bl, Nl, Hl, device=dev, generator=g)).float()
        flops = linear_flops(Bl, Nl, Hl, Dl, Dl, C)
        for name, gate in (("chunk", None), ("chunk gated", gates))[: 1 if ctx.quick else 2]:
            self._ours(ctx, lambda gate=gate: linear_attention(q, k, v, g=gate, chunk_size=C),
                       op="linear_fwd", variant=name, causal=True, flops=flops, shape=(Bl, Hl, Hl, Nl, Nl, Dl),
                       chunk_size=C, flops_formula="2*B*H*N*(C*(K+V) + 2*K*V)")

    def _bhsd(self):
        b, h, n, d = self.shape
        g = torch.Generator(device=self.device).manual_seed(1234 + n)
        return tuple(torch.randn(b, h, n, d, device=self.device, dtype=self.dtype, generator=g) for _ in range(3))

    # ------------------------------------------------------------------ measure (interpreter)

    def _measure_interpreter(self, ctx: StudyContext) -> None:
        self._check_stored(ctx)
        with ctx.guard("cross-compile samples"):
            self._toolchain_check(ctx)

    def _check_stored(self, ctx: StudyContext) -> None:
        from ..codegen.sass import check_sample

        samples = sorted(SAMPLES_DIR.glob("*.sass")) if SAMPLES_DIR.is_dir() else []
        if not samples:
            ctx.log(f"no stored SASS samples under {SAMPLES_DIR}")
        for path in samples:
            with ctx.guard(f"sample {path.name}"):
                self._record_check(ctx, "sass_parse", path.stem, check_sample(path))

    @staticmethod
    def _record_check(ctx: StudyContext, op: str, name: str, result: Dict[str, Any]) -> None:
        n, failed = result["checks"], result["failed"]
        ctx.record(op=op, impl="attention_proto", variant=name,
                   extra={"ok": n > 0 and not failed, "checks": n, "failed": failed, "max_err": len(failed),
                          "bound": 0, "err_ratio": (len(failed) / n) if n else None,
                          "summary": result.get("summary")})

    def _toolchain_check(self, ctx: StudyContext) -> None:
        """Cross-compile the generated samples for sm_90 with Triton's ptxas, disassemble, check them."""
        from ..codegen import collect
        from ..codegen.sass import check_sample

        if not GEN_SCRIPT.exists() or not collect.cuobjdump_path():
            ctx.log("no sample generator or cuobjdump here: toolchain check skipped")
            return
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, str(GEN_SCRIPT), "--out", tmp, "--arch", "90"],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"gen_sass_samples.py failed: {res.stderr.strip()[-400:]}")
            for path in sorted(Path(tmp).glob("*.sass")):
                self._record_check(ctx, "sass_toolchain", path.stem, check_sample(path))

    # ------------------------------------------------------------------ analyze

    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        checks = [r for r in data.rows(study=self.name) if r["op"] in ("sass_parse", "sass_toolchain")]
        if checks:
            out.append(F.parser_finding(checks))
        if data.mode != "gpu":
            return out
        mm = (data.ceilings or {}).get("matmul_tflops")
        ops = ("attn_fwd", "attn_bwd", "paged_decode", "linear_fwd")
        rows = [r for r in data.rows(study=self.name) if r["op"] in ops]
        f = F.bar_finding(rows)
        if f:
            out.append(f)
        groups: Dict[tuple, List[Dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["impl"], r["op"], r["variant"]), []).append(r)
        for (impl, op, variant), rs in groups.items():
            out.append(F.path_finding(impl, op, variant, rs, mm))
        f = F.inductor_finding([r for r in rows if r["impl"] == "inductor"])
        if f:
            out.append(f)
        f = F.same_code_finding([r for r in rows if r["impl"] == "attention_proto" and r["op"] == "attn_fwd"],
                               data.env.get("triton"))
        if f:
            out.append(f)
        return out


# ---------------------------------------------------------------------- helpers


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cfg(cfg) -> Dict[str, Any]:
    return {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "path": cfg.path}


STUDY = CodegenStudy()
