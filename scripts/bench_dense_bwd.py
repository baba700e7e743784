#!/usr/bin/env python3
"""Dense backward benchmark (issue #4): our backward candidates against SDPA FLASH, SDPA cuDNN and
compiled FlexAttention, forward+backward and backward alone.

    PYTHONPATH=src python scripts/bench_dense_bwd.py           # GPU (H100): check, time, table
    PYTHONPATH=src python scripts/bench_dense_bwd.py --quick   # GPU: N4096 only
    PYTHONPATH=src python scripts/bench_dense_bwd.py --cpu     # smoke test in the interpreter (tiny fp16, no peers)
    PYTHONPATH=src python scripts/bench_dense_bwd.py --sm90    # no GPU: compile the candidates for sm_90a, print
                                                               # registers / spills / shared memory (ptxas -v)

GPU run: (1) every candidate's dq/dk/dv against float64 at bf16 B1 H16 N2048 D128, causal and not, with
the tests' rule (error <= 3x PyTorch's own bf16 error + floor), plus a bitwise rerun for the deterministic
ones; a failing candidate is not timed. (2) triton.testing.do_bench medians at bf16 D128 H16, B*N = 16k,
N in {4096, 8192}, causal and not: ours as flash_attention_forward + flash_attention_backward(config=...)
(no autograd), "ours autograd" through attention() (what training runs), the peers through autograd.
Backward alone: ours by calling the backward on a saved O/LSE; peers by torch.autograd.grad with
retain_graph on one forward (or fwd+bwd minus fwd if that fails, marked ~). Last, a table: ms, TFLOPS
(fwd+bwd counted 3.5x, bwd 2.5x the forward FLOPs) and speed relative to FlexAttention (>1: faster);
also written to $OUT/bench_dense_bwd.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TOKENS, HD = 16384, 2048  # B*N and H*D of the bar shapes (D128 -> H16)


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="interpreter smoke run (no GPU, no peers)")
    p.add_argument("--sm90", action="store_true", help="compile the candidates for sm_90a on the CPU")
    p.add_argument("--quick", action="store_true", help="GPU: N4096 only")
    p.add_argument("--no-flex", action="store_true", help="GPU: skip FlexAttention (its compiles take ~10 s a shape)")
    return p.parse_args()


def candidates(D: int = 128):
    """(name, BwdConfig, deterministic); the first TMA one is what attention() now picks on Hopper."""
    from attention_proto.ops.dense.backward import BwdConfig as C

    t = dict(path="tma")
    return [
        ("old default", C(32, 128, 8, 2), True),              # portable kernels, as measured before
        ("old atomic", C(32, 128, 8, 2), False),              # portable, dQ by fp32 atomics in the dK/dV pass
        ("tma", C(64, 128, 8, 3, **t), True),                 # new default: Flex's tiles, one launch
        ("tma split", C(64, 128, 8, 3, fused=False, **t), True),  # same, two launches: the fusion's worth
        ("tma s2", C(64, 128, 8, 2, **t), True),
        ("tma s4", C(64, 128, 8, 4, **t), True),
        ("tma 32x128", C(32, 128, 8, 3, dq_block_m=128, dq_block_n=64, **t), True),  # fewer registers (~200)
        ("tma 64x64 w4", C(64, 64, 4, 2, **t), True),          # 4 warps, 97 KB: two CTAs per SM
    ]


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------

def check_grads(cands, dtype, device, B, H, N, D, causal_list, report):
    """dq/dk/dv of each candidate against float64 (factor 3 of torch's own error); returns the failures."""
    import torch

    from attention_proto.ops.dense.backward import flash_attention_backward
    from attention_proto.ops.dense.reference import attention_reference
    from attention_proto.testing import check_error

    bad = set()
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    for causal in causal_list:
        refs = {}
        for cd in (torch.float64, dtype):
            ins = [t.detach().to(cd).requires_grad_() for t in (q, k, v)]
            o, lse = attention_reference(*ins, causal=causal, compute_dtype=cd, device=device)
            refs[cd] = (o.detach(), lse.detach(), torch.autograd.grad(o, ins, do.to(cd)))
            del ins, o
        o = refs[torch.float64][0].to(dtype)
        lse = refs[torch.float64][1].float()
        for name, cfg, det in cands:
            try:
                ours = flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=cfg, deterministic=det)
                worst = 0.0
                for gname, a, lo, hi in zip(("dq", "dk", "dv"), ours, refs[dtype][2], refs[torch.float64][2]):
                    chk = check_error(a, lo, hi, dtype, factor=3.0)
                    worst = max(worst, chk.ours / chk.bound)
                    if not chk.ok:
                        bad.add(name)
                        print(f"  FAIL {name} causal={int(causal)} {gname}: {chk}")
                bitwise = ""
                if det:
                    again = flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=cfg)
                    same = all(torch.equal(a, b) for a, b in zip(ours, again))
                    bitwise = "bitwise rerun ok" if same else "NOT BITWISE REPRODUCIBLE"
                    if not same:
                        bad.add(name)
                print(f"  {name:12s} {cfg.label:32s} causal={int(causal)}  err/bound {worst:.2f}  {bitwise}")
                report.append(dict(name=name, config=cfg.label, causal=causal, err_over_bound=worst, bitwise=bitwise))
            except Exception as e:  # noqa: BLE001 - a failing candidate is a result
                bad.add(name)
                print(f"  FAIL {name} causal={int(causal)}: {type(e).__name__}: {str(e).strip()[:200]}")
        sys.stdout.flush()
    return bad


