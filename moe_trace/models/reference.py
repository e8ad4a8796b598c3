"""Configs of real MoE checkpoints' sizes, with random weights, for GPU benchmarks (no downloads)."""

from __future__ import annotations

import copy
import warnings

import torch

from moe_trace.errors import ConfigError

# name -> (config class, kwargs). Sizes follow the public checkpoints' config.json.
_REFERENCES: dict[str, tuple[str, str, dict]] = {
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {
            "vocab_size": 50304,
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "rms_norm_eps": 1e-5,
            "clip_qkv": None,
            "norm_topk_prob": False,
            "pad_token_id": 1,
            "eos_token_id": 50279,
            "tie_word_embeddings": False,
        },
    ),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "max_position_embeddings": 40960,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "rms_norm_eps": 1e-6,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": False,
        },
    ),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
    ),
}


def list_references() -> list[str]:
    """Names accepted by :func:`reference_config` / :func:`build_reference_model`."""
    return sorted(_REFERENCES)


def _lookup(name: str):
    if name not in _REFERENCES:
        raise ConfigError(f"unknown reference model {name!r}; valid names: {', '.join(list_references())}")
    return _REFERENCES[name]


def reference_config(name: str, num_hidden_layers: int | None = None, **overrides):
    """The transformers config of reference model ``name`` (optionally with fewer layers)."""
    import transformers

    cfg_cls, _, kwargs = _lookup(name)
    kwargs = copy.deepcopy(kwargs)
    if num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = int(num_hidden_layers)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cfg_cls)(**kwargs)


def build_reference_model(
    name: str,
    num_hidden_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
    **overrides,
):
    """Build reference model ``name`` with random weights directly on ``device``, in eval mode.

    ``device="meta"`` builds it without allocating memory (shapes only). Mixtral-8x7B in bf16
    needs ~94 GB: pass ``num_hidden_layers`` to fit one GPU. Weights are seeded but depend on
    the device's RNG, so they are not comparable across device types.
    """
    import transformers

    _, model_cls, _ = _lookup(name)
    cfg = reference_config(name, num_hidden_layers, **overrides)
    cls = getattr(transformers, model_cls)
    dev = torch.device(device)
    cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        with dev:
            model = cls._from_config(cfg, dtype=dtype)
    gc = getattr(model, "generation_config", None)
    if gc is not None:  # benchmarks want a fixed number of tokens
        gc.eos_token_id = None
        gc.do_sample = False
    model.eval()
    return model
