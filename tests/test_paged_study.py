"""The `paged` study: interpreter mode end to end, a CPU dry run of its GPU half, and its findings.

The dry run walks ``measure_gpu`` with tiny shapes and a fake clock (the code path the
GPU runs, peers refusing on the CPU), then ``analyze`` with the run marked "gpu".
Synthetic rows at the bar shapes check the bar verdicts.
"""
import pytest
import torch

from attention_proto.kb.store import KB
from attention_proto.runtime.timing import Timing
from attention_proto.studies.base import RunData, StudyContext
from attention_proto.studies.paged import OP, OURS, STUDY, Sweep

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

COPY = 3000.0


def _ctx(tmp_path, name="dry"):
    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "fake", "mode": "gpu"}, ["paged"], run_id=name)
    kb.set_ceilings(run_id, {"copy_gbps": COPY})
    ctx = StudyContext(kb, run_id, "paged", quick=False, ceilings={"copy_gbps": COPY}, progress=False,
                       log=lambda m: None)
    ctx.mode = "gpu"  # the timed branch, on the CPU
    return kb, run_id, ctx


def _data(kb, run_id):
    data = RunData(kb, run_id)
    data.mode = "gpu"
    data.ceilings = {"copy_gbps": COPY}
    return data


def test_dry_run_of_the_gpu_sweep(tmp_path, monkeypatch):
    kb, run_id, ctx = _ctx(tmp_path)
    calls = []

    def fake_bench(fn, warmup_ms=0, rep_ms=0):
        fn()
        calls.append(1)
        ms = 0.01 * len(calls)
        return Timing(ms, ms, ms)

    monkeypatch.setattr(ctx, "bench", fake_bench)
    monkeypatch.setattr(ctx, "bench_clean_l2", fake_bench)
    sw = Sweep(grid=[(1, 512), (2, 64)], part_counts=(2,), part_sweep_max_b=2, page_shape=(2, 64), pages=(8, 16),
               mixed=(3, 16, 100), mha=(2, 32), d64=(2, 48), flex=[], configs=[(32, 4, 1)], config_shape=(2, 64),
               Hq=4, Hkv=2, D=32, page=16, dtype=torch.float16, check_lens=(1, 20, 37), host_shape=(1, 16),
               host_calls=5, stream_shapes=((2, 64),))
    STUDY.measure_gpu(ctx, sw, device="cpu")
    assert not ctx.errors, ctx.errors
    rows = kb.measurements(run_id)
    ours = [r for r in rows if r["impl"] == OURS and r["ms_median"]]
    assert {r["extra"]["sweep"] for r in ours} >= {"grid", "page_size", "page_size_baseline", "mixed", "mha", "d64",
                                                    "config"}
    assert any(r["variant"] == "v2-p2" for r in ours)
    # the size-matched ceiling, under both protocols (the bar shapes are timed again with L2 emptied by a read)
    assert [(r["B"], r["extra"]["sweep"]) for r in rows if r["op"] == "read_stream" and r["ms_median"]] == [
        (2, "grid"), (2, "grid_clean_l2")]
    clean = [r for r in ours if r["extra"]["sweep"] == "grid_clean_l2"]
    assert [(r["B"], r["variant"]) for r in clean] == [(2, "auto")]
    assert all(r["extra"]["timing_protocol"].startswith("clean_l2") for r in clean)
    assert all(r["extra"]["ok"] for r in rows if "ok" in r["extra"])
    # peers refuse on the CPU and say why
    assert all(r["extra"].get("unsupported") for r in rows if r["impl"].startswith("sdpa"))
    findings = {f.id: f for f in STUDY.analyze(_data(kb, run_id))}
    for fid in ("paged-paged_decode-correct", "paged-v2-overtakes-v1", "paged-dispatch-choice",
                "paged-partition-scaling", "paged-page-size", "paged-shared-memory", "paged-mixed-lengths",
                "paged-mha", "paged-d64", "paged-tile-config", "paged-host-overhead"):
        assert fid in findings, sorted(findings)
    assert not [f for f in findings if f.startswith("paged-analysis-")]


