"""Pools of kernel-shaping variants for the GPU fuzz tests (the ``*_gpu_cases`` strategies only).

Why: on a GPU, every new combination of compile-time parameters is a Triton compile (about
1-20 s): the head dim, the dtype, the modifier flags (tl.constexpr values, tile configs), the
layouts and index dtypes, and Triton's specialization of int arguments (a value equal to 1 is
compiled in as a constant, one divisible by 16 gets its own variant; pointers by 16-byte
alignment). Drawn independently, nearly every hypothesis example hits a new combination: the
recorded H100 run managed 21-521 cases per operation in 470 s instead of 1000. So a GPU case is
split in two:

- the *kernel-shaping* part is one variant of a fixed pool per operation (:data:`POOLS`): a
  seeded greedy covering array over the operation's dimensions (:func:`covering_pool`) in which
  every value of every dimension appears and every value pair of the listed interactions
  (``pairs``: dtype x head dim, causal x window, softcap x ALiBi, RoPE x heads, ...) appears.
  Dense variants also fix the specialization class of their ints (:data:`LENGTH_CLASSES` of Nq,
  Nk or max_seqlen; the heads kind; ``mod_ints``, the class of window sizes and RoPE offsets):
  the values are still drawn freely inside the class, and every class is some variant's;
- the *free* part (batch, heads within the variant's kind, lengths within their class, window
  sizes, softcap values, scales, RoPE offsets, page tables, seeds, ...) is drawn by hypothesis.

Ints derived from the free part (products such as H x Nq in strides, block counts, the paged
block-table width) still specialize, so a variant compiles a few times (estimated with an
interpreter census of 1000 cases per operation: 1-8 signatures per kernel and variant); the
TMA-or-portable choice and N-dependent tiles add up to x2 on the GPU. The CPU strategies are
unchanged (tiny shapes: their compiles are interpreter runs).

``ATTENTION_PROTO_FUZZ_POOL=0`` turns the pools off: every dimension is then drawn
independently from the same values (the unbounded draws). The ``*_kinds`` functions map a case
back to its kernel-shaping values (``tests/test_fuzz_common.py`` checks that sampled cases stay in
their pool and reach every value).
"""
from __future__ import annotations

import functools
import itertools
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from hypothesis import strategies as st

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: dense layouts ("bcast": every batch row is row 0 through an expand)
DENSE_LAYOUTS = ("bhsd", "bshd", "bhsd_pad", "bshd_pad", "dstride", "bcast")
#: paged decode query lengths by power-of-two bucket: GQA group x Nq rows pick BLOCK_M and the merge tile
PAGED_Q_LENS = {"1": (1, 1), "2": (2, 2), "3-4": (3, 4), "5-8": (5, 8), "9-16": (9, 16)}
#: Triton specializes an int argument equal to 1 (a constant) or divisible by 16 (0 included): a
#: length's class picks a compiled variant, its value within the class does not
LENGTH_CLASSES = ("1", "x16", "other")
#: dense heads: (KV heads, GQA group) kinds; H == 1 and GROUP == 1 are constants, H == 16 divisible by 16
DENSE_HEADS = {"1": ((1, 1),), "mha": tuple((h, 1) for h in (2, 3, 4)),
               "gqa": tuple((h, g) for h in (1, 2, 3, 4) for g in (2, 3, 4) if h * g != 16), "gqa16": ((4, 4),)}
#: varlen heads (fewer: every sequence runs on the CPU reference); kinds named as DENSE_HEADS'
VARLEN_HEADS = {"1": ((1, 1),), "mha": ((2, 1),), "gqa": ((1, 2), (1, 3), (2, 2), (2, 3))}


