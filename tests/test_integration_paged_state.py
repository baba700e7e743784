"""PagedCache reaches the paged kernel whatever the transformers release (issue #7).

transformers 4.57 / 5.17 / 5.18 call ``past_key_values.update(k, v, layer_idx)`` without the
attention's kwargs (5.2x passes ``kwargs=kwargs``): the PagedState then rides on the key view the
layer returns. Here the old call is simulated by dropping the kwargs in ``Cache.update``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attention_proto  # noqa: E402,F401
from attention_proto.integrations import hf_models as hm  # noqa: E402
from attention_proto.integrations import transformers as ap_hf  # noqa: E402
from attention_proto.runtime.device import interpreter_mode  # noqa: E402

DEV = "cpu" if interpreter_mode() else "cuda"
SMALL = dict(hidden=32, heads=2, kv_heads=1)


@pytest.fixture(autouse=True)
def _registered():
    ap_hf.register()
    ap_hf.reset_stats()
    yield


@pytest.fixture
def old_cache_api(monkeypatch):
    """Cache.update as transformers 5.17 calls it: no ``kwargs=`` from the attention."""
    from transformers.cache_utils import Cache

    orig = Cache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return orig(self, key_states, value_states, layer_idx)

    monkeypatch.setattr(Cache, "update", update)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_paged_path_without_cache_kwargs(arch, old_cache_api):
    model = hm.build_model(arch, device=DEV, **SMALL)
    ids, _ = hm.random_batch(1, 10, model.config.vocab_size, device=DEV, seed=6)
    ref = hm.greedy(model, ids, new_tokens=4)
    ap_hf.reset_stats()
    paged = hm.greedy(model, ids, new_tokens=4, cache=ap_hf.PagedCache(model.config, max_cache_len=64))
    assert ap_hf.STATS["paged"] == 3 * model.config.num_hidden_layers  # every decode step, every layer
    assert torch.equal(ref, paged)


def test_prefill_key_carries_no_state():
    cache = ap_hf.PagedCache(num_layers=1, max_cache_len=32, page_size=8)
    k = torch.randn(1, 1, 5, 16, device=DEV)
    keys, _ = cache.update(k, k.clone(), 0)
    assert getattr(keys, ap_hf._PAGED_ATTR, None) is None
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1].clone(), 0)
    state = getattr(keys, ap_hf._PAGED_ATTR)
    assert isinstance(state, ap_hf.PagedState) and state.capacity == 32
    keys, _ = cache.update(torch.randn(1, 1, 17, 16, device=DEV), torch.randn(1, 1, 17, 16, device=DEV), 0)
    assert getattr(keys, ap_hf._PAGED_ATTR, None) is None  # > 16 new tokens: the dense path


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA mocked on the CPU only")
def test_cuda_graph_greedy_refuses_a_step_without_the_paged_kernel(monkeypatch, old_cache_api):
    """The captured step must run the paged kernel: a dense view's length is frozen at capture."""

    class _Graph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: type("S", (), {"wait_stream": lambda s, o: None})())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: type("S", (), {"wait_stream": lambda s, o: None})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = hm.build_model("llama", device=DEV, **SMALL)
    ids, _ = hm.random_batch(1, 6, model.config.vocab_size, device=DEV, seed=1)
    out = hm.cuda_graph_greedy(model, ids, new_tokens=2)  # the state on the key view: passes
    assert out.shape == (1, 2)
    # a release where neither route works: the layer attaches nothing to its key view
    monkeypatch.setattr(ap_hf, "setattr", lambda *a: None, raising=False)
    with pytest.raises(RuntimeError, match="paged kernel"):
        hm.cuda_graph_greedy(model, ids, new_tokens=2)
