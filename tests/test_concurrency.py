"""Concurrency: the kernel cache, the dispatch registry and the ops called from many threads and,
on a GPU, on many CUDA streams at once.

- ``KernelCache``: threads hammer a few keys while compiles are slow; every key compiles exactly
  once, hit/miss counts add up, every launch runs, ``clear()`` in the middle breaks nothing.
- dispatch: ``explain_request``/``select`` from many threads (with decision-cache clears) give
  the single-threaded answers.
- ops: threads call dense (forward and backward), paged and linear ops with different shapes;
  each result equals the sequential one bitwise. On the CPU this needs Triton's interpreter to
  be safe from several threads, which it is not (xfail, see the reason); on a GPU it runs as is.
- CUDA streams (``gpu``): the ops on four streams at once, and one stream per thread, match the
  default-stream results bitwise.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto import dispatch
from attention_proto.ops.dense.interface import attention
from attention_proto.ops.linear.interface import linear_attention
from attention_proto.ops.paged.interface import paged_attention
from attention_proto.ops.paged.testing import make_paged
from attention_proto.runtime import cache as cache_mod
from attention_proto.runtime.cache import KernelCache
from attention_proto.runtime.device import interpreter_mode
from test_fuzz_common import DEV, gen, gpu, randn

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def run_threads(n, target, *, args_of=lambda i: (i,)):
    """Start n threads on ``target`` behind a barrier; return the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(*args_of(i))
        except BaseException as e:  # noqa: BLE001 - collected and reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
    return errors


# ------------------------------------------------------------------------------------------------
# kernel cache
# ------------------------------------------------------------------------------------------------

class SlowKernel:
    """A stand-in kernel: ``warmup`` (the compile) is slow and counted, launches are counted."""

    def __init__(self, name):
        self.__name__ = name
        self.compiles = {}
        self.launches = 0
        self.lock = threading.Lock()

    def warmup(self, *args, grid=None, **constexprs):
        key = tuple(sorted(constexprs.items()))
        with self.lock:
            self.compiles[key] = self.compiles.get(key, 0) + 1
        time.sleep(0.02)  # a wide window for a second compile of the same key
        return f"compiled-{key}"

    def __getitem__(self, grid):
        def run(*args, **kw):
            with self.lock:
                self.launches += 1
        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """Make KernelCache take its GPU path (warmup = compile) with the fake kernels."""
    monkeypatch.setattr(cache_mod, "interpreter_mode", lambda: False)


def test_kernel_cache_compiles_each_key_once_under_contention(compiled_mode):
    cache = KernelCache()
    kernels = [SlowKernel("a"), SlowKernel("b")]
    x16, x32 = torch.zeros(2, dtype=torch.float16), torch.zeros(2)
    n_threads, per_thread = 12, 60

    def hammer(i):
        for j in range(per_thread):
            kern = kernels[(i + j) % 2]
            cache.launch(kern, (1,), x16 if j % 3 else x32, j % 5, BLOCK=16 << (j % 4))

    errors = run_threads(n_threads, hammer)
    assert not errors, errors[:3]
    # keys: kernel x dtype x BLOCK
    keys = {(k, dt, b) for k in ("a", "b") for dt in (0, 1) for b in range(4)}
    assert cache.stats.misses == len(cache.entries()) <= len(keys)
    assert cache.stats.hits + cache.stats.misses == n_threads * per_thread
    assert sum(k.launches for k in kernels) == n_threads * per_thread
    for k in kernels:
        # Triton's own specialisation aside, one compile per (constexprs, dtype) key: never twice
        assert sum(k.compiles.values()) == len(cache.find(k.__name__))


def test_kernel_cache_clear_while_launching(compiled_mode):
    cache = KernelCache()
    kern = SlowKernel("c")
    x = torch.zeros(2)
    stop = threading.Event()

    def hammer(i):
        if i == 0:
            for _ in range(20):
                cache.clear()
                time.sleep(0.005)
            stop.set()
            return
        n = 0
        while not stop.is_set() or n < 10:
            cache.launch(kern, (1,), x, BLOCK=16 * (1 + n % 3))
            n += 1

    errors = run_threads(6, hammer)
    assert not errors, errors[:3]
    cache.launch(kern, (1,), x, BLOCK=16)
    assert cache.stats.hits + cache.stats.misses >= 1 and len(cache.entries()) <= 3


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------