def shard_part() -> Optional[Tuple[int, int]]:
    """(i, n) from ``ATTENTION_PROTO_FUZZ_SHARD`` = "i/n" (set by scripts/fuzz_gpu.py per shard), else None.

    Shard i of n draws only the pool variants i, i + n, i + 2n, ...: the shards split the pool instead
    of each compiling nearly all of it (concurrent processes compile the same variant each, before
    Triton's disk cache has it); together they still draw from every variant."""
    raw = os.environ.get("ATTENTION_PROTO_FUZZ_SHARD", "").strip()
    if not raw:
        return None
    try:
        i, n = (int(x) for x in raw.split("/"))
    except ValueError:
        raise ValueError(f"ATTENTION_PROTO_FUZZ_SHARD must be 'i/n' (0 <= i < n); got {raw!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"ATTENTION_PROTO_FUZZ_SHARD must be 'i/n' (0 <= i < n); got {raw!r}")
    return i, n


def pools_enabled() -> bool:
    """False when ``ATTENTION_PROTO_FUZZ_POOL`` is 0/false/off (read at draw time)."""
    return os.environ.get("ATTENTION_PROTO_FUZZ_POOL", "1").strip().lower() not in ("0", "false", "off", "no")


def covering_pool(dims: Dict[str, Sequence[Any]], size: int, pairs: Sequence[Tuple[str, str]], seed: int,
                  valid: Optional[Callable[[dict], bool]] = None, candidates: int = 60) -> Tuple[dict, ...]:
    """``size`` variants (dicts dim -> value) covering every value of every dim and every value pair
    of the dims in ``pairs`` (pairs no valid variant can hold are skipped).

    Greedy (AETG-like): each new variant is the best of ``candidates`` random ones, each seeded with
    a still-uncovered target, scored by the required targets it covers first, then by value pairs
    of any two dims not seen yet (spread beyond the required pairs). Deterministic for a seed.
    Raises ValueError when ``size`` is too small for the required targets.
    """
    valid = valid or (lambda v: True)
    rng = random.Random(seed)
    names = list(dims)

    def rand_variant(fixed: dict, gen: random.Random = rng) -> dict:
        return {n: fixed[n] if n in fixed else gen.choice(list(dims[n])) for n in names}

    def feasible(fixed: dict) -> bool:
        gen = random.Random(repr(sorted(fixed.items(), key=repr)))  # its own stream: no order dependence
        return any(valid(rand_variant(fixed, gen)) for _ in range(200))

    required = {((n,), (v,)) for n in names for v in dims[n]}
    for a, b in pairs:
        required |= {((a, b), (va, vb)) for va in dims[a] for vb in dims[b]}
    required = {t for t in required if feasible(dict(zip(*t)))}
    all_pairs = list(itertools.combinations(names, 2))

    def targets(v: dict):
        return ({((n,), (v[n],)) for n in names} | {((a, b), (v[a], v[b])) for a, b in pairs},
                {(a, b, v[a], v[b]) for a, b in all_pairs})

    variants, left, seen = [], set(required), set()
    order = sorted(required, key=repr)  # a set's order is not stable across runs; the seed must be
    while len(variants) < size:
        best, best_score = None, None
        todo = [t for t in order if t in left]
        for _ in range(candidates):
            fixed = dict(zip(*rng.choice(todo))) if todo else {}
            v = rand_variant(fixed)
            if not valid(v):
                continue
            req, spread = targets(v)
            score = (len(req & left), len(spread - seen))
            if best_score is None or score > best_score:
                best, best_score = v, score
        if best is None:
            raise ValueError("covering_pool: no valid variant found; check `valid`")
        req, spread = targets(best)
        left -= req
        seen |= spread
        variants.append(best)
    if left:
        raise ValueError(f"covering_pool: {size} variants leave {len(left)} targets uncovered, "
                         f"e.g. {sorted(left, key=repr)[:3]}")
    return tuple(variants)


@dataclass(frozen=True)
class Pool:
    """One operation's kernel-shaping dimensions, its pool and how to read a case's values back."""

    op: str
    dims: Dict[str, Tuple[Any, ...]]
    pairs: Tuple[Tuple[str, str], ...]
    size: int
    kinds: Callable[[dict], dict]  # case -> kernel-shaping values (a superset of dims)
    valid: Callable[[dict], bool] = lambda v: True
    seed: int = 2026

    @functools.cached_property
    def variants(self) -> Tuple[dict, ...]:
        return covering_pool(self.dims, self.size, self.pairs, self.seed, self.valid)

    def key(self, case: dict) -> tuple:
        """The kernel-shaping key of a drawn case."""
        k = self.kinds(case)
        return tuple(k[n] for n in self.dims)

    def shard_variants(self) -> Tuple[dict, ...]:
        """This process's part of the pool (:func:`shard_part`; the whole pool without one)."""
        part = shard_part()
        if part is None:
            return self.variants
        i, n = part
        return self.variants[i::n] or (self.variants[i % len(self.variants)],)

    def variant_keys(self) -> set:
        return {tuple(v[n] for n in self.dims) for v in self.variants}

    def draw(self, draw) -> dict:
        """A variant: from the pool, or (pools off) every dimension drawn independently."""
        if pools_enabled():
            return dict(draw(st.sampled_from(self.shard_variants())))
        free = st.fixed_dictionaries({n: st.sampled_from(vals) for n, vals in self.dims.items()})
        return draw(free.filter(self.valid))


# ------------------------------------------------------------------------------------------------
# kinds: which kernel a case's values select
# ------------------------------------------------------------------------------------------------

def window_kind(window) -> str:
    """None -> "none"; an int (left only) -> "left"; a (left, right) pair -> "pair"."""
    if window is None:
        return "none"
    return "pair" if isinstance(window, tuple) else "left"


def scale_kind(scale) -> str:
    """None -> "default" (1/sqrt(D)); > 0 -> "positive"; <= 0 -> "natural" (the kernels' natural-units path)."""
    if scale is None:
        return "default"
    return "positive" if scale > 0 else "natural"


def length_class(n: int) -> str:
    return "1" if n == 1 else ("x16" if n % 16 == 0 else "other")  # 0 counts as x16, as in Triton


def heads_kind(H: int, Hkv: int) -> str:
    return next(k for k, pairs in DENSE_HEADS.items() if (Hkv, H // Hkv) in pairs)


def q_len_bucket(nq: int) -> str:
    return next(name for name, (lo, hi) in PAGED_Q_LENS.items() if lo <= nq <= hi)


def dense_kinds(case: dict) -> dict:
    rope = case["rope"]
    k = dict(D=case["D"], dtype=case["dtype"], causal=case["causal"], window=window_kind(case["window"]),
             softcap=case["softcap"] is not None, alibi=case["alibi"], scale=scale_kind(case["scale"]),
             rope=None if rope is None else rope[0], rope_q="auto" if rope is None or rope[1] is None else "given",
             score_hook=case.get("score_hook", False), mask_hook=case.get("mask_hook", False),
             layout=case.get("layout"), entry=case["entry"], gqa=case["H"] != case["Hkv"],
             heads=heads_kind(case["H"], case["Hkv"]), mod_ints=mod_ints_class(case),
             deterministic=case.get("deterministic"))
    if "Nq" in case:
        k.update(nq=length_class(case["Nq"]), nk=length_class(case["Nk"]))
    if "lq" in case:  # varlen: the class of max_seqlen (the longest sequence plus the slack)
        k.update(nq=length_class(max(case["lq"]) + case["slack"]), nk=length_class(max(case["lk"]) + case["slack"]))
    return k


def mod_ints_class(case: dict) -> str:
    """The class of the window sizes and RoPE offsets a dense case draws ("0" when it draws none);
    "mixed" (only with the pools off) when they differ."""
    window, rope = case["window"], case["rope"]
    sides = () if window is None else (window,) if isinstance(window, int) else window
    ints = [w for w in sides if w >= 0] + ([] if rope is None else [o for o in rope[1:] if o is not None])
    classes = {length_class(n) if n != 0 else "0" for n in ints}
    return classes.pop() if len(classes) == 1 else ("0" if not classes else "mixed")


def _dense_valid(v: dict) -> bool:
    if v["rope"] is None and v["rope_q"] != "auto":  # a query offset only with RoPE
        return False
    return v["mod_ints"] == "0" or v["window"] != "none" or v["rope"] is not None


def paged_kinds(case: dict) -> dict:
    return dict(D=case["D"], dtype=case["dtype"], page=case["page"], version=case["version"],
                parts=case["num_partitions"] is not None, group=case["Hq"] // case["Hkv"],
                q_len=q_len_bucket(case["Nq"]), softcap=case["softcap"] is not None, alibi=case["alibi"],
                window=case["window"] is not None, q_padded=case["q_padded"], index_dtype=case["index_dtype"])


def cache_kinds(case: dict) -> dict:
    return {n: case[n] for n in ("page", "D", "dtype", "group")}


def linear_kinds(case: dict) -> dict:
    k = {n: case[n] for n in ("K", "V", "H", "dtype", "layout", "gated", "h0", "final", "chunk", "mode")}
    k["packed"] = case["lens"] is not None
    return k


def step_kinds(case: dict) -> dict:
    return {n: case[n] for n in ("K", "V", "H", "dtype", "gated")}


# ------------------------------------------------------------------------------------------------
# the pools (sizes: enough for the required pairs; each variant is one or a few compiles)
# ------------------------------------------------------------------------------------------------

B = (False, True)
# rope_q: default query positions or a given q_offset (a constexpr of the backward's RoPE pass);
# mod_ints: the specialization class shared by the case's window sizes and RoPE offsets ("other":
# 2 or more, not a multiple of 16; an unbounded window side stays -1)
_DENSE = dict(D=(16, 40, 64, 80, 128, 256), dtype=GPU_DTYPES, causal=B, window=("none", "left", "pair"),
              softcap=B, alibi=(None, "standard", "custom"), scale=("default", "positive", "natural"),
              rope=(None, "half", "interleaved"), rope_q=("auto", "given"), mod_ints=("0", "1", "other"))
_DENSE_SHAPES = dict(heads=tuple(DENSE_HEADS), nq=LENGTH_CLASSES, nk=LENGTH_CLASSES)
_LINEAR_DIMS = (16, 32, 48, 64, 100, 128, 256)
_LINEAR = dict(K=_LINEAR_DIMS, V=_LINEAR_DIMS, H=(1, 2, 3, 4), dtype=GPU_DTYPES, layout=("bshd", "bhsd"),
               packed=B, gated=B, h0=B)


def _paged_valid(v: dict) -> bool:
    return not (v["version"] == "v1" and v["parts"])  # V1 has one partition


POOLS: Dict[str, Pool] = {p.op: p for p in (
    Pool("dense_fwd", dict(_DENSE, **_DENSE_SHAPES, score_hook=B, mask_hook=B, layout=DENSE_LAYOUTS,
                           entry=("public", "api", "lowlevel")),
         pairs=(("dtype", "D"), ("causal", "window"), ("softcap", "alibi"), ("rope", "heads"), ("rope", "rope_q"),
                ("scale", "softcap"), ("scale", "alibi"), ("causal", "alibi"), ("score_hook", "mask_hook"),
                ("layout", "entry"), ("nq", "nk"), ("causal", "nq"), ("window", "mod_ints")),
         size=24, kinds=dense_kinds, valid=_dense_valid),
    Pool("dense_bwd", dict(_DENSE, **_DENSE_SHAPES, layout=DENSE_LAYOUTS, entry=("public", "api"), deterministic=B),
         pairs=(("dtype", "D"), ("causal", "window"), ("softcap", "alibi"), ("rope", "heads"), ("rope", "rope_q"),
                ("deterministic", "heads"), ("deterministic", "window"), ("softcap", "D"), ("layout", "rope"),
                ("nq", "nk"), ("window", "mod_ints")),
         size=24, kinds=dense_kinds, valid=_dense_valid),
    # forward and backward share the varlen strategy (deterministic matters to the backward only)
    Pool("dense_varlen", dict(_DENSE, D=(16, 40, 64, 96, 128, 256), heads=tuple(VARLEN_HEADS), nq=LENGTH_CLASSES,
                              nk=LENGTH_CLASSES, entry=("public", "api"), deterministic=B),
         pairs=(("dtype", "D"), ("causal", "window"), ("softcap", "alibi"), ("rope", "heads"), ("rope", "rope_q"),
                ("deterministic", "heads"), ("scale", "softcap"), ("window", "mod_ints"), ("nq", "nk")),
         size=20, kinds=dense_kinds, valid=_dense_valid),
    Pool("paged_decode", dict(D=(16, 32, 64, 80, 96, 128, 256), dtype=GPU_DTYPES, page=(8, 16, 32, 64, 128, 256),
                              version=("auto", "v1", "v2"), parts=B, group=(1, 2, 4, 5, 8),
                              q_len=tuple(PAGED_Q_LENS), softcap=B, alibi=B, window=B, q_padded=B,
                              index_dtype=(torch.int32, torch.int64)),
         pairs=(("dtype", "D"), ("group", "q_len"), ("page", "version"), ("softcap", "alibi"),
                ("window", "version"), ("parts", "version")),
         size=32, kinds=paged_kinds, valid=_paged_valid),
    Pool("paged_append", dict(page=(8, 16, 64, 256), D=(16, 64, 96, 128, 256), dtype=GPU_DTYPES, group=(1, 2)),
         pairs=(("dtype", "D"), ("page", "dtype"), ("page", "group")), size=16, kinds=cache_kinds),
    Pool("linear_chunk_fwd", dict(_LINEAR, final=B, chunk=(32, 64, 128), mode=("chunk",)),
         pairs=(("dtype", "K"), ("dtype", "V"), ("chunk", "gated"), ("chunk", "packed"), ("h0", "final"),
                ("layout", "gated")), size=24, kinds=linear_kinds),
    # the recurrent forward ignores the chunk size (free here)
    Pool("linear_recurrent_fwd", dict(_LINEAR, final=B, mode=("recurrent",)),
         pairs=(("dtype", "K"), ("dtype", "V"), ("packed", "h0"), ("h0", "final"), ("layout", "gated")),
         size=24, kinds=linear_kinds),
    # the backward always takes the final state (final is free); both modes run the chunked backward
    Pool("linear_bwd", dict(_LINEAR, chunk=(32, 64, 128), mode=("chunk", "recurrent")),
         pairs=(("dtype", "K"), ("dtype", "V"), ("chunk", "gated"), ("mode", "chunk"), ("gated", "h0"),
                ("packed", "h0")), size=24, kinds=linear_kinds),
    Pool("linear_step", dict(K=(16, 64, 100, 128, 256), V=(16, 64, 100, 128, 256), H=(1, 2, 3, 4), dtype=GPU_DTYPES,
                             gated=B),
         pairs=(("dtype", "K"), ("dtype", "V"), ("gated", "H")), size=16, kinds=step_kinds),
)}
