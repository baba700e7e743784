"""Runtime pieces: validation messages, FLOP counting, kernel cache accounting."""
import threading

import pytest
import torch

from attention_proto.runtime import validation as V
from attention_proto.runtime.cache import KernelCache
from attention_proto.runtime.timing import attention_flops


def test_validation_messages_name_argument_received_and_supported():
    t = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"q has dtype torch.int8; supported: float16, bfloat16.*shape=\(2, 3\)"):
        V.require_dtype("q", t, (torch.float16, torch.bfloat16))
    with pytest.raises(ValueError, match=r"k must have 4 dimensions.*shape=\(2, 3\)"):
        V.require_rank("k", t, 4)
    with pytest.raises(TypeError, match="v must be a torch.Tensor; got list"):
        V.require_tensor("v", [1, 2])
    with pytest.raises(ValueError, match="layout must be one of 'bhsd', 'bshd'; got 'x'"):
        V.require_choice("layout", "x", ("bhsd", "bshd"))


def test_flops_convention_matches_anchors():
    assert attention_flops(2, 16, 8192, 8192, 128, False) == 4 * 2 * 16 * 8192 * 8192 * 128
    assert attention_flops(2, 16, 8192, 8192, 128, True) == 2 * 2 * 16 * 8192 * 8192 * 128
    assert attention_flops(1, 1, 4, 4, 8, False, mode="fwd_bwd") == 3.5 * 4 * 16 * 8
    # causal with Nq < Nk counts only the allowed bottom-right pairs: rows see 3, 4 keys
    assert attention_flops(1, 1, 2, 4, 8, True) == 2 * (3 + 4) * 16


def test_kernel_cache_counts_hits_misses_threadsafe():
    calls = []

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    cache = KernelCache()
    k = FakeKernel()
    x = torch.zeros(4)

    def hammer():
        for i in range(50):
            cache.launch(k, (1,), x, 3, BLOCK=16 if i % 2 else 32)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert cache.stats.misses == 2
    assert cache.stats.hits == 198
    assert len(calls) == 200
    assert {e.constexprs for e in cache.entries()} == {(("BLOCK", 16),), (("BLOCK", 32),)}


def test_error_rule_numbers_with_nonfinite_entries():
    # max_abs_err / check_error work in float64 on the tensors' device; the numbers are the definition's
    from attention_proto.testing import check_error, max_abs_err

    ref = torch.tensor([[1.0, -3.0, float("inf")], [float("-inf"), 2.0, 0.5]], dtype=torch.float64)
    ours = torch.tensor([[1.5, -3.0, float("inf")], [float("-inf"), 2.25, 0.5]], dtype=torch.float16)
    assert max_abs_err(ours, ref) == 0.5
    assert max_abs_err(torch.tensor([[1.0, -3.0, 1.0], [float("-inf"), 2.0, 0.5]]), ref) == float("inf")
    assert max_abs_err(torch.tensor([[float("nan"), -3.0, float("inf")], [float("-inf"), 2.0, 0.5]]), ref) == float("inf")
    chk = check_error(ours, ref.to(torch.float16), ref, torch.float16)
    assert chk.bound == pytest.approx(1e-3 * 3.0)  # torch's error 0; floor x the largest finite |ref| (3)
    none_finite = torch.tensor([float("inf"), float("-inf")], dtype=torch.float64)  # scale falls back to 1
    assert check_error(none_finite, none_finite, none_finite, torch.float32).bound == pytest.approx(1e-5)
    assert max_abs_err(torch.empty(0), torch.empty(0, dtype=torch.float64)) == 0.0
