"""Study `integration` (study 8): attention-proto inside PyTorch and Hugging Face transformers.

Correctness (every mode): tiny random-weight models built from configs in code -- Llama (RoPE,
GQA) and Gemma 2 (sliding window + logit softcap; Mistral too on the GPU) -- with
``attn_implementation="attention_proto"``: logits against a float64 eager copy by the error rule
(PyTorch's own error = sdpa, or eager for Gemma 2), a left-padded batch against each sequence
alone, greedy generation against sdpa/eager (same tokens), the paged decode path, and
``torch.compile(fullgraph=True)`` with its graph-break count. Ops level: the custom ops against
the float64 reference, and the drop-in SDPA against PyTorch's.

On the GPU, a larger random Llama (8 layers, hidden 2048, 16:4 heads of 128, seq 4096, bf16;
2 layers and seq 2048 in quick mode): forward time with ours, sdpa and eager; the custom-op
boundary overhead against calling the kernel directly (host time per call at a small shape,
GPU time at seq 4k); compile time and graph breaks of torch.compile(fullgraph=True); and a
decode step captured in a CUDA graph over the paged cache (32 replayed tokens against eager).

Bars: fullgraph compile succeeds with 0 graph breaks; the model forward with attention-proto is
at least as fast as with sdpa at seq 4k.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from ..runtime.timing import attention_flops, wall_time_per_call
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, ratio, speedup_verdict

BIG = dict(layers=8, hidden=2048, heads=16, kv_heads=4, intermediate=5632, vocab=32000)
BIG_QUICK = dict(layers=2, hidden=2048, heads=16, kv_heads=4, intermediate=5632, vocab=32000)
MODEL_ROUNDS = 3  # alternating rounds of the big model forward, ours and sdpa (see run)
NO_SEARCH = "attention_proto_no_pos_search"  # ours without the search for packed sequences in position_ids


def _ok_row(ctx: StudyContext, op: str, variant: str, chk, dtype: str, **fields: Any) -> None:
    ratio_ = chk.ours / chk.bound if chk.bound else None
    ctx.record(op=op, impl="attention_proto", variant=variant, dtype=dtype,
               extra={"ok": chk.ok, "max_err": chk.ours, "torch_err": chk.torch_err, "bound": chk.bound,
                      "err_ratio": ratio_}, **fields)


def _flag_row(ctx: StudyContext, op: str, variant: str, ok: bool, dtype: str, err_ratio: Optional[float] = None,
              **extra: Any) -> None:
    """A pass/fail row; ``err_ratio`` (measured / allowed) where the check has one."""
    fields = {k: extra.pop(k) for k in ("B", "H", "Hkv", "N", "Nk", "D", "causal") if k in extra}
    ctx.record(op=op, impl="attention_proto", variant=variant, dtype=dtype,
               extra={"ok": bool(ok), "err_ratio": err_ratio if err_ratio is not None else (0.0 if ok else None),
                      **extra}, **fields)


class IntegrationStudy(Study):
    name = "integration"
    title = "PyTorch custom ops, drop-in SDPA and Hugging Face transformers"

    # ------------------------------------------------------------------ measure
    def measure(self, ctx: StudyContext) -> None:
        try:
            import transformers  # noqa: F401  (the model checks need it)
        except ImportError as e:
            ctx.log(f"transformers is not installed ({e}): model checks skipped")
            ctx.errors.append("transformers missing")
            self._ops(ctx)
            return
        from ..integrations import transformers as ap_hf

        ap_hf.register()
        gpu = ctx.timing
        steps = 4 + 3 + (4 if gpu else 0)
        bar = ctx.progress(steps, "integration")
        self._ops(ctx)
        bar.update(1, "ops")
        self._sdpa(ctx)
        bar.update(1, "drop-in sdpa")
        archs = ("llama", "gemma2", "mistral") if gpu else ("llama", "gemma2")
        for arch in archs:
            with ctx.guard(f"logits {arch}"):
                self._logits(ctx, arch)
        bar.update(1, "logits")
        with ctx.guard("padded batch"):
            self._padding(ctx)
        bar.update(1, "padding")
        with ctx.guard("generation"):
            self._generation(ctx)
        bar.update(1, "generation")
        with ctx.guard("compile tiny"):
            self._compile_tiny(ctx)
        bar.update(1, "compile")
        with ctx.guard("paged decode"):
            self._paged_generation(ctx)
        bar.update(1, "paged")
        if gpu:
            with ctx.guard("cuda graph decode"):
                self._cuda_graph(ctx)
            bar.update(1, "cuda graph")
            with ctx.guard("op boundary"):
                self._boundary(ctx)
            bar.update(1, "op overhead")
            with ctx.guard("big model"):
                self._big_model(ctx)
            bar.update(2, "big model")

    # ------------------------------------------------------------------ ops level
    def _ops(self, ctx: StudyContext) -> None:
        from ..integrations import torch_ops
        from ..ops.dense.reference import attention_reference
        from ..testing import check_error

        dev = ctx.device
        dt = torch.bfloat16 if ctx.timing else torch.float16
        dname = str(dt).replace("torch.", "")
        g = torch.Generator(device="cpu").manual_seed(8)
        B, H, Hkv, N, Nk, D = 2, 4, 2, 19, 23, 32
        q, k, v = (torch.randn(B, h, n, D, generator=g).to(dev, dt) for h, n in ((H, N), (Hkv, Nk), (Hkv, Nk)))
        for name, kw in (("causal", dict(causal=True)), ("window+softcap", dict(causal=True, window=(5, -1), softcap=8.0))):
            with ctx.guard(f"op flash_fwd {name}"):
                out = torch_ops.flash_attention(q, k, v, **kw)
                ref, _ = attention_reference(q, k, v, **kw)
                low, _ = attention_reference(q, k, v, compute_dtype=dt, device=dev, **kw)
                _ok_row(ctx, "op_flash_fwd", name, check_error(out, low, ref, dt), dname, B=B, H=H, Hkv=Hkv, N=N,
                        Nk=Nk, D=D, causal=True)
        with ctx.guard("op padded_fwd"):
            km = torch.ones(B, Nk, dtype=torch.bool, device=dev)
            km[0, :7] = False
            qm = km[:, Nk - N:]
            out = torch_ops.padded_attention(q, k, v, km, qm, causal=True)
            worst = None
            for b in range(B):
                kr, qr = km[b], qm[b]
                ref, _ = attention_reference(q[b:b + 1, :, qr], k[b:b + 1, :, kr], v[b:b + 1, :, kr], causal=True)
                low, _ = attention_reference(q[b:b + 1, :, qr], k[b:b + 1, :, kr], v[b:b + 1, :, kr], causal=True,
                                             compute_dtype=dt, device=dev)
                chk = check_error(out[b:b + 1, :, qr], low, ref, dt)
                worst = chk if worst is None or chk.ours / chk.bound > worst.ours / worst.bound else worst
            _ok_row(ctx, "op_padded_fwd", "left padding", worst, dname, B=B, H=H, Hkv=Hkv, N=N, Nk=Nk, D=D, causal=True)

    def _sdpa(self, ctx: StudyContext) -> None:
        from ..ops.dense.reference import attention_reference
        from ..sdpa import scaled_dot_product_attention
        from ..testing import check_error

        dev = ctx.device
        dt = torch.bfloat16 if ctx.timing else torch.float16
        g = torch.Generator(device="cpu").manual_seed(9)
        for L, S in ((17, 29), (29, 17)):
            with ctx.guard(f"drop-in sdpa L{L} S{S}"):
                q = torch.randn(2, 4, L, 32, generator=g).to(dev, dt)
                k = torch.randn(2, 2, S, 32, generator=g).to(dev, dt)
                v = torch.randn(2, 2, S, 32, generator=g).to(dev, dt)
                ours = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                # PyTorch's causal is top-left (j <= i): in our bottom-right terms a right window of L - S,
                # or plain causal over the first L keys when L < S
                if L >= S:
                    kw = dict(window=(-1, L - S))
                    kk, vv = k, v
                else:
                    kw = dict(causal=True)
                    kk, vv = k[:, :, :L], v[:, :, :L]
                ref, _ = attention_reference(q, kk, vv, **kw)
                low, _ = attention_reference(q, kk, vv, compute_dtype=dt, device=dev, **kw)
                _ok_row(ctx, "sdpa_dropin", f"causal L{L} S{S}", check_error(ours, low, ref, dt),
                        str(dt).replace("torch.", ""), B=2, H=4, Hkv=2, N=L, Nk=S, D=32, causal=True)

    # ------------------------------------------------------------------ models
    def _tiny(self, ctx: StudyContext, arch: str, dtype: torch.dtype, **kw):
        from ..integrations import hf_models as hm

        # interpreter: 2:1 heads of 16 (one interpreted kernel per layer and token is the cost)
        size = dict(layers=2, hidden=256, heads=4, kv_heads=2) if ctx.timing else dict(hidden=32, heads=2, kv_heads=1)
        size.update(kw)
        return hm.build_model(arch, dtype=dtype, device=ctx.device, **size)

    def _logits(self, ctx: StudyContext, arch: str) -> None:
        from ..integrations import hf_models as hm

        dt = torch.bfloat16 if ctx.timing else torch.float32
        model = self._tiny(ctx, arch, dt, **({} if ctx.timing else dict(hidden=64, heads=4, kv_heads=2)))
        N = 96 if ctx.timing else 20
        ids, _ = hm.random_batch(2, N, model.config.vocab_size, device=ctx.device, seed=3)
        chk, _ = hm.logits_check(model, ids)
        _ok_row(ctx, "model_logits", f"{arch} vs {hm.reference_impl(arch)}", chk, str(dt).replace("torch.", ""),
                B=2, H=model.config.num_attention_heads, Hkv=model.config.num_key_value_heads, N=N,
                D=model.config.head_dim, causal=True, mods=self._mods(arch))

    @staticmethod
    def _mods(arch: str) -> List[str]:
        return {"llama": ["rope", "gqa"], "gemma2": ["rope", "gqa", "window", "softcap"],
                "mistral": ["rope", "gqa", "window"]}.get(arch, [])

    def _padding(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm

        dt = torch.float32
        model = self._tiny(ctx, "llama", dt)
        N = 24 if not ctx.timing else 64
        lens = [N, N - 9, 5]
        ids, mask = hm.random_batch(3, N, model.config.vocab_size, device=ctx.device, seed=4, pad="left", lengths=lens)
        chk, _ = hm.logits_check(model, ids, mask)
        _ok_row(ctx, "model_logits", "llama left-padded batch vs sdpa", chk, "float32", B=3, N=N, causal=True,
                mods=["key_padding"])
        worst = hm.padded_vs_alone(model, ids, mask)
        tol = 1e-4
        _flag_row(ctx, "padded_vs_alone", "llama left padding", worst <= tol, "float32", err_ratio=worst / tol,
                  max_diff=worst, tol=tol, B=3, N=N)

    def _generation(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm
        from ..integrations import transformers as ap_hf

        new = 32 if ctx.timing else 6
        for arch in (("llama", "gemma2") if ctx.timing else ("llama",)):
            model = self._tiny(ctx, arch, torch.float32)
            ids, mask = hm.random_batch(2, 12, model.config.vocab_size, device=ctx.device, seed=5, pad="left",
                                        lengths=[12, 7])
            ref = hm.greedy(model, ids, mask, new_tokens=new, impl=hm.reference_impl(arch))
            ap_hf.reset_stats()
            ours = hm.greedy(model, ids, mask, new_tokens=new)
            same = torch.equal(ref, ours)
            first = int((ref != ours).any(0).nonzero()[0]) if not same else None
            _flag_row(ctx, "generate", f"{arch} greedy {new} tokens, left-padded", same, "float32", B=2, N=12,
                      tokens=new, first_diff=first, paths=dict(ap_hf.STATS))

    def _paged_generation(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm
        from ..integrations import transformers as ap_hf

        new = 32 if ctx.timing else 4
        model = self._tiny(ctx, "gemma2", torch.float32)
        ids, _ = hm.random_batch(1, 10, model.config.vocab_size, device=ctx.device, seed=6)
        ref = hm.greedy(model, ids, new_tokens=new)
        ap_hf.reset_stats()
        paged = hm.greedy(model, ids, new_tokens=new, cache=ap_hf.PagedCache(model.config, max_cache_len=64))
        used = ap_hf.STATS["paged"]
        _flag_row(ctx, "generate_paged", f"gemma2 greedy {new} tokens, PagedCache", torch.equal(ref, paged) and used > 0,
                  "float32", tokens=new, paged_calls=used, same_tokens=torch.equal(ref, paged))

    def _compile_tiny(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm

        model = self._tiny(ctx, "llama", torch.float32)
        model.set_attn_implementation("attention_proto")
        ids, mask = hm.random_batch(2, 16, model.config.vocab_size, device=ctx.device, seed=7, pad="left",
                                    lengths=[16, 11])
        # aot_eager traces through the ops' fake implementations as inductor does, without its codegen
        # time; under the interpreter plain dynamo ("eager") keeps the check short
        res = _compile_check(model, (ids,), {"attention_mask": mask}, backend="aot_eager" if ctx.timing else "eager")
        ok = res["fullgraph_ok"] and res["graph_breaks"] == 0 and res["max_diff"] is not None and res["max_diff"] < 1e-3
        _flag_row(ctx, "compile", f"llama tiny fullgraph ({res['backend']})", ok, "float32", **res)

    # ------------------------------------------------------------------ GPU only
    def _cuda_graph(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm

        from ..integrations.transformers import PagedCache

        model = self._tiny(ctx, "llama", torch.float32)
        ids, _ = hm.random_batch(2, 10, model.config.vocab_size, device=ctx.device, seed=10)
        # the eager baseline runs the same paged kernels (a dense-cache baseline differs in kernel
        # and could flip an argmax near-tie of the tiny random model); the dense one is recorded too
        cap = ids.shape[1] + 32 + 16  # cuda_graph_greedy's default capacity
        eager = hm.greedy(model, ids, new_tokens=32, cache=PagedCache(model.config, max_cache_len=cap, page_size=16))
        dense = hm.greedy(model, ids, new_tokens=32)
        graphed = hm.cuda_graph_greedy(model, ids, new_tokens=32)
        _flag_row(ctx, "cuda_graph_decode", "llama paged decode step in a CUDA graph, 32 tokens",
                  torch.equal(eager, graphed), "float32", tokens=32, same_as_dense_cache=torch.equal(dense, graphed))

    def _boundary(self, ctx: StudyContext) -> None:
        from ..integrations import torch_ops
        from ..ops.dense.forward import flash_attention_forward
        from . import peers

        for N, B in ((128, 1), (4096, 1)):
            q, k, v = peers.bhsd(B, 16, N, 128, Hkv=4, seed=11)
            direct = lambda: flash_attention_forward(q, k, v, causal=True)  # noqa: E731
            op = lambda: torch_ops.flash_attention(q, k, v, causal=True)  # noqa: E731
            with torch.no_grad():
                if N <= 128:
                    sync = torch.cuda.synchronize
                    us_direct = wall_time_per_call(direct, calls=500, sync=sync)
                    us_op = wall_time_per_call(op, calls=500, sync=sync)
                    for impl, us in (("direct", us_direct), ("custom_op", us_op)):
                        ctx.record(op="op_boundary_host", impl="attention_proto", variant=impl, B=B, H=16, Hkv=4,
                                   N=N, D=128, dtype="bfloat16", causal=True, extra={"us_per_call": us})
                else:
                    flops = attention_flops(B, 16, N, N, 128, True)
                    for impl, fn in (("direct", direct), ("custom_op", op)):
                        ctx.record(op="op_boundary_gpu", impl="attention_proto", variant=impl, B=B, H=16, Hkv=4,
                                   N=N, D=128, dtype="bfloat16", causal=True, timing=ctx.bench(fn), flops=flops)

    def _big_model(self, ctx: StudyContext) -> None:
        from ..integrations import hf_models as hm

        size = BIG_QUICK if ctx.quick else BIG
        N = 2048 if ctx.quick else 4096
        model = hm.build_model("llama", dtype=torch.bfloat16, device="cuda", seed=12, **size)
        cfg = model.config
        ids, _ = hm.random_batch(1, N, cfg.vocab_size, device="cuda", seed=13)
        n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
        flops = 2.0 * n_params * N + cfg.num_hidden_layers * attention_flops(1, cfg.num_attention_heads, N, N,
                                                                              cfg.head_dim, True)
        variant = f"llama {cfg.num_hidden_layers}L h{cfg.hidden_size} seq{N}"
        fields = dict(B=1, H=cfg.num_attention_heads, Hkv=cfg.num_key_value_heads, N=N, D=cfg.head_dim,
                      dtype="bfloat16", causal=True)
        # ours and sdpa alternate over MODEL_ROUNDS rounds (eager, far behind, once): the host and clocks
        # drift between sittings by ~5%, so each round compares the two under the same conditions; the
        # row's timing is the round whose median is the median of the rounds, every round in extra
        # NO_SEARCH: ours registered with packed_position_ids=False, i.e. without looking for packed sequences
        # in position_ids (since df5e38a the search runs on the device, per-row first keys in the kernel;
        # before, it cost one sync per forward): what the search costs
        from ..integrations import transformers as ap_hf

        rounds: Dict[str, List[Any]] = {}
        enqueue: Dict[str, List[float]] = {}
        gpu_ms: Dict[str, float] = {}
        order = ["attention_proto", "sdpa", NO_SEARCH] * (1 if ctx.quick else MODEL_ROUNDS) + ["eager"]
        for impl in order:
            with ctx.guard(f"big model {impl}"):
                if impl == NO_SEARCH:
                    ap_hf.register(packed_position_ids=False)
                model.set_attn_implementation("attention_proto" if impl == NO_SEARCH else impl)

                def fwd():
                    with torch.no_grad():
                        return model(ids).logits

                try:
                    fwd()
                    torch.cuda.synchronize()
                    rounds.setdefault(impl, []).append(ctx.bench(fwd, warmup_ms=50, rep_ms=300))
                    if ctx.timing:
                        enqueue.setdefault(impl, []).append(_enqueue_ms(fwd))
                        if impl not in gpu_ms and impl != "eager":
                            gpu_ms[impl] = _kernel_ms(fwd)
                finally:
                    if impl == NO_SEARCH:
                        ap_hf.register()
        for impl, ts in rounds.items():
            ok = [t for t in ts if t is not None]
            t = sorted(ok, key=lambda x: x.ms_median)[(len(ok) - 1) // 2] if ok else None
            extra = {"round_ms": [round(x.ms_median, 4) for x in ok], "rounds": len(ts)}
            if impl in enqueue:
                # host time to enqueue one forward, per round: a forward whose enqueue takes as long as its
                # GPU work is host-bound, and do_bench then times the host
                extra["enqueue_ms"] = [round(x, 3) for x in enqueue[impl]]
            if impl in gpu_ms:
                extra["gpu_kernel_ms"] = round(gpu_ms[impl], 4)  # GPU time of every kernel of one forward
            ctx.record(op="model_fwd", impl=impl, variant=variant, timing=t, flops=flops, extra=extra, **fields)
        for impl in ("attention_proto", "sdpa"):
            with ctx.guard(f"big model compile {impl}"):
                model.set_attn_implementation(impl)
                # the tiny model's run counts breaks with explain; here fullgraph success is the count (saves a trace)
                res = _compile_check(model, (ids,), {}, backend="inductor", max_diff=False, explain=False)
                compiled = res.pop("compiled")
                t = None
                if compiled is not None:
                    def cfwd():
                        with torch.no_grad():
                            return compiled(ids).logits

                    t = ctx.bench(cfwd, warmup_ms=50, rep_ms=300)
                    if ctx.timing:
                        res["enqueue_ms"] = round(_enqueue_ms(cfwd), 3)
                ctx.record(op="model_compile", impl=impl, variant=variant, timing=t, flops=flops, extra=res, **fields)
                compiled = None  # the next implementation compiles afresh (dynamo reset below)
                torch._dynamo.reset()
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ analyze
    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        for op in ("op_flash_fwd", "op_padded_fwd", "sdpa_dropin", "model_logits"):
            f = correctness_finding(self.name, data, op)
            if f:
                out.append(f)
        out.extend(self._flag_findings(data))
        comp = [r for r in data.rows(op="compile")] + [r for r in data.rows(op="model_compile")]
        if comp:
            breaks = [r["extra"].get("graph_breaks") for r in comp]
            fulls = [bool(r["extra"].get("fullgraph_ok")) for r in comp]
            known = [b for b in breaks if b is not None]
            ok = all(fulls) and known and max(known) == 0
            secs = [r["extra"].get("compile_s") for r in comp if r["extra"].get("compile_s") is not None]
            out.append(Finding(
                id="integration-compile-fullgraph", title="torch.compile(fullgraph=True) of a Llama model with our attention",
                claim=(f"{sum(fulls)} of {len(comp)} torch.compile(fullgraph=True) runs of Llama-architecture models with "
                       f"attn_implementation='attention_proto' succeeded, with {max(known) if known else 'n/a'} graph "
                       f"breaks at most (dynamo explain) and compile times of {', '.join(fmt(s, 1) + ' s' for s in secs) or 'n/a'} "
                       f"({', '.join(r['variant'] for r in comp)})."),
                verdict="supported" if ok else "refuted",
                metrics={"runs": len(comp), "fullgraph_ok": sum(fulls), "max_graph_breaks": max(known) if known else None,
                         "compile_s": secs},
                evidence=[r["id"] for r in comp]))
        if data.mode == "gpu":
            out.extend(self._gpu_findings(data))
        return out

    def _flag_findings(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        specs = (
            ("generate", "integration-generate-same-tokens", "Greedy generation matches sdpa/eager",
             lambda r: (f"{r['variant']}: {'same tokens' if r['extra']['ok'] else 'first difference at token ' + str(r['extra'].get('first_diff'))}"
                        f" (paths {r['extra'].get('paths')})")),
            ("generate_paged", "integration-paged-decode", "Generation over PagedCache runs the paged decode kernel",
             lambda r: (f"{r['variant']}: {r['extra'].get('paged_calls')} paged decode calls, "
                        f"{'same' if r['extra'].get('same_tokens') else 'different'} tokens as the dense cache")),
            ("padded_vs_alone", "integration-padded-batch", "A padded batch gives each sequence's own result",
             lambda r: (f"{r['variant']}: max |batched - alone| logits difference {fmt(r['extra'].get('max_diff'), 8)}"
                        f" (tolerance {r['extra'].get('tol')})")),
            ("cuda_graph_decode", "integration-cuda-graph-decode", "A paged decode step captured in a CUDA graph",
             lambda r: f"{r['variant']}: {'same tokens as eager decode' if r['extra']['ok'] else 'tokens differ from eager decode'}"),
        )
        for op, fid, title, describe_row in specs:
            rows = data.rows(op=op)
            if not rows:
                continue
            good = [r for r in rows if r["extra"].get("ok")]
            out.append(Finding(
                id=fid, title=title,
                claim=f"{len(good)} of {len(rows)} passed: " + "; ".join(describe_row(r) for r in rows) + ".",
                verdict="supported" if len(good) == len(rows) else "refuted",
                metrics={"checks": len(rows), "passed": len(good)}, evidence=[r["id"] for r in rows]))
        return out

    def _gpu_findings(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        rows = {r["impl"]: r for r in data.rows(op="model_fwd") if r["ms_median"]}
        ours, sdpa, eager = rows.get("attention_proto"), rows.get("sdpa"), rows.get("eager")
        if ours and sdpa:
            sp = ratio(sdpa["ms_median"], ours["ms_median"])
            out.append(Finding(
                id="integration-forward-vs-sdpa", title=f"Model forward with attention-proto vs sdpa at seq {ours['N']}",
                claim=(f"A random {ours['variant']} bf16 forward takes {fmt(ours['ms_median'])} ms with "
                       f"attention-proto and {fmt(sdpa['ms_median'])} ms with sdpa ({fmt(sp)}x; the bar is >= 1.00x)"
                       f"{', and ' + fmt(eager['ms_median']) + ' ms with eager' if eager else ''}."
                       + _rounds_text(ours, sdpa) + _host_bound_text(ours, sdpa)),
                verdict=speedup_verdict(sp, 1.0),
                metrics={"ours_ms": ours["ms_median"], "sdpa_ms": sdpa["ms_median"],
                         "eager_ms": eager["ms_median"] if eager else None, "speedup_vs_sdpa": sp,
                         "round_speedups": _round_speedups(ours, sdpa),
                         "speedup_vs_eager": ratio(eager["ms_median"], ours["ms_median"]) if eager else None},
                evidence=[r["id"] for r in (ours, sdpa, eager) if r]))
        ko, ks = ((ours or {}).get("extra") or {}).get("gpu_kernel_ms"), ((sdpa or {}).get("extra") or {}).get("gpu_kernel_ms")
        if ko and ks:
            out.append(Finding(
                id="integration-forward-gpu-time", title="GPU work of one model forward, attention-proto vs sdpa",
                claim=(f"The kernels of one {ours['variant']} forward take {fmt(ko, 3)} ms of GPU time with "
                       f"attention-proto and {fmt(ks, 3)} ms with sdpa ({fmt(ratio(ks, ko), 3)}x; torch.profiler, "
                       f"every kernel summed, so the host's speed does not enter)."),
                verdict="observation",
                metrics={"ours_gpu_ms": ko, "sdpa_gpu_ms": ks, "speedup_vs_sdpa": ratio(ks, ko)},
                evidence=[ours["id"], sdpa["id"]]))
        nos = rows.get(NO_SEARCH)
        if ours and nos and sdpa:
            out.append(Finding(
                id="integration-forward-position-search",
                title="What looking for packed sequences in position_ids costs the model forward",
                claim=(f"With the search for packed sequences in position_ids turned off "
                       f"(register(packed_position_ids=False)) the {ours['variant']} forward takes "
                       f"{fmt(nos['ms_median'])} ms against {fmt(ours['ms_median'])} ms with it "
                       f"({fmt(ratio(ours['ms_median'], nos['ms_median']))}x) and {fmt(sdpa['ms_median'])} ms "
                       f"with sdpa ({fmt(ratio(sdpa['ms_median'], nos['ms_median']))}x sdpa's speed)."
                       + _rounds_text(nos, sdpa)),
                verdict="observation",
                metrics={"with_search_ms": ours["ms_median"], "without_search_ms": nos["ms_median"],
                         "sdpa_ms": sdpa["ms_median"], "speedup_vs_sdpa": ratio(sdpa["ms_median"], nos["ms_median"])},
                evidence=[r["id"] for r in (ours, nos, sdpa)]))
        comp = data.one(op="model_compile", impl="attention_proto")
        comp_sdpa = data.one(op="model_compile", impl="sdpa")
        if comp and comp["ms_median"] and comp_sdpa and comp_sdpa["ms_median"]:
            sp = ratio(comp_sdpa["ms_median"], comp["ms_median"])
            out.append(Finding(
                id="integration-compiled-vs-sdpa", title="Compiled model forward, attention-proto vs sdpa",
                claim=(f"Compiled with torch.compile (inductor, fullgraph), the {comp['variant']} forward takes "
                       f"{fmt(comp['ms_median'])} ms with attention-proto and {fmt(comp_sdpa['ms_median'])} ms with "
                       f"sdpa ({fmt(sp)}x)" + _enqueue_text(comp, comp_sdpa) + "."),
                verdict="observation",
                metrics={"ours_ms": comp["ms_median"], "sdpa_ms": comp_sdpa["ms_median"], "speedup_vs_sdpa": sp},
                evidence=[comp["id"], comp_sdpa["id"]]))
        if comp and comp["ms_median"] and ours:
            out.append(Finding(
                id="integration-compiled-forward", title="Compiled model forward with attention-proto",
                claim=(f"torch.compile (inductor, fullgraph) of the {comp['variant']} model took "
                       f"{fmt(comp['extra'].get('compile_s'), 1)} s to compile; the compiled forward runs in "
                       f"{fmt(comp['ms_median'])} ms against {fmt(ours['ms_median'])} ms eager "
                       f"({fmt(ratio(ours['ms_median'], comp['ms_median']))}x)."),
                verdict="observation",
                metrics={"compile_s": comp["extra"].get("compile_s"), "compiled_ms": comp["ms_median"],
                         "eager_ms": ours["ms_median"]},
                evidence=[comp["id"], ours["id"]]))
        host = {r["variant"]: r for r in data.rows(op="op_boundary_host")}
        gpu = {r["variant"]: r for r in data.rows(op="op_boundary_gpu") if r["ms_median"]}
        if "direct" in host and "custom_op" in host:
            d, c = host["direct"]["extra"]["us_per_call"], host["custom_op"]["extra"]["us_per_call"]
            gd, gc = gpu.get("direct"), gpu.get("custom_op")
            extra_txt = ""
            if gd and gc:
                extra_txt = (f"; at N{gc['N']} the GPU time is {fmt(gc['ms_median'], 3)} ms through the op against "
                             f"{fmt(gd['ms_median'], 3)} ms direct ({fmt(ratio(gc['ms_median'], gd['ms_median']), 3)}x)")
            out.append(Finding(
                id="integration-op-overhead", title="Custom-op boundary overhead",
                claim=(f"Calling the forward through torch.ops.attention_proto.flash_fwd costs {fmt(c, 1)} us of host "
                       f"time per call against {fmt(d, 1)} us for the kernel entry called directly ({c - d:+.1f} us, "
                       f"N{host['direct']['N']}){extra_txt}"
                       + ("; the op measured faster than the direct call: this difference is within the "
                          "host's noise" if c < d else "") + "."),
                verdict="observation",
                metrics={"host_us_direct": d, "host_us_op": c, "host_us_overhead": c - d,
                         "gpu_ms_direct": gd["ms_median"] if gd else None, "gpu_ms_op": gc["ms_median"] if gc else None},
                evidence=[r["id"] for r in list(host.values()) + list(gpu.values())]))
        return out


def _compile_check(model, args: tuple, kwargs: dict, *, backend: str, max_diff: bool = True,
                   explain: bool = True) -> Dict[str, Any]:
    """Graph breaks, whether fullgraph compiles, its first-call time and the output difference.

    ``explain``: count breaks with dynamo's explain (a second trace); without it the count is 0
    when fullgraph=True compiles (it raises at the first break) and unknown otherwise.
    """
    import torch._dynamo as dynamo

    res: Dict[str, Any] = {"backend": backend, "graph_breaks": None, "graph_count": None, "fullgraph_ok": False,
                           "compile_s": None, "max_diff": None, "error": None,
                           "breaks_counted_by": "dynamo.explain" if explain else "fullgraph"}
    with torch.no_grad():
        eager = model(*args, **kwargs).logits if max_diff else None
        dynamo.reset()
        if explain:
            try:
                ex = dynamo.explain(model)(*args, **kwargs)
                res["graph_breaks"], res["graph_count"] = int(ex.graph_break_count), int(ex.graph_count)
                if ex.break_reasons:
                    res["break_reasons"] = [str(getattr(b, "reason", b))[:200] for b in ex.break_reasons[:5]]
            except Exception as e:  # noqa: BLE001 - recorded, the compile below still runs
                res["error"] = f"explain: {type(e).__name__}: {str(e)[:200]}"
            dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        try:
            t0 = time.perf_counter()
            out = compiled(*args, **kwargs).logits
            if out.is_cuda:
                torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            res["fullgraph_ok"] = True
            if not explain:
                res["graph_breaks"], res["graph_count"] = 0, 1
            if eager is not None:
                res["max_diff"] = float((out.float() - eager.float()).abs().max())
        except Exception as e:  # noqa: BLE001
            res["error"] = f"compile: {type(e).__name__}: {str(e)[:300]}"
            compiled = None
    res["compiled"] = compiled
    if max_diff:
        res.pop("compiled")
    return res


STUDY = IntegrationStudy()


def _enqueue_ms(fwd) -> float:
    """Host milliseconds to enqueue one call of ``fwd`` (the GPU idle at the start; no sync inside)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fwd()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3


