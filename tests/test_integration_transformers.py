"""Hugging Face transformers with attn_implementation="attention_proto": tiny random models, built in code.

CPU (interpreter) sizes: 2 layers, hidden 64, 4:2 heads of 16. The float64 eager/sdpa model is the
reference of the logits checks (error rule against sdpa, or eager for Gemma 2's softcap).
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attention_proto  # noqa: E402,F401
from attention_proto.integrations import hf_models as hm  # noqa: E402
from attention_proto.integrations import transformers as ap_hf  # noqa: E402
from attention_proto.integrations import torch_ops  # noqa: E402
from attention_proto.runtime.device import interpreter_mode  # noqa: E402

DEV = "cpu" if interpreter_mode() else "cuda"


@pytest.fixture(autouse=True, scope="module")
def _registered():
    ap_hf.register()
    yield


@pytest.fixture(autouse=True)
def _stats():
    ap_hf.reset_stats()
    yield


def model_of(arch, dtype=torch.float32, **kw):
    return hm.build_model(arch, dtype=dtype, device=DEV, **kw)


#: the smallest GQA model (2:1 heads of 16): generation runs one interpreted kernel per layer and token
SMALL = dict(hidden=32, heads=2, kv_heads=1)


@pytest.mark.parametrize("arch", hm.ARCHS)
def test_logits_match_reference(arch):
    model = model_of(arch)
    ids, _ = hm.random_batch(2, 21, model.config.vocab_size, device=DEV, seed=1)
    chk, _ = hm.logits_check(model, ids)
    assert chk.ok, str(chk)
    assert ap_hf.STATS["dense"] == model.config.num_hidden_layers and ap_hf.STATS["fallback"] == 0


def test_sliding_window_is_in_effect():
    """Mistral with window 8 at 21 tokens differs from the same weights without a window, and we follow it."""
    model = model_of("mistral", **SMALL)
    ids, _ = hm.random_batch(1, 21, model.config.vocab_size, device=DEV, seed=2)
    with torch.no_grad():
        model.set_attn_implementation("attention_proto")
        windowed = model(ids).logits
        model.config.sliding_window = None
        full = model(ids).logits
        model.set_attn_implementation("sdpa")
        full_sdpa = model(ids).logits
    assert (windowed - full).abs().max() > 1e-3
    assert (full - full_sdpa).abs().max() < 1e-4


def test_fp16_logits():
    model = model_of("llama", dtype=torch.float16)
    ids, _ = hm.random_batch(2, 17, model.config.vocab_size, device=DEV, seed=3)
    chk, _ = hm.logits_check(model, ids)
    assert chk.ok, str(chk)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_padded_batch_matches_sdpa_and_each_sequence_alone(pad):
    model = model_of("llama", **SMALL)
    ids, mask = hm.random_batch(3, 19, model.config.vocab_size, device=DEV, seed=4, pad=pad, lengths=[19, 12, 4])
    chk, _ = hm.logits_check(model, ids, mask)
    assert chk.ok, str(chk)
    assert ap_hf.STATS["padded"] == model.config.num_hidden_layers
    if pad == "left":
        assert hm.padded_vs_alone(model, ids, mask) < 1e-4


def test_gemma2_padded_batch_with_window_and_softcap():
    model = model_of("gemma2", **SMALL)
    ids, mask = hm.random_batch(2, 19, model.config.vocab_size, device=DEV, seed=5, pad="left", lengths=[19, 10])
    assert hm.padded_vs_alone(model, ids, mask) < 1e-4
    assert ap_hf.STATS["fallback"] == 0


def test_greedy_generation_32_tokens_left_padded():
    # one layer: 32 tokens are 32 interpreted kernel launches per layer (the 2-layer cache path is tested below)
    model = model_of("llama", layers=1 if interpreter_mode() else 2, **SMALL)
    ids, mask = hm.random_batch(2, 10, model.config.vocab_size, device=DEV, seed=6, pad="left", lengths=[10, 6])
    ref = hm.greedy(model, ids, mask, new_tokens=32, impl="sdpa")
    ap_hf.reset_stats()
    ours = hm.greedy(model, ids, mask, new_tokens=32)
    assert torch.equal(ref, ours)
    assert ap_hf.STATS["padded"] == 32 * model.config.num_hidden_layers  # prefill + 31 decode steps


def test_paged_cache_generation_uses_the_paged_kernel():
    pytest.importorskip("attention_proto.ops.paged.cache")
    model = model_of("gemma2", **SMALL)
    ids, _ = hm.random_batch(1, 9, model.config.vocab_size, device=DEV, seed=7)
    ref = hm.greedy(model, ids, new_tokens=8, impl="eager")
    ap_hf.reset_stats()
    cache = ap_hf.PagedCache(model.config, max_cache_len=32, page_size=8)
    ours = hm.greedy(model, ids, new_tokens=8, cache=cache)
    assert torch.equal(ref, ours)
    assert ap_hf.STATS["paged"] == 7 * model.config.num_hidden_layers
    assert cache.get_seq_length() == 9 + 7
    with pytest.raises(ValueError, match="PagedCache is full"):
        hm.greedy(model, ids, new_tokens=30, cache=ap_hf.PagedCache(model.config, max_cache_len=16))


def test_paged_cache_with_padding_reads_pages_densely():
    pytest.importorskip("attention_proto.ops.paged.cache")
    model = model_of("llama", **SMALL)
    ids, mask = hm.random_batch(2, 8, model.config.vocab_size, device=DEV, seed=8, pad="left", lengths=[8, 5])
    ref = hm.greedy(model, ids, mask, new_tokens=4, impl="sdpa")
    ours = hm.greedy(model, ids, mask, new_tokens=4, cache=ap_hf.PagedCache(model.config, max_cache_len=32))
    assert torch.equal(ref, ours)


def test_torch_compile_fullgraph_no_graph_breaks():
    import torch._dynamo as dynamo

    model = model_of("llama")
    model.set_attn_implementation("attention_proto")
    ids, mask = hm.random_batch(2, 16, model.config.vocab_size, device=DEV, seed=9, pad="left", lengths=[16, 11])
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        dynamo.reset()
        # fullgraph=True raises at the first graph break: success means 0 breaks (the study counts them too)
        # dynamo alone ("eager" backend) under the interpreter; the ops' fake/AOT path is tested at op level
        compiled = torch.compile(model, fullgraph=True, backend="eager" if interpreter_mode() else "inductor")
        out = compiled(ids, attention_mask=mask).logits
    dynamo.reset()
    assert (out - eager).abs().max() < (1e-5 if interpreter_mode() else 1e-3)


def test_packed_sequences_through_position_ids():
    """position_ids that restart mark packed sequences, sdpa computes them as a packed mask. In inference
    each row's first key bounds it inside the dense kernel (no sync); with gradients the varlen path runs."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(1, 18, model.config.vocab_size, device=DEV, seed=10)
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].to(DEV)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, position_ids=pos, use_cache=False).logits  # sdpa detects packing only without a cache
        model.set_attn_implementation("attention_proto")
        ap_hf.reset_stats()
        ours = model(ids, position_ids=pos).logits
        assert ap_hf.STATS["dense"] == model.config.num_hidden_layers and ap_hf.STATS["varlen"] == 0
        alone = model(ids[:, 7:]).logits
    assert (ours - ref).abs().max() < 1e-4
    assert (ours[:, 7:] - alone).abs().max() < 1e-4
    ap_hf.reset_stats()
    trained = model(ids, position_ids=pos).logits  # gradients: the varlen path (it has a backward)
    assert ap_hf.STATS["varlen"] == model.config.num_hidden_layers
    assert (trained.detach() - ref).abs().max() < 1e-4


