#!/usr/bin/env python3
"""Probe: dq error of the softcap backward at a saturating softcap (GPU, bf16; ~1 min).

The session-8 GPU fuzz failed dense_bwd on one case class: Nq=1, D=256, scale 1.0, softcap 0.5,
ALiBi, RoPE (dq error 3.6-4.5x PyTorch's bf16 error; the rule allows 3x). With scale 1 and D 256 the
scores are ~N(0, 256) against a cap of 0.5: nearly every tanh saturates, and dq is carried by the
few scores near 0, where d/ds tanh is steep. This times nothing: it measures errors, per variant:

    PYTHONPATH=src python scripts/probe_softcap_grad.py [split|nosplit|split_reflse|split_ref_o|split_ref_lse|split_fwd]

``nosplit`` turns off the split-precision scores (backward.SPLIT_ROPE_SOFTCAP_SCORES) that fixed it.
``split_fwd`` also turns them on in the forward (forward.SPLIT_ROPE_SOFTCAP_SCORES, opt-in since session 9).
(A first version rebound the kernels' tanh to the exact form: no change at all, so tanh.approx
is not the cause; a float64 emulation put the whole error on the rounded rotated q/k.)
"""
from __future__ import annotations

import os
import sys

import torch
from attention_proto.ops.dense import backward, forward
from attention_proto.ops.dense.reference import alibi_slopes, attention_reference
from attention_proto.ops.dense.rope import RopeSpec
import attention_proto

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 smoke run (fp16 only)
SEEDS = 40 if DEV == "cuda" else int(os.environ.get("PROBE_SEEDS", "1"))


REF_O_LSE = False


def rebind(variant: str) -> None:
    """``nosplit``: the rounded scores (and the TMA path) of before the split mode; ``split_reflse``:
    the backward alone, from the float64 reference's O and LSE instead of our forward's."""
    global REF_O_LSE
    backward.SPLIT_ROPE_SOFTCAP_SCORES = variant != "nosplit"
    forward.SPLIT_ROPE_SOFTCAP_SCORES = variant == "split_fwd"
    REF_O_LSE = {"split_reflse": "both", "split_ref_o": "o", "split_ref_lse": "lse"}.get(variant, False)


def grads(q, k, v, do, dt, mods, ours: bool):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)] if ours else \
        [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    if ours and REF_O_LSE:
        o64, lse64 = attention_reference(*[t.double() for t in ins], causal=mods["causal"], scale=mods["scale"],
                                         softcap=mods["softcap"], alibi_slopes=mods["alibi_ref"], rope=mods["rope"],
                                         compute_dtype=torch.float64, device=DEV)
        sl = mods["alibi_ref"].to(DEV) if mods["alibi_ref"] is not None else None
        o, lse = o64.to(dt), lse64.float()
        if REF_O_LSE != "both":  # one of the two from our forward
            fo, flse = attention_proto.attention(*[t.detach() for t in ins], layout="bhsd", causal=mods["causal"],
                                                 scale=mods["scale"], softcap=mods["softcap"],
                                                 alibi_slopes=mods["alibi_gpu"], rope=mods["rope"], return_lse=True)
            o, lse = (o, flse.float()) if REF_O_LSE == "o" else (fo, lse)
        return backward.flash_attention_backward(do, *ins, o, lse, causal=mods["causal"],
                                                 scale=mods["scale"], softcap=mods["softcap"], alibi_slopes=sl,
                                                 rope=mods["rope"])
    if ours:
        out = attention_proto.attention(*ins, layout="bhsd", causal=mods["causal"], scale=mods["scale"],
                                        softcap=mods["softcap"], alibi_slopes=mods["alibi_gpu"],
                                        rope=mods["rope"])
    else:
        out, _ = attention_reference(*ins, causal=mods["causal"], scale=mods["scale"], softcap=mods["softcap"],
                                     alibi_slopes=mods["alibi_ref"], rope=mods["rope"], compute_dtype=dt,
                                     device=DEV)
    return torch.autograd.grad(out, ins, do.to(out.dtype))


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "split"
    rebind(variant)
    rows = []
    configs = [
        # name, B, H, Hkv, Nq, Nk, D, dtype, softcap, alibi, rope, scale
        ("fuzz s3", 3, 6, 3, 1, 48, 256, torch.bfloat16, 0.5, True, True, 1.0),
        ("fuzz s2", 3, 6, 2, 1, 32, 256, torch.bfloat16, 0.5, True, True, 1.0),
        ("no alibi", 3, 6, 3, 1, 48, 256, torch.bfloat16, 0.5, False, True, 1.0),
        ("no rope", 3, 6, 3, 1, 48, 256, torch.bfloat16, 0.5, True, False, 1.0),
        ("neither", 3, 6, 3, 1, 48, 256, torch.bfloat16, 0.5, False, False, 1.0),
        ("Nq 64", 2, 6, 3, 64, 64, 256, torch.bfloat16, 0.5, True, True, 1.0),
        ("D 128", 3, 6, 3, 1, 48, 128, torch.bfloat16, 0.5, True, True, 1.0),
        ("cap 5", 3, 6, 3, 1, 48, 256, torch.bfloat16, 5.0, True, True, 1.0),
        ("scale 1/16", 3, 6, 3, 1, 48, 256, torch.bfloat16, 0.5, True, True, 1 / 16),
        ("fp16", 3, 6, 3, 1, 48, 256, torch.float16, 0.5, True, True, 1.0),
    ]
    if DEV == "cpu":
        configs = [c for c in configs if c[7] == torch.float16]
    only = os.environ.get("PROBE_CONFIGS")
    if only:
        configs = [c for c in configs if c[0] in only.split(",")]
    for name, B, H, Hkv, Nq, Nk, D, dt, cap, alibi, rope, scale in configs:
        worst, over = 0.0, 0
        for seed in range(SEEDS):
            g = torch.Generator(device=DEV).manual_seed(1000 + seed)
            q, k, v, do = (torch.randn(s, generator=g, device=DEV).to(dt)
                           for s in ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, H, Nq, D)))
            sl = alibi_slopes(H) if alibi else None
            mods = dict(causal=True, scale=scale, softcap=cap, alibi_ref=sl,
                        alibi_gpu=True if alibi else None, rope=RopeSpec("half") if rope else None)
            ours = grads(q, k, v, do, dt, mods, True)
            low = grads(q, k, v, do, dt, mods, False)
            ref = grads(q, k, v, do, torch.float64, mods, False)
            for nm, a, lo, hi in zip(("dq", "dk", "dv"), ours, low, ref):
                e_o = (a.double() - hi).abs().max().item()
                e_t = (lo.double() - hi).abs().max().item()
                top = max(1.0, hi.abs().max().item())
                bound = 3 * e_t + 8e-3 * (top if dt == torch.bfloat16 else 1e-3 / 8e-3 * top)
                if nm == "dq":
                    worst = max(worst, e_o / max(e_t, 1e-30))
                over += e_o > bound
        rows.append((name, worst, over))
    print(f"variant {variant}: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (interpreter)'}")
    print(f"{'config':<12} {'worst dq ours/torch':>20} {'grads over the rule (of 120)':>30}")
    for name, worst, over in rows:
        print(f"{name:<12} {worst:>20.2f} {over:>30}")


if __name__ == "__main__":
    main()
