"""Hopper fast path of the dense forward: tensor descriptors (TMA), software pipelining, optional
warp specialization.

Design
------
- Host-side ``TensorDescriptor``s over the 4-D tensors ``[B, H, N, D]`` with their real strides
  (block ``[1, 1, BLOCK, D]``), so one descriptor serves BHSD and BSHD (a transposed view) alike,
  and the TMA unit does the bounds work: rows past N load as zeros (then masked like any ragged
  tail) and stores past Nq are clipped -- any Nq, Nk, no per-head overflow. Loaded tiles are
  reshaped to 2-D (the leading unit dims are free).
- The KV loop is ``tl.range(..., num_stages=NUM_STAGES)``: Triton pipelines the K/V descriptor
  loads (TMA + mbarriers) ahead of the wgmma consumer. With ``WARP_SPEC`` (path "tma+ws") the
  mask-free main loop also asks for warp specialization (producer/consumer warp groups); triton
  3.6 documents this as Blackwell-first, so the path stays opt-in (the tuned table decides).
- The online-softmax step, the modifiers and the block ranges are the portable kernel's
  (:func:`.forward.attn_step`, :mod:`.common`), so both paths compute the same thing.

Subset (see :func:`supports`): CUDA with compute capability >= 9, fp16/bf16, D a power of two in
[16, 256], last dim contiguous, 16-byte aligned pointers and strides, Nq, Nk > 0, no RoPE (fused
varlen. Causal, window, softcap, ALiBi, GQA/MQA, RoPE and the score_mod/mask_mod hooks are
supported. RoPE: the query tile is rotated in registers after its TMA load (:func:`.common.rope_rows`);
the keys are rotated once per call by the standalone RoPE kernel into a scratch tensor that the K
descriptor reads (``rope_kernel``). Rotating every K tile as it is loaded would redo each rotation
once per query block (N / BLOCK_M times) and cannot keep the TMA -> wgmma path (the rotated tile
must go back through registers): on the H100 that form cost 5.5x plain attention (finding
modifiers-rope-fused-overhead of the first run). Triton's interpreter also runs this kernel (descriptors are
emulated), which is how the CPU tests check its indexing; on a GPU it needs Hopper.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...runtime.cache import KERNEL_CACHE
from ...runtime.device import interpreter_mode
from .common import WINDOW_UNBOUNDED, key_start_bounds, kv_block_range, rope_rows
from .configs import FwdConfig, config_problems
from .forward import alibi_lse_shift, attn_step, natural_scores

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.3
    TensorDescriptor = None

TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_HEAD_DIMS = (16, 32, 64, 128, 256)


@triton.jit
def _fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, ALIBI, COS, SIN, KEY_START,
    slb, slh, slm, seqlen_q, seqlen_k, H, GROUP, num_m_blocks,
    sm_scale, qk_scale2, softcap, win_left, win_right, stride_cs, max_pos, rope_q_pos0, heads_per_chunk,
    ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, USE_NATURAL: tl.constexpr, HAS_HOOKS: tl.constexpr,
    REVERSE_M: tl.constexpr, NUM_STAGES: tl.constexpr, WARP_SPEC: tl.constexpr, LPT: tl.constexpr = False,
):
    if LPT:
        # causal, longest first across heads: blocks are issued in linear program order, so the linear id
        # walks the query blocks from the heaviest (last) down with every head of a chunk at each block
        # (chunks: heads whose K/V fit in L2 together); see forward.CAUSAL_SCHEDULE
        lin = tl.program_id(0) + tl.program_id(1) * num_m_blocks
        per_chunk = heads_per_chunk * num_m_blocks
        c = lin // per_chunk
        r = lin - c * per_chunk
        in_chunk = tl.minimum(heads_per_chunk, tl.num_programs(1) - c * heads_per_chunk)
        pid_m = num_m_blocks - 1 - r // in_chunk
        pid_bh = c * heads_per_chunk + r % in_chunk
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        if REVERSE_M:
            pid_m = num_m_blocks - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = desc_q.load([b, h, m0, 0]).reshape([BLOCK_M, HEAD_DIM])
    if ROPE != 0:
        # the query tile is rotated once, in registers; k arrives already rotated (see supports)
        q = rope_rows(q, rope_q_pos0 + offs_m, COS, SIN, stride_cs, max_pos, ROPE, HEAD_DIM)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right,
                                              BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    left = win_left
    if KEY_START is not None:
        # per-row first keys (packed documents): a left window per row in the leading band only
        ks_base = KEY_START + b.to(tl.int64) * seqlen_q
        lo, full_lo, full_hi, left = key_start_bounds(ks_base, offs_m, seqlen_q, seqlen_k, lo, full_lo, full_hi,
                                                      hi, win_left, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW or KEY_START is not None:
        for start_n in tl.range(lo, full_lo, BLOCK_N, num_stages=NUM_STAGES):
            k = desc_k.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
            v = desc_v.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
            acc, l_i, m_i = attn_step(
                acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
                sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, left, win_right, True, IS_CAUSAL,
                HAS_WINDOW or KEY_START is not None, HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL,
                HAS_HOOKS, "tf32", None, None, False)
    for start_n in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        v = desc_v.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        acc, l_i, m_i = attn_step(
            acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
            sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, win_left, win_right, False, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL, HAS_HOOKS, "tf32", None, None, False)
    for start_n in tl.range(full_hi, hi, BLOCK_N, num_stages=NUM_STAGES):
        k = desc_k.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        v = desc_v.load([b, hk, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        acc, l_i, m_i = attn_step(
            acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
            sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, win_left, win_right, True, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL, HAS_HOOKS, "tf32", None, None, False)
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]  # one division per row, not per element
    desc_o.store([b, h, m0, 0], out.to(q.dtype).reshape([1, 1, BLOCK_M, HEAD_DIM]))
    if LSE is not None:  # None (a constexpr): the caller needs no LSE
        lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        lse = alibi_lse_shift(lse, offs_m, m0, slope, HAS_ALIBI, USE_NATURAL)
        l_ptrs = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + offs_m * slm
        tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)


_CAPABILITY: dict = {}


def _capability(device: torch.device) -> Tuple[int, int]:
    cc = _CAPABILITY.get(device)
    if cc is None:
        cc = _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    return cc


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned base and leading strides, none of them 0 (a broadcast view): what TMA accepts."""
    e = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s > 0 and (s * e) % 16 == 0 for s in t.stride()[:-1])


def supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    varlen: bool = False,
    out: Optional[torch.Tensor] = None,
    check_device: bool = True,
    config: Optional[FwdConfig] = None,
) -> List[str]:
    """Reasons the TMA path does not apply to these inputs (empty list: it applies).

    q [B, H, Nq, D], k/v [B, Hkv, Nk, D] as for :func:`.forward.flash_attention_forward`.
    ``check_device=False`` skips the GPU checks (the interpreter emulates descriptors).
    ``config``: also the reasons this launch config cannot compile on Hopper
    (:func:`.configs.config_problems`: warp specialization needs 8 warps).
    """
    reasons = device_and_tensor_reasons(q, k, v, out=out, check_device=check_device, config=config, rank=4,
                                        tokens_dim=2, empty="empty sequence (Nq or Nk = 0)")
    if varlen:
        reasons.append("varlen (cu_seqlens) is not supported by the TMA path")
    if rope is not None and q.shape[-1] % 2:
        reasons.append(f"RoPE needs an even head dim; got D={q.shape[-1]}")
    return reasons


def device_and_tensor_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: Optional[torch.Tensor],
                              check_device: bool, config: Optional[FwdConfig], rank: int, tokens_dim: int,
                              empty: Optional[str], head_dims: Tuple[int, ...] = TMA_HEAD_DIMS,
                              what: str = "the TMA path") -> List[str]:
    """What every TMA kernel needs (the dense and varlen forwards, the backward): a config that
    compiles, tensor descriptors, a Hopper GPU (unless ``check_device=False``), ``rank``-D fp16/bf16
    tensors with D in ``head_dims`` (Dv == D), tokens along ``tokens_dim`` (``empty``: the reason
    when there are none; None: not checked), unit last strides and 16-byte alignment (no 0 stride)."""
    reasons: List[str] = []
    if config is not None:
        reasons.extend(config_problems(config))
    if TensorDescriptor is None:
        reasons.append("triton has no triton.tools.tensor_descriptor (needs triton >= 3.3)")
    if check_device:
        if interpreter_mode():
            reasons.append("Triton interpreter (no GPU): the portable kernel runs instead")
        elif not q.is_cuda:
            reasons.append(f"q is on {q.device}; TMA needs a CUDA tensor")
        else:
            major, minor = _capability(q.device)
            if major < 9:
                reasons.append(f"compute capability {major}.{minor}; TMA needs >= 9.0 (Hopper)")
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        layout = "BHSD views" if rank == 4 else "packed [T, H, D]"
        reasons.append(f"q/k/v must be {rank}-D {layout}; got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D")
        return reasons
    if q.dtype not in TMA_DTYPES:
        reasons.append(f"dtype {q.dtype}; {what} supports float16 and bfloat16")
    D = q.shape[-1]
    if D not in head_dims or v.shape[-1] != D:
        reasons.append(f"head dim {D} (v: {v.shape[-1]}); {what} supports D in {head_dims} with Dv == D")
    if empty is not None and (q.shape[tokens_dim] == 0 or k.shape[tokens_dim] == 0):
        reasons.append(empty)
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t is None:
            continue
        if t.stride(-1) != 1:
            reasons.append(f"{name} has last-dim stride {t.stride(-1)}; TMA needs it contiguous (1)")
        elif not _aligned(t):
            reasons.append(f"{name} pointer or strides {tuple(t.stride())} are not 16-byte aligned (or a stride is 0)")
    return reasons


def make_descriptor(t: torch.Tensor, shape: List[int], strides: List[int], block_shape: List[int]) -> Any:
    """A host ``TensorDescriptor`` over ``t`` without the constructor's checks.

    The checks (16-byte aligned base and strides, unit last stride, positive shape) are what
    :func:`supports` verified for the launch plan this descriptor belongs to; skipping them saves a
    few microseconds per descriptor and call. ``shape``/``strides``/``block_shape`` are shared
    with the plan and never mutated.
    """
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block_shape, padding="zero")
    return d


