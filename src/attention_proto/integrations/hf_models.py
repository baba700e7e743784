"""Random-weight transformers models built from configs in code (no downloads), for tests and study 8.

``build_model("llama", ...)`` gives a LlamaForCausalLM (RoPE, GQA); ``"mistral"`` and ``"qwen2"``
add a sliding window; ``"gemma2"`` alternates sliding and full layers and soft-caps the
attention logits. Sizes default to tiny (2 layers, hidden 64: fast under Triton's interpreter);
the study passes larger ones on the GPU.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma2")


def make_config(arch: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: Optional[int] = None, intermediate: Optional[int] = None, vocab: int = 128,
                sliding_window: Optional[int] = 8, softcap: Optional[float] = 20.0, max_positions: int = 8192,
                attn_implementation: str = "eager", **extra: Any):
    """A transformers config for ``arch`` in ``ARCHS`` (window/softcap used where the architecture has them)."""
    import transformers as tf

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}; got {arch!r}")
    hd = head_dim or hidden // heads
    common: Dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
        max_position_embeddings=max_positions, attention_dropout=0.0, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    common.update(extra)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(sliding_window=sliding_window, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(sliding_window=sliding_window, use_sliding_window=sliding_window is not None,
                             max_window_layers=0, **common)
    else:
        cfg = tf.Gemma2Config(sliding_window=sliding_window or 4096, attn_logit_softcapping=softcap,
                              final_logit_softcapping=None, query_pre_attn_scalar=hd, hidden_activation="gelu_pytorch_tanh",
                              **common)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(arch: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                attn_implementation: str = "eager", **config_kw: Any):
    """A random-weight causal LM (eval mode) of ``arch`` on ``device`` in ``dtype``."""
    import transformers as tf

    cfg = make_config(arch, attn_implementation=attn_implementation, **config_kw)
    torch.manual_seed(seed)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "gemma2": tf.Gemma2ForCausalLM}[arch]
    model = cls(cfg)
    # small random weights keep logits in a range where fp16 rounding is not the story
    return model.to(device=device, dtype=dtype).eval()


def reference_impl(arch: str) -> str:
    """The transformers implementation to compare against: sdpa, or eager where sdpa refuses (softcap)."""
    return "eager" if arch == "gemma2" else "sdpa"


def random_batch(B: int, N: int, vocab: int, *, device: str = "cpu", seed: int = 0, pad: Optional[str] = None,
                 lengths: Optional[list] = None):
    """(input_ids [B, N], attention_mask [B, N] int64): random tokens; ``pad`` "left"/"right" with ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    if pad is not None:
        for b, n in enumerate(lengths or [N] * B):
            if pad == "left":
                mask[b, : N - n] = 0
                ids[b, : N - n] = 0
            else:
                mask[b, n:] = 0
                ids[b, n:] = 0
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# checks shared by the tests and study 8
# ---------------------------------------------------------------------------------------------


def _quiet():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield

    return ctx()


def logits_check(model, ids, mask=None, *, impl: str = "attention_proto", baseline: Optional[str] = None,
                 ref64_model=None):
    """Our logits against the float64 eager model and the baseline implementation, by the error rule.

    Returns ``(ErrorCheck, ours_logits)``; only real (unpadded) positions count. ``ref64_model``:
    a float64 copy of ``model`` (made here when not given; on the model's device).
    """
    import copy

    from ..testing import check_error

    arch = model.config.model_type
    baseline = baseline or reference_impl(arch)
    if ref64_model is None:
        ref64_model = copy.deepcopy(model).to(torch.float64)
    ref64_model.set_attn_implementation(baseline)  # eager float64 overflows its additive mask on padded rows
    sel = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    with torch.no_grad(), _quiet():
        ref = ref64_model(ids, attention_mask=mask).logits[sel]
        model.set_attn_implementation(baseline)
        low = model(ids, attention_mask=mask).logits[sel]
        model.set_attn_implementation(impl)
        ours = model(ids, attention_mask=mask).logits[sel]
    return check_error(ours, low, ref, model.dtype), ours


def greedy(model, ids, mask=None, *, new_tokens: int = 32, impl: str = "attention_proto", cache=None):
    """Greedy generation of exactly ``new_tokens`` tokens with ``impl``; returns the generated ids [B, new]."""
    model.set_attn_implementation(impl)
    kw: Dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
    if cache is not None:
        kw["past_key_values"] = cache
    with torch.no_grad(), _quiet():
        out = model.generate(ids, attention_mask=mask, **kw)
    return out[:, ids.shape[1]:]


def padded_vs_alone(model, ids, mask, *, impl: str = "attention_proto"):
    """Max |logits of each sequence in the left-padded batch - logits of the sequence alone| (real tokens)."""
    model.set_attn_implementation(impl)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    worst = 0.0
    with torch.no_grad(), _quiet():
        batched = model(ids, attention_mask=mask, position_ids=pos).logits
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            alone = model(ids[b:b + 1, real]).logits[0]
            worst = max(worst, float((alone - batched[b, real]).abs().max()))
    return worst


def cuda_graph_greedy(model, prompt, *, new_tokens: int = 32, max_cache_len: Optional[int] = None,
                      page_size: int = 16):
    """Greedy decode with each step replayed from one captured CUDA graph over a :class:`PagedCache`.

    The prompt is prefilled eagerly; the decode step (embedding, every layer's paged append and
    ``attention_proto::paged_decode``, argmax, next position) is captured once with static
    shapes and replayed ``new_tokens - 1`` times. Returns the generated ids [B, new_tokens].
    """
    from . import transformers as ap_hf
    from .transformers import PagedCache

    model.set_attn_implementation("attention_proto")
    B, N = prompt.shape
    cap = max_cache_len or (N + new_tokens + page_size)
    cache = PagedCache(model.config, max_cache_len=cap, page_size=page_size)
    dev = prompt.device
    with torch.no_grad(), _quiet():
        out = model(prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)
        static_ids = tok[:, None].clone()
        static_pos = torch.full((B, 1), N, dtype=torch.long, device=dev)

        def step():
            logits = model(static_ids, position_ids=static_pos, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1)
            static_ids.copy_(nxt[:, None])
            static_pos.add_(1)
            return nxt

        layers = cache.layers
        lens0 = [l.length for l in layers]
        # warm up on a side stream (compiles every kernel), then roll the cache back
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        saved = (static_ids.clone(), static_pos.clone())
        paged0 = ap_hf.STATS["paged"]
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        if ap_hf.STATS["paged"] - paged0 < len(layers):
            # any other path reads the cache through a dense view whose length is a host int frozen
            # at capture: every replay would attend to the first N + 1 tokens only (wrong tokens)
            raise RuntimeError(f"cuda_graph_greedy: the warm-up decode step ran the paged kernel in "
                               f"{ap_hf.STATS['paged'] - paged0} of {len(layers)} layers (paths {dict(ap_hf.STATS)}); "
                               f"a captured step needs it in every layer")
        for l, n in zip(layers, lens0):
            l.crop(n)
        static_ids.copy_(saved[0])
        static_pos.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        # capture ran no kernel but advanced the host-side lengths: put them back
        for l, n in zip(layers, lens0):
            l.crop(n)
        toks = [tok]
        for _ in range(new_tokens - 1):
            graph.replay()
            toks.append(static_out.clone())
        torch.cuda.synchronize()
    return torch.stack(toks, 1)
