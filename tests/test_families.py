"""The per-family matrix: every MoE family of the installed transformers, as a tiny random model.

For each family: layers are detected; generated tokens are identical with profiling on and off;
every layer saw B*P + B*(N-1) tokens; counts equal an independent reference (plain hooks on the
experts' inputs) where the experts take routing arguments; FLOPs equal FlopCounterMode on the
eager experts path."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers

import moe_trace
from moe_trace.capture import find_bindings
from moe_trace.models import build_tiny_model, example_inputs
from moe_trace.models.families import available_families, transformers_moe_families
from tests.conftest import routing_reference, set_experts_implementation
from tests.test_capture import flop_counter_parts

pytestmark = pytest.mark.tf4  # also run on transformers 4.57 (.ci/run)

logging.getLogger("transformers").setLevel(logging.ERROR)
FAMILIES = available_families()  # the recipes the installed transformers can build
N_NEW = 3

# Families whose experts get no (indices, weights) arguments: routing is derived at the router.
ROUTER_COUNTED = {"llama4", "jetmoe", "doge"}
# Known FLOP-count differences, with the reason (each must be a documented modelling choice).
FLOPS_EXCEPTIONS: dict[str, str] = {}
# Block-diffusion generation: forwards are not one-token decode steps, so B*P + B*(N-1) does not apply.
NOT_AUTOREGRESSIVE = {"diffusion_gemma"}
# Encoder-decoder families with capacity-limited routers: checked by test_seq2seq_family.
SEQ2SEQ = {"switch_transformers", "nllb_moe"}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# Families this transformers ships but cannot run (the model itself fails): moe-trace refuses them at
# detect() with the version that works.
NEEDS_NEWER = {} if TRANSFORMERS_5 else {"doge": "5.0"}
if TRANSFORMERS_5:
    FLOPS_EXCEPTIONS["nllb_moe"] = ("transformers 5.x NllbMoeExperts runs expert_0/expert_1 on every token instead of "
                                    "the dispatched experts (moe-trace counts the router's dispatch); checked on 4.57")


class RouterSideReference:
    """Independent routing for families whose experts get no (indices, weights):
    llama4 - experts with a non-zero dense router score; jetmoe - the router's tokens-per-expert
    sizes and the token of each sorted assignment; doge - the ids fed to `down_embed`."""

    def __init__(self, family, bindings):
        import numpy as np

        self.np = np
        self.calls = {i: [] for i in range(len(bindings))}
        self.handles = []
        for i, b in enumerate(bindings):
            if family == "doge":
                self.handles.append(b.experts[0].register_forward_pre_hook(self._doge(i)))
            else:
                self.handles.append(b.router.register_forward_hook(self._llama4(i) if family == "llama4"
                                                                   else self._jetmoe(i)))

    def _doge(self, i):
        def hook(mod, args):
            idx = args[0].reshape(-1, args[0].shape[-1]).numpy()
            self.calls[i].append((idx.reshape(-1), self.np.full(idx.shape[0], idx.shape[1])))
        return hook

    def _llama4(self, i):
        def hook(mod, args, out):
            nz = (out[0].float() != 0).numpy()
            self.calls[i].append((self.np.nonzero(nz)[1], nz.sum(-1)))
        return hook

    def _jetmoe(self, i):
        def hook(mod, args, out):
            sizes = [int(x) for x in out[3]]  # assignments per expert
            experts = self.np.repeat(self.np.arange(len(sizes)), sizes)
            self.calls[i].append((experts, self.np.bincount(out[1].numpy(), minlength=out[4].shape[0])))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def counts(self, layer, num_experts, phase):
        calls = self.calls[layer][:1] if phase == "prefill" else self.calls[layer][1:]
        counts = self.np.zeros(num_experts, dtype=self.np.int64)
        khist = {}
        for experts, ks in calls:
            counts += self.np.bincount(experts, minlength=num_experts)[:num_experts]
            for k in ks:
                khist[str(int(k))] = khist.get(str(int(k)), 0) + 1
        return counts, khist, sum(len(ks) for _, ks in calls)


def _seq(out):
    return out if torch.is_tensor(out) else out.sequences


def test_every_family_is_listed():
    """Every MoE family of the installed transformers (found in its source tree) has a recipe here."""
    missing = sorted(set(transformers_moe_families()) - set(FAMILIES))
    assert not missing, f"MoE families of this transformers without a tiny recipe: {missing}"
    assert set(FAMILIES) <= set(transformers_moe_families())


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SEQ2SEQ])
def test_family(family):
    model = build_tiny_model(family)
    if family in NEEDS_NEWER:
        with pytest.raises(moe_trace.UnsupportedTransformersError, match=f"transformers >= {NEEDS_NEWER[family]}"):
            find_bindings(model)
        return
    bindings = find_bindings(model)
    assert len(bindings) >= 2, f"{family}: expected at least 2 MoE layers"
    inputs = example_inputs(model, batch=2, prompt_len=5)
    gen = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    torch.manual_seed(0)  # block-diffusion generation draws random numbers
    with torch.no_grad():
        ref_tokens = model.generate(**inputs, **gen)
    if bindings[0].handler.name in ROUTER_COUNTED:
        ref = RouterSideReference(bindings[0].handler.name, bindings)
    else:
        ref = routing_reference(model, bindings)
    torch.manual_seed(0)
    with moe_trace.profile(model) as run, torch.no_grad():
        out = model.generate(**inputs, **gen)
    ref.remove()
    assert torch.equal(_seq(out), _seq(ref_tokens)), f"{family}: profiling changed the generated tokens"
    d = run.report().to_dict()
    B, P = inputs["input_ids"].shape
    assert d["phases"]["prefill"]["forward_calls"] >= 1, f"{family}: no model forward (step) was seen"
    for layer in d["layers"]:
        if "vision" in layer["name"]:
            assert layer["tokens"] == 0  # modality experts see no text tokens
        elif family not in NOT_AUTOREGRESSIVE:
            assert layer["phases"]["prefill"]["tokens"] == B * P
            assert layer["phases"]["decode"]["tokens"] == B * (N_NEW - 1)
            assert layer["tokens"] == d["phases"]["prefill"]["tokens"] + d["phases"]["decode"]["tokens"]
        if family in NOT_AUTOREGRESSIVE:
            pre, _, _ = ref.counts(layer["index"], layer["num_experts"], "prefill")
            dec, _, _ = ref.counts(layer["index"], layer["num_experts"], "decode")
            assert layer["expert_counts"] == (pre + dec).tolist()
        else:
            for phase in ("prefill", "decode"):
                counts, khist, _ = ref.counts(layer["index"], layer["num_experts"], phase)
                assert layer["phases"][phase]["expert_counts"] == counts.tolist(), (family, layer["index"], phase)
                if khist is not None:  # rows per expert module (4.x lists) say nothing about k
                    assert layer["phases"][phase]["k_hist"] == khist


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_flops_match_flop_counter(family):
    if family in NEEDS_NEWER:
        pytest.skip(f"{family} needs transformers >= {NEEDS_NEWER[family]} (test_family checks the error)")
    if family in FLOPS_EXCEPTIONS:
        pytest.skip(FLOPS_EXCEPTIONS[family])
    model = build_tiny_model(family)
    set_experts_implementation(model, "eager")  # undecorated (and 4.x) experts always run eagerly
    inputs = example_inputs(model, batch=2, prompt_len=5)
    bindings = find_bindings(model)
    ids = inputs["input_ids"]
    call = {"decoder_input_ids": ids[:, :3]} if family in SEQ2SEQ else {}
    expected = flop_counter_parts(model, bindings, ids, whole_block=family == "doge", call_kwargs=call)
    with moe_trace.profile(model) as run, torch.no_grad():
        model(ids, **call)
    d = run.report().to_dict()
    got = [l["phases"]["prefill"]["flops"] for l in d["layers"]]
    assert got == expected


class DispatchReference:
    """Independent routing of the capacity-limited seq2seq routers, from their outputs with numpy:
    Switch - the one-hot dispatch rows (an empty row: the token was dropped); NLLB - the non-zero
    combine weights of each token (2 minus those: its dropped choices). Phases as the model's:
    the encoder run and the first decoder forward are prefill."""

    def __init__(self, model, bindings):
        self.forwards = 0
        self.data = {i: {p: [np.zeros(b.info.num_experts, np.int64), {}, 0] for p in ("prefill", "decode")}
                     for i, b in enumerate(bindings)}
        self.handles = [model.register_forward_pre_hook(self._step)]
        self.handles += [b.router.register_forward_hook(self._hook(i, b.info.top_k)) for i, b in enumerate(bindings)]

    def _step(self, module, args):
        self.forwards += 1

    def _hook(self, i, top_k):
        def hook(module, args, out):
            mask, probs = out[0], out[1]
            E = mask.shape[-1]
            routed = (mask.reshape(-1, E) != 0) if top_k == 1 else (probs.reshape(-1, E) != 0)
            routed = routed.numpy()
            counts, khist, dropped = self.data[i]["prefill" if self.forwards <= 1 else "decode"]
            counts += routed.sum(0)
            for k in routed.sum(-1):
                khist[str(int(k))] = khist.get(str(int(k)), 0) + 1
            self.data[i]["prefill" if self.forwards <= 1 else "decode"][2] += int(top_k * routed.shape[0] - routed.sum())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f in SEQ2SEQ])
def test_seq2seq_family(family, tmp_path):
    """SwitchTransformers / NLLB-MoE: encoder and decoder sparse layers found and labelled; generate
    unchanged under every mode; per layer and phase, counts, k and capacity drops equal the router's
    dispatch (numpy), and where the experts follow the dispatch (Switch; NLLB on 4.x) the rows each
    expert module receives."""
    model = build_tiny_model(family)
    bindings = find_bindings(model)
    stacks = [b.info.stack for b in bindings]
    assert stacks == ["encoder"] * 2 + ["decoder"] * 2
    assert all(st in b.info.name.split(".") for st, b in zip(stacks, bindings))
    inputs = example_inputs(model, batch=2, prompt_len=5)
    B, P = inputs["input_ids"].shape
    gen = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    with torch.no_grad():
        ref_tokens = model.generate(**inputs, **gen)
    dispatch = DispatchReference(model, bindings)
    rows = routing_reference(model, bindings) if family != "nllb_moe" or not TRANSFORMERS_5 else None
    with moe_trace.profile(model) as run, torch.no_grad():
        out = model.generate(**inputs, **gen)
    dispatch.remove()
    if rows is not None:
        rows.remove()
    assert torch.equal(out, ref_tokens)
    for mode in ("timing", "kineto"):
        with moe_trace.profile(model, mode=mode, logdir=tmp_path) as r2, \
                torch.no_grad():
            assert torch.equal(model.generate(**inputs, **gen), ref_tokens), mode
        assert r2.report().to_dict()["layers"][0]["stack"] == "encoder"
    back = moe_trace.analyze(tmp_path).to_dict()["layers"]  # the trace carries stack and dropped
    kin = r2.report().to_dict()["layers"]
    assert [(l["stack"], l["dropped"], l["expert_counts"]) for l in back] == \
        [(l["stack"], l["dropped"], l["expert_counts"]) for l in kin]
    d = run.report().to_dict()
    assert d["phases"]["prefill"]["forward_calls"] == 2 and d["phases"]["decode"]["forward_calls"] == N_NEW - 1
    assert sum(l["dropped"] for l in d["layers"]) > 0, "the tiny recipe should overflow an expert's capacity"
    for layer in d["layers"]:
        i = layer["index"]
        assert layer["stack"] == stacks[i]
        want = {"prefill": B * P, "decode": 0} if stacks[i] == "encoder" else {"prefill": B, "decode": B * (N_NEW - 1)}
        for phase in ("prefill", "decode"):
            got = layer["phases"][phase]
            counts, khist, dropped = dispatch.data[i][phase]
            assert got["tokens"] == want[phase], (i, phase)
            assert got["expert_counts"] == counts.tolist(), (i, phase)
            assert got["k_hist"] == khist and got["dropped"] == dropped, (i, phase)
            assert got["assignments"] + got["dropped"] == layer["top_k"] * got["tokens"]
            if rows is not None:
                assert got["expert_counts"] == rows.counts(i, layer["num_experts"], phase)[0].tolist(), (i, phase)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in SEQ2SEQ])
def test_seq2seq_routing_reader_does_not_sync(family, monkeypatch):
    """The models' own expert loops sync; moe-trace's part (reading the dispatch, queueing it) must not."""
    from moe_trace.capture.counters import DeviceCounters, Pending

    model = build_tiny_model(family)
    bindings = find_bindings(model)
    outs = []
    h = bindings[0].router.register_forward_hook(lambda m, a, o: outs.append(o))
    ids = example_inputs(model)["input_ids"]
    with torch.no_grad():
        model(ids, decoder_input_ids=ids[:, :2])
    h.remove()
    dc = DeviceCounters(torch.device("cpu"), [bindings[0].info.num_experts])
    with monkeypatch.context() as m:
        def boom(*a, **k):
            raise AssertionError("host sync in the routing reader")
        for name in ["item", "tolist", "cpu", "numpy", "__bool__"]:
            m.setattr(torch.Tensor, name, boom)
        idx, w = bindings[0].handler.routing_from_router(bindings[0], outs[0])
        dc.queue(Pending(0, 0, idx, w, None, False))
        dc.end_forward()
        dc.flush()
    counts, k_hist, _, _, _ = dc.read()
    E = bindings[0].info.num_experts
    assert counts[0, 0, :E].sum() + counts[0, 0, E + 1] == bindings[0].info.top_k * ids.numel()