def test_packed_position_ids_under_inference_mode():
    """Inference tensors have no version counter: the per-tensor memo must not read one (review, session
    7: torch.inference_mode() forwards of a batch of one raised RuntimeError in the position_ids search)."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(1, 18, model.config.vocab_size, device=DEV, seed=10)
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].to(DEV)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, position_ids=pos, use_cache=False).logits
        plain_ref = model(ids).logits
        model.set_attn_implementation("attention_proto")
    with torch.inference_mode():
        ours = model(ids, position_ids=pos).logits
        plain = model(ids).logits
    assert (ours - ref).abs().max() < 1e-4 and (plain - plain_ref).abs().max() < 1e-4
    ap_hf.reset_stats()
    with torch.inference_mode():  # gradients cannot be on here; the varlen path's memo is checked directly
        assert ap_hf._packed_cu_seqlens(pos.clone())[1] == 11


def test_key_starts_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
    ks = torch_ops.key_starts_from_positions(pos)
    assert ks.dtype == torch.int32
    assert ks.tolist() == [[0, 0, 0, 3, 3, 5, 5, 7], [0] * 8]


def test_packed_position_ids_search_can_be_turned_off():
    """register(packed_position_ids=False): no sync for the search; restarting positions are one
    sequence, as sdpa with a cache computes them. Bad values are a TypeError naming the argument."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(1, 18, model.config.vocab_size, device=DEV, seed=10)
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].to(DEV)
    try:
        ap_hf.register(packed_position_ids=False)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            ref = model(ids, position_ids=pos).logits  # with a cache: one sequence
            model.set_attn_implementation("attention_proto")
            ap_hf.reset_stats()
            ours = model(ids, position_ids=pos).logits
        assert ap_hf.STATS["varlen"] == 0 and ap_hf.STATS["dense"] == model.config.num_hidden_layers
        assert (ours - ref).abs().max() < 1e-4
        with pytest.raises(TypeError, match="packed_position_ids must be a bool"):
            ap_hf.register(packed_position_ids="no")
    finally:
        ap_hf.register()


