"""`SimpleBenchmark`: named routing configurations on the same prompts, compared in one table.

    bench = SimpleBenchmark(model, tokenizer, max_new_tokens=32)
    bench.run({"baseline": None, "top1": "topk:1", "knee": {"selector": "kneedle", "active_layers": 12}},
              prompts)
    print(bench.compare())      # pandas DataFrame, one row per configuration, diffs vs the baseline

A configuration is ``None`` (the model as is), a selector (name string, object or callable), a dict
with any of ``selector``, ``top_k``, ``router_middleware``, ``active_layers``, ``max_new_tokens``,
or (the earlier profiler's form) a callable ``fn(model)`` that modifies the model and may return a
function that undoes it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from moe_trace.errors import ConfigError

from .selectors import Selector, resolve_selector, topk

CONFIG_KEYS = ("selector", "top_k", "router_middleware", "active_layers", "max_new_tokens")


class SimpleBenchmark:
    """Runs configurations on prompts with `measure_generate`; `compare()` gives the diff table."""

    def __init__(self, model: Any, tokenizer: Any = None, *, max_new_tokens: int = 16, repeats: int = 1,
                 warmup: int = 1, progress: bool = False):
        from .sweep import _check_count

        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
        self.repeats = _check_count("repeats", repeats, 1)
        self.warmup = _check_count("warmup", warmup, 0)
        self.progress = progress
        self.results: dict[str, dict[str, Any]] = {}
        self._facts = None
        self._warm = False

    # -- configuration ----------------------------------------------------------------------------
    def _facts_(self):
        if self._facts is None:
            from .sweep import model_facts

            self._facts = model_facts(self.model)
        return self._facts

    def normalize_config(self, name: str, config: Any) -> dict[str, Any]:
        """A config as a dict with every key of CONFIG_KEYS plus ``modify``; ConfigError when bad."""
        out: dict[str, Any] = {"selector": None, "router_middleware": None, "active_layers": None,
                               "max_new_tokens": self.max_new_tokens, "modify": None}
        if config is None:
            return out
        if isinstance(config, (str, Selector)):
            out["selector"] = resolve_selector(config)
            return out
        if isinstance(config, dict):
            unknown = sorted(set(config) - set(CONFIG_KEYS))
            if unknown:
                raise ConfigError(f"config {name!r}: unknown key(s) {', '.join(unknown)}; valid keys: "
                                  f"{', '.join(CONFIG_KEYS)}")
            facts = self._facts_()
            if config.get("top_k") is not None and config.get("selector") is not None:
                raise ConfigError(f"config {name!r}: give either top_k or selector, not both")
            if config.get("router_middleware") is not None and (config.get("selector") is not None
                                                                 or config.get("top_k") is not None):
                raise ConfigError(f"config {name!r}: router_middleware cannot be combined with a selector / top_k")
            if config.get("top_k") is not None:
                k = config["top_k"]
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= facts.num_experts:
                    raise ConfigError(f"config {name!r}: top_k must be an integer in [1, {facts.num_experts}], got {k!r}")
                out["selector"] = topk(k)
            elif config.get("selector") is not None:
                out["selector"] = resolve_selector(config["selector"])
            mw = config.get("router_middleware")
            if mw is not None and not callable(mw):
                raise ConfigError(f"config {name!r}: router_middleware must be callable")
            out["router_middleware"] = mw
            n = config.get("active_layers")
            if n is not None:
                if facts.num_blocks is None:
                    raise ConfigError(f"config {name!r}: cannot find the decoder blocks to mask")
                if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= facts.num_blocks:
                    raise ConfigError(f"config {name!r}: active_layers must be an integer in [1, {facts.num_blocks}], "
                                      f"got {n!r}")
                out["active_layers"] = n
            m = config.get("max_new_tokens")
            if m is not None:
                if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                    raise ConfigError(f"config {name!r}: max_new_tokens must be an integer >= 1, got {m!r}")
                out["max_new_tokens"] = m
            return out
        if callable(config):
            out["modify"] = config
            return out
        raise ConfigError(f"config {name!r}: expected None, a selector, a dict or a callable(model), "
                          f"got {type(config).__name__}")

    # -- running --------------------------------------------------------------------------------
    def run_config(self, name: str, prompts: Sequence[Any], config: Any = None) -> list[dict[str, Any]]:
        """Run one configuration on every prompt (`repeats` times); the samples are kept under `name`."""
        cfg = self.normalize_config(name, config)
        return self._run(name, cfg, prompts)

    def run(self, configs: dict[str, Any], prompts: Sequence[Any], baseline: str | None = None):
        """Check every configuration first, run them in order, return `compare(baseline)`."""
        if not configs:
            raise ConfigError("give at least one configuration")
        checked = {name: self.normalize_config(name, c) for name, c in configs.items()}
        from .sweep import prepare_inputs

        prepare_inputs(self.model, prompts, self.tokenizer)  # validate the prompts too
        for name, cfg in checked.items():
            self._run(name, cfg, prompts)
        return self.compare(baseline)

    def _run(self, name: str, cfg: dict[str, Any], prompts: Sequence[Any]) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        from .sweep import measure_generate, prepare_inputs

        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        inputs = prepare_inputs(self.model, prompts, self.tokenizer)
        facts = self._facts_()
        undo: Callable | None = None
        if cfg["modify"] is not None:
            undo = cfg["modify"](self.model)
        try:
            def once(inp, keep=False):
                return measure_generate(self.model, inp, max_new_tokens=cfg["max_new_tokens"],
                                        selector=cfg["selector"], router_middleware=cfg["router_middleware"],
                                        active_layers=cfg["active_layers"], layers=facts.layers, keep_output=keep)

            if not self._warm:
                for _ in range(self.warmup):
                    once(inputs[0])
                self._warm = True
            samples, outputs = [], []
            with tqdm(total=self.repeats * len(inputs), desc=name, disable=not self.progress) as bar:
                for r in range(self.repeats):
                    for i, inp in enumerate(inputs):
                        rec = once(inp, keep=(r == 0))
                        rec.pop("report", None)
                        ids = rec.pop("output_ids", None)
                        if ids is not None:
                            outputs.append(ids[:, inp["input_ids"].shape[1]:])
                        samples.append({"config": name, "repeat": r, "input_id": i, **rec})
                        bar.update(1)
        finally:
            if callable(undo):
                undo()
        sel = cfg["selector"]
        self.results[name] = {"samples": samples, "outputs": outputs,
                              "selector": sel.spec if isinstance(sel, Selector) else (None if sel is None else repr(sel)),
                              "active_layers": cfg["active_layers"], "max_new_tokens": cfg["max_new_tokens"]}
        return samples

    # -- comparison ---------------------------------------------------------------------------------
    def compare(self, baseline: str | None = None):
        """pandas DataFrame, one row per configuration: mean latencies, k, FLOPs/token, active experts,
        ``tokens_match`` (share of generated tokens equal to the baseline's) and ``*_vs_base`` diffs
        (percent for latency / FLOPs, absolute for k)."""
        import pandas as pd

        if not self.results:
            raise ConfigError("nothing to compare: run some configurations first")
        base = baseline if baseline is not None else next(iter(self.results))
        if base not in self.results:
            raise ConfigError(f"unknown baseline {base!r}; configurations: {', '.join(self.results)}")
        rows = []
        for name, res in self.results.items():
            s = res["samples"]

            def mean(key):
                return float(np.mean([x[key] for x in s])) if s else 0.0

            rows.append({"config": name, "selector": res["selector"], "active_layers": res["active_layers"],
                         "n": len(s), "prefill_ms": mean("prefill_ms"), "decode_ms": mean("decode_ms"),
                         "total_ms": mean("total_ms"), "ms_per_output_token": mean("ms_per_output_token"),
                         "new_tokens": mean("new_tokens"), "k_mean": mean("k_mean"),
                         "flops_per_token": mean("flops_per_token"), "active_experts": mean("active_experts_mean"),
                         "tokens_match": _match(res["outputs"], self.results[base]["outputs"])})
        df = pd.DataFrame(rows).set_index("config")
        b = df.loc[base]
        for col in ("prefill_ms", "decode_ms", "total_ms", "flops_per_token"):
            df[f"{col}_vs_base_%"] = (df[col] / b[col] - 1.0) * 100.0 if b[col] else np.nan
        df["k_mean_vs_base"] = df["k_mean"] - b["k_mean"]
        return df


def _match(a: list, b: list) -> float:
    """Share of generated token positions where two configurations produced the same token."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(x.shape[1], y.shape[1])
        rows = min(x.shape[0], y.shape[0])
        same += int((x[:rows, :n] == y[:rows, :n]).sum())
        total += rows * max(x.shape[1], y.shape[1])
    return same / total if total else float("nan")


# one number format per row of the printed comparison (rows: metrics, columns: configuration names)
COMPARE_ROWS = (
    ("selector", "selector", "{}"),
    ("active_layers", "active layers", "{}"),
    ("k_mean", "k (mean experts/token)", "{:.2f}"),
    ("k_mean_vs_base", "k vs base", "{:+.2f}"),
    ("active_experts", "active experts", "{:.1f}"),
    ("flops_per_token", "MFLOP/token", "mflop"),
    ("flops_per_token_vs_base_%", "FLOPs vs base", "{:+.1f}%"),
    ("prefill_ms", "prefill ms", "{:.2f}"),
    ("decode_ms", "decode ms", "{:.2f}"),
    ("total_ms", "total ms", "{:.2f}"),
    ("total_ms_vs_base_%", "total vs base", "{:+.1f}%"),
    ("ms_per_output_token", "ms / output token", "{:.2f}"),
    ("new_tokens", "new tokens", "{:.1f}"),
    ("tokens_match", "tokens = base", "{:.0%}"),
    ("n", "samples", "{:d}"),
)


COMPARE_SCHEMA = "moe-trace/compare/1"


def compare_document(df, experiment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison as a JSON document (what `moe-trace compare --json` writes and TensorBoard's MoE tab
    lists as a run): ``schema``, ``experiment`` (model, device, repeats, ...), ``baseline`` (the first
    configuration), ``rows`` (the printed table's rows: ``key``, ``label``, ``format``) and ``configs``
    (one object per configuration, in order: ``config`` and every column of `df`; NaN is null)."""
    def val(v):
        if v is None:
            return None
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        return str(v)

    configs = [{"config": str(name), **{str(c): val(df.loc[name, c]) for c in df.columns}} for name in df.index]
    return {"schema": COMPARE_SCHEMA, "experiment": dict(experiment or {}),
            "baseline": str(df.index[0]) if len(df.index) else None,
            "rows": [{"key": k, "label": label, "format": fmt} for k, label, fmt in COMPARE_ROWS],
            "configs": configs}


def format_compare(df, width: int = 80) -> str:
    """The comparison as text that fits `width` columns: one row per metric with one number format,
    one column per configuration (named as given); more configurations than fit wrap into blocks."""
    names = [str(n) for n in df.index]
    label_w = max(len(label) for _, label, _ in COMPARE_ROWS)

    def cell(col, fmt, name):
        v = df.loc[name, col] if col in df.columns else None
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if fmt == "mflop":
            return f"{float(v) / 1e6:.3f}"
        if fmt == "{:d}":
            return str(int(v))
        return fmt.format(v) if fmt != "{}" else str(v)

    cells = {name: [cell(col, fmt, name) for col, _, fmt in COMPARE_ROWS] for name in names}
    col_w = {name: max(len(name), *(len(c) for c in cells[name])) for name in names}
    blocks, cur, used = [], [], label_w
    for name in names:
        if cur and used + 2 + col_w[name] > width:
            blocks.append(cur)
            cur, used = [], label_w
        cur.append(name)
        used += 2 + col_w[name]
    blocks.append(cur)
    lines = []
    for block in blocks:
        if lines:
            lines.append("")
        lines.append(" " * label_w + "".join(f"  {n:>{col_w[n]}}" for n in block))
        for r, (_, label, _) in enumerate(COMPARE_ROWS):
            lines.append(f"{label:<{label_w}}" + "".join(f"  {cells[n][r]:>{col_w[n]}}" for n in block))
    return "\n".join(lines)
