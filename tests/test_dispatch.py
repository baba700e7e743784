"""The backend registry: declared capabilities, first-fit selection, explain(), errors, threads."""
from __future__ import annotations

import threading

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto import dispatch
from attention_proto.dispatch import Backend, Capabilities, NoBackendError, Request
from attention_proto.runtime.device import interpreter_mode

DEV = "cpu" if interpreter_mode() else "cuda"


def req(**kw) -> Request:
    base = dict(kind="dense", device_type=DEV, dtype=torch.float16, head_dim=64, head_dim_v=64, num_heads=8,
                num_kv_heads=2)
    base.update(kw)
    return Request(**base)


def test_builtin_backends_in_priority_order():
    names = [b.name for b in dispatch.backends()]
    assert names[:3] == ["triton", "sdpa", "reference"]


def test_first_fit_prefers_ours():
    d = dispatch.explain_request(req(modifiers={"causal", "window", "softcap"}))
    assert d.ok and d.backend == "triton" and d.rejected == ()


def test_softcap_rules_out_sdpa_and_dropout_rules_out_ours():
    d = dispatch.explain_request(req(modifiers={"dropout", "causal"}))
    assert d.backend == "sdpa"
    assert any("dropout" in r for r in d.reasons_for("triton"))
    d = dispatch.explain_request(req(modifiers={"softcap"}), prefer=["sdpa", "triton"])
    assert d.backend == "triton" and "softcap" in " ".join(d.reasons_for("sdpa"))


def test_value_head_dim_and_large_head_dims_go_to_sdpa():
    d = dispatch.explain_request(req(head_dim_v=32))
    assert d.backend == "sdpa" and "value head dim" in " ".join(d.reasons_for("triton"))
    d = dispatch.explain_request(req(head_dim=512, head_dim_v=512))
    assert d.backend == "sdpa" and "above the maximum 256" in " ".join(d.reasons_for("triton"))


@pytest.mark.skipif(not interpreter_mode(), reason="the interpreter's dtype limits")
def test_interpreter_has_no_bfloat16():
    d = dispatch.explain_request(req(dtype=torch.bfloat16))
    assert d.backend == "sdpa"
    assert "bfloat16" in " ".join(d.reasons_for("triton"))


def test_no_backend_lists_every_candidate():
    r = req(modifiers={"softcap", "dropout"})
    with pytest.raises(NoBackendError) as ei:
        dispatch.select(r)
    msg = str(ei.value)
    for name in ("triton", "sdpa", "reference"):
        assert f"{name}: rejected" in msg
    assert "dropout" in msg and "softcap" in msg
    assert isinstance(ei.value, ValueError)
    assert ei.value.decision.backend is None


def test_reference_only_by_name():
    d = dispatch.explain_request(req(modifiers={"softcap", "bool_mask"}))
    assert d.backend is None
    assert "not chosen automatically" in " ".join(d.reasons_for("reference"))
    assert dispatch.select(req(modifiers={"softcap", "bool_mask"}), prefer="reference").name == "reference"


def test_grad_with_hooks_has_no_backward():
    d = dispatch.explain_request(req(modifiers={"score_mod"}, needs_grad=True))
    assert d.backend is None
    assert "no backward with score_mod" in " ".join(d.reasons_for("triton"))


def test_paged_query_length_limit_and_sdpa_has_no_paged():
    d = dispatch.explain_request(req(kind="paged", layout="paged", q_len=20))
    assert d.backend is None
    assert "above the maximum 16" in " ".join(d.reasons_for("triton"))
    assert "no paged attention" in " ".join(d.reasons_for("sdpa"))
    assert dispatch.explain_request(req(kind="paged", layout="paged", q_len=1)).backend == "triton"


def test_decision_is_printable_and_structured():
    d = dispatch.explain_request(req(modifiers={"dropout"}))
    text = str(d)
    assert "uses backend 'sdpa'" in text and "triton: rejected" in text
    dd = d.as_dict()
    assert dd["backend"] == "sdpa" and dd["request"]["modifiers"] == ["dropout"]
    assert dd["rejected"]["triton"]


def test_unknown_names_and_bad_requests_raise_typed_errors():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dispatch.explain_request(req(), prefer="nope")
    with pytest.raises(ValueError, match="unknown modifiers"):
        req(modifiers={"flux"})
    with pytest.raises(ValueError, match="Request.kind"):
        req(kind="sparse")
    with pytest.raises(TypeError, match="dispatch.Backend"):
        dispatch.register_backend(object())


def _toy(name: str, priority: int, dtypes) -> Backend:
    return Backend(name=name, priority=priority, description="toy",
                   capabilities=lambda: Capabilities(kinds=frozenset({"dense"}), device_types=frozenset({DEV}),
                                                     dtypes=frozenset(dtypes)),
                   runners={"dense": lambda *a: "toy"})


def test_register_and_unregister_custom_backend():
    toy = _toy("toy_first", 1, {torch.float16})
    dispatch.register_backend(toy)
    try:
        assert dispatch.select(req()).name == "toy_first"
        assert dispatch.select(req(dtype=torch.float32)).name == "triton"  # toy does not take fp32
        with pytest.raises(ValueError, match="already registered"):
            dispatch.register_backend(_toy("toy_first", 2, {torch.float16}))
        assert toy.runner("dense")() == "toy"
        with pytest.raises(NotImplementedError):
            toy.runner("varlen")
    finally:
        dispatch.unregister_backend("toy_first")
    assert dispatch.select(req()).name == "triton"


def test_unavailable_backend_says_why():
    b = Backend(name="toy_missing", priority=5, description="toy", probe=lambda: "needs a thing that is not here",
                capabilities=lambda: Capabilities(kinds=frozenset({"dense"}), device_types=frozenset({DEV}),
                                                  dtypes=frozenset({torch.float16})))
    dispatch.register_backend(b)
    try:
        d = dispatch.explain_request(req())
        assert d.backend == "triton"
        assert d.reasons_for("toy_missing") == ("unavailable: needs a thing that is not here",)
    finally:
        dispatch.unregister_backend("toy_missing")


def test_thread_safety_under_concurrent_registration():
    """Selections from many threads while backends come and go: always a consistent answer, never an error."""
    errors, stop = [], threading.Event()
    requests = [req(dtype=dt, modifiers=mods) for dt in (torch.float16, torch.float32)
                for mods in (frozenset(), {"causal"}, {"dropout"}, {"softcap", "window"})]

    def reader():
        i = 0
        while not stop.is_set():
            r = requests[i % len(requests)]
            i += 1
            try:
                d = dispatch.explain_request(r)
                if d.backend not in ("triton", "sdpa", "toy_thread"):
                    errors.append(f"unexpected backend {d.backend} for {r.describe()}")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    def writer():
        for _ in range(50):
            dispatch.register_backend(_toy("toy_thread", 1, {torch.float16}), replace_existing=True)
            dispatch.unregister_backend("toy_thread")

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert "toy_thread" not in [b.name for b in dispatch.backends()]
    assert dispatch.select(req()).name == "triton"