# ----------------------------------------------------------------------------------------------
# GPU timing
# ----------------------------------------------------------------------------------------------

def _ms(fn, rep=100):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _peer_fns(impl, q, k, v, do, causal):
    """(fwd with autograd graph, fwd+bwd step, bwd-alone fn or None) of one peer; raises if it cannot run."""
    import torch
    import torch.nn.functional as F

    from attention_proto.studies import peers

    ins = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        bm = None
        if causal:  # Nq == Nk here: bottom-right causal is the plain one
            bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[2], k.shape[2], device=q.device)
        flex = peers.compiled_flex()

        def fwd():
            return flex(*ins, block_mask=bm)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, peers.SDPA_BACKENDS[impl])

        def fwd():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*ins, is_causal=causal)

    def step():
        return torch.autograd.grad(fwd(), ins, do)

    step()
    torch.cuda.synchronize()
    o = fwd()

    def bwd():
        return torch.autograd.grad(o, ins, do, retain_graph=True)

    try:
        bwd()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - fall back to fwd+bwd minus fwd
        return fwd, step, None
    return fwd, step, bwd


def gpu_main(args) -> None:
    import torch

    from attention_proto.ops.dense.backward import flash_attention_backward
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.interface import attention
    from attention_proto.runtime.timing import attention_flops

    t_start = time.time()
    dev = "cuda"
    D = 128
    H = HD // D
    cands = candidates(D)
    results = {"device": torch.cuda.get_device_name(0), "check": [], "rows": []}
    import triton

    print(f"device: {results['device']}; torch {torch.__version__}; triton {triton.__version__}")

    # same integer specializations as the bar shapes (H16, N a multiple of 2048, GROUP 1): no extra compiles
    print("\n== gradient check: bf16 B1 H16 N2048 D128 vs float64 (bound = 3x torch bf16 error + floor)")
    bad = check_grads(cands, torch.bfloat16, dev, 1, H, 2048, D, (False, True), results["check"])
    torch.cuda.empty_cache()
    print(f"   ({time.time() - t_start:.0f} s so far)")

    peers_list = ["sdpa_flash", "sdpa_cudnn"] + ([] if args.no_flex else ["flex"])
    Ns = (4096,) if args.quick else (4096, 8192)
    for N in Ns:
        B = TOKENS // N
        for causal in (False, True):
            g = torch.Generator(device=dev).manual_seed(N + causal)
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
            f_fb = attention_flops(B, H, N, N, D, causal, mode="fwd_bwd")
            f_b = attention_flops(B, H, N, N, D, causal, mode="bwd")
            rows = []

            def add(name, label, fb_ms, b_ms, note=""):
                rows.append(dict(N=N, causal=causal, name=name, config=label, fwd_bwd_ms=fb_ms, bwd_ms=b_ms,
                                 fwd_bwd_tflops=f_fb / fb_ms / 1e9 if fb_ms else None,
                                 bwd_tflops=f_b / b_ms / 1e9 if b_ms else None, note=note))

            o, lse = flash_attention_forward(q, k, v, causal=causal)
            fwd_ms = _ms(lambda: flash_attention_forward(q, k, v, causal=causal))
            add("ours fwd", "forward alone", None, None, f"{fwd_ms:.3f} ms")
            for name, cfg, det in cands:
                if name in bad:
                    add(name, cfg.label, None, None, "failed the check")
                    continue
                try:
                    def bwd(cfg=cfg, det=det):
                        return flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=cfg,
                                                        deterministic=det)

                    def step(cfg=cfg, det=det):
                        oo, ll = flash_attention_forward(q, k, v, causal=causal)
                        return flash_attention_backward(do, q, k, v, oo, ll, causal=causal, config=cfg,
                                                        deterministic=det)

                    bwd()
                    add(name, cfg.label, _ms(step), _ms(bwd))
                except Exception as e:  # noqa: BLE001
                    add(name, cfg.label, None, None, f"{type(e).__name__}: {str(e).strip()[:120]}")
            try:  # the real training path: attention() through autograd, default config
                ins = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))

                def auto_step():
                    return torch.autograd.grad(attention(*ins, causal=causal), ins, do)

                auto_step()
                add("ours autograd", "attention() default", _ms(auto_step), None)
            except Exception as e:  # noqa: BLE001
                add("ours autograd", "attention() default", None, None, f"{type(e).__name__}: {str(e)[:120]}")
            for impl in peers_list:
                try:
                    fwd, step, bwd = _peer_fns(impl, q, k, v, do, causal)
                    fb = _ms(step)
                    if bwd is not None:
                        add(impl, "", fb, _ms(bwd))
                    else:
                        add(impl, "", fb, fb - _ms(fwd), "~bwd = fwd+bwd - fwd")
                except Exception as e:  # noqa: BLE001 - a peer refusing is a result
                    msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
                    add(impl, "", None, None, f"{type(e).__name__}: {msg}")
                torch.cuda.empty_cache()
            results["rows"] += rows
            _print_shape(rows, N, B, H, D, causal)
            print(f"   ({time.time() - t_start:.0f} s so far)")
            torch.cuda.empty_cache()
    _print_table(results["rows"])
    print(f"\ntotal {time.time() - t_start:.0f} s")
    _dump(results)


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def _print_shape(rows, N, B, H, D, causal, dtype="bf16"):
    print(f"\n== {dtype} D{D} H{H} N{N} B{B} causal={int(causal)}")
    for r in rows:
        print(f"  {r['name']:16s} {r['config']:34s} fwd+bwd {_fmt(r['fwd_bwd_ms'], '8.3f')} ms "
              f"{_fmt(r['fwd_bwd_tflops'], '5.0f')} TF | bwd {_fmt(r['bwd_ms'], '8.3f')} ms "
              f"{_fmt(r['bwd_tflops'], '5.0f')} TF  {r['note']}")
    sys.stdout.flush()


