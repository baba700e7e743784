"""warmup(): the variants a model configuration needs, run once each (interpreter: nothing compiles)."""
from __future__ import annotations

import json

import os

import pytest

import attention_proto  # noqa: F401
from attention_proto import cli
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.warmup import (PRESETS, ModelAttentionConfig, WarmupOptions, reset_compiled_kernels,
                                    triton_binaries, triton_cache_dir, warmup)

TINY = ModelAttentionConfig("tiny", head_dim=32, num_heads=4, num_kv_heads=2, window=8, softcap=20.0,
                            max_position_embeddings=64)


def test_warmup_tiny_runs_every_planned_variant():
    dry = warmup(TINY, seq_lens=(17,), dry_run=True)
    real = warmup(TINY, seq_lens=(17,))
    assert not dry.errors and not real.errors, (dry.errors, real.errors)
    assert dry.mode == "dry-run" and real.mode in ("interpreter", "gpu")
    # the same calls launch the same kernel variants whether or not they run
    assert dry.num_variants == real.num_variants >= 5
    kinds = real.by_kernel()
    assert kinds["_fwd_kernel"] >= 3  # aligned prefill, ragged (row-masked) prefill, varlen
    assert {"_paged_decode_kernel", "_paged_append_kernel"} <= set(kinds)  # V2 merges in the decode kernel
    assert len(real.calls) == 6 and sum(c.new_variants for c in real.calls) == real.num_variants
    assert "tiny" in real.summary() and str(real.num_variants) in real.summary()
    json.dumps(real.as_dict(), default=str)


def test_warmup_train_adds_backward_variants():
    rep = warmup(TINY, seq_lens=(16,), train=True, decode=False, varlen=False, ragged=False)
    assert not rep.errors, rep.errors
    kinds = rep.by_kernel()
    assert "_bwd_dkdv" in kinds and "_bwd_preprocess" in kinds and "_fwd_kernel" in kinds


def test_warmup_variant_sets_of_presets():
    """Gemma 2 alternates window and global layers: twice Llama's forward variants (same options)."""
    kw = dict(dry_run=True, seq_lens=(256,), decode=False, varlen=False)
    llama, gemma = warmup("llama", **kw), warmup("gemma2", **kw)
    assert gemma.by_kernel()["_fwd_kernel"] == 2 * llama.by_kernel()["_fwd_kernel"]
    assert [len(PRESETS[m].modifier_sets()) for m in ("llama", "mistral", "gemma2")] == [1, 1, 2]
    assert PRESETS["mistral"].modifier_sets() == [{"window": (4095, -1)}]
    assert PRESETS["gemma2"].modifier_sets()[0]["softcap"] == 50.0


def test_warmup_lengths_and_errors():
    assert WarmupOptions(min_seq_len=128, max_seq_len=1024).lengths(TINY) == [128, 256, 512, 1024]
    assert WarmupOptions().lengths(PRESETS["mistral"])[-1] == 16384  # capped
    with pytest.raises(ValueError, match="unknown model preset"):
        warmup("gpt5")
    with pytest.raises(TypeError, match="ModelAttentionConfig"):
        warmup(42)


def test_reset_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    with triton_cache_dir(str(tmp_path)):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"
    reset_compiled_kernels()
    assert KERNEL_CACHE.entries() == [] and triton_binaries() == 0


def test_cli_warmup_dry_run(capsys):
    assert cli.main(["warmup", "--model", "llama", "--dry-run", "--max-seq-len", "256", "--no-varlen"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3-8B" in out and "kernel variants planned" in out