def _kernel_ms(fwd) -> float:
    """GPU milliseconds of every kernel one call of ``fwd`` launches (torch.profiler, summed): the
    forward's GPU work, whatever the host's speed."""
    from torch.profiler import ProfilerActivity, profile

    fwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
    # the device-side events (kernels, memcpy, memset), each once: their own time ranges
    us = sum(e.time_range.elapsed_us() for e in prof.events()
             if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return us / 1e3


def _round_speedups(ours: dict, sdpa: dict) -> List[float]:
    """sdpa / ours per alternating round (rows recorded before the rounds have none)."""
    a, b = (ours.get("extra") or {}).get("round_ms") or [], (sdpa.get("extra") or {}).get("round_ms") or []
    return [round(y / x, 4) for x, y in zip(a, b) if x]


def _host_bound_text(ours: dict, sdpa: dict) -> str:
    """How long the host took to enqueue one forward against the forward's GPU kernel time."""
    eo, es = (ours.get("extra") or {}), (sdpa.get("extra") or {})
    qo, qs = eo.get("enqueue_ms"), es.get("enqueue_ms")
    if not qo or not qs:
        return ""
    mo, ms = sorted(qo)[(len(qo) - 1) // 2], sorted(qs)[(len(qs) - 1) // 2]
    txt = f" Enqueueing one forward took {fmt(mo)} ms of host time with attention-proto and {fmt(ms)} ms with sdpa"
    ko, ks = eo.get("gpu_kernel_ms"), es.get("gpu_kernel_ms")
    if ko and ks:
        txt += f", against {fmt(ko)} and {fmt(ks)} ms of GPU kernel time"
        bound = [name for name, q, k in (("attention-proto", mo, ko), ("sdpa", ms, ks)) if q >= 0.9 * k]
        txt += (f": host-bound ({' and '.join(bound)}: the enqueue takes at least 90% of the kernel time, so the "
                f"timing follows the host)" if bound else ": the GPU work dominates")
    return txt + "."


def _enqueue_text(ours: dict, sdpa: dict) -> str:
    qo, qs = (ours.get("extra") or {}).get("enqueue_ms"), (sdpa.get("extra") or {}).get("enqueue_ms")
    if qo is None or qs is None:
        return ""
    return f"; enqueueing one compiled forward took {fmt(qo)} and {fmt(qs)} ms of host time"


def _rounds_text(ours: dict, sdpa: dict) -> str:
    sps = _round_speedups(ours, sdpa)
    if len(sps) < 2:
        return ""
    return (f" Each timing is the median of {len(sps)} alternating rounds; the rounds' ratios were "
            + ", ".join(f"{x:.2f}x" for x in sps) + ".")