def _row(ctx, variant, B, N, ms, version, parts=1, impl=OURS, sweep="grid", **extra):
    nbytes = 2.0 * B * N * 8 * 128 * 2
    ctx.record(op=OP, impl=impl, variant=variant, B=B, H=32, Hkv=8, N=1, Nk=N, D=128, dtype="bfloat16", causal=True,
               timing=Timing(ms, ms, ms), nbytes=nbytes,
               extra=dict(sweep=sweep, version=version, num_partitions=parts, page_size=16, programs=B * 8 * parts,
                          tokens_per_partition=N // parts, sm_count=132, **extra))


def _ms(B, N, gbps):
    return 2.0 * B * N * 8 * 128 * 2 / (gbps * 1e9) * 1e3


def test_bar_verdicts_from_rows(tmp_path):
    kb, run_id, ctx = _ctx(tmp_path, "bars")
    for B, N in ((8, 4096), (8, 32768)):
        _row(ctx, "auto", B, N, _ms(B, N, 2700), "v2", 5)
        _row(ctx, "contiguous", B, N, _ms(B, N, 2900), None, impl="sdpa_cudnn")
    _row(ctx, "v1", 1, 65536, _ms(1, 65536, 300), "v1")
    _row(ctx, "v2", 1, 65536, _ms(1, 65536, 2500), "v2", 33)
    _row(ctx, "v2-p8", 1, 65536, _ms(1, 65536, 2000), "v2", 8)
    _row(ctx, "v2-p32", 1, 65536, _ms(1, 65536, 2600), "v2", 32)
    _row(ctx, "auto", 1, 65536, _ms(1, 65536, 2500), "v2", 33)
    f = {x.id: x for x in STUDY.analyze(_data(kb, run_id))}
    assert f["paged-bar-copy"].verdict == "supported"          # 2700 / 3000 = 90% >= 85%
    assert f["paged-bar-cudnn"].verdict == "supported"         # 2700 / 2900 = 0.93 >= 0.9
    assert f["paged-bar-v2-long"].verdict == "supported"       # 83% of copy, 8.3x V1
    assert f["paged-bar-v2-long"].metrics["best_partitions"] == 32
    assert "90%" in f["paged-bar-copy"].claim
    assert "trivial" not in f["paged-bar-copy"].claim        # no read-stream rows: no size-matched ceiling
    assert f["paged-dispatch-choice"].verdict == "supported"   # auto (2500) >= 95% of best (2600)
    scale = f["paged-partition-scaling"]
    assert "P=32" in scale.claim


def test_bars_under_the_clean_l2_protocol(tmp_path):
    kb, run_id, ctx = _ctx(tmp_path, "clean")
    _row(ctx, "auto", 8, 4096, _ms(8, 4096, 2000), "v2", 4)       # do_bench protocol: 67%
    _row(ctx, "v2", 1, 65536, _ms(1, 65536, 2380), "v2", 25)
    for B, N, gbps in ((8, 4096, 2400), (8, 32768, 2850)):
        _row(ctx, "auto", B, N, _ms(B, N, gbps), "v2", 4, sweep="grid_clean_l2")
        _row(ctx, "contiguous", B, N, _ms(B, N, 2500), None, impl="sdpa_cudnn", sweep="grid_clean_l2")
    _row(ctx, "v1", 1, 65536, _ms(1, 65536, 200), "v1", sweep="grid_clean_l2")
    _row(ctx, "v2", 1, 65536, _ms(1, 65536, 2560), "v2", 25, sweep="grid_clean_l2")
    ctx.record(op="read_stream", impl="triton_read", variant="contiguous", B=8, H=32, Hkv=8, N=1, Nk=4096, D=128,
               dtype="bfloat16", timing=Timing(_ms(8, 4096, 2700), 0, 0), nbytes=2.0 * 8 * 4096 * 8 * 128 * 2,
               extra={"sweep": "grid_clean_l2"})
    f = {x.id: x for x in STUDY.analyze(_data(kb, run_id))}
    c = f["paged-bars-clean-l2"]
    assert c.verdict == "refuted"                      # B8 N4k: 2400 / 3000 = 80% < 85%
    assert c.metrics["worst_fraction"] == pytest.approx(0.8)
    assert c.metrics["long"]["fraction"] == pytest.approx(2560 / 3000)
    assert c.metrics["long_speedup_vs_v1"] == pytest.approx(12.8)
    assert "do_bench protocol: 67%" in c.claim and "the trivial read 90%" in c.claim
    # the do_bench bars read only do_bench rows (the clean stream is not their size-matched ceiling)
    assert "trivial" not in f["paged-bar-copy"].claim
    assert f["paged-bar-copy"].metrics["worst_fraction"] == pytest.approx(2000 / 3000)


def test_bar_claims_quote_the_size_matched_read_stream(tmp_path):
    kb, run_id, ctx = _ctx(tmp_path, "stream")
    _row(ctx, "auto", 8, 4096, _ms(8, 4096, 2000), "v2", 4)
    _row(ctx, "v1", 1, 65536, _ms(1, 65536, 300), "v1")
    _row(ctx, "v2", 1, 65536, _ms(1, 65536, 2400), "v2", 25)
    for B, N, gbps in ((8, 4096, 2250), (1, 65536, 2650)):
        ms = _ms(B, N, gbps)
        ctx.record(op="read_stream", impl="triton_read", variant="contiguous", B=B, H=32, Hkv=8, N=1, Nk=N, D=128,
                   dtype="bfloat16", timing=Timing(ms, ms, ms), nbytes=2.0 * B * N * 8 * 128 * 2,
                   extra={"sweep": "grid"})
    f = {x.id: x for x in STUDY.analyze(_data(kb, run_id))}
    copy_bar = f["paged-bar-copy"]
    assert copy_bar.verdict == "refuted"                       # the bar is against the copy ceiling, as issued
    assert "2250 GB/s (75% of copy; ours 89% of it)" in copy_bar.claim
    assert abs(copy_bar.metrics["points"][0]["fraction_of_stream"] - 2000 / 2250) < 1e-6
    assert "2650 GB/s" in f["paged-bar-v2-long"].claim


def test_bar_refuted_when_slow(tmp_path):
    kb, run_id, ctx = _ctx(tmp_path, "slow")
    _row(ctx, "auto", 8, 4096, _ms(8, 4096, 2000), "v2", 5)
    _row(ctx, "contiguous", 8, 4096, _ms(8, 4096, 2900), None, impl="sdpa_cudnn")
    _row(ctx, "v1", 1, 65536, _ms(1, 65536, 800), "v1")
    _row(ctx, "v2", 1, 65536, _ms(1, 65536, 2500), "v2", 33)
    f = {x.id: x for x in STUDY.analyze(_data(kb, run_id))}
    assert f["paged-bar-copy"].verdict == "refuted"
    assert f["paged-bar-cudnn"].verdict == "refuted"
    assert f["paged-bar-v2-long"].verdict == "refuted"         # only 3.1x V1


def test_interpreter_mode_records_correctness(tmp_path):
    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "cpu-interpreter", "mode": "interpreter"}, ["paged"], run_id="interp")
    ctx = StudyContext(kb, run_id, "paged", quick=True, ceilings={}, progress=False, log=lambda m: None)
    STUDY.measure(ctx)
    assert not ctx.errors
    rows = kb.measurements(run_id)
    assert len(rows) >= 7 and all(r["extra"]["ok"] for r in rows)
    data = RunData(kb, run_id)
    data.mode = "interpreter"
    (f,) = STUDY.analyze(data)
    assert f.verdict == "supported"


