"""Collecting compiled code on a CPU machine: real cubins cross-compiled for sm_90 with Triton's bundled
ptxas, disassembled with its cuobjdump; the launch recorder; Inductor's wrapper code; the caches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention_proto.codegen import collect
from attention_proto.codegen.collect import (KernelCode, cubins_in, inductor_calls, main_kernel, row_extra,
                                             sdpa_rewrites, triton_cache_kernels)

ROOT = Path(__file__).resolve().parents[1]
needs_cuobjdump = pytest.mark.skipif(collect.cuobjdump_path() is None, reason="no cuobjdump (triton's nvidia backend)")
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's (CPU) behaviour")


@pytest.fixture(scope="module")
def sample_cubins(tmp_path_factory):
    """The generator's kernels compiled for sm_90 (cross-compiled here: no GPU needed), cubins kept."""
    out = tmp_path_factory.mktemp("cubins")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_sass_samples.py"), "--out", str(out), "--arch", "90",
                    "--cubin"], check=True, capture_output=True, timeout=300)
    return out


@needs_cuobjdump
def test_cubins_to_digests(sample_cubins):
    found = cubins_in(sample_cubins)
    assert {n for n, _, _ in found} == {"hgmma_dot", "hmma_dot", "ffma_loop", "spill", "tma_load"}
    kernels = {k.name: k for k in triton_cache_kernels(sample_cubins, used_names=["hgmma_dot", "spill"])}
    hg, sp, hm = kernels["hgmma_dot"], kernels["spill"], kernels["hmma_dot"]
    assert hg.used and sp.used and hm.used is False
    assert hg.sass.main_loop.counts["HGMMA"] > 0 and hg.spill_bytes == 0 and hg.registers > 0
    meta = json.loads((sample_cubins / "gen_hgmma_dot.json").read_text())
    assert hg.num_warps == 4 and hg.shared_bytes == meta["shared"]
    assert sp.spill_bytes > 0
    d = hg.digest()
    assert d["main_loop"]["HGMMA"] > 0 and d["occupancy"]["warps_per_sm"] > 0
    json.dumps(d)
    # the row's headline numbers come from the kernel with the most MMAs in its main loop (used ones)
    extra = row_extra(list(kernels.values()), note="x")
    assert extra["main_kernel"] == "hgmma_dot" and extra["hgmma_main_loop"] > 0 and extra["hmma_main_loop"] == 0
    assert extra["max_spill_bytes"] == sp.spill_bytes and extra["note"] == "x"
    assert len(extra["kernels"]) == 5
    json.dumps(extra)


def test_main_kernel_without_code():
    assert main_kernel([KernelCode("k", "kernel_cache", error="not compiled")]) is None
    ex = row_extra([KernelCode("k", "kernel_cache", error="not compiled")])
    assert "main_kernel" not in ex and ex["kernels"][0]["error"] == "not compiled" and ex["max_spill_bytes"] is None


def test_analyze_bad_cubin_is_recorded():
    kc = collect.analyze_cubin("x", b"not a cubin", "triton_cache", meta={"num_warps": 4})
    assert kc.sass is None and kc.error and kc.num_warps == 4


@interpreter_only
def test_record_launches_sees_our_kernels():
    """Under the interpreter the entries have no compiled kernel: recorded as such, not an error."""
    from attention_proto.ops.dense.interface import attention

    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    with collect.record_launches() as rec:
        attention(q, k, v, causal=True)
    assert "launch" not in rec.cache.__dict__  # restored
    names = [e.kernel_name for e in rec.entries()]
    assert names and all("fwd" in n for n in names)
    kcs = rec.kernel_codes()
    assert all(kc.error and "interpreter" in kc.error for kc in kcs)
    assert kcs[0].config.get("BLOCK_M") is not None