def test_packed_rows_in_a_batch_of_several_are_exact():
    """Packing in a batch of two (no cache): the varlen path takes one packed row, so transformers' own
    4-D mask is materialised and computed eagerly -- equal to sdpa, never the unpacked causal pattern."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(2, 12, model.config.vocab_size, device=DEV, seed=3)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1).contiguous().to(DEV)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", ap_hf.TransformersFallbackWarning)
        model.set_attn_implementation("sdpa")
        ref = model(ids, position_ids=pos, use_cache=False).logits
        model.set_attn_implementation("attention_proto")
        ours = model(ids, position_ids=pos, use_cache=False).logits
    assert ap_hf.STATS["fallback"] == model.config.num_hidden_layers
    assert (ours - ref).abs().max() < 1e-4


def test_mask_pattern_kinds():
    import transformers.masking_utils as mu

    kind = ap_hf.mask_pattern_kind
    assert kind(mu.causal_mask_function) == "plain"
    assert kind(mu.sliding_window_causal_mask_function(4)) == "plain"
    packed = torch.tensor([[0, 0, 0, 1, 1]])
    inner = mu.causal_mask_function
    if hasattr(mu, "remap_positions_for_packed_sequence"):  # transformers >= 5.2x (5.17 has no remap)
        inner = mu.remap_positions_for_packed_sequence(inner, packed)
    f = mu.and_masks(inner, mu.packed_sequence_mask_function(packed))
    assert kind(f) == "packed"
    assert kind(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))) == "other"
    assert kind(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(packed))) == "other"
    assert kind(lambda b, h, q, k: q >= k) == "other"
    # under torch.compile neither closures nor (on some torch versions) names can be read: the config decides
    ckind = ap_hf.compiled_pattern_kind
    cfg = type("Cfg", (), {"attention_chunk_size": None})()
    chunked_cfg = type("Cfg", (), {"attention_chunk_size": 4})()
    assert ckind(mu.causal_mask_function, mu, chunked_cfg) == "plain"
    assert ckind(mu.sliding_window_causal_mask_function(4), mu, cfg) == "plain"
    assert ckind(f, mu, cfg) == "plain"  # transformers adds the packed overlay to every traced no-cache forward
    assert ckind(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), mu, chunked_cfg) == "other"


def test_compiled_forward_without_cache_keeps_our_kernels():
    """While tracing, transformers adds its packed overlay to every forward without a cache (it cannot
    test for packing there): that must not send the compiled model to eager attention (strict mode
    raises on any eager call)."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(1, 8, model.config.vocab_size, device=DEV, seed=1)
    ap_hf.register(strict=True)
    try:
        model.set_attn_implementation("attention_proto")
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
            ref = model(ids, use_cache=False).logits
        assert (out - ref).abs().max() < 1e-4
    finally:
        ap_hf.register()
        torch._dynamo.reset()