def _print_table(rows):
    """Speed relative to FlexAttention (flex ms / ours ms: >= 0.9 is the bar), per shape."""
    shapes = sorted({(r["N"], r["causal"]) for r in rows})
    names = []
    for r in rows:
        if r["name"] not in names and r["name"] != "ours fwd":
            names.append(r["name"])
    by = {(r["N"], r["causal"], r["name"]): r for r in rows}
    head = "".join(f" | {f'N{N // 1024}k' if N >= 1024 else f'N{N}':>5s} {'causal' if c else 'full':6s}     "
                   for N, c in shapes)
    for key, title in (("fwd_bwd_ms", "forward+backward"), ("bwd_ms", "backward alone")):
        print(f"\n== {title}: ms / TFLOPS / x Flex (flex ms / ms, >1 faster)")
        print(f"  {'':16s}{head}")
        for name in names:
            cells = []
            for N, c in shapes:
                r = by.get((N, c, name))
                fl = by.get((N, c, "flex"))
                ms = r[key] if r else None
                tf = r[key.replace("_ms", "_tflops")] if r else None
                ratio = (fl[key] / ms) if (fl and fl[key] and ms) else None
                x = f"{ratio:4.2f}x" if ratio is not None else "   -"
                cells.append(f"{_fmt(ms, '7.2f')} {_fmt(tf, '4.0f')} {x}")
            print(f"  {name:16s}" + "".join(f" | {c:>18s}" for c in cells))
    sys.stdout.flush()


def _dump(results):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_dense_bwd.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


# ----------------------------------------------------------------------------------------------
# CPU: interpreter smoke run
# ----------------------------------------------------------------------------------------------

