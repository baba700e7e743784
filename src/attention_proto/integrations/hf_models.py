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
