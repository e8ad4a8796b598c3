"""Tiny random-weight models of every MoE family in transformers (no downloads).

The per-family recipes live in ``tiny_configs.json`` next to this file: the text-config kwargs
(hidden 64, 8 experts, top-2, 3-4 layers, vocab 256), how to wrap them for the multimodal /
speech / diffusion families, and the fix-ups random initialisation needs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from moe_trace.errors import ConfigError

DEFAULT_FAMILY = "olmoe"

_DATA_FILE = Path(__file__).with_name("tiny_configs.json")


@functools.lru_cache(maxsize=1)
def _data() -> dict:
    with open(_DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def list_families() -> list[str]:
    """Names of every MoE family that has a tiny recipe, sorted."""
    return sorted(_data()["families"])


def family_info(family: str) -> dict:
    """A copy of the JSON recipe of ``family`` (model_class, config_class, text_kwargs, ...)."""
    return copy.deepcopy(_entry(family))


def _entry(family: str) -> dict:
    fams = _data()["families"]
    if family not in fams:
        import difflib

        close = difflib.get_close_matches(str(family).lower(), sorted(fams), n=4, cutoff=0.5)
        raise ConfigError(
            f"unknown model family {family!r}"
            + (f"; closest: {', '.join(close)}" if close else "")
            + f"; `moe-trace demo --list-families` lists all {len(fams)}"
        )
    return fams[family]


@functools.lru_cache(maxsize=1)
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _transformers_attr(name: str, family: str):
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError as exc:  # older / newer transformers without this family
        raise ConfigError(
            f"family {family!r} needs transformers.{name}, which transformers "
            f"{transformers.__version__} does not provide (the tiny recipes are made for transformers 5.24; "
            f"moe_trace.models.families.available_families() lists those this version can build)"
        ) from exc


@contextlib.contextmanager
def _quiet():
    """Silence transformers' config/loading chatter (warnings, progress bars) for a block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _set_path(d: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _get_path(d: dict, path: str, default: Any = None) -> Any:
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _resize_per_layer(values: list, n: int) -> list:
    """Resize a per-layer list to ``n`` entries: keep entry 0, cycle over the rest."""
    if n <= len(values):
        return list(values[:n])
    tail = values[1:] or values
    out = list(values)
    i = len(values) - 1  # continue the cycle where the list stopped
    while len(out) < n:
        out.append(tail[i % len(tail)])
        i += 1
    return out


def _text_kwargs(family: str, overrides: dict) -> dict:
    e = _entry(family)
    kw = copy.deepcopy(e["text_kwargs"])
    if _transformers_major() < 5:  # 4.x spells rope settings `rope_scaling`; some need them explicitly
        if "rope_parameters" in kw:
            kw["rope_scaling"] = kw.pop("rope_parameters")
        kw.update(copy.deepcopy(e.get("transformers4_text_kwargs", {})))
    aliases = e.get("aliases", {})
    explicit = set()
    for key, value in overrides.items():
        paths = aliases.get(key, key)
        for path in [paths] if isinstance(paths, str) else paths:
            _set_path(kw, path, copy.deepcopy(value))
            explicit.add(path.split(".")[0])
    layers_key = aliases.get("num_hidden_layers", "num_hidden_layers")
    if not isinstance(layers_key, str):  # encoder-decoder: several layer counts, the first one rules
        layers_key = layers_key[0]
    n_layers = _get_path(kw, layers_key)
    for key in e.get("per_layer_keys", []):
        if key not in explicit and isinstance(kw.get(key), list) and len(kw[key]) != n_layers:
            kw[key] = _resize_per_layer(kw[key], n_layers)
    return kw


def tiny_config(family: str = DEFAULT_FAMILY, **overrides):
    """The transformers config of ``family``'s tiny model.

    ``overrides`` apply to the text (decoder) config, e.g. ``num_experts_per_tok=4`` or
    ``num_hidden_layers=6``; the generic names ``num_experts``, ``num_experts_per_tok`` and
    ``num_hidden_layers`` are mapped to the family's own field. For the multimodal / speech /
    diffusion wrappers the returned object is the wrapper config (its ``text_config`` holds
    the MoE decoder).
    """
    e = _entry(family)
    text_kw = _text_kwargs(family, overrides)
    cls = _transformers_attr(e["config_class"], family)
    if "wrapper" in e:
        kwargs = copy.deepcopy(e["wrapper"].get("kwargs", {}))
        kwargs[e["wrapper"].get("text_key", "text_config")] = text_kw
    else:
        kwargs = text_kw
    try:
        with _quiet():
            return cls(**kwargs)
    except Exception as exc:  # ValueError, TypeError, strict-dataclass validation errors
        msg = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        note = f" ({e['notes']})" if e.get("notes") else ""
        raise ConfigError(f"family {family!r} rejects overrides {overrides}: {msg}{note}") from exc


