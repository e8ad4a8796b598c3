"""Knob sweeps: latency (prefill / decode) and routing metrics of `model.generate` across settings.

    result = run_sweep(model, "top-k", [1, 2, 4, 8], inputs, repeats=5, out_dir="results/topk")
    result.summary          # per setting: mean / std / p50 / p90 / p99 of each latency
    result.all_samples      # one record per (setting, repeat, input)

Knobs (see docs/experiments.md):

- ``top-k``: every token keeps k experts (the `topk` selector through ``profile(selector=...)``).
- ``active-layers``: only the first N decoder blocks run; the others are masked (their forward
  returns the block's input) without removing any module; restored on exit.
- ``output-tokens``: ``max_new_tokens`` (= ``min_new_tokens``, so exactly that many are generated).
- ``prompt-length``: every input is cut / tiled to N prompt tokens.
- ``flops-scaling``: like ``top-k``, plus a linear fit of measured latency against the report's
  theoretical FLOPs.

Each sample times the first model forward of a `generate` call (prefill) separately from the rest
(decode): CUDA events on GPU, `time.perf_counter` on CPU, recorded by forward pre/post hooks on the
model, read once after the call (no sync inside the timed region).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from moe_trace.errors import ConfigError

from .selectors import Selector, resolve_selector, topk

SCHEMA = "moe-trace/sweep/1"
KNOBS = ("top-k", "active-layers", "output-tokens", "prompt-length", "flops-scaling")
_KNOB_ALIASES = {
    "topk": "top-k", "top_k": "top-k", "k": "top-k",
    "active_layers": "active-layers", "layers": "active-layers", "blocks": "active-layers",
    "active-blocks": "active-layers", "active_blocks": "active-layers",
    "output_tokens": "output-tokens", "max_new_tokens": "output-tokens", "max-new-tokens": "output-tokens",
    "prompt_length": "prompt-length", "prompt-len": "prompt-length", "context": "prompt-length",
    "flops_scaling": "flops-scaling", "flops": "flops-scaling",
}
LATENCIES = ("prefill_ms", "decode_ms", "total_ms", "ms_per_output_token")
STATS = ("mean", "std", "ci95_low", "ci95_high", "p50", "p90", "p99")
# fewest samples for which a percentile is reported (below: None, the tail is not resolved)
MIN_SAMPLES = {"p90": 10, "p99": 100}
# two-sided 95% Student t quantiles by degrees of freedom (>30: normal)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}
_MEANS = ("prompt_tokens", "new_tokens", "decode_steps", "decode_forward_ms", "k_mean", "k_mean_prefill",
          "k_mean_decode", "active_experts_mean", "flops_total", "flops_prefill", "flops_decode", "flops_per_token")


# ---------------------------------------------------------------------------------------------
# knob / value validation
def normalize_knob(knob: str) -> str:
    key = str(knob).strip().lower()
    key = _KNOB_ALIASES.get(key, key)
    if key not in KNOBS:
        raise ConfigError(f"unknown knob {knob!r}; valid knobs: {', '.join(KNOBS)}")
    return key


def _int_values(knob: str, values: Iterable[Any]) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    out, bad = [], []
    for v in values:
        try:
            f = float(v)
            if not f.is_integer():
                raise ValueError
            out.append(int(f))
        except (TypeError, ValueError):
            bad.append(v)
    if bad:
        raise ConfigError(f"knob {knob!r} takes integer values; got {', '.join(map(repr, bad))}")
    if not out:
        raise ConfigError(f"knob {knob!r}: give at least one value")
    return out


@dataclass
class ModelFacts:
    """What validation needs to know about a model."""

    num_experts: int
    top_k: int
    num_moe_layers: int
    num_blocks: int | None
    max_positions: int | None
    blocks_name: str | None = None
    layers: list = field(default_factory=list)


def model_facts(model: nn.Module) -> ModelFacts:
    from moe_trace.capture.detect import detect

    layers = detect(model)
    found = find_decoder_blocks(model, layers, required=False)
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    max_pos = getattr(text, "max_position_embeddings", None) if text is not None else None
    return ModelFacts(num_experts=min(l.num_experts for l in layers), top_k=max(l.top_k for l in layers),
                      num_moe_layers=len(layers), num_blocks=len(found[1]) if found else None,
                      max_positions=int(max_pos) if isinstance(max_pos, int) else None,
                      blocks_name=found[0] if found else None, layers=layers)


def validate_values(knob: str, values: Iterable[Any], facts: ModelFacts, *, max_new_tokens: int,
                    prompt_tokens: int) -> list[int]:
    """Check every value against the model; one ConfigError naming all bad values and the range."""
    knob = normalize_knob(knob)
    if knob == "active-layers":
        if facts.num_blocks is None:
            raise ConfigError("knob 'active-layers': cannot find the model's list of decoder blocks")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = [values]
        parsed = [parse_block_value(v) for v in values]
        sets = [v for v in parsed if isinstance(v, tuple)]
        for v in sets:
            active_block_set(v, facts.num_blocks)
        plain = [v for v in parsed if not isinstance(v, tuple)]
        ints = _int_values(knob, plain) if plain else []
        bad = [v for v in ints if not 1 <= v <= facts.num_blocks]
        if bad:
            raise ConfigError(f"knob 'active-layers': value(s) {', '.join(map(str, bad))} out of range "
                              f"[1, {facts.num_blocks}] (at most the number of decoder blocks ({facts.num_blocks}))")
        it = iter(ints)
        return [v if isinstance(v, tuple) else next(it) for v in parsed]
    vals = _int_values(knob, values)
    if knob in ("top-k", "flops-scaling"):
        lo, hi, what = 1, facts.num_experts, f"the number of experts ({facts.num_experts})"
    elif knob == "active-layers":
        if facts.num_blocks is None:
            raise ConfigError("knob 'active-layers': cannot find the model's list of decoder blocks")
        lo, hi, what = 1, facts.num_blocks, f"the number of decoder blocks ({facts.num_blocks})"
    elif knob == "output-tokens":
        lo = 1
        hi = facts.max_positions - prompt_tokens if facts.max_positions else None
        what = f"max_position_embeddings ({facts.max_positions}) minus the prompt length ({prompt_tokens})"
    else:  # prompt-length
        lo = 1
        hi = facts.max_positions - max_new_tokens if facts.max_positions else None
        what = f"max_position_embeddings ({facts.max_positions}) minus max_new_tokens ({max_new_tokens})"
    bad = [v for v in vals if v < lo or (hi is not None and v > hi)]
    if bad:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"knob {knob!r}: value(s) {', '.join(map(str, bad))} out of range {rng}"
                          + (f" (at most {what})" if hi is not None else ""))
    if knob == "flops-scaling" and len(set(vals)) < 2:
        raise ConfigError("knob 'flops-scaling' needs at least two different k values to fit a line")
    return vals


# ---------------------------------------------------------------------------------------------
# decoder-block mask
def find_decoder_blocks(model: nn.Module, layers: list | None = None, required: bool = True):
    """``(name, ModuleList)`` of the model's decoder blocks: the ModuleList holding most MoE layers.

    Without MoE layers to go by, the longest ModuleList whose children share one class.
    """
    if layers is None:
        from moe_trace.capture.detect import detect

        layers = detect(model)
    names = [l.name for l in layers]
    best, best_score = None, (0, 0)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = f"{name}." if name else ""
        holds = sum(1 for n in names if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit())
        same = len({type(m) for m in mod}) == 1
        score = (holds, len(mod) if (holds or same) else 0)
        if score > best_score:
            best, best_score = (name, mod), score
    if best is None and required:
        raise ConfigError(f"cannot find the decoder blocks of {type(model).__name__} (no nn.ModuleList)")
    return best


def _returns_tuple(block: nn.Module) -> bool:
    try:
        ann = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):
        return False
    text = ann if isinstance(ann, str) else repr(ann)
    return text.lower().removeprefix("typing.").startswith("tuple")


def _skip_forward(block: nn.Module):
    as_tuple = _returns_tuple(block)

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            hidden = next(v for v in kwargs.values() if torch.is_tensor(v))
        return (hidden,) if as_tuple else hidden

    forward._moe_trace_skipped = True  # the session does not warn about these layers' missing routing

    forward._moe_trace_mask = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def mask_blocks(model: nn.Module, n_active: Any, layers: list | None = None, order: Sequence[int] | None = None):
    """Run only some decoder blocks; the rest return their input unchanged.

    `n_active`: an int N keeps the first N blocks (of `order`, an importance order of block indices,
    most important first; default: model order), or a set / list of block indices keeps exactly those
    (seed 003's chosen block sets). The masked blocks stay in the model (same modules, parameters and
    hooks); their ``forward`` is shadowed by an instance attribute for the duration of the block and
    restored on exit. (A post-forward hook alone would still compute the block, so latency would not
    change.) `n_active=None` masks nothing.
    """
    if n_active is None:
        yield
        return
    _, blocks = find_decoder_blocks(model, layers)
    keep = active_block_set(n_active, len(blocks), order)
    saved = []
    try:
        for i, blk in enumerate(blocks):
            if i in keep:
                continue
            saved.append((blk, blk.__dict__.get("forward", _MISSING)))
            blk.forward = _skip_forward(blk)
        yield
    finally:
        for blk, old in saved:
            if old is _MISSING:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = old


def active_block_set(active: Any, num_blocks: int, order: Sequence[int] | None = None) -> set[int]:
    """The block indices that run for an active-layers value (see `mask_blocks`); ConfigError if bad."""
    if order is not None:
        order = check_block_order(order, num_blocks)
    if isinstance(active, (int, np.integer)) and not isinstance(active, bool):
        if not 1 <= int(active) <= num_blocks:
            raise ConfigError(f"active layers must be in [1, {num_blocks}], got {active}")
        return set((order or list(range(num_blocks)))[: int(active)])
    idx = list(active)
    bad = [i for i in idx if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < num_blocks]
    if bad or not idx:
        raise ConfigError(f"active block set {idx!r}: indices must be in [0, {num_blocks - 1}] and not empty")
    return {int(i) for i in idx}


def check_block_order(order: Sequence[int], num_blocks: int) -> list[int]:
    """An importance order: distinct block indices in [0, num_blocks), most important first."""
    try:
        out = [int(i) for i in order]
    except (TypeError, ValueError):
        raise ConfigError(f"block order {order!r}: expected block indices, e.g. 3,0,2,1") from None
    if len(set(out)) != len(out) or any(not 0 <= i < num_blocks for i in out):
        raise ConfigError(f"block order {out}: give distinct block indices in [0, {num_blocks - 1}]")
    return out


def parse_block_value(v: Any) -> Any:
    """An active-layers value: an int, or a block set written "0+2+5" (CLI) / a list or tuple."""
    if isinstance(v, str) and "+" in v:
        try:
            return tuple(sorted({int(x) for x in v.split("+") if x.strip()}))
        except ValueError:
            raise ConfigError(f"active block set {v!r}: expected indices joined by '+', e.g. 0+2+5") from None
    if isinstance(v, (list, tuple, set, frozenset)):
        return tuple(sorted(int(x) for x in v))
    return v


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# timing of generate: first forward (prefill) vs the rest (decode)
class ForwardTimer:
    """Times every top-level model forward; CUDA events on GPU, perf_counter on CPU.

    Inside `profile()` it is an observer (`moe_trace.capture.observers`: `on_step_start` /
    `on_forward_end`, so only the session hooks the model); standalone, ``with timer:`` installs
    its own forward pre/post hooks."""

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self.device = dev
        self.marks: list[tuple[Any, Any]] = []
        self._depth = 0
        self._start = None
        self._handles: list[Any] = []

    @property
    def source(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter"

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def _pre(self, module, args, kwargs):
        self._depth += 1
        if self._depth == 1:
            self._start = self._now()

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.marks.append((self._start, self._now()))

    # observer protocol (profile(..., observers=[timer])): the session calls these first thing
    def on_step_start(self, step) -> None:
        self._start = self._now()

    def on_forward_end(self, step, output) -> None:
        self.marks.append((self._start, self._now()))

    def __enter__(self) -> "ForwardTimer":
        self.marks.clear()
        # prepend: start before and stop before the profiler's own model hooks (its end-of-step
        # counter flush is profiling overhead, not model latency)
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
                         self.model.register_forward_hook(self._post, always_call=True, prepend=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1000.0

    def result(self) -> dict[str, float | int]:
        """prefill_ms (first forward), decode_ms (end of the first forward to end of the last),
        decode_forward_ms (sum of the later forwards), decode_steps. Call after `synchronize()`."""
        if not self.marks:
            return {"prefill_ms": 0.0, "decode_ms": 0.0, "decode_forward_ms": 0.0, "decode_steps": 0}
        first = self.marks[0]
        prefill = self._ms(*first)
        rest = self.marks[1:]
        decode = self._ms(first[1], rest[-1][1]) if rest else 0.0
        decode_fw = float(sum(self._ms(a, b) for a, b in rest))
        return {"prefill_ms": prefill, "decode_ms": decode, "decode_forward_ms": decode_fw, "decode_steps": len(rest)}


# ---------------------------------------------------------------------------------------------
# inputs
class ByteTokenizer:
    """Fallback for models without a tokenizer (the tiny test models): UTF-8 bytes mod vocab."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.vocab = int(cfg.get_text_config().vocab_size)
        from moe_trace.models.tiny import _special_token_ids

        self.special = _special_token_ids(cfg)
        self.allowed = [i for i in range(self.vocab) if i not in self.special] or list(range(self.vocab))

    def __call__(self, text: str, return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:
        data = text.encode("utf-8") or b" "
        ids = torch.tensor([[self.allowed[b % len(self.allowed)] for b in data]], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, **_: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def prepare_inputs(model: nn.Module, inputs: Any = None, tokenizer: Any = None) -> list[dict[str, torch.Tensor]]:
    """A list of generate() keyword dicts from prompts (str / list of str), tensors or dicts.

    `None` gives two deterministic random prompts of 8 tokens (`moe_trace.models.example_inputs`).
    """
    dev = _model_device(model)
    if inputs is None:
        from moe_trace.models.tiny import example_inputs

        items: list[Any] = [example_inputs(model, batch=1, prompt_len=8, seed=s) for s in range(2)]
    elif isinstance(inputs, (str, dict, torch.Tensor)):
        items = [inputs]
    else:
        items = list(inputs)
    if not items:
        raise ConfigError("no inputs: give at least one prompt")
    out = []
    for it in items:
        if isinstance(it, str):
            tok = tokenizer if tokenizer is not None else ByteTokenizer(model)
            enc = tok(it, return_tensors="pt")
            d = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        elif isinstance(it, torch.Tensor):
            ids = it if it.dim() == 2 else it.unsqueeze(0)
            d = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        elif isinstance(it, dict) or hasattr(it, "keys"):
            d = dict(it)
            if "input_ids" not in d:
                raise ConfigError(f"an input dict needs 'input_ids' (got keys {sorted(d)})")
        else:
            raise ConfigError(f"inputs must be prompts (str), token tensors or dicts with input_ids, "
                              f"got {type(it).__name__}")
        out.append({k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in d.items()})
    return out


def with_prompt_length(inp: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """`inp` with input_ids tiled / cut to exactly `n` tokens per row (attention mask all ones)."""
    ids = inp["input_ids"]
    reps = math.ceil(n / ids.shape[1])
    new = ids.repeat(1, reps)[:, :n]
    out = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    out["input_ids"] = new
    out["attention_mask"] = torch.ones_like(new)
    return out


# ---------------------------------------------------------------------------------------------
# one measured generate
def _gen_kwargs(model: nn.Module, max_new_tokens: int, extra: dict | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "min_new_tokens": int(max_new_tokens),
                          "do_sample": False}
    gc = getattr(model, "generation_config", None)
    if gc is not None and getattr(gc, "pad_token_id", None) is None:
        eos = getattr(gc, "eos_token_id", None)
        kw["pad_token_id"] = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
    if extra:
        kw.update(extra)
    return kw


def routing_metrics(report) -> dict[str, float]:
    """Token-weighted k means, mean active experts and FLOPs of one report."""
    d = report.to_dict()
    layers = d["layers"]

    def k_mean(blocks):
        tok = sum(b["tokens"] for b in blocks)
        return sum(b["assignments"] for b in blocks) / tok if tok else 0.0

    used = [l for l in layers if l["tokens"]]
    return {
        "k_mean": k_mean(layers),
        "k_mean_prefill": k_mean([l["phases"]["prefill"] for l in layers]),
        "k_mean_decode": k_mean([l["phases"]["decode"] for l in layers]),
        "active_experts_mean": float(np.mean([l["active_experts"] for l in used])) if used else 0.0,
        "flops_total": int(d["totals"]["flops"]["total"]),
        "flops_prefill": int(d["phases"]["prefill"]["flops"]["total"]),
        "flops_decode": int(d["phases"]["decode"]["flops"]["total"]),
        "flops_per_token": float(d["totals"]["flops_per_token"]),
    }


def measure_generate(model: nn.Module, inputs: dict[str, torch.Tensor], *, max_new_tokens: int,
                     selector: Any = None, router_middleware: Any = None, active_layers: int | None = None,
                     layers: list | None = None, generate_kwargs: dict | None = None,
                     profile_mode: str = "stats", keep_output: bool = False,
                     block_order: Sequence[int] | None = None) -> dict[str, Any]:
    """Run one `model.generate` under `moe_trace.profile` and time prefill / decode.

    Returns a flat record (latencies, token counts, routing metrics) plus ``"report"`` (the run's
    `Report`) and, with `keep_output`, ``"output_ids"`` (CPU tensor).
    """
    from moe_trace.capture.session import profile

    kw = _gen_kwargs(model, max_new_tokens, generate_kwargs)
    timer = ForwardTimer(model)
    prof_kw: dict[str, Any] = {"observers": [timer]}
    if selector is not None:
        prof_kw["selector"] = selector
    if router_middleware is not None:
        prof_kw["router_middleware"] = router_middleware
    with torch.inference_mode(), mask_blocks(model, active_layers, layers, order=block_order):
        with profile(model, profile_mode, **prof_kw) as run:
            timer.synchronize()
            t0 = time.perf_counter()
            out = model.generate(**inputs, **kw)
            timer.synchronize()
            t1 = time.perf_counter()
    report = run.report()
    ids = inputs["input_ids"]
    seq = out.sequences if hasattr(out, "sequences") else out
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    new_tokens = int(seq.shape[1] - (1 if enc_dec else ids.shape[1]))
    t = timer.result()
    rec: dict[str, Any] = {
        "batch": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
        "prefill_ms": t["prefill_ms"], "decode_ms": t["decode_ms"], "decode_forward_ms": t["decode_forward_ms"],
        "decode_steps": int(t["decode_steps"]), "total_ms": (t1 - t0) * 1000.0,
        "ms_per_output_token": t["decode_ms"] / t["decode_steps"] if t["decode_steps"] else 0.0,
        "timing": timer.source,
    }
    rec.update(routing_metrics(report))
    rec["report"] = report
    if keep_output:
        rec["output_ids"] = seq.detach().cpu()
    return rec


# ---------------------------------------------------------------------------------------------
# statistics
def _t95(df: int) -> float:
    if df > 30:
        return 1.960
    return _T95.get(df) or _T95[min(k for k in _T95 if k >= df)]


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std (sample, ddof=1), the 95% confidence interval of the mean (Student t), p50, and p90 /
    p99 only from 10 / 100 samples on (None below: a tail percentile of 4 samples is their maximum)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return {s: None for s in STATS}
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    half = _t95(a.size - 1) * std / np.sqrt(a.size) if a.size > 1 else None
    out = {"mean": mean, "std": std, "ci95_low": mean - half if half is not None else None,
           "ci95_high": mean + half if half is not None else None, "p50": float(np.percentile(a, 50))}
    for name, q in (("p90", 90), ("p99", 99)):
        out[name] = float(np.percentile(a, q)) if a.size >= MIN_SAMPLES[name] else None
    return out


def noise_warnings(rows: list[dict[str, Any]], knob: str) -> list[str]:
    """A warning per latency whose spread between repetitions is larger than its change across the knob
    (the differences may be noise: more --repeats, a quieter machine, or a larger model)."""
    out = []
    if len(rows) < 2:
        return out
    for lat in ("prefill_ms", "decode_ms", "total_ms"):
        means = [r[f"{lat}_mean"] for r in rows if r.get(f"{lat}_mean") is not None]
        stds = [r[f"{lat}_std"] for r in rows if r.get(f"{lat}_std") is not None]
        if len(means) < 2 or not stds:
            continue
        effect = max(means) - min(means)
        spread = max(stds)
        if spread > effect:
            out.append(f"{lat}: the spread between repetitions (std up to {spread:.3g} ms) exceeds the change "
                       f"across {knob} (max - min of the means: {effect:.3g} ms); the differences may be noise")
    return out


def summarize_samples(samples: list[dict[str, Any]], knob: str, values: Sequence[int]) -> list[dict[str, Any]]:
    """One row per setting (in `values` order): n, latency statistics and means of the rest."""
    rows = []
    first_flops = first_lat = None
    for v in values:
        group = [s for s in samples if s["value"] == v]
        row: dict[str, Any] = {"knob": knob, "value": v, "n": len(group)}
        for lat in LATENCIES:
            for stat, x in describe([s[lat] for s in group]).items():
                row[f"{lat}_{stat}"] = x
        for m in _MEANS:
            vals = [s[m] for s in group if s.get(m) is not None]
            row[f"{m}_mean"] = float(np.mean(vals)) if vals else 0.0
        if first_flops is None:
            first_flops, first_lat = row["flops_total_mean"], row["total_ms_mean"]
        row["flops_ratio"] = row["flops_total_mean"] / first_flops if first_flops else None
        row["latency_ratio"] = row["total_ms_mean"] / first_lat if first_lat else None
        rows.append(row)
    return rows


def fit_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """Least-squares y = slope * x + intercept with r^2; None when x does not vary."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size < 2 or np.ptp(xa) == 0:
        return None
    slope, intercept = np.polyfit(xa, ya, 1)
    pred = slope * xa + intercept
    ss_res = float(((ya - pred) ** 2).sum())
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0,
            "n": int(xa.size)}


def flops_fit(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured latency (ms) vs theoretical MoE GFLOPs: per phase and for the whole generate."""
    return {
        "x_unit": "GFLOPs", "y_unit": "ms",
        "prefill": fit_line([s["flops_prefill"] / 1e9 for s in samples], [s["prefill_ms"] for s in samples]),
        "decode": fit_line([s["flops_decode"] / 1e9 for s in samples], [s["decode_ms"] for s in samples]),
        "total": fit_line([s["flops_total"] / 1e9 for s in samples], [s["total_ms"] for s in samples]),
    }


# ---------------------------------------------------------------------------------------------
class SweepResult:
    """The sweep's JSON document (``schema``, ``experiment``, ``summary``, ``all_samples``, ``fit``)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.paths: dict[str, str] = {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    @property
    def summary(self) -> list[dict[str, Any]]:
        return self.data["summary"]

    @property
    def all_samples(self) -> list[dict[str, Any]]:
        return self.data["all_samples"]

    @property
    def knob(self) -> str:
        return self.data["experiment"]["knob"]

    @property
    def fit(self) -> dict[str, Any] | None:
        return self.data.get("fit")

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.data, indent=indent)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def load(cls, path: str | Path) -> "SweepResult":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read sweep results {path}: {exc}") from None
        if not isinstance(data, dict) or "summary" not in data or "all_samples" not in data:
            raise ConfigError(f"{path} is not a sweep result (needs 'summary' and 'all_samples')")
        return cls(data)

    def to_dataframe(self, which: str = "summary"):
        import pandas as pd

        if which not in ("summary", "samples", "all_samples"):
            raise ConfigError("to_dataframe(which=...) takes 'summary' or 'samples'")
        return pd.DataFrame(self.summary if which == "summary" else self.all_samples)

    def plot(self, out_dir: str | Path) -> list[Path]:
        from .plots import plot_sweep

        return plot_sweep(self, out_dir)

    def __repr__(self) -> str:
        return f"SweepResult(knob={self.knob!r}, settings={len(self.summary)}, samples={len(self.all_samples)})"


def _slug(knob: str) -> str:
    return knob.replace("-", "_")


def run_sweep(model: nn.Module, knob: str, values: Iterable[Any], inputs: Any = None, *, tokenizer: Any = None,
              repeats: int = 3, warmup: int = 1, max_new_tokens: int = 16, selector: Any = None,
              out_dir: str | Path | None = None, plots: bool = True, progress: bool = True,
              generate_kwargs: dict | None = None, profile_mode: str = "stats",
              model_name: str | None = None, block_order: Sequence[int] | None = None) -> SweepResult:
    """Sweep one knob over `values`; every (value, repeat, input) is one timed `generate`.

    Every value runs `warmup` untimed generates first; then the repetitions are interleaved (each
    repetition visits every value, in an order rotated by one per repetition), so warm-up and drift
    do not land on one setting. `summary` has mean, std, a 95% interval of the mean and the
    percentiles the sample count supports; `warnings` says where the spread exceeds the effect.
    active-layers values: N (the first N blocks, of `block_order` when given: an importance order of
    block indices) or block sets (tuples of indices; "0+2+5" on the command line).

    `inputs`: prompts (with `tokenizer`; without one, bytes are mapped to token ids), token tensors,
    dicts of generate() inputs, or None for two random 8-token prompts. `selector` is the routing of
    the non-top-k knobs (None: the model's own). `warmup` untimed generates run before the first
    sample. All arguments are checked before any generate runs (ConfigError).
    With `out_dir`: ``sweep_{knob}.json`` and, with `plots`, PNGs under ``figures/``.
    """
    knob = normalize_knob(knob)
    repeats = _check_count("repeats", repeats, 1)
    warmup = _check_count("warmup", warmup, 0)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    base_selector = resolve_selector(selector)
    if knob in ("top-k", "flops-scaling") and base_selector is not None:
        raise ConfigError(f"knob {knob!r} sets the selector itself; do not pass selector=")
    facts = model_facts(model)
    prepared = prepare_inputs(model, inputs, tokenizer)
    longest = max(int(p["input_ids"].shape[1]) for p in prepared)
    vals = validate_values(knob, values, facts, max_new_tokens=max_new_tokens, prompt_tokens=longest)
    if block_order is not None:
        if knob != "active-layers":
            raise ConfigError("block_order (--block-order) applies to the active-layers knob only")
        block_order = check_block_order(block_order, facts.num_blocks or 0)
    if knob != "output-tokens" and facts.max_positions and knob != "prompt-length" \
            and longest + max_new_tokens > facts.max_positions:
        raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                          f"max_position_embeddings ({facts.max_positions})")

    def setting(v: int) -> dict[str, Any]:
        s: dict[str, Any] = {"selector": base_selector, "active_layers": None, "max_new_tokens": max_new_tokens,
                             "prompt_length": None}
        if knob in ("top-k", "flops-scaling"):
            s["selector"] = topk(v)
        elif knob == "active-layers":
            s["active_layers"] = v
        elif knob == "output-tokens":
            s["max_new_tokens"] = v
        else:
            s["prompt_length"] = v
        return s

    def run_one(v: int, inp: dict[str, torch.Tensor]) -> dict[str, Any]:
        s = setting(v)
        if s["prompt_length"] is not None:
            inp = with_prompt_length(inp, s["prompt_length"])
        return measure_generate(model, inp, max_new_tokens=s["max_new_tokens"], selector=s["selector"],
                                active_layers=s["active_layers"], layers=facts.layers,
                                generate_kwargs=generate_kwargs, profile_mode=profile_mode,
                                block_order=block_order)

    for v in vals:  # warm-up of every setting (kernels, allocator, caches), untimed
        for _ in range(warmup):
            run_one(v, prepared[0])

    from tqdm.auto import tqdm

    samples: list[dict[str, Any]] = []
    total = len(vals) * repeats * len(prepared)
    with tqdm(total=total, desc=f"sweep {knob}", unit="run", disable=not progress) as bar:
        for r in range(repeats):
            order = vals[r % len(vals):] + vals[: r % len(vals)]  # interleaved, rotated per repetition
            for v in order:
                s = setting(v)
                for i, inp in enumerate(prepared):
                    rec = run_one(v, inp)
                    rec.pop("report", None)
                    sample = {"sample_id": len(samples), "knob": knob, "value": list(v) if isinstance(v, tuple) else v,
                              "repeat": r, "input_id": i,
                              "selector": s["selector"].spec if isinstance(s["selector"], Selector)
                              else (None if s["selector"] is None else repr(s["selector"])),
                              "active_layers": (len(v) if isinstance(v, tuple) else v) if knob == "active-layers"
                              else facts.num_blocks,
                              "max_new_tokens": s["max_new_tokens"], **rec}
                    samples.append(sample)
                    bar.update(1)
                    bar.set_postfix({knob: v, "prefill_ms": f"{rec['prefill_ms']:.1f}",
                                     "decode_ms": f"{rec['decode_ms']:.1f}"})

    cfg = getattr(model, "config", None)
    experiment = {
        "knob": knob, "values": vals, "repeats": repeats, "warmup": warmup, "num_inputs": len(prepared),
        "max_new_tokens": max_new_tokens, "selector": base_selector.spec if isinstance(base_selector, Selector)
        else (None if base_selector is None else repr(base_selector)),
        "model": {"name": model_name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
                  "class": type(model).__name__, "family": facts.layers[0].family if facts.layers else None,
                  "num_experts": facts.num_experts, "top_k": facts.top_k, "num_moe_layers": facts.num_moe_layers,
                  "num_blocks": facts.num_blocks},
        "device": str(_model_device(model)),
        "device_name": torch.cuda.get_device_name(_model_device(model)) if _model_device(model).type == "cuda" else "cpu",
        "timing": samples[0]["timing"] if samples else None,
        "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    experiment["interleaved"] = True
    if block_order is not None:
        experiment["block_order"] = block_order
    summary = summarize_samples(samples, knob, [list(v) if isinstance(v, tuple) else v for v in vals])
    notes = noise_warnings(summary, knob)
    for n in notes:
        warnings.warn(n, RuntimeWarning, stacklevel=2)
    data: dict[str, Any] = {"schema": SCHEMA, "experiment": experiment,
                            "summary": summary, "warnings": notes, "all_samples": samples}
    if knob == "flops-scaling":
        data["fit"] = flops_fit(samples)
    result = SweepResult(data)
    if out_dir is not None:
        out = Path(out_dir)
        path = out / f"sweep_{_slug(knob)}.json"
        result.to_json(path)
        result.paths["json"] = str(path)
        if plots:
            for p in result.plot(out / "figures"):
                result.paths[p.stem] = str(p)
    return result


def _check_count(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)
