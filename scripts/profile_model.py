#!/usr/bin/env python3
"""Where a transformers model forward spends its time with attention-proto against sdpa (issue #7).

    PYTHONPATH=src python scripts/profile_model.py            # GPU: the integration study's llama 8L h2048 seq4k
    PYTHONPATH=src python scripts/profile_model.py --cpu      # smoke run: tiny model, interpreter, no timings

The integration study's finding `integration-forward-vs-sdpa` compares whole forwards. This script
splits one forward per attention implementation (attention_proto, sdpa) into:

- GPU time: the ``runtime.timing.bench`` median of the forward (the study's protocol);
- host time to enqueue the forward (wall time of ``model(ids)`` with the GPU kept busy by a long
  sleep kernel first, so the host never waits for it) and whether the forward is host-bound
  (enqueue time >= GPU time);
- syncs: device -> host copies and synchronizations the forward performs (profiler CPU events
  ``cudaStreamSynchronize`` / ``cudaMemcpyAsync`` DtoH / ``cudaDeviceSynchronize``);
- per kernel: the attention kernels' total GPU time against everything else (profiler, one forward);
- the attention call alone: host time of ``attention_forward`` per layer (profiler record_function).

The table printed last has one column per implementation; full profiler tables go to
``$OUT/profile_model_<impl>.txt`` when $OUT is set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ATTN_KERNEL_HINTS = ("_fwd_", "flash", "fmha", "attention", "sdpa", "cudnn", "_rope")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="smoke run: tiny model under the interpreter, no timings")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    return p.parse_args()


def _attention_alone(model, N, dt):
    """One layer's attention call at the model's shapes, q/k/v as the model hands them (BSHD views)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attention_proto.integrations import torch_ops
    from attention_proto.integrations import transformers as ap_tf
    from attention_proto.runtime.timing import bench

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, N, H, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    k = torch.randn(1, N, Hkv, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    v = torch.randn(1, N, Hkv, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    attn = model.model.layers[0].self_attn
    pos = torch.arange(N, device="cuda")[None]
    calls = {
        "alone_hf_ours_ms": lambda: ap_tf.attention_forward(attn, q, k, v, None, scaling=D ** -0.5, position_ids=pos),
        "alone_hf_sdpa_ms": lambda: sdpa_attention_forward(attn, q, k, v, None, scaling=D ** -0.5, is_causal=True),
        "alone_op_ours_ms": lambda: torch_ops.flash_attention(q, k, v, causal=True),
        "alone_sdpa_gqa_ms": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    r = {}
    with torch.no_grad():
        for name, fn in calls.items():
            try:
                fn()
                r[name] = bench(fn, warmup_ms=50, rep_ms=200).ms_median
            except Exception as e:  # noqa: BLE001 - a peer missing here is reported, not fatal
                r[name] = f"{type(e).__name__}: {e}"[:27]
    return r


def main() -> int:
    args = _args()
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from attention_proto.integrations import hf_models as hm
    from attention_proto.integrations import transformers as ap_tf

    ap_tf.register()
    gpu = torch.cuda.is_available() and not args.cpu
    dev = "cuda" if gpu else "cpu"
    if gpu:
        size = dict(layers=args.layers, hidden=2048, heads=16, kv_heads=4, intermediate=5632, vocab=32000)
        N, dt = args.seq, torch.bfloat16
    else:
        size = dict(layers=2, hidden=64, heads=4, kv_heads=2)
        N, dt = 16, torch.float32
    model = hm.build_model("llama", dtype=dt, device=dev, seed=12, **size)
    ids, _ = hm.random_batch(1, N, model.config.vocab_size, device=dev, seed=13)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    rows = {}
    for impl in ("attention_proto", "sdpa"):
        model.set_attn_implementation(impl)

        def fwd():
            with torch.no_grad():
                return model(ids).logits

        fwd()
        r = {}
        if gpu:
            from attention_proto.runtime.timing import bench

            torch.cuda.synchronize()
            r["gpu_ms"] = bench(fwd, warmup_ms=50, rep_ms=300).ms_median
            # host enqueue time: the GPU is kept busy first so the host never waits for it
            enq = []
            for _ in range(5):
                torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles ahead of the forward
                t0 = time.perf_counter()
                fwd()
                enq.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
            r["enqueue_ms"] = sorted(enq)[len(enq) // 2]
            r["host_bound"] = r["enqueue_ms"] >= r["gpu_ms"]
        from torch.profiler import ProfilerActivity, profile, record_function

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        orig = ap_tf.attention_forward

        def timed_attention(*a, **k):
            with record_function("attention_proto.attention_forward"):
                return orig(*a, **k)

        ap_tf.attention_forward = timed_attention
        try:
            if impl == "attention_proto":
                ap_tf.register()  # re-register so transformers calls the wrapped function
            with profile(activities=acts) as prof:
                fwd()
                if gpu:
                    torch.cuda.synchronize()
        finally:
            ap_tf.attention_forward = orig
            if impl == "attention_proto":
                ap_tf.register()
        ev = prof.key_averages()
        r["syncs"] = int(sum(e.count for e in ev if e.key in SYNC_EVENTS))
        r["dtoh_copies"] = int(sum(e.count for e in ev if e.key.startswith("Memcpy DtoH")
                                   or e.key == "aten::_local_scalar_dense"))
        attn_cpu = [e for e in ev if e.key == "attention_proto.attention_forward"]
        if attn_cpu:
            r["attn_calls"] = attn_cpu[0].count
            r["attn_host_us_per_call"] = attn_cpu[0].cpu_time_total / max(1, attn_cpu[0].count)
        if gpu:
            def dev_us(e):
                return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)

            kernels = [e for e in ev if dev_us(e) > 0 and not e.key.startswith(("aten::", "Memcpy", "Memset"))
                       and e.device_type.name == "CUDA"] if hasattr(ev[0], "device_type") else []
            attn = [e for e in kernels if any(h in e.key.lower() for h in ATTN_KERNEL_HINTS)]
            r["attn_kernel_ms"] = sum(dev_us(e) for e in attn) / 1e3
            r["all_kernel_ms"] = sum(dev_us(e) for e in kernels) / 1e3
            r["attn_kernels"] = ", ".join(sorted({e.key[:40] for e in attn}))[:200]
        if out_dir:
            table = None
            for sort in (("self_device_time_total", "self_cuda_time_total") if gpu else ("self_cpu_time_total",)):
                try:
                    table = ev.table(sort_by=sort, row_limit=60)
                    break
                except (KeyError, AttributeError, ValueError):
                    continue
            Path(out_dir, f"profile_model_{impl}.txt").write_text(table or ev.table(row_limit=60))
        rows[impl] = r
    if gpu:
        rows["attention alone"] = _attention_alone(model, N, dt)
    keys = sorted({k for r in rows.values() for k in r})
    print(f"\nllama {size['layers']}L h{size['hidden']} seq{N} {dt} on {dev}"
          + (f" ({torch.cuda.get_device_name()})" if gpu else " (smoke run: no timings)"))
    print(f"{'':24}" + "".join(f"{impl:>28}" for impl in rows))
    for k in keys:
        vals = []
        for impl in rows:
            v = rows[impl].get(k, "-")
            vals.append(f"{v:>28.3f}" if isinstance(v, float) else f"{str(v)[:27]:>28}")
        print(f"{k:24}" + "".join(vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
