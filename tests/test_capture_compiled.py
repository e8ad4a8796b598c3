"""Compiled models (eager, aot_eager and inductor backends; compiled before or inside the block; whole
module, method, fullgraph, a compiled function that calls the model), and a loud warning for layers
that saw forwards but recorded no routing."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.capture.compiled import compiled_codes
from moe_trace.models import build_tiny_model


def _model():
    return build_tiny_model("olmoe", num_hidden_layers=2).eval()


def _ids(s=5):
    return torch.randint(3, 200, (2, s), generator=torch.Generator().manual_seed(0))


def _counts(run):
    return [l["expert_counts"] for l in run.report().to_dict()["layers"]]


def _hist_sum(run):
    return sum(int(dc._hist.sum()) for dc in run.counters.devices.values())


def _entries(fn):
    code = fn.__code__
    return compiled_codes().get(id(code), (None, ()))[1]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_model_compiled_before_profile_is_counted_exactly(backend):
    m = _model()
    ids = _ids()
    with torch.no_grad():
        want_logits = m(input_ids=ids).logits
    with torch.no_grad(), moe_trace.profile(m) as ref:
        m(input_ids=ids)
    global _HELD
    _HELD = m  # a script's globals hold the model; a function that does not use it is not the model's
    other = lambda x: x.sin() + 1  # noqa: E731 - the user's unrelated compiled function
    compiled_other = torch.compile(other, backend=backend)
    compiled_other(torch.ones(3))
    kept = _entries(other)
    m.forward = torch.compile(m.forward, backend=backend)
    with torch.no_grad():
        m(input_ids=ids)  # warmed up: compiled without moe-trace's hooks
    with torch.no_grad(), moe_trace.profile(m) as run:
        got_logits = m(input_ids=ids).logits
    assert _counts(run) == _counts(ref)
    assert [l["tokens"] for l in run.report().to_dict()["layers"]] == [10, 10]
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules())
    assert kept and _entries(other) == kept  # the user's other compiled code keeps its cache
    before = _hist_sum(run)
    with torch.no_grad():
        m(input_ids=ids)  # code compiled inside the block was dropped: nothing counts into the old run
    assert _hist_sum(run) == before
    _HELD = None
    torch.compiler.reset()


_HELD = None


def _call_held(**kw):
    return _HELD(**kw)


@pytest.mark.parametrize("style", ["module", "method", "fullgraph", "closure", "global"])
def test_every_way_of_compiling_is_counted_exactly(style):
    """torch.compile(model) (an OptimizedModule around the profiled model), model.compile(),
    fullgraph=True (moe-trace's hooks cause no graph break), and a compiled function that reaches the
    model through its closure: compiled and warmed before the block, counted exactly in it, over
    several forwards of one shape (replays of one graph)."""
    m = _model()
    ids = _ids(4)
    with torch.no_grad(), moe_trace.profile(m) as ref:
        for _ in range(3):
            m(input_ids=ids, use_cache=False)
    if style == "module":
        call = torch.compile(m, backend="eager")
    elif style == "method":
        m.compile(backend="eager")
        call = m
    elif style == "fullgraph":
        m.forward = torch.compile(m.forward, backend="eager", fullgraph=True)
        call = m
    elif style == "closure":
        call = torch.compile(lambda **kw: m(**kw), backend="eager")
    else:  # a module-level function that uses a global holding the model
        global _HELD
        _HELD = m
        call = torch.compile(_call_held, backend="eager")
    with torch.no_grad():
        call(input_ids=ids, use_cache=False)
    with torch.no_grad(), moe_trace.profile(m) as run:
        for _ in range(3):
            call(input_ids=ids, use_cache=False)
    assert _counts(run) == _counts(ref)
    assert not run.report().to_dict()["notes"]
    _HELD = None
    torch.compiler.reset()


def test_compiled_generate_does_not_recompile_per_forward():
    """generate() on a compiled forward: counting inside compiled code keeps no Python state that
    dynamo would specialize on (a queue length, a running element count), so the decode forwards
    replay one graph instead of recompiling each step (and falling back to eager after 8); tokens
    equal the uncompiled model's, counts equal the uncompiled profiled run."""
    from torch._dynamo.utils import counters

    m = _model()
    ids = _ids()

    def gen():
        return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), moe_trace.profile(m) as ref:
        want = gen()
    m.forward = torch.compile(m.forward, backend="eager")
    with torch.no_grad():
        gen()
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad(), moe_trace.profile(m) as run:
        got = gen()
    assert torch.equal(got, want)
    assert _counts(run) == _counts(ref)
    assert counters["stats"]["unique_graphs"] - before <= 3  # prefill + decode (+ a dynamic-shape decode)
    torch.compiler.reset()


@pytest.mark.slow
def test_inductor_compiled_model_counts_exactly_in_every_mode(tmp_path):
    """The default backend (inductor, C++ on CPU): counting compiles into the graph (in-place adds into
    the preallocated buffers, no recompile per forward). Compiled before the block (stats) and inside
    it (kineto, timing): counts equal the uncompiled run, the model's outputs are unchanged, and
    kineto's analyze equals the live report."""
    m = _model()
    ids = _ids(4)
    with torch.no_grad():
        want = m(input_ids=ids, use_cache=False).logits
    with torch.no_grad(), moe_trace.profile(m) as ref:
        for _ in range(3):
            m(input_ids=ids, use_cache=False)
    eager_forward = m.forward
    m.forward = torch.compile(eager_forward)
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    with torch.no_grad(), moe_trace.profile(m) as run:
        got = [m(input_ids=ids, use_cache=False).logits for _ in range(3)]
    assert _counts(run) == _counts(ref)
    assert all(torch.allclose(g, want, atol=1e-5) for g in got)
    assert not run.report().to_dict()["notes"]
    for mode in ("kineto", "timing"):
        m.forward = eager_forward
        with torch.no_grad(), moe_trace.profile(m, mode, logdir=tmp_path / mode) as run:
            m.forward = torch.compile(eager_forward)  # compiled inside the block
            for _ in range(3):
                m(input_ids=ids, use_cache=False)
        assert _counts(run) == _counts(ref), mode
        notes = run.report().to_dict()["notes"]
        assert any("torch.compile'd code" in n for n in notes), mode  # per-part times missing: said so
        if mode == "kineto":
            assert [l["expert_counts"] for l in moe_trace.analyze(tmp_path / mode).to_dict()["layers"]] == _counts(ref)
    m.forward = eager_forward
    torch.compiler.reset()


def test_a_layer_that_saw_forwards_but_recorded_nothing_is_a_loud_warning(capsys):
    m = build_tiny_model("olmoe").eval()
    m.model.layers[1].mlp.forward = lambda hidden_states: hidden_states  # bypasses router and experts
    with pytest.warns(RuntimeWarning, match=r"MoE layer\(s\) 1 saw 1 model forward"):
        with torch.no_grad(), moe_trace.profile(m) as run:
            m(input_ids=torch.randint(3, 200, (1, 4)))
    d = run.report().to_dict()
    assert any("recorded no routing" in n and "1" in n for n in d["notes"])
    assert "recorded no routing" in capsys.readouterr().err
    assert [l["tokens"] for l in d["layers"]] == [4, 0, 4]
