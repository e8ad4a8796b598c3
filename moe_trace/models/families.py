"""Which MoE families the installed transformers ships, found in its own source tree.

A model directory of `transformers/models/` is an MoE family when its configuration file names an
experts count (`num_experts`, `num_local_experts`, `n_routed_experts`, `moe_num_experts`). The
family matrix (tests/test_families.py) checks that every one of them has a tiny recipe that
builds on the installed version, so the list stays true by itself as transformers adds families;
README states the count that `tests/test_readme.py` computes.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from moe_trace.models.tiny import _data

_MOE_CONFIG = re.compile(r"\b(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\b")

#: MoE model directories that are not generative models of tokens, with the reason (not profiled).
NOT_PROFILED = {
    "vitpose_backbone": "a vision backbone whose 'experts' are picked by dataset index, not routed per token",
    "openai_privacy_filter": "a token-classification encoder (no generate); its layers use the generic handler",
}


@functools.lru_cache(maxsize=None)
def _moe_dirs(models_dir: str) -> tuple[str, ...]:
    out = []
    for d in sorted(Path(models_dir).iterdir()):
        for cfg in d.glob("configuration_*.py"):
            if _MOE_CONFIG.search(cfg.read_text(encoding="utf-8", errors="replace")):
                out.append(d.name)
                break
    return tuple(out)


def _recipes_by_dir() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for fam, e in _data()["families"].items():
        out.setdefault(e["module"].rsplit(".", 1)[-1], []).append(fam)
    return out


def transformers_moe_families() -> list[str]:
    """The MoE families of the installed transformers (recipe names; excluding `NOT_PROFILED`).
    A directory with no recipe yet appears under its own name (the matrix then fails: add one)."""
    import transformers

    models = Path(transformers.__file__).parent / "models"
    recipes = _recipes_by_dir()
    fams = set()
    for d in _moe_dirs(str(models)):
        if d in NOT_PROFILED:
            continue
        fams.update(recipes.get(d, [d]))
    return sorted(fams)


def available_families() -> list[str]:
    """The tiny recipes whose config and model classes the installed transformers provides."""
    import transformers

    out = []
    for fam, e in _data()["families"].items():
        if all(_has(transformers, e[k]) for k in ("config_class", "model_class")):
            out.append(fam)
    return sorted(out)


def _has(module, name: str) -> bool:
    try:
        getattr(module, name)
        return True
    except (AttributeError, ImportError, RuntimeError):
        return False
