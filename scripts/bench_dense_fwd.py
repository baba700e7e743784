#!/usr/bin/env python3
"""Dense forward benchmark: TFLOPS per path/config vs SDPA (cuDNN, FLASH), and host overhead.

One GPU call, compact output (also written to $OUT/bench_dense_fwd.json when $OUT is set)::

    python scripts/bench_dense_fwd.py                # GPU: TFLOPS table + host overhead + A/B
    python scripts/bench_dense_fwd.py --quick        # GPU: D128 N4k/N16k only
    python scripts/bench_dense_fwd.py --host         # GPU: host overhead only
    python scripts/bench_dense_fwd.py --lpt          # GPU: causal program order, "head" vs "lpt" (~1 min)
    python scripts/bench_dense_fwd.py --host-cpu [--src DIR]
        # no GPU needed: the Python host work of attention() with the kernel launch emulated
        # (Triton's argument binding is run, compile and the C launcher are not); --src points at
        # another checkout's src/ to compare before/after in one process layout

Shapes are the smoke run's: bf16, B*N = 16k tokens, H*D = 2048 (D64: H32, D128: H16, D256: H8),
non-causal and causal. Each row is one config (``path BMxBN wW sS``); ``auto`` is what
``attention()`` picks; ``x cuDNN`` is the ratio to SDPA's cuDNN backend in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D128 at N4k and N16k only")
    p.add_argument("--host", action="store_true", help="GPU host overhead only")
    p.add_argument("--lpt", action="store_true", help="GPU: causal forward.CAUSAL_SCHEDULE 'head' vs 'lpt'")
    p.add_argument("--host-cpu", action="store_true", help="CPU: host overhead with the launch emulated")
    p.add_argument("--src", default=None, help="--host-cpu: import attention_proto from this src/ folder")
    p.add_argument("--calls", type=int, default=2000, help="calls per host-overhead sample")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# GPU: TFLOPS
# ----------------------------------------------------------------------------------------------

def _cfgs(D):
    from attention_proto.ops.dense.configs import FwdConfig as C

    # CTAs per SM from cross-compiled sm_90 kernels (regs, shared memory) in the comments
    rows = [C(64, 64, 4, 3, "tma"),        # D64: 3/SM, D128: 2/SM (shared memory)
            C(64, 64, 4, 2, "tma"),        # D64: 4/SM, D128: 2/SM
            C(64, 32, 4, 3, "tma"),        # D128: 3/SM (114 regs)
            C(64, 128, 4, 2, "tma"),
            C(128, 64, 8, 3, "tma"),       # 1/SM at D128 (138 regs x 256 threads)
            C(128, 64, 8, 2, "tma"),
            C(128, 128, 8, 2, "tma"),      # 1/SM (189 regs): lost in the smoke run
            C(128, 64, 8, 3, "tma+ws"),    # same cubin as tma 128x64w8s3 on sm_90 (WS does nothing here)
            C(64, 64, 4, 3, "portable"), C(128, 64, 8, 3, "portable")]
    if D <= 64:
        rows += [C(128, 128, 4, 3, "portable"), C(128, 64, 4, 3, "tma"), C(128, 128, 4, 2, "tma")]
    if D >= 256:
        rows = [C(128, 64, 8, 2, "tma"), C(64, 64, 4, 2, "tma"), C(64, 32, 4, 2, "tma"),  # 64x32: 2 CTAs/SM
                C(128, 32, 8, 2, "tma"), C(64, 64, 4, 2, "portable"), C(128, 32, 8, 2, "portable")]
    return rows


def _label(cfg):
    return f"{cfg.path} {cfg.BLOCK_M}x{cfg.BLOCK_N}w{cfg.num_warps}s{cfg.num_stages}"


def _bench_ms(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median"))


def gpu_tflops(quick: bool, results: dict) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention_proto.ops.dense.configs import config_problems, pick_forward_config
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.interface import attention
    from attention_proto.runtime.timing import attention_flops

    shapes = [(128, 4096), (128, 16384)] if quick else [(64, 4096), (128, 4096), (128, 16384), (256, 4096), (256, 16384)]
    for D, N in shapes:
        H, B = 2048 // D, 16384 // N
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        for causal in (False, True):
            flops = attention_flops(B, H, N, N, D, causal)
            rows = []

            def run(name, fn, ref=None):
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    err = float((out.float() - ref.float()).abs().max()) if ref is not None else None
                    ms = _bench_ms(fn)
                    rows.append((name, flops / ms / 1e9, err, None))
                except Exception as e:  # noqa: BLE001 - a failing config is a result
                    rows.append((name, None, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90] if str(e).strip() else ''}"))

            for impl, be in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
                def sd(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                run(impl, sd)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            auto = pick_forward_config(D, q.dtype, causal, N, "auto")
            run(f"auto ({_label(auto)})", lambda: attention(q, k, v, causal=causal), ref)
            for cfg in _cfgs(D):
                if config_problems(cfg):
                    rows.append((_label(cfg), None, None, "; ".join(config_problems(cfg))[:90]))
                    continue
                run(_label(cfg), lambda cfg=cfg: flash_attention_forward(q, k, v, causal=causal, config=cfg)[0], ref)
            cudnn = rows[0][1]
            print(f"\n== bf16 D{D} N{N} B{B} H{H} causal={int(causal)}  (TFLOPS, x cuDNN, max|err| vs SDPA flash)")
            for name, tf, err, why in rows:
                if tf is None:
                    print(f"  {name:28s}   ----  {why}")
                else:
                    ratio = f"{tf / cudnn:5.2f}x" if cudnn else "   - "
                    e = f"{err:.4f}" if err is not None else ""
                    print(f"  {name:28s} {tf:6.0f}  {ratio}  {e}")
            results.setdefault("tflops", []).append(dict(D=D, N=N, B=B, H=H, causal=causal, rows=[
                dict(name=n, tflops=t, err=e, error=w) for n, t, e, w in rows]))
            sys.stdout.flush()
        del q, k, v
        torch.cuda.empty_cache()


def gpu_lpt(results: dict) -> None:
    """Causal forward with each program order (forward.CAUSAL_SCHEDULE), SDPA cuDNN beside, bf16.

    Shapes: the integration study's layer (B1 H16:4 N4k D128, where a list-scheduling model predicts
    82 -> 65 units of makespan), the flash study's (B4 H16 N4k, B1 H16 N16k at D128; B4 H32 N4k D64),
    and a large one where the L2 chunking matters (B4 H16 N16k D128 MHA: 3 heads a chunk)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention_proto.ops.dense import forward as fwd
    from attention_proto.ops.dense.interface import attention
    from attention_proto.runtime.timing import attention_flops

    shapes = [(1, 16, 4, 4096, 128), (4, 16, 16, 4096, 128), (1, 16, 16, 16384, 128), (4, 32, 32, 4096, 64),
              (4, 16, 16, 16384, 128)]
    print("\n== causal program order (TFLOPS, two runs each; best lpt / best head; x cuDNN; max|diff|)")
    for B, H, Hkv, N, D in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        flops = attention_flops(B, H, N, N, D, True)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cud = flops / _bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                            enable_gqa=H != Hkv)) / 1e9
        row = {"B": B, "H": H, "Hkv": Hkv, "N": N, "D": D, "cudnn": cud}
        outs = {}
        for sched in ("head", "lpt", "head", "lpt"):  # each twice, interleaved: the spread of one version
            with fwd.causal_schedule(sched):
                fn = lambda: attention(q, k, v, causal=True)  # noqa: E731
                outs[sched] = fn()
                row.setdefault(sched, []).append(flops / _bench_ms(fn) / 1e9)
        diff = float((outs["lpt"].float() - outs["head"].float()).abs().max())
        h, l = max(row["head"]), max(row["lpt"])
        print(f"  B{B} H{H}:{Hkv} N{N} D{D}: head {row['head'][0]:.0f}/{row['head'][1]:.0f}  "
              f"lpt {row['lpt'][0]:.0f}/{row['lpt'][1]:.0f}  "
              f"cuDNN {cud:.0f}  lpt/head {l / h:.3f}x  lpt x cuDNN {l / cud:.2f}  diff {diff:.1e}  "
              f"chunk {fwd.lpt_heads(B, H, Hkv, N, D, 2)}")
        results.setdefault("lpt", []).append(dict(row, diff=diff))
        sys.stdout.flush()
        del q, k, v
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# GPU: host overhead
# ----------------------------------------------------------------------------------------------