def _requests():
    reqs = []
    for kind in ("dense", "varlen", "paged", "linear"):
        for dtype in (torch.float16, torch.float32, torch.float64):
            for D in (16, 100, 512):
                for mods in ((), ("causal",), ("dropout",), ("rope", "softcap")):
                    reqs.append(dispatch.Request(kind=kind, device_type=DEV, dtype=dtype, head_dim=D, head_dim_v=D,
                                                 num_heads=4, num_kv_heads=2, modifiers=mods,
                                                 q_len=1 if kind == "paged" else None))
    return reqs


def test_dispatch_decisions_are_stable_across_threads():
    reqs = _requests()
    dispatch.clear_decisions()
    expected = [str(dispatch.explain_request(r)) for r in reqs]

    def hammer(i):
        for j in range(300):
            r = (i * 7 + j) % len(reqs)
            if i == 0 and j % 50 == 0:
                dispatch.clear_decisions()
            got = dispatch.explain_request(reqs[r])
            assert str(got) == expected[r], f"decision changed under threads for {reqs[r].describe()}"
            if got.backend is not None:
                assert dispatch.select(reqs[r]).name == got.backend

    errors = run_threads(8, hammer)
    assert not errors, errors[:3]


# ------------------------------------------------------------------------------------------------
# the ops from several threads
# ------------------------------------------------------------------------------------------------

def _jobs(big: bool):
    """(name, callable) pairs, each deterministic; sizes tiny on the CPU, real on a GPU."""
    dt = torch.bfloat16 if big else torch.float16
    N, D, H = (1024, 128, 8) if big else (13, 16, 2)
    g = gen(0)
    q, k, v, do = (randn((1, H, N, D), g, dt) for _ in range(4))
    q2, k2, v2 = randn((2, H, N // 2 + 3, D // 2), g, dt), randn((2, 1, N // 2 + 5, D // 2), g, dt), \
        randn((2, 1, N // 2 + 5, D // 2), g, dt)
    pq, kc, vc, bt, sl = make_paged(3, 2 * H, H, 1, D, 16 if big else 4, [5, N, 3 * N // 2], dt, DEV, gen(1))
    lq, lk, lv = (randn((1, N, H, D), g, dt) for _ in range(3))

    def bwd():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True, deterministic=True).backward(do)
        return [t.grad for t in leaves]

    return [
        ("dense_fwd_causal", lambda: attention(q, k, v, causal=True)),
        ("dense_fwd_gqa_window", lambda: attention(q2, k2, v2, window=(7, 2), softcap=20.0)),
        ("dense_bwd", bwd),
        ("paged", lambda: paged_attention(pq, kc, vc, bt, sl)),
        ("linear", lambda: linear_attention(lq, lk, lv, output_final_state=True)),
    ]


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    return [] if x is None else [x]


def _check_threads(jobs, n_threads, rounds):
    expected = {name: _flat(fn()) for name, fn in jobs}
    results = []
    lock = threading.Lock()

    def work(i):
        for r in range(rounds):
            name, fn = jobs[(i + r) % len(jobs)]
            out = _flat(fn())
            with lock:
                results.append((name, out))

    errors = run_threads(n_threads, work)
    if errors:
        raise errors[0]
    for name, out in results:
        for a, b in zip(out, expected[name]):
            assert torch.equal(a, b), f"{name}: a result computed in a thread differs from the sequential one"


def test_ops_from_threads():
    """Ops from several threads at once (on the CPU the kernel cache serialises interpreted launches:
    Triton's interpreter patches triton.language globally while a launch runs)."""
    _check_threads(_jobs(big=not interpreter_mode()), n_threads=6, rounds=4)


# ------------------------------------------------------------------------------------------------
# CUDA streams
# ------------------------------------------------------------------------------------------------

@gpu
def test_ops_on_several_streams_gpu():
    jobs = _jobs(big=True)
    expected = {name: _flat(fn()) for name, fn in jobs}
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    got = []
    for rep in range(3):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                name, fn = jobs[(i + rep) % len(jobs)]
                got.append((name, _flat(fn()), s))
    torch.cuda.synchronize()
    for name, out, _ in got:
        for a, b in zip(out, expected[name]):
            assert torch.equal(a, b), f"{name} on a side stream differs from the default stream"


@gpu
def test_ops_threads_each_on_its_own_stream_gpu():
    jobs = _jobs(big=True)
    expected = {name: _flat(fn()) for name, fn in jobs}
    torch.cuda.synchronize()
    results, lock = [], threading.Lock()

    def work(i):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for r in range(3):
                name, fn = jobs[(i + r) % len(jobs)]
                out = _flat(fn())
                s.synchronize()
                with lock:
                    results.append((name, out))

    errors = run_threads(8, work)
    assert not errors, errors[:3]
    for name, out in results:
        for a, b in zip(out, expected[name]):
            assert torch.equal(a, b), f"{name} from a thread on its own stream differs"
