"""Host copies of cu_seqlens are kept per unchanged tensor: layers sharing one offsets tensor sync once."""
from __future__ import annotations

import torch

import attention_proto  # noqa: F401
from attention_proto.ops.linear import linear_attention
from attention_proto.runtime import offsets
from attention_proto.runtime.device import kernel_device


def test_same_tensor_same_copy_until_changed():
    offsets.clear()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    a, ea = offsets.host_offsets(cu)
    b, eb = offsets.host_offsets(cu)
    assert a == [0, 3, 7] and a is b and ea is eb
    cu[1] = 4  # in place: the version counter moves
    c, ec = offsets.host_offsets(cu)
    assert c == [0, 4, 7] and c is not a and ec is not ea
    other = cu.clone()  # equal values, another tensor: read again
    assert offsets.host_offsets(other)[0] is not c


def test_inference_tensors_are_read_every_time():
    with torch.inference_mode():
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    a, _ = offsets.host_offsets(cu)
    b, _ = offsets.host_offsets(cu)
    assert a == b == [0, 2, 5] and a is not b


def test_derived_values_are_kept_per_unchanged_tensor():
    offsets.clear()
    calls = []

    def compute(t):
        calls.append(1)
        return t * 2

    pos = torch.arange(6)[None]
    a = offsets.derived(pos, "double", compute)
    assert offsets.derived(pos, "double", compute) is a and len(calls) == 1
    offsets.derived(pos, "other", compute)  # another name: computed again
    pos[0, 0] = 9  # in place: the version counter moves
    assert offsets.derived(pos, "double", compute)[0, 0] == 18 and len(calls) == 3
    with torch.inference_mode():
        inf = torch.arange(6)[None]
    offsets.derived(inf, "double", compute)
    offsets.derived(inf, "double", compute)  # no version counter: computed every time, never an error
    assert len(calls) == 5
    keep = [torch.arange(i + 1) for i in range(offsets.MEMO_SIZE + 3)]  # alive: distinct ids
    for t in keep:
        offsets.derived(t, "double", compute)
    assert len(offsets._DERIVED) == offsets.MEMO_SIZE


def test_memo_is_bounded():
    offsets.clear()
    keep = [torch.tensor([0, i], dtype=torch.int32) for i in range(offsets.MEMO_SIZE + 5)]
    for t in keep:
        offsets.host_offsets(t)
    assert len(offsets._MEMO) == offsets.MEMO_SIZE


def test_linear_packed_calls_share_the_plan():
    dev = kernel_device()
    offsets.clear()
    cu = torch.tensor([0, 5, 5, 21], dtype=torch.int32, device=dev)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 21, 2, 16, generator=g).to(dev, torch.float16) for _ in range(3))
    o1, _ = linear_attention(q, k, v, cu_seqlens=cu, chunk_size=32)
    plans = offsets.host_offsets(cu)[1]["linear_chunk_plans"]
    plan = plans[32]
    o2, _ = linear_attention(q, k, v, cu_seqlens=cu, chunk_size=32)
    assert offsets.host_offsets(cu)[1]["linear_chunk_plans"][32] is plan
    assert torch.equal(o1, o2)