def cpu_main() -> None:
    """The script's code paths in Triton's interpreter: tiny fp16 shapes, interpreter-sized tiles
    of every candidate kind, correctness check, one timed call each, the table (no peers)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import attention_proto  # noqa: F401
    from attention_proto.ops.dense.backward import BwdConfig as C
    from attention_proto.ops.dense.backward import flash_attention_backward
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.runtime.timing import attention_flops

    t = dict(path="tma")
    cands = [("portable", C(16, 32, 1, 1), True), ("portable atomic", C(16, 32, 1, 1), False),
             ("tma", C(16, 32, 1, 2, **t), True), ("tma split", C(16, 32, 1, 2, fused=False, **t), True),
             ("tma 32x32", C(32, 32, 1, 2, dq_block_m=32, dq_block_n=16, **t), True)]
    print("== gradient check: fp16 B1 H2 N45 D32 vs float64 (interpreter)")
    bad = check_grads(cands, torch.float16, "cpu", 1, 2, 45, 32, (False, True), [])
    rows = []
    B, H, N, D = 1, 2, 64, 32
    for causal in (False, True):
        q, k, v, do = (torch.randn(B, H, N, D, dtype=torch.float16) for _ in range(4))
        o, lse = flash_attention_forward(q, k, v, causal=causal)
        for name, cfg, det in cands:
            t0 = time.perf_counter()
            flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=cfg, deterministic=det)
            ms = (time.perf_counter() - t0) * 1e3
            fb = attention_flops(B, H, N, N, D, causal, mode="fwd_bwd")
            bf = attention_flops(B, H, N, N, D, causal, mode="bwd")
            rows.append(dict(N=N, causal=causal, name=name, config=cfg.label, fwd_bwd_ms=ms, bwd_ms=ms,
                             fwd_bwd_tflops=fb / ms / 1e9, bwd_tflops=bf / ms / 1e9, note="interpreter"))
        _print_shape([r for r in rows if r["causal"] == causal], N, B, H, D, causal, "fp16")
    _print_table(rows)
    if bad:
        raise SystemExit(f"failed: {sorted(bad)}")
    print("\ncpu smoke ok")


# ----------------------------------------------------------------------------------------------
# CPU: sm_90a compile check
# ----------------------------------------------------------------------------------------------

def sm90_main() -> None:
    """Compile (never launch) each candidate for sm_90a with Triton's CUDA backend and its bundled
    ptxas, and print registers per thread, spill bytes and shared memory per kernel."""
    import re
    import subprocess
    import tempfile

    os.environ["TRITON_INTERPRET"] = "0"
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Sm90:  # just enough driver for JITFunction.warmup: compile for sm_90, never launch
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Sm90())
    from attention_proto.ops.dense import backward as bw

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    compiled = []
    bw.KERNEL_CACHE.launch = lambda kern, grid, *a, **kw: compiled.append(
        (kern.fn.__name__, kw.get("MODE"), kern.warmup(*a, grid=grid, **kw)))
    print(f"{'candidate':12s} {'config':34s} {'mods':22s} kernel            regs spill  smem KB  (H == Hkv)")
    for D in (128, 64):
        for name, cfg, det in candidates(D):
            for mods in (dict(causal=True), dict(), dict(causal=True, softcap=30.0)):
                compiled.clear()
                q = torch.zeros(1, 4, 256, D, dtype=torch.bfloat16)
                k = torch.zeros(1, 4, 256, D, dtype=torch.bfloat16)
                bw.flash_attention_backward(q, q, k, k, q, torch.zeros(1, 4, 256), config=cfg, deterministic=det,
                                            **mods)
                for kname, mode, kern in compiled:
                    if kname.startswith(("_rope", "_bwd_prep")):
                        continue
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                        f.write(kern.asm["ptx"])
                    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                                         capture_output=True, text=True)
                    os.unlink(f.name)
                    txt = out.stderr + out.stdout
                    regs = re.findall(r"Used (\d+) registers", txt)
                    spill = re.findall(r"(\d+) bytes spill stores", txt)
                    m = "" if mode is None else f"[{mode}]"
                    # C7515: ptxas serializes every wgmma of the kernel (a wait after each one)
                    ser = "  WGMMA SERIALIZED" if "C7515" in txt else ""
                    print(f"{name:12s} {cfg.label:34s} {','.join(f'{a}' for a in mods):22s} "
                          f"{kname + m:17s} {regs[-1] if regs else '?':>4s} {spill[-1] if spill else '?':>5s} "
                          f"{kern.metadata.shared / 1024:7.1f}   D{D}{ser}", flush=True)


def main() -> None:
    args = _args()
    if args.sm90:
        sm90_main()
    elif args.cpu:
        cpu_main()
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: use --cpu (interpreter smoke run) or --sm90 (compile check)")
        gpu_main(args)


if __name__ == "__main__":
    main()