def _apply_fixups(model, family: str, seed: int) -> None:
    e = _entry(family)
    gen = torch.Generator().manual_seed(seed + 1234567)
    text_cfg = model.config.get_text_config()
    std = float(getattr(text_cfg, "initializer_range", 0.02) or 0.02)
    for fx in e.get("fixups", []):
        kind = fx["kind"]
        if kind == "redraw_zero_params":
            # Parameters initialised to all zeros (e.g. afmoe's router) get N(0, std) weights.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(fx["suffix"]) and not bool(p.any()):
                        p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif kind == "random_hash_table":
            # Token-id -> expert tables (deepseek_v4 `tid2eid`) are zeros at init: draw
            # k distinct random experts per token id.
            n_exp = int(getattr(text_cfg, fx.get("num_experts_attr", "n_routed_experts")))
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name.endswith(fx["suffix"]):
                        rows, k = b.shape
                        perm = torch.rand(rows, n_exp, generator=gen).argsort(dim=-1)[:, :k]
                        b.copy_(perm.to(b.dtype))
        else:  # pragma: no cover - data error
            raise ConfigError(f"unknown fix-up kind {kind!r} for family {family!r}")


def _finish_generation_config(model, family: str) -> None:
    """Greedy, never stops early: no EOS, pad id set (generation runs to max_new_tokens)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    for key, value in _entry(family).get("generation", {}).items():
        setattr(gc, key, value)
    text_cfg = model.config.get_text_config()
    pad = getattr(text_cfg, "pad_token_id", None)
    gc.eos_token_id = None
    gc.pad_token_id = 0 if pad is None else pad
    if hasattr(gc, "do_sample"):
        gc.do_sample = False


def build_tiny_model(
    family: str = DEFAULT_FAMILY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
):
    """Build ``family``'s tiny model with deterministic random weights, in eval mode.

    Weights are drawn on the CPU in float32 from ``seed`` (the caller's RNG state is left
    untouched), fix-ups are applied, then the model is moved to ``device`` / ``dtype``.
    ``overrides`` go to the text config (see :func:`tiny_config`).
    """
    e = _entry(family)
    cfg = tiny_config(family, **overrides)
    cls = _transformers_attr(e["model_class"], family)
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        model = cls._from_config(cfg, dtype=torch.float32)
        _apply_fixups(model, family, seed)
    _finish_generation_config(model, family)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def save_tiny_checkpoint(family: str, path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save ``family``'s tiny model with ``save_pretrained`` to the local dir ``path``.

    The checkpoint loads offline with ``from_pretrained(path)`` of its class (or
    ``AutoModelForCausalLM`` for the text families); :func:`load_checkpoint` picks the class.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(family, seed=seed, **overrides)
    with _quiet():
        model.save_pretrained(path)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
):
    """Load a checkpoint saved by :func:`save_tiny_checkpoint` (or any local HF checkpoint).

    The class is the one named in the saved config's ``architectures``; without it
    ``AutoModelForCausalLM`` is used. ``device_map`` (e.g. "auto") is passed to ``from_pretrained``
    (accelerate places / offloads the layers) and ``device`` is then ignored. Returns the model in eval mode.
    """
    import transformers

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{path} has no config.json; not a saved checkpoint")
    with open(cfg_file, encoding="utf-8") as f:
        archs = json.load(f).get("architectures") or []
    if archs and archs[0] == "LegacyMoeForCausalLM":
        from moe_trace.models.legacy import LegacyMoeForCausalLM as cls
    else:
        cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    with _quiet():
        model = cls.from_pretrained(str(path), **kwargs)
    if device_map is None:
        model = model.to(device)
    model.eval()
    return model


def _special_token_ids(config) -> set[int]:
    ids: set[int] = set()

    def visit(d):
        if isinstance(d, dict):
            for k, v in d.items():
                if isinstance(v, dict):
                    visit(v)
                elif str(k).endswith(("token_id", "token_index", "token_ids")):
                    vals = v if isinstance(v, (list, tuple)) else [v]
                    ids.update(int(x) for x in vals if isinstance(x, int))

    visit(config.to_dict())
    return ids


def example_inputs(model, batch: int = 2, prompt_len: int = 6, seed: int = 0) -> dict:
    """Deterministic ``input_ids`` / ``attention_mask`` for ``model.generate(**inputs, ...)``.

    Token ids avoid every special id the config names (pad/bos/eos/image tokens, ...).
    Use ``max_new_tokens=N, min_new_tokens=N, do_sample=False`` to get exactly N tokens.
    """
    cfg = model.config
    vocab = int(cfg.get_text_config().vocab_size)
    special = _special_token_ids(cfg)
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(allowed), (batch, prompt_len), generator=gen)
    input_ids = allowed[pick]
    device = next(model.parameters()).device
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
    }
