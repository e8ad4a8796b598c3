"""Tiny random-weight models of every MoE family (demo, tests) and reference-size configs.

``tiny``: one tiny model per transformers MoE family; ``legacy``: a tiny model in the
transformers 4.x MoE layout; ``reference``: real checkpoints' sizes with random weights.
The legacy names are imported lazily (they pull in transformers' modeling code).
"""

from moe_trace.models.reference import build_reference_model, list_references, reference_config
from moe_trace.models.tiny import (
    DEFAULT_FAMILY,
    build_tiny_model,
    example_inputs,
    family_info,
    list_families,
    load_checkpoint,
    save_tiny_checkpoint,
    tiny_config,
)

_LAZY = {"LegacyMoeConfig", "LegacyMoeForCausalLM", "build_legacy_model"}


def __getattr__(name):
    if name in _LAZY:
        from moe_trace.models import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_FAMILY",
    "LegacyMoeConfig",
    "LegacyMoeForCausalLM",
    "build_legacy_model",
    "build_reference_model",
    "build_tiny_model",
    "example_inputs",
    "family_info",
    "list_families",
    "list_references",
    "load_checkpoint",
    "reference_config",
    "save_tiny_checkpoint",
    "tiny_config",
]
