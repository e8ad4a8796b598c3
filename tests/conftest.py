"""Shared fixtures: tiny random-weight MoE models built from transformers config classes (no downloads)."""
from __future__ import annotations

import pytest
import torch

# Tiny tensors: one intra-op thread is much faster than OpenMP spinning on a 2-core CI machine.
torch.set_num_threads(1)


def tiny_olmoe(num_layers: int = 3, experts: int = 8, top_k: int = 2, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=experts,
                      num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return OlmoeForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed: int = 0):
    """Has a shared expert (and a 1-output shared-expert gate)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
                         eos_token_id=None)
    return Qwen2MoeForCausalLM(cfg).eval()


def prompt(batch: int = 2, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def generate(model, ids, n: int = 5):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


_INDEX_NAMES = ("top_k_index", "router_indices", "top_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "top_weights", "router_weights")


def _bound_arguments(module, args, kwargs) -> dict:
    """The experts' call arguments by parameter name (works for every transformers version's signature)."""
    import inspect

    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def set_experts_implementation(model, name: str = "eager") -> None:
    """`model.set_experts_implementation(name)` where the installed transformers has it (5.x);
    4.x experts (and undecorated 5.x ones) always run their eager loop."""
    fn = getattr(model, "set_experts_implementation", None)
    if fn is None:
        return
    try:
        fn(name)
    except (ValueError, AttributeError):
        pass


class ReferenceRouting:
    """An independent reference: plain forward-pre-hooks on the experts modules record the
    (top_k_index, top_k_weights) they receive; counts are then made on the host with numpy.
    The arguments are found by name (`top_k_index` in 5.x, `router_indices` / `routing_weights` in
    4.x); experts that take no routing arguments need `ExpertRowsReference`."""

    def __init__(self, model, experts_modules):
        self.calls = {i: [] for i in range(len(experts_modules))}
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(experts_modules)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            named = _bound_arguments(module, args, kwargs)
            idx = next((named[n] for n in _INDEX_NAMES if named.get(n) is not None), None)
            w = next((named[n] for n in _WEIGHT_NAMES if named.get(n) is not None), None)
            if idx is None and len(args) > 2:
                idx, w = args[1], args[2]
            if idx is None or w is None:
                raise AssertionError(f"{type(module).__name__} got no routing arguments: use ExpertRowsReference")
            self.calls[i].append((idx.detach().clone(), w.detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def counts(self, layer: int, num_experts: int, phase: str):
        """Expert counts and k histogram for one layer; the first call is prefill, the rest decode."""
        import numpy as np

        calls = self.calls[layer][:1] if phase == "prefill" else self.calls[layer][1:]
        counts = np.zeros(num_experts, dtype=np.int64)
        khist = {}
        tokens = 0
        for idx, w in calls:
            idx, w = idx.numpy(), w.numpy()
            idx = idx.reshape(-1, idx.shape[-1])
            if w.shape != idx.shape:
                w = np.take_along_axis(w.reshape(idx.shape[0], -1), np.clip(idx, 0, w.shape[-1] - 1), axis=-1)
            valid = (idx >= 0) & (idx < num_experts) & (w != 0)
            for e in idx[valid]:
                counts[e] += 1
            for k in valid.sum(-1):
                khist[str(int(k))] = khist.get(str(int(k)), 0) + 1
            tokens += idx.shape[0]
        return counts, khist, tokens


class ExpertRowsReference:
    """The other independent reference (transformers 4.x `nn.ModuleList` experts, seq2seq
    `ModuleDict` experts): forward-pre-hooks on every expert module count the rows (tokens) it
    receives. The phase is the model's: its first forward (and an encoder run before it) is
    prefill, later forwards decode. No k histogram (rows do not say which token went where)."""

    def __init__(self, model, per_layer_experts):
        self.rows = {i: {"prefill": [0] * len(ex), "decode": [0] * len(ex)} for i, ex in enumerate(per_layer_experts)}
        self.forwards = 0
        self.handles = [model.register_forward_pre_hook(self._step)]
        for i, experts in enumerate(per_layer_experts):
            for e, m in enumerate(experts):
                self.handles.append(m.register_forward_pre_hook(self._hook(i, e)))

    def _step(self, module, args):
        self.forwards += 1

    def _hook(self, i, e):
        def hook(module, args):
            x = args[0]
            phase = "prefill" if self.forwards <= 1 else "decode"
            self.rows[i][phase][e] += x.reshape(-1, x.shape[-1]).shape[0]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def counts(self, layer: int, num_experts: int, phase: str):
        import numpy as np

        return np.asarray(self.rows[layer][phase][:num_experts], dtype=np.int64), None, None


class TokensPerExpertReference:
    """For experts called as `experts(tokens, tokens_per_expert)` (4.x Aria): the per-expert token
    counts the experts themselves receive, summed per phase (first model forward = prefill)."""

    def __init__(self, model, experts_modules):
        self.forwards = 0
        self.rows = {i: {"prefill": 0, "decode": 0} for i in range(len(experts_modules))}
        self.handles = [model.register_forward_pre_hook(self._step)]
        self.handles += [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(experts_modules)]

    def _step(self, module, args):
        self.forwards += 1

    def _hook(self, i):
        def hook(module, args):
            phase = "prefill" if self.forwards <= 1 else "decode"
            self.rows[i][phase] = self.rows[i][phase] + args[1].detach().clone().long()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def counts(self, layer: int, num_experts: int, phase: str):
        import numpy as np

        got = self.rows[layer][phase]
        return (np.zeros(num_experts, np.int64) if isinstance(got, int) else got.numpy()[:num_experts]), None, None


def routing_reference(model, bindings):
    """The reference for `bindings`: the routing arguments the experts receive where their call has
    them (5.x, 4.x stacked experts), else the rows each expert module receives (one module per
    expert: 4.x `nn.ModuleList`, seq2seq `ModuleDict`)."""
    if _takes_routing(bindings[0].experts[0]):
        return ReferenceRouting(model, [b.experts[0] for b in bindings])
    if _takes(bindings[0].experts[0], "tokens_per_expert"):
        return TokensPerExpertReference(model, [b.experts[0] for b in bindings])
    layers = []
    for b in bindings:
        E = b.info.num_experts
        layers.append(b.experts[:E] if len(b.experts) >= E else list(b.experts[0].children())[:E])
    return ExpertRowsReference(model, layers)


def _takes(module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _takes_routing(module) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(n in params for n in _INDEX_NAMES)


@pytest.fixture
def olmoe():
    return tiny_olmoe()


@pytest.fixture(autouse=True)
def _small_gzip_blocks(monkeypatch):
    """Every .gz this process writes is deflated in 16 KB blocks (trace/io.py ParallelGzip; 1 MB in use),
    so the peer-tool and browser tests read multi-block files like a real export's, not one-block ones."""
    from moe_trace.trace import io

    monkeypatch.setattr(io, "GZ_BLOCK", 16 << 10)