def tma_launch_parts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
    causal: bool, window: Tuple[int, int], has_softcap: bool, has_alibi: bool, score_mod: Any, mask_mod: Any,
    config: FwdConfig, positive_scale: bool = True, rope_mode: int = 0, rope_ints: Tuple[int, int, int] = (0, 0, 0),
    lpt_heads: int = 0,
) -> Tuple[Tuple[int, int], tuple, tuple, tuple, dict]:
    """What a TMA launch takes that depends on neither data pointers nor float values.

    Returns ``(grid, desc_specs, ints_a, ints_b, constexprs)``; the kernel's positional arguments
    are the four descriptors (``make_descriptor(t, *spec)`` over q, k, v, out), lse, the ALiBi
    slopes (or None), the RoPE cos and sin tables (or None), ``ints_a``, the floats (sm_scale,
    sm_scale * log2(e), softcap or 0), ``ints_b``. ``rope_mode`` (0 none, 1 half, 2 interleaved)
    and ``rope_ints`` (table row stride, table rows, first query position): ``k`` must then be the
    already rotated keys. :func:`.forward.flash_attention_forward` caches these per call
    signature (its launch plan). ``positive_scale``: sm_scale > 0 (else the scores take the
    natural-units path, see :func:`.forward.attn_step`). ``lpt_heads`` > 0: issue the programs
    longest first across chunks of that many heads (causal; :data:`.forward.CAUSAL_SCHEDULE`).
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    BM, BN = config.BLOCK_M, config.BLOCK_N
    specs = tuple((list(t.shape), list(t.stride()), [1, 1, blk, D])
                  for t, blk in ((q, BM), (k, BN), (v, BN), (out, BM)))
    left, right = window
    num_m = (Nq + BM - 1) // BM  # not triton.cdiv: a jit function, slow to call from Python
    ints_a = (lse.stride() if lse is not None else (0, 0, 0)) + (Nq, Nk, H, H // Hkv, num_m)
    ints_b = ((left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED) + tuple(rope_ints)
              + (int(lpt_heads),))
    consts = dict(ROPE=rope_mode, WARP_SPEC=config.path == "tma+ws",
                  **tma_constexprs(D, config, causal, window, has_softcap, has_alibi, score_mod, mask_mod, positive_scale))
    if lpt_heads > 0:
        consts["LPT"] = True
    return (num_m, B * H), specs, ints_a, ints_b, consts


def tma_constexprs(D: int, config: FwdConfig, causal: bool, window: Tuple[int, int], has_softcap: bool,
                   has_alibi: bool, score_mod: Any, mask_mod: Any, positive_scale: bool) -> dict:
    """The constexprs (and launch options) both TMA forward kernels take."""
    left, right = window
    return dict(
        HEAD_DIM=D, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        IS_CAUSAL=bool(causal), HAS_WINDOW=left >= 0 or right >= 0, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=has_alibi, SCORE_MOD=score_mod, MASK_MOD=mask_mod,
        USE_NATURAL=natural_scores(has_softcap, has_alibi, bool(causal), score_mod, positive_scale),
        HAS_HOOKS=score_mod is not None or mask_mod is not None, REVERSE_M=bool(causal),
        NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def flash_attention_forward_tma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    window: Tuple[int, int],
    softcap: Optional[float],
    alibi_slopes: Optional[torch.Tensor],
    score_mod: Any,
    mask_mod: Any,
    config: FwdConfig,
    checked: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the TMA kernel into ``out`` [B, H, Nq, D] and ``lse`` [B, H, Nq] (already allocated).

    :func:`.forward.flash_attention_forward` launches this path itself through its cached launch
    plans (:func:`tma_launch_parts`); this entry runs one launch without a plan. Arguments are
    normalized (window as (left, right) with -1 unbounded, slopes as an fp32 tensor or None).
    Raises ValueError listing the reasons when the path does not apply (``checked=True``: the
    caller has just asked :func:`supports`).
    """
    if not checked:
        reasons = supports(q, k, v, out=out, check_device=not interpreter_mode(), config=config)
        if reasons:
            raise ValueError("the TMA forward path does not apply: " + "; ".join(reasons))
    grid, specs, ints_a, ints_b, consts = tma_launch_parts(
        q, k, v, out, lse, causal=causal, window=window, has_softcap=softcap is not None,
        has_alibi=alibi_slopes is not None, score_mod=score_mod, mask_mod=mask_mod, config=config,
        positive_scale=sm_scale > 0.0)
    descs = tuple(TensorDescriptor(t, *spec) for t, spec in zip((q, k, v, out), specs))
    floats = (sm_scale, sm_scale * 1.4426950408889634, float(softcap) if softcap is not None else 0.0)
    KERNEL_CACHE.launch(_fwd_tma_kernel, grid, *descs, lse, alibi_slopes, None, None, None,
                        *ints_a, *floats, *ints_b, **consts)
    return out, lse
