"""Integration on the GPU: bf16 models, inductor fullgraph compile, CUDA-graph capture of decode steps.

Run on the device machine: ``python -m pytest tests/test_integration_gpu.py -q``.
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GEN = torch.Generator().manual_seed(2024)
MID = dict(layers=2, hidden=256, heads=4, kv_heads=2)  # D = 64


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from attention_proto.integrations import hf_models as hm
    from attention_proto.integrations import transformers as ap_hf

    ap_hf.register()
    return hm, ap_hf


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_bf16_logits_match_reference(hf, arch):
    hm, ap_hf = hf
    model = hm.build_model(arch, dtype=torch.bfloat16, device="cuda", **MID)
    ids, _ = hm.random_batch(2, 200, model.config.vocab_size, device="cuda", seed=1)
    chk, _ = hm.logits_check(model, ids)
    assert chk.ok, str(chk)


def test_bf16_left_padded_batch(hf):
    hm, ap_hf = hf
    model = hm.build_model("llama", dtype=torch.bfloat16, device="cuda", **MID)
    ids, mask = hm.random_batch(3, 150, model.config.vocab_size, device="cuda", seed=2, pad="left",
                                lengths=[150, 97, 20])
    chk, _ = hm.logits_check(model, ids, mask)
    assert chk.ok, str(chk)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_greedy_32_tokens_same_as_sdpa_eager(hf, arch):
    """fp32 so that a near-tie between two logits cannot flip a token (bf16 logits differ in the last bits)."""
    hm, ap_hf = hf
    model = hm.build_model(arch, dtype=torch.float32, device="cuda", **MID)
    ids, mask = hm.random_batch(2, 40, model.config.vocab_size, device="cuda", seed=3, pad="left", lengths=[40, 23])
    ref = hm.greedy(model, ids, mask, new_tokens=32, impl=hm.reference_impl(arch))
    ours = hm.greedy(model, ids, mask, new_tokens=32)
    assert torch.equal(ref, ours)
    ap_hf.reset_stats()
    paged = hm.greedy(model, ids[:1], new_tokens=32,
                      cache=ap_hf.PagedCache(model.config, max_cache_len=128, page_size=16))
    assert torch.equal(paged, hm.greedy(model, ids[:1], new_tokens=32, impl=hm.reference_impl(arch)))
    assert ap_hf.STATS["paged"] == 31 * model.config.num_hidden_layers


def test_inductor_fullgraph_compile(hf):
    import torch._dynamo as dynamo

    hm, ap_hf = hf
    model = hm.build_model("llama", dtype=torch.bfloat16, device="cuda", **MID)
    model.set_attn_implementation("attention_proto")
    ids, mask = hm.random_batch(2, 128, model.config.vocab_size, device="cuda", seed=4, pad="left", lengths=[128, 77])
    with torch.no_grad():
        eager = model(ids).logits.float()
        dynamo.reset()
        ex = dynamo.explain(model)(ids)
        assert ex.graph_break_count == 0, ex.break_reasons
        dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(ids).logits.float()
        out_pad = compiled(ids, attention_mask=mask).logits.float()
        ref_pad = model(ids, attention_mask=mask).logits.float()
    dynamo.reset()
    assert (out - eager).abs().max() < 5e-2
    real = mask.bool()
    assert (out_pad - ref_pad)[real].abs().max() < 5e-2


def test_training_step_compiled(hf):
    hm, ap_hf = hf
    model = hm.build_model("llama", dtype=torch.bfloat16, device="cuda", **MID).train()
    model.set_attn_implementation("attention_proto")
    ids, _ = hm.random_batch(2, 128, model.config.vocab_size, device="cuda", seed=5)
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch._dynamo.reset()


def test_paged_decode_op_in_a_cuda_graph():
    """Capture attention_proto::paged_decode once, then replay as the sequences grow (no host sync inside)."""
    from attention_proto.integrations import torch_ops
    from attention_proto.ops.paged.cache import PagedKVCache
    from attention_proto.ops.paged.reference import paged_attention_reference

    B, Hq, Hkv, D, page = 3, 8, 2, 128, 16
    cache = PagedKVCache(64, page, Hkv, D, max_seqs=B, max_pages_per_seq=16, dtype=torch.bfloat16, device="cuda")
    ids = [cache.add_sequence() for _ in range(B)]
    for s in ids:
        cache.reserve(s, 16 * page)  # every page a sequence will use exists before capture: the table is static
    prompt = [37, 5, 100]
    T = max(prompt)
    kp = torch.randn(B, Hkv, T, D, generator=GEN).to("cuda", torch.bfloat16)
    vp = torch.randn(B, Hkv, T, D, generator=GEN).to("cuda", torch.bfloat16)
    cache.append(ids, kp, vp, counts=prompt)
    bt, lens = cache.batch(ids)
    q = torch.randn(B, Hq, 1, D, generator=GEN).to("cuda", torch.bfloat16)
    cap = 16 * page

    def step():
        return torch_ops.paged_decode(q, cache.k_cache, cache.v_cache, bt, lens, softcap=30.0, max_seq_len=cap)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for _ in range(3):
        kn = torch.randn(B, Hkv, 1, D, generator=GEN).to("cuda", torch.bfloat16)
        vn = torch.randn(B, Hkv, 1, D, generator=GEN).to("cuda", torch.bfloat16)
        cache.append(ids, kn, vn)            # updates the same lens/block_table tensors in place
        q.copy_(torch.randn(B, Hq, 1, D, generator=GEN))
        g.replay()
        torch.cuda.synchronize()
        ref, _ = paged_attention_reference(q.cpu(), cache.k_cache.cpu(), cache.v_cache.cpu(), bt.cpu(), lens.cpu(),
                                           softcap=30.0)
        low, _ = paged_attention_reference(q.cpu(), cache.k_cache.cpu(), cache.v_cache.cpu(), bt.cpu(), lens.cpu(),
                                           softcap=30.0, compute_dtype=torch.bfloat16)
        from attention_proto.testing import assert_close_rule

        assert_close_rule(out, low, ref, torch.bfloat16)


def test_dense_decode_op_in_a_cuda_graph():
    from attention_proto.integrations import torch_ops
    from attention_proto.ops.dense.reference import attention_reference
    from attention_proto.testing import assert_close_rule

    q = torch.randn(4, 16, 1, 128, generator=GEN).to("cuda", torch.bfloat16)
    k = torch.randn(4, 4, 1000, 128, generator=GEN).to("cuda", torch.bfloat16)
    v = torch.randn(4, 4, 1000, 128, generator=GEN).to("cuda", torch.bfloat16)

    def step():
        return torch_ops.flash_attention(q, k, v, causal=True, window=(255, -1))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    q.copy_(torch.randn(4, 16, 1, 128, generator=GEN))
    g.replay()
    torch.cuda.synchronize()
    ref, _ = attention_reference(q, k, v, causal=True, window=(255, -1))
    low, _ = attention_reference(q, k, v, causal=True, window=(255, -1), compute_dtype=torch.bfloat16, device="cuda")
    assert_close_rule(out, low, ref, torch.bfloat16)


def test_model_decode_step_in_a_cuda_graph(hf):
    hm, ap_hf = hf
    model = hm.build_model("llama", dtype=torch.float32, device="cuda", **MID)
    ids, _ = hm.random_batch(2, 20, model.config.vocab_size, device="cuda", seed=6)
    eager = hm.greedy(model, ids, new_tokens=32)
    graphed = hm.cuda_graph_greedy(model, ids, new_tokens=32)
    assert torch.equal(eager, graphed)


def test_dropin_sdpa_bf16_matches_cudnn():
    import torch.nn.functional as F

    from attention_proto.sdpa import scaled_dot_product_attention, strict

    q = torch.randn(2, 16, 1000, 128, generator=GEN).to("cuda", torch.bfloat16)
    k = torch.randn(2, 4, 1000, 128, generator=GEN).to("cuda", torch.bfloat16)
    v = torch.randn(2, 4, 1000, 128, generator=GEN).to("cuda", torch.bfloat16)
    with strict():
        ours = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (ours.float() - theirs.float()).abs().max() < 2e-2
