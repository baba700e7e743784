"""The float64 references against independent small computations."""
import math

import pytest
import torch

from attention_proto.ops.dense.reference import (
    alibi_slopes, attention_reference, attention_reference_varlen, dense_mask,
)
from attention_proto.ops.dense.rope import RopeSpec, apply_rope_reference, rope_cos_sin


def naive(q, k, v, scale, allowed, bias=None, cap=None):
    """Softmax written out element by element on tiny inputs."""
    Nq, D = q.shape
    Nk = k.shape[0]
    out = torch.zeros(Nq, v.shape[1], dtype=torch.float64)
    lse = torch.empty(Nq, dtype=torch.float64)
    for i in range(Nq):
        s = []
        for j in range(Nk):
            x = sum(float(q[i, d]) * float(k[j, d]) for d in range(D)) * scale
            if cap:
                x = cap * math.tanh(x / cap)
            if bias is not None:
                x += float(bias[i, j])
            s.append(x if allowed[i][j] else -math.inf)
        m = max(s)
        if m == -math.inf:
            lse[i] = -math.inf
            continue
        w = [math.exp(x - m) for x in s]
        z = sum(w)
        lse[i] = m + math.log(z)
        for j in range(Nk):
            out[i] += (w[j] / z) * v[j].double()
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(3, 3), (2, 5), (5, 2)])
def test_dense_matches_hand_softmax(causal, nq, nk):
    g = torch.Generator().manual_seed(nq * 10 + nk)
    q, k, v = (torch.randn(1, 1, n, 4, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    out, lse = attention_reference(q, k, v, causal=causal)
    allowed = [[(j <= i + nk - nq) or not causal for j in range(nk)] for i in range(nq)]
    o2, l2 = naive(q[0, 0], k[0, 0], v[0, 0], 0.5, allowed)
    torch.testing.assert_close(out[0, 0], o2)
    torch.testing.assert_close(lse[0, 0], l2)


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    q, k, v = (torch.randn(1, 2, n, 8) for n in (6, 2, 2))
    out, lse = attention_reference(q, k, v, causal=True)  # rows 0..3 see no key
    assert torch.isneginf(lse[..., :4]).all()
    assert (out[..., :4, :] == 0).all()
    assert not torch.isnan(out).any()
    assert torch.isfinite(lse[..., 4:]).all()


def test_window_and_causal_masks():
    m = dense_mask(4, 6, causal=True, window=(1, -1))
    # query i sits at key position i + 2; sees keys i+1 .. i+2
    expected = torch.tensor([[j in (i + 1, i + 2) for j in range(6)] for i in range(4)])
    assert torch.equal(m, expected)
    m2 = dense_mask(3, 3, window=(0, 1))
    assert torch.equal(m2, torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool))


def test_softcap_and_alibi_match_hand_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for n in (3, 4, 4))
    slopes = alibi_slopes(2)
    out, lse = attention_reference(q, k, v, softcap=2.0, alibi_slopes=slopes)
    for h in range(2):
        bias = torch.tensor([[-float(slopes[h]) * abs(i + 1 - j) for j in range(4)] for i in range(3)])
        o2, l2 = naive(q[0, h], k[0, h], v[0, h], 0.5, [[True] * 4] * 3, bias=bias, cap=2.0)
        torch.testing.assert_close(out[0, h], o2)
        torch.testing.assert_close(lse[0, h], l2)


def test_alibi_standard_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s6 = alibi_slopes(6)  # not a power of two: 4 of the 4-head series + 2 of the 8-head series
    assert torch.allclose(s6[:4], alibi_slopes(4))
    assert torch.allclose(s6[4:], alibi_slopes(8)[0::2][:2])


def test_gqa_equals_repeated_heads():
    q = torch.randn(2, 8, 5, 16)
    k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    o1, l1 = attention_reference(q, k, v, causal=True)
    o2, l2 = attention_reference(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_rotates_pairs_by_position(layout):
    D = 8
    x = torch.randn(1, 1, 5, D, dtype=torch.float64)
    spec = RopeSpec(layout=layout, theta=100.0)
    q2, k2 = apply_rope_reference(x, x, spec)
    for p in range(5):
        for i in range(D // 2):
            ang = p * 100.0 ** (-2 * i / D)
            a, b = (i, i + D // 2) if layout == "half" else (2 * i, 2 * i + 1)
            xa, xb = float(x[0, 0, p, a]), float(x[0, 0, p, b])
            assert math.isclose(float(k2[0, 0, p, a]), xa * math.cos(ang) - xb * math.sin(ang), abs_tol=1e-12)
            assert math.isclose(float(k2[0, 0, p, b]), xb * math.cos(ang) + xa * math.sin(ang), abs_tol=1e-12)


def test_rope_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    s = []
    for off in (0, 7):
        qr, kr = apply_rope_reference(q, k, RopeSpec(q_offset=off + 3, k_offset=off))
        s.append(float((qr * kr).sum()))
    assert math.isclose(s[0], s[1], rel_tol=1e-9)


def test_rope_tables_given_equal_computed():
    cos, sin = rope_cos_sin(torch.arange(32), 16, 10000.0)
    q, k = torch.randn(1, 2, 4, 16, dtype=torch.float64), torch.randn(1, 2, 9, 16, dtype=torch.float64)
    a = apply_rope_reference(q, k, RopeSpec())
    b = apply_rope_reference(q, k, RopeSpec(cos=cos, sin=sin))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_varlen_reference_runs_each_sequence_alone():
    lens_q, lens_k = [3, 1, 0, 4], [3, 2, 2, 6]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(sum(lens_q), 2, 8), torch.randn(sum(lens_k), 1, 8), torch.randn(sum(lens_k), 1, 8)
    out, lse = attention_reference_varlen(q, k, v, cq, ck, causal=True)
    assert out.shape == (8, 2, 8) and lse.shape == (2, 8)
    o3, l3 = attention_reference(q[4:8].transpose(0, 1)[None], k[7:13].transpose(0, 1)[None],
                                 v[7:13].transpose(0, 1)[None], causal=True)
    torch.testing.assert_close(out[4:8], o3[0].transpose(0, 1))
    torch.testing.assert_close(lse[:, 4:8], l3[0])