def test_time_breakdown_from_kernel_durations(tmp_path):
    # session 9's H100 probe at B8 N4k (us): decode 49.9, merge 2.6, read 46.1; walls 56.4 and 49.4
    kb, run_id, ctx = _ctx(tmp_path, "breakdown")
    kv = 2.0 * 8 * 4096 * 8 * 128 * 2
    ctx.record(op="paged_kernel_times", impl=OURS, variant="auto", B=8, H=32, Hkv=8, N=1, Nk=4096, D=128,
               dtype="bfloat16", causal=True, nbytes=kv,
               extra={"sweep": "kernel_times", "kernels_us": {"_paged_decode_kernel": 49.9, "_paged_reduce_kernel": 2.6},
                      "read_kernels_us": {"read_stream_kernel": 46.1}, "wall_us": 56.4, "read_wall_us": 49.4,
                      "version": "v2", "num_partitions": 4, "kv_bytes": kv})
    f = {x.id: x for x in STUDY.analyze(_data(kb, run_id))}["paged-time-breakdown"]
    m = f.metrics
    assert f.verdict == "observation"
    assert m["decode_us"] == pytest.approx(49.9) and m["merge_us"] == pytest.approx(2.6)
    assert m["replay_us"] == pytest.approx(3.9) and m["read_replay_us"] == pytest.approx(3.3)
    assert m["bar_wall_us"] == pytest.approx(kv / (0.85 * COPY * 1e3))  # 52.6 us at a 3000 GB/s copy
    assert m["slack_us"] == pytest.approx(m["bar_wall_us"] - 3.3 - 46.1)
    assert m["over_read_us"] == pytest.approx(6.4)
    assert "decode kernel takes 49.90 us" in f.claim and "they spend 6.40 us more" in f.claim
