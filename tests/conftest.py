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


class ReferenceRouting:
    """An independent reference: plain forward-pre-hooks on the experts modules record the
    (top_k_index, top_k_weights) they receive; counts are then made on the host with numpy."""

    def __init__(self, model, experts_modules):
        self.calls = {i: [] for i in range(len(experts_modules))}
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(experts_modules)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            w = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
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
            if w.shape != idx.shape:
                w = np.take_along_axis(w, np.clip(idx, 0, w.shape[-1] - 1), axis=-1)
            valid = (idx >= 0) & (idx < num_experts) & (w != 0)
            for e in idx[valid]:
                counts[e] += 1
            for k in valid.sum(-1):
                khist[str(int(k))] = khist.get(str(int(k)), 0) + 1
            tokens += idx.shape[0]
        return counts, khist, tokens


@pytest.fixture
def olmoe():
    return tiny_olmoe()