def _wall_us(fn, calls, sync):
    for _ in range(100):
        fn()
    sync()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
    return statistics.median(samples)


def gpu_host(calls: int, results: dict) -> None:
    import torch
    import torch.nn.functional as F

    from attention_proto.ops.dense.configs import FwdConfig
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.interface import attention
    from attention_proto.runtime.cache import KERNEL_CACHE

    q, k, v = (torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sync = torch.cuda.synchronize
    tma = FwdConfig(64, 64, 4, 3, "tma")
    cases = [
        ("sdpa (default backend)", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("attention(q, k, v)", lambda: attention(q, k, v)),
        ("attention(causal=True)", lambda: attention(q, k, v, causal=True)),
        ("flash_fwd portable cfg", lambda: flash_attention_forward(q, k, v, config=FwdConfig(64, 64, 4, 2))),
        ("flash_fwd tma 64x64w4s3", lambda: flash_attention_forward(q, k, v, config=tma)),
    ]
    print(f"\n== host overhead: bf16 B1 H8 N128 D64, wall us per call ({calls} calls, synchronized at the end)")
    out = {}
    for name, fn in cases:
        h0 = KERNEL_CACHE.stats.hits
        us = _wall_us(fn, calls, sync)
        out[name] = us
        print(f"  {name:28s} {us:7.1f} us   (kernel-cache hits {KERNEL_CACHE.stats.hits - h0})")
    print(f"  bar: <= 1.5 x sdpa = {1.5 * out['sdpa (default backend)']:.1f} us")
    results["host_gpu_us"] = out


# ----------------------------------------------------------------------------------------------
# CPU: host overhead with the launch emulated
# ----------------------------------------------------------------------------------------------

def cpu_host(calls: int, results: dict) -> None:
    """Pretend to be on Hopper (interpreter checks off, CUDA-only checks answered as on a GPU) and
    replace each kernel by a stub that runs what Triton's ``JITFunction.run`` does on a cache hit
    (bind + specialize every argument, cache key, global check, launch metadata) but neither
    compiles nor launches. A direct launch (runtime.cache.DirectLaunch), where the library has one,
    runs as on a GPU up to the C launcher, which is a no-op here."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    import attention_proto  # noqa: F401
    from attention_proto.ops.dense import configs as C, forward as F, forward_tma as FT, interface as I
    from attention_proto.runtime import cache as RC

    print(f"attention_proto from {os.path.dirname(attention_proto.__file__)}")

    class FakeDriver:  # what DirectLaunch asks of triton's driver
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda dev: 0)

    driver.set_active(FakeDriver())
    no = lambda *a, **k: False  # noqa: E731
    for m in (F, FT, C, RC):
        if hasattr(m, "interpreter_mode"):
            m.interpreter_mode = no
    I._KERNEL_DEVICE[:] = ["cpu"]
    FT._CAPABILITY[torch.device("cpu")] = (9, 0)
    orig_supports = FT.supports

    def supports(q, k, v, **kw):  # a CUDA tensor's answers, minus is_cuda (these are CPU tensors)
        if kw.get("check_device", True):
            FT._capability(q.device)
        kw["check_device"] = False
        return orig_supports(q, k, v, **kw)

    FT.supports = supports
    F._tma_path_usable = lambda q, k, v, out, varlen=False: not FT.supports(q, k, v, out=out, varlen=varlen)
    C.pick_forward_config.cache_clear()
    backend = make_backend(GPUTarget("cuda", 90, 32))

    class FakeCompiled:
        function = 1
        packed_metadata = None
        run = staticmethod(lambda *a: None)

        def launch_metadata(self, grid, stream, *args):
            return None

    class Stub:
        def __init__(self, jf):
            self.jf, self.params, self.__name__ = jf, jf.params, jf.__name__
            self.binder = create_function_from_signature(jf.signature, jf.params, backend)
            self.kkc = {}

        def warmup(self, *a, grid=None, **kw):
            return FakeCompiled()

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                kwargs["debug"] = kwargs.get("debug", self.jf.debug) or knobs.runtime.debug
                kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                bound, spec, opts = self.binder(*args, **kwargs)
                compute_cache_key(self.kkc, spec, opts)
                for (name, _), (val, gl) in self.jf.used_global_vals.items():
                    pass
                FakeCompiled().launch_metadata(grid, 0, *bound.values())
                return FakeCompiled()
            return run

    F._fwd_kernel = Stub(F._fwd_kernel)
    FT._fwd_tma_kernel = Stub(FT._fwd_tma_kernel)
    if hasattr(F, "clear_launch_plans"):
        F.clear_launch_plans()
    if os.environ.get("BENCH_PROFILE"):  # cProfile of the first case instead of timings
        import cProfile
        import pstats

        small = [torch.randn(1, 8, 128, 64, dtype=torch.float16) for _ in range(3)]
        fn = lambda: I.attention(*small)  # noqa: E731
        if os.environ["BENCH_PROFILE"] == "hf":  # the transformers attention function, as the study's model calls it
            fn = _hf_layer_calls(torch)["HF attention_forward (pos ids)"]
        for _ in range(100):
            fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        return

    def best_us(fn, n):
        for _ in range(300):
            fn()
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return best

    small = [torch.randn(1, 8, 128, 64, dtype=torch.float16) for _ in range(3)]
    big = [torch.randn(1, 16, 1024, 128, dtype=torch.float16) for _ in range(3)]
    cp, ct = C.FwdConfig(64, 64, 4, 2), C.FwdConfig(64, 64, 4, 3, "tma")
    cases = [
        ("attention() B1 H8 N128 D64", lambda: I.attention(*small)),
        ("attention(causal) same", lambda: I.attention(*small, causal=True)),
        ("attention() B1 H16 N1k D128", lambda: I.attention(*big)),
        ("flash_fwd portable cfg", lambda: F.flash_attention_forward(*small, config=cp)),
        ("flash_fwd tma cfg", lambda: F.flash_attention_forward(*small, config=ct)),
        ("torch.empty_like x2 (floor)", lambda: (torch.empty_like(small[0]), torch.empty((1, 8, 128)))),
    ]
    try:
        cases += list(_hf_layer_calls(torch).items())
    except ImportError as e:  # transformers missing: the kernel-level rows still mean something
        print(f"  (no transformers rows: {e})")
    print(f"\n== CPU host overhead (launch emulated), best-of-7 us per call, {calls} calls each")
    out = {}
    for name, fn in cases:
        out[name] = best_us(fn, calls)
        print(f"  {name:32s} {out[name]:7.1f} us")
    results["host_cpu_us"] = out


def _hf_layer_calls(torch) -> dict:
    """The integration study's layer as transformers hands it over (BHSD views of [B, N, H, D]
    projections, GQA 16:4, N128): through the custom op and through the attention function."""
    from attention_proto.integrations import torch_ops
    from attention_proto.integrations import transformers as ap_hf

    hq = torch.randn(1, 128, 16, 128, dtype=torch.float16).transpose(1, 2)
    hk, hv = (torch.randn(1, 128, 4, 128, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    pos = torch.arange(128)[None]
    layer = type("Layer", (torch.nn.Module,), {"is_causal": True})()
    return {
        "custom op flash_attention, HF views": lambda: torch_ops.flash_attention(hq, hk, hv, causal=True),
        "HF attention_forward (pos ids)": lambda: ap_hf.attention_forward(layer, hq, hk, hv, None, scaling=0.088,
                                                                        position_ids=pos),
        "HF attention_forward (no pos)": lambda: ap_hf.attention_forward(layer, hq, hk, hv, None, scaling=0.088),
    }


def main() -> None:
    a = _args()
    if a.host_cpu:
        os.environ["TRITON_INTERPRET"] = "0"  # real JIT kernels, so Triton's binder can run
        if a.src:
            sys.path.insert(0, os.path.abspath(a.src))
    results: dict = {}
    if a.host_cpu:
        cpu_host(a.calls, results)
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: use --host-cpu")
        import attention_proto  # noqa: F401

        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}")
        if a.lpt:
            gpu_lpt(results)
        else:
            if not a.host:
                gpu_tflops(a.quick, results)
            gpu_host(a.calls, results)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "bench_dense_fwd.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
