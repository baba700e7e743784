#!/usr/bin/env python3
"""Which step of the integration study slows the big model forward that follows it (issue #7).

    PYTHONPATH=src python scripts/bisect_model_forward.py      # GPU, ~2 min

Session 6 on an H100: the integration study timed the llama 8L h2048 seq4k forward at 16.0 ms with
attention-proto (three rounds) against 11.1 ms with sdpa, while scripts/profile_model.py, run right
after it on the same machine in a fresh process, timed 11.4 ms against 11.0 ms. This script runs the
study's steps one by one in one process and times both forwards (the study's protocol) after each, and
counts the device-to-host syncs of one forward with attention-proto.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    import torch

    from attention_proto.integrations import hf_models as hm
    from attention_proto.integrations import transformers as ap_hf
    from attention_proto.kb.store import KB
    from attention_proto.runtime.timing import bench
    from attention_proto.studies.base import StudyContext
    from attention_proto.studies.integration import BIG, IntegrationStudy

    tmp = tempfile.mkdtemp()
    kb = KB(Path(tmp) / "kb.sqlite")
    ctx = StudyContext(kb, "bisect", "integration", False, {}, progress=False, log=lambda m: None)
    study = IntegrationStudy()
    ap_hf.register()
    model = hm.build_model("llama", dtype=torch.bfloat16, device="cuda", seed=12, **BIG)
    ids, _ = hm.random_batch(1, 4096, model.config.vocab_size, device="cuda", seed=13)

    def forward_ms(impl: str) -> float:
        model.set_attn_implementation(impl)

        def fwd():
            with torch.no_grad():
                return model(ids).logits

        fwd()
        torch.cuda.synchronize()
        return bench(fwd, warmup_ms=50, rep_ms=300).ms_median

    def syncs() -> int:
        model.set_attn_implementation("attention_proto")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            model(ids)
        return sum(e.count for e in prof.key_averages()
                   if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))

    rows = []

    def point(label: str) -> None:
        ours, sdpa = forward_ms("attention_proto"), forward_ms("sdpa")
        rows.append((label, ours, sdpa, syncs()))
        print(f"{label:28s} ours {ours:7.2f} ms  sdpa {sdpa:7.2f} ms  ratio {sdpa / ours:5.2f}  syncs {rows[-1][3]}",
              flush=True)

    point("fresh")
    steps = [("ops", lambda: study._ops(ctx)), ("sdpa drop-in", lambda: study._sdpa(ctx))]
    steps += [(f"logits {a}", (lambda a=a: study._logits(ctx, a))) for a in ("llama", "gemma2", "mistral")]
    steps += [("padding", lambda: study._padding(ctx)), ("generation", lambda: study._generation(ctx)),
              ("compile tiny", lambda: study._compile_tiny(ctx)),
              ("paged generation", lambda: study._paged_generation(ctx)),
              ("cuda graph", lambda: study._cuda_graph(ctx)), ("boundary", lambda: study._boundary(ctx))]
    for label, fn in steps:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing step is reported, the bisection goes on
            print(f"{label}: {type(e).__name__}: {e}", flush=True)
        point(f"after {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
