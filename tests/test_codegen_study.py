"""The codegen study: its interpreter-mode run, its GPU analysis on synthetic rows, codegen.json and the table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attention_proto.codegen.collect import KernelCode, row_extra
from attention_proto.codegen.report import codegen_document, codegen_table, write_codegen_json
from attention_proto.codegen.sass import parse_sass
from attention_proto.kb.store import KB
from attention_proto.runtime.timing import Timing
from attention_proto.studies import load_study
from attention_proto.studies.base import RunData
from attention_proto.studies.runner import run_studies

SAMPLES = Path(__file__).parent / "data" / "sass"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the study's full GPU run would start")
def test_interpreter_run(tmp_path):
    run_id = run_studies(["codegen"], tmp_path, progress=False, log=lambda m: None)
    kb = KB.in_dir(tmp_path)
    rows = kb.measurements(run_id, study="codegen")
    stored = [r for r in rows if r["op"] == "sass_parse"]
    assert len(stored) == len(list(SAMPLES.glob("*.sass")))
    assert all(r["extra"]["ok"] for r in rows), [r["extra"]["failed"] for r in rows if not r["extra"]["ok"]]
    (f,) = kb.findings(run_id=run_id, study="codegen")
    assert f["id"] == "codegen-parser-correct" and f["verdict"] == "supported"
    path = write_codegen_json(rows, tmp_path / "res")
    doc = json.loads(path.read_text())
    assert doc["implementations"] == [] and len(doc["parser_checks"]) == len(rows)
    assert codegen_table(rows) == []
    kb.close()


def _kernel(sample: str, name: str | None = None) -> KernelCode:
    fn = next(iter(parse_sass((SAMPLES / f"{sample}.sass").read_text()).values()))
    return KernelCode(name or fn.name, "kernel_cache", sass=fn, registers=fn.res.registers,
                      spill_bytes=fn.res.local_bytes, shared_bytes=32768, num_warps=4)


@pytest.fixture
def gpu_run(tmp_path):
    """A KB holding a fake GPU run with rows shaped like the GPU study's (kernels from the stored samples)."""
    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"mode": "gpu", "gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "nvidia-h100"}, ["codegen"])
    kb.set_ceilings(run_id, {"matmul_tflops": 700.0})

    def add(op, impl, variant, causal, kernels, tflops, **more):
        ms = 1.0
        row = dict(run_id=run_id, study="codegen", op=op, impl=impl, variant=variant, mods=[], B=4, H=16, Hkv=16,
                   N=4096, Nk=4096, D=128, dtype="bfloat16", causal=causal,
                   extra=row_extra(kernels, **more), ms_median=ms if tflops else None, ms_p20=ms, ms_p80=ms,
                   tflops=tflops, gbps=None, gpu="NVIDIA H100 80GB HBM3", mode="gpu")
        return kb.add_measurement(row)

    return kb, run_id, add


def _findings(kb, run_id):
    return {f.id: f for f in load_study("codegen").analyze(RunData(kb, run_id))}


def test_gpu_analysis_bar_supported(gpu_run):
    kb, run_id, add = gpu_run
    for causal in (False, True):
        add("attn_fwd", "attention_proto", "auto", causal, [_kernel("gen_hgmma_dot", "_fwd_tma")], 501.0)
        add("attn_fwd", "attention_proto", "tma", causal, [_kernel("gen_hgmma_dot", "_fwd_tma")], 500.0)
        add("attn_fwd", "attention_proto", "tma+ws", causal, [_kernel("gen_hgmma_dot", "_fwd_tma")], 499.0)
        add("attn_fwd", "attention_proto", "portable", causal, [_kernel("gen_hmma_dot", "_fwd_kernel")], 300.0)
        add("attn_fwd", "sdpa_cudnn", "", causal, [], 600.0, sass="closed library kernel")
        add("attn_fwd", "inductor", "default", causal, [_kernel("gen_ffma_loop", "triton_red_fused__softmax_0")],
            100.0, inductor_calls={"extern": {"bmm": 2}, "aten": {}, "triton_kernels": ["triton_red_fused__softmax_0"]},
            sdpa_rewrite=[])
    add("attn_fwd", "helion", "fixed config", False, [], None, unavailable="import helion failed: ModuleNotFoundError")
    f = _findings(kb, run_id)
    bar = f["codegen-ours-fastest-fwd-hgmma"]
    assert bar.verdict == "supported", bar.claim
    assert "'auto'" in bar.claim and "501 TFLOPS" in bar.claim
    same = f["codegen-ours-identical-variants"]
    assert "'tma+ws' compiles to the same code as 'tma'" in same.claim and "no effect" in same.claim
    assert "'auto' runs the code of 'tma', 'tma+ws'" in same.claim
    assert f["codegen-attention_proto-attn_fwd-portable"].metrics["non-causal"]["hmma_main_loop"] > 0
    assert "mma.sync" in f["codegen-attention_proto-attn_fwd-portable"].claim
    assert "SASS not read" in f["codegen-sdpa_cudnn-attn_fwd"].claim
    assert "not run" in f["codegen-helion-attn_fwd-fixed-config"].claim
    assert f["codegen-helion-attn_fwd-fixed-config"].verdict == "inconclusive"
    assert "cuBLAS" in f["codegen-inductor-lowering"].claim
    # every claim's numbers come from rows: the TFLOPS of the rows appear, no placeholders
    assert all("None" not in x.claim for x in f.values())