@pytest.mark.gpu
def test_record_launches_on_gpu():
    """On a GPU the entries hold compiled kernels: the forward's SASS has HGMMA in its main loop."""
    from attention_proto.ops.dense.interface import attention

    q, k, v = (torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with collect.record_launches() as rec:
        attention(q, k, v, causal=True)
        torch.cuda.synchronize()
    kcs = rec.kernel_codes()
    assert kcs and all(kc.error is None for kc in kcs), [kc.error for kc in kcs]
    main = main_kernel(kcs)
    assert main.registers and main.registers <= 255  # from the driver
    assert main.sass.main_loop.counts["HGMMA"] > 0
    assert main.ptx and main.ptx.get("wgmma", 0) > 0


def test_fresh_compile_caches_env():
    before = os.environ.get("TRITON_CACHE_DIR")
    with collect.fresh_compile_caches(reset_dynamo=False) as cap:
        assert os.environ["TRITON_CACHE_DIR"] == str(cap.triton_dir)
        assert cap.folder.is_dir()
    assert os.environ.get("TRITON_CACHE_DIR") == before


WRAPPER = '''
triton_red_fused__softmax_0 = async_compile.triton('triton_red_fused__softmax_0', """
@triton.jit
def triton_red_fused__softmax_0(in_ptr0, out_ptr2, xnumel, r0_numel):
    pass
""")
def call(args):
    # Topologically Sorted Source Nodes: [matmul], Original ATen: [aten.bmm]
    extern_kernels.bmm(reinterpret_tensor(arg0_1, (64, 4096, 128), (524288, 128, 1), 0), arg1_1, out=buf0)
    triton_red_fused__softmax_0.run(buf0, buf3, 262144, 4096, stream=stream0)
    extern_kernels.bmm(buf3, arg2_1, out=buf4)
    buf5 = torch.ops.aten._scaled_dot_product_flash_attention.default(arg0_1, arg1_1, arg2_1, scale=0.08)
'''


def test_inductor_calls():
    calls = inductor_calls([WRAPPER])
    assert calls["triton_kernels"] == ["triton_red_fused__softmax_0"]
    assert calls["triton_runs"] == {"triton_red_fused__softmax_0": 1}
    assert calls["extern"] == {"bmm": 2}
    assert "_scaled_dot_product_flash_attention" in calls["aten"] and "bmm" not in calls["aten"]
    assert sdpa_rewrites(calls) == ["_scaled_dot_product_flash_attention"]


@interpreter_only
def test_inductor_capture_on_cpu():
    """The capture path the GPU study takes, on the CPU: fresh caches, run_and_get_code, the wrapper's calls.
    (On the CPU, Inductor's pattern matcher rewrites the written-out attention into a fused SDPA op.)"""
    from torch._inductor.utils import run_and_get_code

    from attention_proto.studies.codegen import naive_attention

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with collect.fresh_compile_caches() as cap:
        out, codes = run_and_get_code(torch.compile(naive_attention), q, k, v)
        assert triton_cache_kernels(cap.folder) == []  # a CPU graph compiles no Triton kernel
    assert cap.notes == [] and codes
    calls = inductor_calls(codes)
    assert sdpa_rewrites(calls) or calls["extern"].get("bmm") == 2, calls
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_cross_compile_our_forward_uses_hgmma():
    """Our portable forward at the GPU heuristic's D128 tile, compiled for sm_90 without a GPU:
    wgmma in the main loop and no spills (the codegen study's bar, checked ahead of a GPU run)."""
    code = (
        "import torch, json\n"
        "from attention_proto.codegen.cross import compile_launches\n"
        "from attention_proto.ops.dense.configs import FwdConfig\n"
        "from attention_proto.ops.dense.forward import flash_attention_forward\n"
        "q, k, v = (torch.randn(1, 2, 256, 128, dtype=torch.bfloat16) for _ in range(3))\n"
        "with compile_launches(90) as cl:\n"
        "    flash_attention_forward(q, k, v, causal=False, config=FwdConfig(128, 64, 8, 3, 'portable'))\n"
        "print(json.dumps([kc.digest() for kc in cl.kernels]))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (d,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["main_loop"]["HGMMA"] > 0 and d["total"]["HMMA"] == 0
    assert d["spill_bytes"] == 0 and d["registers"] <= 255