def test_compiled_forward_sees_packed_position_ids():
    """Under torch.compile the mask closures cannot be read, but inference finds packed sequences from
    position_ids on the device (the key-start kernel, no sync): the logits equal sdpa's packed mask."""
    model = model_of("llama", **SMALL)
    ids, _ = hm.random_batch(1, 12, model.config.vocab_size, device=DEV, seed=4)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(DEV)
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            ref = model(ids, position_ids=pos, use_cache=False).logits
            model.set_attn_implementation("attention_proto")
            ap_hf.register(strict=True)
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            out = compiled(ids, position_ids=pos).logits  # with a cache: sdpa would not see the packing
        assert (out - ref).abs().max() < 1e-4
    finally:
        ap_hf.register()
        torch._dynamo.reset()


@pytest.mark.parametrize("overlay", ["block", "chunked"])
def test_patterns_beyond_causal_are_materialised_not_dropped(overlay):
    """A block overlay (bidirectional image tokens) or chunked attention: our mask function returns
    transformers' own 4-D mask (the attention then computes it eagerly), equal to sdpa's."""
    import transformers.masking_utils as mu

    model = model_of("llama", **SMALL)
    cfg = model.config
    emb = torch.zeros(1, 10, cfg.hidden_size, device=DEV)
    kw = {}
    if overlay == "block":
        kw["block_sequence_ids"] = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1]], device=DEV)
        make = mu.create_causal_mask
    else:
        cfg.attention_chunk_size = 4
        make = mu.create_chunked_causal_mask
    masks = {}
    for impl in ("sdpa", "attention_proto"):
        cfg._attn_implementation = impl
        # positional: the cache argument was `past_key_values` before transformers 5.2x
        masks[impl] = make(cfg, emb, None, None, torch.arange(10, device=DEV)[None], **kw)
    assert masks["attention_proto"] is not None and masks["attention_proto"].dim() == 4
    assert torch.equal(masks["attention_proto"], masks["sdpa"])


def test_training_gradients_match_sdpa():
    model = model_of("llama", **SMALL)
    ids, mask = hm.random_batch(2, 14, model.config.vocab_size, device=DEV, seed=11, pad="right", lengths=[14, 9])
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", "attention_proto"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    a, b = grads["sdpa"], grads["attention_proto"]
    assert a.keys() == b.keys()
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-4


def test_4d_mask_falls_back_once_and_strict_raises():
    model = model_of("llama", **SMALL)
    model.set_attn_implementation("attention_proto")
    N = 9
    ids, _ = hm.random_batch(1, N, model.config.vocab_size, device=DEV, seed=12)
    mask4d = torch.ones(1, 1, N, N, dtype=torch.bool, device=DEV).tril()
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = model(ids, attention_mask=mask4d).logits
        ref = model(ids).logits
    msgs = [str(x.message) for x in w if issubclass(x.category, ap_hf.TransformersFallbackWarning)]
    assert len(msgs) == 1 and "4-D attention mask" in msgs[0]
    assert (out - ref).abs().max() < 1e-4
    assert ap_hf.STATS["fallback"] == model.config.num_hidden_layers
    ap_hf.register(strict=True)
    try:
        with pytest.raises(ap_hf.AttentionProtoFallbackError, match="4-D attention mask"):
            with torch.no_grad():
                model(ids, attention_mask=mask4d)
    finally:
        ap_hf.register(strict=False)


def test_paged_cache_needs_layers():
    with pytest.raises(ValueError, match="number of layers"):
        ap_hf.PagedCache(None, max_cache_len=8)
    with pytest.raises(ValueError, match="power of two"):
        ap_hf.PagedCache(None, max_cache_len=8, num_layers=2, page_size=12)


def test_from_pretrained_with_attn_implementation(tmp_path):
    """The public loading paths accept the registered name (a local checkpoint: no download)."""
    model = model_of("qwen2", **SMALL)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attention_proto")
    assert loaded.config._attn_implementation == "attention_proto"
    cfg = hm.make_config("llama", **SMALL)
    fresh = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attention_proto")
    assert fresh.config._attn_implementation == "attention_proto"
    ids, _ = hm.random_batch(1, 12, cfg.vocab_size, device="cpu", seed=13)
    with torch.no_grad():
        ours = loaded.to(DEV)(ids.to(DEV)).logits
        loaded.set_attn_implementation("sdpa")
        ref = loaded(ids.to(DEV)).logits
    assert (ours - ref).abs().max() < 1e-4
    assert ap_hf.STATS["dense"] == loaded.config.num_hidden_layers