def test_gpu_analysis_bar_refuted_names_the_cost(gpu_run):
    kb, run_id, add = gpu_run
    add("attn_fwd", "attention_proto", "tma+ws", False, [_kernel("gen_spill", "_fwd_ws")], 520.0)
    add("attn_fwd", "attention_proto", "tma", False, [_kernel("gen_hgmma_dot", "_fwd_tma")], 480.0)
    bar = _findings(kb, run_id)["codegen-ours-fastest-fwd-hgmma"]
    assert bar.verdict == "refuted"
    assert "spill to local memory" in bar.claim and "no HGMMA in its main loop" in bar.claim
    assert "'tma'" in bar.claim and "480 TFLOPS" in bar.claim  # the best variant that meets the bar


def test_codegen_json_and_table(gpu_run, tmp_path):
    kb, run_id, add = gpu_run
    add("attn_fwd", "attention_proto", "tma", True, [_kernel("gen_hgmma_dot", "_fwd_tma"),
                                                     _kernel("gen_ffma_loop", "_prep")], 450.0)
    add("attn_fwd", "sdpa_flash", "", True, [], 400.0, sass="closed library kernel")
    rows = kb.measurements(run_id)
    doc = codegen_document(rows)
    (ours, flash) = doc["implementations"]
    assert ours["summary"]["main_kernel"] == "_fwd_tma" and len(ours["kernels"]) == 2
    assert ours["tflops"] == 450.0 and flash["kernels"] == []
    lines = codegen_table(rows)
    text = "\n".join(lines)
    assert "_fwd_tma (main)" in text and "closed library kernel" in text and "450 TFLOPS" in text
    header = next(line for line in lines if line.startswith("| impl"))
    assert all(line.count("|") == header.count("|") for line in lines if line.startswith("| ") and "---" not in line)
    path = write_codegen_json(rows, tmp_path / "out")
    assert json.loads(path.read_text())["gpu"] == "NVIDIA H100 80GB HBM3"
    assert write_codegen_json([], tmp_path / "none") is None


class _FakeGpuCtx:
    """Drives the GPU branch of the study on CPU tensors: timings are None, failures propagate."""

    timing, quick, mode = True, True, "gpu"

    def __init__(self):
        self.rows = []

    def bench(self, fn, **kw):
        fn()
        return None

    def record(self, **row):
        self.rows.append(row)
        return len(self.rows)

    def log(self, msg):
        pass

    def guard(self, what):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU code paths on CPU tensors (interpreter)")
def test_gpu_code_paths_smoke_on_cpu():
    """Every GPU part of measure() runs (tiny fp32 shapes, interpreter) and records well-formed rows."""
    from attention_proto.codegen import collect
    from attention_proto.studies.codegen import CodegenStudy

    st = CodegenStudy()
    st.shape, st.dtype, st.device = (1, 2, 32, 16), torch.float32, "cpu"
    st.paged_shape = (2, 4, 2, 48, 16, 16)
    st.linear_shape = (1, 40, 2, 16, 32)
    st.tool = collect.cuobjdump_path()  # limits: Hopper's by default
    ctx = _FakeGpuCtx()
    q, k, v = st._bhsd()
    # (Inductor's capture runs in test_codegen_collect: a CPU compile costs seconds)
    for part in (st._ours_forward, st._ours_backward, st._sdpa, st._helion):
        part(ctx, q, k, v, False, 1.0)
    st._paged(ctx)
    st._linear(ctx)
    got = {(r["op"], r["impl"], r["variant"]) for r in ctx.rows}
    assert {("attn_fwd", "attention_proto", p) for p in ("auto", "portable", "tma", "tma+ws")} <= got
    assert {("attn_bwd", "attention_proto", "deterministic"), ("attn_fwd", "sdpa_cudnn", ""),
            ("attn_fwd", "helion", "fixed config"),
            ("paged_decode", "attention_proto", "v1"), ("paged_decode", "attention_proto", "v2"),
            ("linear_fwd", "attention_proto", "chunk")} <= got
    for r in ctx.rows:
        ex = r["extra"]
        assert "kernels" in ex and "max_spill_bytes" in ex
        if r["impl"] == "attention_proto":
            # launched kernels were seen (interpreted here, so no SASS), and nothing was unavailable
            assert "unavailable" not in ex, ex.get("unavailable")
            assert ex["kernels"] and all("interpreter" in k["error"] for k in ex["kernels"]), r["op"]
    helion = next(r for r in ctx.rows if r["impl"] == "helion")
    assert helion["extra"].get("unavailable") or helion["extra"]["kernels"]
