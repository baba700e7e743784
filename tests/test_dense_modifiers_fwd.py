"""Dense forward modifiers: each alone, then a pairwise grid of combinations (CPU interpreter).

Every case runs our forward into NaN-poisoned outputs and checks out and lse against the float64
reference with the error rule (see ``test_dense_forward.check``).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense.reference import alibi_slopes
from attention_proto.ops.dense.rope import RopeSpec, rope_cos_sin
from test_dense_forward import DTYPES, check, qkv


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("mods", [
    dict(window=7),
    dict(window=(7, -1)),
    dict(window=(-1, 5)),
    dict(window=(6, 3)),
    dict(window=(0, 0)),
    dict(window=(6, 3), causal=True),
    dict(softcap=2.0),
    dict(softcap=50.0),
    dict(alibi_slopes=True),
    dict(alibi_slopes="tensor"),
    dict(rope=RopeSpec("half")),
    dict(rope=RopeSpec("interleaved")),
    dict(rope=RopeSpec("half", theta=500.0, q_offset=3, k_offset=2)),
    dict(rope="tables"),
    dict(scale=0.05),
], ids=["win-int", "win-left", "win-right", "win-both", "win-diag", "win-causal", "softcap2", "softcap50",
        "alibi", "alibi-tensor", "rope-half", "rope-inter", "rope-offsets", "rope-tables", "scale"])
def test_modifier_alone(mods, dtype):
    mods = dict(mods)
    Nq, Nk, D = 21, 37, 40
    q, k, v = qkv(1, 2, 2, Nq, Nk, D, dtype)
    if mods.get("alibi_slopes") == "tensor":
        mods["alibi_slopes"] = torch.tensor([0.3, 1.7]).to(q.device)
    if mods.get("rope") == "tables":
        cos, sin = rope_cos_sin(torch.arange(64), D, 10000.0, torch.float64)
        mods["rope"] = RopeSpec("interleaved", cos=cos.float().to(q.device), sin=sin.float().to(q.device))
    if mods.get("softcap"):
        q, k = q * 3, k * 3  # large scores so the cap matters
    check(q, k, v, dtype, **mods)


# pairwise grid -------------------------------------------------------------------------------

FACTORS = {
    "causal": [False, True],
    "window": [None, (9, 2)],
    "softcap": [None, 4.0],
    "alibi": [None, True],
    "rope": [None, "half", "interleaved"],
    "gqa": [1, 2],
}


def pairwise_cases():
    """Greedy covering array: every value pair of every two factors appears in some case."""
    names = list(FACTORS)
    full = list(itertools.product(*FACTORS.values()))
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(range(len(names)), 2)
                 for va in range(len(FACTORS[names[a]])) for vb in range(len(FACTORS[names[b]]))}
    index = [[FACTORS[n].index(x) for n, x in zip(names, row)] for row in full]
    cases = []
    while uncovered:
        def gain(ix):
            return sum((a, ix[a], b, ix[b]) in uncovered for a, b in itertools.combinations(range(len(names)), 2))

        best = max(range(len(full)), key=lambda r: gain(index[r]))
        ix = index[best]
        uncovered -= {(a, ix[a], b, ix[b]) for a, b in itertools.combinations(range(len(names)), 2)}
        cases.append(dict(zip(names, full[best])))
    return cases


CASES = pairwise_cases()


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items() if v not in (None, False, 1)) or "plain"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_pairwise(case):
    i = CASES.index(case)
    dtype = DTYPES[i % 2]  # alternate fp16 / fp32
    H = 4
    Hkv = H // case["gqa"]
    q, k, v = qkv(1, H, Hkv, 19, 26, 32, dtype)
    mods = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    if case["softcap"]:
        q = q * 2
    if case["alibi"]:
        mods["alibi_slopes"] = alibi_slopes(H).to(q.device)
    if case["rope"]:
        mods["rope"] = RopeSpec(case["rope"])
    check(q, k, v, dtype, **mods)


def test_pairwise_grid_is_small_and_complete():
    assert len(CASES) <= 12
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
