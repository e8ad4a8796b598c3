"""A tiny causal LM with a MoE block in the transformers 4.x layout.

transformers 4.x Mixtral / OLMoE / Qwen2-MoE blocks look like this: ``gate = nn.Linear(H, E)``
returns router logits, ``experts`` is an ``nn.ModuleList`` of expert MLPs, the block does
softmax -> top-k -> (optional renorm) -> a Python loop over the experts, and returns
``(hidden_states, router_logits)``. transformers 5 replaced this with stacked expert weights and a
separate router module, so this model keeps the old layout alive for the profiler's legacy
handler and its tests. It supports ``generate()`` with or without a KV cache.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers 5 spells it PreTrainedConfig; 4.x PretrainedConfig (5 keeps an alias)
    from transformers import PretrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PreTrainedConfig as PretrainedConfig
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

EXPERT_NAMINGS = ("mixtral", "qwen")


class LegacyMoeConfig(PretrainedConfig):
    """Config of :class:`LegacyMoeForCausalLM` (4.x Mixtral-style field names)."""

    model_type = "moe_trace_legacy_moe"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 32,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 4,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        expert_naming: str = "mixtral",
        max_position_embeddings: int = 512,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        output_router_logits: bool = False,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if expert_naming not in EXPERT_NAMINGS:
            raise ValueError(f"expert_naming must be one of {EXPERT_NAMINGS}, got {expert_naming!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.expert_naming = expert_naming
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class LegacyRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LegacyMixtralExpert(nn.Module):
    """4.x ``MixtralBlockSparseTop2MLP``: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LegacyQwenExpert(nn.Module):
    """4.x ``OlmoeMLP`` / ``Qwen2MoeMLP``: ``down_proj(silu(gate_proj x) * up_proj x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LegacySparseMoeBlock(nn.Module):
    """4.x-style sparse MoE block; returns ``(hidden_states, router_logits [T, E])``."""

    def __init__(self, config: LegacyMoeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        expert_cls = LegacyMixtralExpert if config.expert_naming == "mixtral" else LegacyQwenExpert
        self.experts = nn.ModuleList(
            [expert_cls(config.hidden_size, config.intermediate_size) for _ in range(self.num_experts)]
        )

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)

        final = torch.zeros_like(x)
        # [E, k, T]: which (slot, token) pairs go to each expert
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.numel() == 0:
                continue
            current = x[top_x]
            out = self.experts[expert_idx](current) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(x.dtype))
        return final.view(batch, seq, hidden), router_logits


class LegacyAttention(nn.Module):
    """Plain causal multi-head attention with an optional transformers ``Cache``."""

    def __init__(self, config: LegacyMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, mask, past_key_values=None):
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LegacyDecoderLayer(nn.Module):
    def __init__(self, config: LegacyMoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LegacyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LegacyAttention(config, layer_idx)
        self.post_attention_layernorm = LegacyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = LegacySparseMoeBlock(config)

    def forward(self, x, mask, past_key_values=None):
        x = x + self.self_attn(self.input_layernorm(x), mask, past_key_values)
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + moe_out, router_logits


class LegacyMoePreTrainedModel(PreTrainedModel):
    config_class = LegacyMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LegacyDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
        elif isinstance(module, LegacyRMSNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)


class LegacyMoeModel(LegacyMoePreTrainedModel):
    def __init__(self, config: LegacyMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            [LegacyDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LegacyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, past_key_values=None):
        b, s = input_ids.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past_len, past_len + s, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)[None]
        total = past_len + s
        # bool mask [b, 1, s, total]: causal, and keys masked out by attention_mask
        causal = torch.ones(s, total, dtype=torch.bool, device=x.device).tril(diagonal=past_len)
        mask = causal[None, None].expand(b, 1, s, total)
        if attention_mask is not None:
            keys = attention_mask[:, -total:].bool()[:, None, None, :]
            mask = mask & keys
            # a fully masked row (left padding) would give NaN: let it see itself
            mask = mask | ~mask.any(-1, keepdim=True)
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, mask, past_key_values)
            router_logits.append(logits)
        return self.norm(x), tuple(router_logits)


class LegacyMoeForCausalLM(LegacyMoePreTrainedModel, GenerationMixin):
    """Tiny causal LM whose MoE blocks use the transformers 4.x layout."""

    _tied_weights_keys: list = []

    def __init__(self, config: LegacyMoeConfig):
        super().__init__(config)
        self.model = LegacyMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        hidden, router_logits = self.model(input_ids, attention_mask, past_key_values)
        logits = self.lm_head(hidden)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return MoeCausalLMOutputWithPast(
            logits=logits,
            past_key_values=past_key_values,
            router_logits=router_logits if output_router_logits else None,
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=None, **kwargs
    ):
        if past_key_values is not None and use_cache is not False:
            cached = past_key_values.get_seq_length()
            if cached > 0:
                input_ids = input_ids[:, cached:]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values if use_cache is not False else None,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }


def build_legacy_model(
    seed: int = 0,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 32,
    num_layers: int = 3,
    vocab_size: int = 256,
    *,
    expert_naming: str = "mixtral",
    norm_topk_prob: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LegacyMoeForCausalLM:
    """Build the 4.x-layout tiny MoE LM with deterministic random weights, in eval mode.

    ``expert_naming="mixtral"`` gives experts with ``w1``/``w2``/``w3``; ``"qwen"`` gives
    ``gate_proj``/``up_proj``/``down_proj``. Generation never stops early (no EOS in the
    generation config).
    """
    config = LegacyMoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        expert_naming=expert_naming,
        norm_topk_prob=norm_topk_prob,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = LegacyMoeForCausalLM(config)
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = config.pad_token_id
    gc.do_sample = False
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


with contextlib.suppress(Exception):  # registration is optional (AutoConfig / AutoModel lookups)
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(LegacyMoeConfig.model_type, LegacyMoeConfig)
    AutoModelForCausalLM.register(LegacyMoeConfig, LegacyMoeForCausalLM)
