"""`Report`: metrics of a run, as a documented dict (docs/report-format.md), JSON, CSV, DataFrame or text."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_trace.checks import output_file
from moe_trace.errors import ConfigError

from .metrics import ZERO_FLOPS, add_flops, balance, flops, k_stats
from .roofline import format_roofline, roofline
from .rundata import PHASES, LayerCounts, RunData

SCHEMA = "moe-trace/report/1"


def check_ep_size(ep_size):
    """`ep_size` if it is None or a positive int (the divisor check needs the layers: Report does it)."""
    if ep_size is not None and (not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1):
        raise ConfigError(f"ep_size must be a positive integer, got {ep_size!r}")
    return ep_size


def _checked_parts(parts) -> list[RunData]:
    if isinstance(parts, RunData):
        return [parts]
    if isinstance(parts, (str, bytes, dict)) or not hasattr(parts, "__iter__"):
        raise ConfigError(f"Report takes a RunData or a list of them, got {type(parts).__name__}; get one from "
                          "run.report() or moe_trace.analyze(path)")
    parts = list(parts)
    if not parts:
        raise ConfigError("a Report needs at least one RunData; get one from run.report() or moe_trace.analyze(path)")
    bad = next((p for p in parts if not isinstance(p, RunData)), None)
    if bad is not None:
        raise ConfigError(f"Report parts must be RunData, got {type(bad).__name__} (RunData.from_dict(d) reads a dict)")
    return parts


def _checked_ranks(ranks, n: int) -> list[int | None]:
    if ranks is None:
        return [None] * n
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
        raise ConfigError(f"ranks must be a list of ints (or None) with one entry per RunData, got {ranks!r}")
    ranks = list(ranks)
    if len(ranks) != n:
        raise ConfigError(f"ranks has {len(ranks)} entries for {n} RunData part(s); give one rank (int or None) each")
    bad = next((r for r in ranks if r is not None and (isinstance(r, bool) or not isinstance(r, int))), None)
    if bad is not None:
        raise ConfigError(f"ranks must be ints or None, got {bad!r}")
    return ranks


class Report:
    """Metrics of one run; `parts` holds one `RunData` per process (rank), usually just one."""

    def __init__(self, parts: RunData | list[RunData], ranks: list[int | None] | None = None,
                 ep_size: int | None = None, run_id: str | None = None, peak: dict[str, float] | None = None):
        """`ep_size`: add the load per expert-parallel rank for that many ranks (contiguous placement);
        by default only for runs that were expert parallel. `run_id`: the run's id (default: the
        parts' `run_id` when they agree). `peak`: `{"tbps": ..., "tflops": ...}` of the device for the
        roofline's shares (default: a table of known GPUs, see analysis/roofline.py)."""
        self.parts = _checked_parts(parts)
        ids = {p.run_id for p in self.parts}
        self.run_id = run_id if run_id is not None else (ids.pop() if len(ids) == 1 else None)
        # the distributed rank of each part (labels of per-device rows); position when unknown
        ranks = _checked_ranks(ranks, len(self.parts))
        self.ranks = [r if r is not None else i for i, r in enumerate(ranks)]
        self.ep_size = check_ep_size(ep_size)
        if peak is not None and not (isinstance(peak, dict) and set(peak) <= {"tbps", "tflops"}):
            raise ConfigError(f"peak must be a dict with 'tbps' and/or 'tflops', got {peak!r}")
        self.peak = peak
        self.notes: list[str] = self._capture_notes()
        self._dict: dict[str, Any] | None = None

    def _capture_notes(self) -> list[str]:
        """Notes the capture recorded in `settings["notes"]` (incomplete run, layers without routing)."""
        notes: list[str] = []
        for part in self.parts:
            for note in (part.settings or {}).get("notes") or []:
                if isinstance(note, str) and note not in notes:
                    notes.append(note)
        return notes

    # -- building ---------------------------------------------------------------------------
    @property
    def run(self) -> RunData:
        """The parts combined layer by layer: counts summed across ranks, where ranks that hold the
        same batch (tensor-parallel ranks: one `batch_group` in `settings["parallel"]`) count once."""
        kept = self._distinct_batches()
        run = kept[0]
        for other in kept[1:]:
            run = run.merged(other)
        return run

    def _distinct_batches(self) -> list[RunData]:
        groups: dict[Any, list[RunData]] = {}
        for n, part in enumerate(self.parts):
            layout = part.settings.get("parallel") or {}
            key = layout.get("batch_group")
            groups.setdefault(("group", key) if key is not None else ("part", n), []).append(part)
        kept = []
        self.notes = self._capture_notes()
        for (kind, key), members in groups.items():
            kept.append(members[0])
            if kind == "group" and len(members) > 1:
                first = [[c.expert_counts.tolist() for c in members[0].counts[p]] for p in PHASES]
                if any([[c.expert_counts.tolist() for c in m.counts[p]] for p in PHASES] != first for m in members[1:]):
                    self.notes.append(f"ranks of batch group {key} hold the same batch but counted different "
                                      "routing; the first rank's counts are used")
        return kept

    def to_dict(self) -> dict[str, Any]:
        if self._dict is None:
            self._dict = self._build()
        return self._dict

    def _build(self) -> dict[str, Any]:
        run = self.run
        layers = run.layers
        first = layers[0] if layers else None
        model = {
            "family": run.model.get("family", first.family if first else None),
            "name": run.model.get("name"),
            "num_moe_layers": len(layers),
            "num_experts": first.num_experts if first else 0,
            "top_k": first.top_k if first else 0,
            "hidden_size": first.hidden_size if first else 0,
            "expert_dim": first.expert_dim if first else 0,
            "shared_expert_dim": first.shared_expert_dim if first else 0,
        }
        out_layers = []
        phase_flops = {p: dict(ZERO_FLOPS) for p in PHASES}
        for i, layer in enumerate(layers):
            per_phase = {p: run.counts[p][i] for p in PHASES}
            total = per_phase[PHASES[0]]
            for p in PHASES[1:]:
                total = total + per_phase[p]
            entry = {"index": layer.index, "name": layer.name, "device": layer.device, "stack": layer.stack,
                     "family": layer.family, "num_experts": layer.num_experts, "top_k": layer.top_k,
                     **_counts_block(layer, total)}
            entry["phases"] = {}
            for p in PHASES:
                block = _counts_block(layer, per_phase[p])
                if run.timing:
                    block["time_ms"] = dict(run.timing[p][i])
                entry["phases"][p] = block
                phase_flops[p] = add_flops(phase_flops[p], block["flops"])
            if run.timing:
                entry["time_ms"] = {k: _sum_opt(run.timing[p][i].get(k) for p in PHASES)
                                    for k in ("router_ms", "experts_ms", "shared_ms")}
            out_layers.append(entry)
        phases = {}
        for p in PHASES:
            tok = run.forward_tokens.get(p, 0)
            phases[p] = {"forward_calls": run.forward_calls.get(p, 0), "tokens": tok,
                         "padding_tokens": int(run.padding_tokens.get(p, 0)),
                         "flops": phase_flops[p],
                         "flops_per_token": phase_flops[p]["total"] / tok if tok else 0.0}
            if run.timing:
                phases[p]["time_ms"] = {k: _sum_opt(t.get(k) for t in run.timing[p])
                                        for k in ("router_ms", "experts_ms", "shared_ms")}
        total_flops = dict(ZERO_FLOPS)
        for p in PHASES:
            total_flops = add_flops(total_flops, phase_flops[p])
        rf = roofline(layers, run.counts, lambda i, p: out_layers[i]["phases"][p]["flops"]["total"],
                      lambda i, p: out_layers[i]["phases"][p]["k_mean"], run.timing,
                      (run.settings or {}).get("devices") or {}, self.peak)
        total_tokens = sum(run.forward_tokens.get(p, 0) for p in PHASES)
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "model": model,
            "settings": run.settings,
            "timing_source": run.timing_source,
            "phases": phases,
            "totals": {"tokens": total_tokens, "flops": total_flops,
                       "flops_per_token": total_flops["total"] / total_tokens if total_tokens else 0.0},
            "layers": out_layers,
            "devices": self._devices(),
            "expert_parallel": self._expert_parallel(run),
            "roofline": rf,
            "notes": list(self.notes),
        }

    def _expert_parallel(self, run: RunData) -> dict[str, Any] | None:
        """Assignments per expert-parallel rank (rank r holds experts [r*E/N, (r+1)*E/N))."""
        layout = self.parts[0].settings.get("parallel") or {}
        run_ep = layout.get("ep_size") or 1
        n = self.ep_size or (run_ep if run_ep > 1 else None)
        if not n or not run.layers:
            return None
        for layer in run.layers:
            if layer.num_experts % n:
                raise ConfigError(f"ep_size {n} does not divide the {layer.num_experts} experts of layer "
                                  f"{layer.name}; choose a divisor of {layer.num_experts}")
        per_layer = []
        phases = {}
        for p in PHASES:
            loads = np.stack([np.asarray(run.counts[p][i].expert_counts, dtype=np.int64).reshape(n, -1).sum(1)
                              for i in range(len(run.layers))])                       # [L, n]
            per_layer.append(loads)
            total = loads.sum(0)
            phases[p] = {"assignments": [int(x) for x in total], "imbalance": _imbalance(total)}
        loads = per_layer[0] + per_layer[1]
        total = loads.sum(0)
        share = total / total.sum() if total.sum() else np.zeros(n)
        return {
            "ep_size": int(n),
            "source": "run" if n == run_ep else "what-if",
            "ranks": [{"ep_rank": r, "experts": [r * run.layers[0].num_experts // n,
                                                 (r + 1) * run.layers[0].num_experts // n],
                       "assignments": int(total[r]), "share": float(share[r])} for r in range(n)],
            "imbalance": _imbalance(total),
            "per_layer_imbalance": [_imbalance(row) for row in loads],
            "phases": phases,
        }

    def _devices(self) -> list[dict[str, Any]]:
        multi = len(self.parts) > 1
        rows: dict[str, dict[str, Any]] = {}
        for rank, part in enumerate(self.parts):
            for i, layer in enumerate(part.layers):
                key = f"rank{self.ranks[rank]}/{layer.device}" if multi else layer.device
                row = rows.setdefault(key, {"device": key, "layers": 0, "tokens": 0, "flops": dict(ZERO_FLOPS),
                                            "router_ms": None, "experts_ms": None, "shared_ms": None,
                                            "peak_memory_bytes": part.peak_memory.get(layer.device),
                                            "phases": {p: {"tokens": 0, "flops": dict(ZERO_FLOPS),
                                                           "router_ms": None, "experts_ms": None,
                                                           "shared_ms": None, "k_hist": {}} for p in PHASES}})
                row["layers"] += 1
                for p in PHASES:
                    c = part.counts[p][i]
                    f = flops(layer, c)
                    row["tokens"] += c.tokens
                    row["flops"] = add_flops(row["flops"], f)
                    ph = row["phases"][p]
                    ph["tokens"] += c.tokens
                    ph["flops"] = add_flops(ph["flops"], f)
                    for k, n in enumerate(c.k_hist):
                        if n:
                            ph["k_hist"][str(k)] = ph["k_hist"].get(str(k), 0) + int(n)
                    if part.timing:
                        for k in ("router_ms", "experts_ms", "shared_ms"):
                            v = part.timing[p][i].get(k)
                            ph[k] = _sum_opt([ph[k], v])
                            row[k] = _sum_opt([row[k], v])
        return list(rows.values())

    # -- output -----------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The report as strict JSON (non-finite numbers, e.g. a NaN router statistic, are written as null)."""
        if path is not None:
            output_file(path, "report JSON path")
        text = json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def phases_shown(self) -> list[str]:
        """The phases tables list: prefill and decode always, later phases (verify) when the run has them."""
        d = self.to_dict()
        return [p for i, p in enumerate(PHASES)
                if i < 2 or d["phases"][p]["forward_calls"] or any(l["phases"][p]["tokens"] for l in d["layers"])]

    def to_dataframe(self):
        """One row per (layer, phase) with counts, balance, k and FLOPs; phase "all" sums both."""
        import pandas as pd

        rows = []
        for layer in self.to_dict()["layers"]:
            blocks = [("all", layer)] + [(p, layer["phases"][p]) for p in self.phases_shown()]
            for phase, b in blocks:
                row = {"layer": layer["index"], "name": layer["name"], "device": layer["device"], "phase": phase}
                for k in ("tokens", "assignments", "excluded", "dropped", "k_mean", "k_std", "k_min", "k_max",
                          "active_experts", "dead_experts", "cv", "gini", "entropy_norm", "max_over_mean",
                          "top1_prob_mean", "router_entropy_mean"):
                    row[k] = b[k]
                for k, v in b["flops"].items():
                    row[f"flops_{k}"] = v
                for k, v in (b.get("time_ms") or {}).items():
                    row[k] = v
                rows.append(row)
        return pd.DataFrame(rows)

    def to_csv(self, path: str | Path) -> None:
        output_file(path, "report CSV path")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False)

    def __str__(self) -> str:
        d = self.to_dict()
        m = d["model"]
        lines = [
            f"moe-trace report: {m['family']} - {m['num_moe_layers']} MoE layers, {m['num_experts']} experts, "
            f"top-{m['top_k']}, hidden {m['hidden_size']}, expert dim {m['expert_dim']}"
            + (f", shared dim {m['shared_expert_dim']}" if m["shared_expert_dim"] else ""),
        ]
        timed = d["timing_source"] is not None
        for p in self.phases_shown():
            ph = d["phases"][p]
            line = (f"  {p:<8} forwards {ph['forward_calls']:>5}  tokens {ph['tokens']:>8}  "
                    f"FLOPs {_fmt(ph['flops']['total'])} ({_fmt(ph['flops_per_token'])}/token)")
            if timed and ph.get("time_ms"):
                t = ph["time_ms"]
                line += (f"  router {_fmt_ms(t['router_ms'])} ms  experts {_fmt_ms(t['experts_ms'])} ms  "
                         f"shared {_fmt_ms(t['shared_ms'])} ms")
            lines.append(line)
        head = f"  {'layer':>5} {'device':<8} {'tokens':>8} {'k_mean':>6} {'active':>6} {'cv':>6} {'gini':>6} " \
               f"{'ent':>5} {'max/mean':>8} {'GFLOPs':>9}"
        if timed:
            head += f" {'router ms':>9} {'experts ms':>10} {'shared ms':>9}"
        lines.append(head)
        for l in d["layers"]:
            row = (f"  {l['index']:>5} {l['device']:<8} {l['tokens']:>8} {l['k_mean']:>6.2f} "
                   f"{l['active_experts']:>6} {l['cv']:>6.3f} {l['gini']:>6.3f} {l['entropy_norm']:>5.3f} "
                   f"{l['max_over_mean']:>8.2f} {l['flops']['total'] / 1e9:>9.4f}")
            if timed:
                t = l["time_ms"]
                row += f" {_fmt_ms(t['router_ms']):>9} {_fmt_ms(t['experts_ms']):>10} {_fmt_ms(t['shared_ms']):>9}"
            lines.append(row)
        if timed:
            lines.append(f"  timing: {d['timing_source']} (ms summed over the run's forwards; per phase above)")
            lines += format_roofline(d["roofline"])
        else:
            lines.append("  latency: not measured in stats mode; profile(model, mode=\"timing\") (CUDA events) or "
                         "mode=\"kineto\" (trace), `--mode timing` on the command line, adds router / experts / "
                         "shared ms per layer and phase")
        stacks = {st: [str(l["index"]) for l in d["layers"] if l.get("stack") == st] for st in ("encoder", "decoder")}
        if any(stacks.values()):
            lines.append("  " + "; ".join(f"{st} layers {' '.join(ix)}" for st, ix in stacks.items() if ix))
        dropped = sum(l.get("dropped", 0) for l in d["layers"])
        if dropped:
            lines.append(f"  dropped by expert capacity: {dropped} token-expert slots (not routed, not in the counts)")
        ep = d.get("expert_parallel")
        if ep:
            loads = " ".join(f"{r['assignments']}" for r in ep["ranks"])
            worst = max(ep["per_layer_imbalance"], default=None)
            lines.append(f"  expert parallel ({ep['source']}, {ep['ep_size']} ranks): assignments per rank {loads}; "
                         f"max/mean {_fmt_ratio(ep['imbalance'])}, worst layer {_fmt_ratio(worst)}")
        for note in d.get("notes", []):
            lines.append(f"  note: {note}")
        if len(d["devices"]) > 1:
            lines.append("  per device:")
            for dev in d["devices"]:
                lines.append(f"    {dev['device']:<14} layers {dev['layers']:>3} tokens {dev['tokens']:>8} "
                             f"GFLOPs {dev['flops']['total'] / 1e9:.4f}")
        return "\n".join(lines)

    __repr__ = __str__


def _counts_block(layer, c: LayerCounts) -> dict[str, Any]:
    counts = np.asarray(c.expert_counts, dtype=np.int64)
    ks = k_stats(c.k_hist)
    tokens = int(c.tokens)
    return {
        "tokens": tokens,
        "calls": int(c.calls),
        "expert_counts": [int(x) for x in counts],
        "assignments": int(counts.sum()),
        "excluded": int(c.excluded),
        "padding_tokens": int(c.padding_tokens),
        "dropped": int(c.dropped),
        **ks,
        **balance(counts),
        "top1_prob_mean": c.top1_prob_sum / tokens if tokens else 0.0,
        "router_entropy_mean": c.entropy_sum / tokens if tokens else 0.0,
        "flops": flops(layer, c),
    }


def _imbalance(loads: np.ndarray) -> float | None:
    """max / mean of per-rank loads (1.0 is perfect balance); None without any load."""
    mean = float(np.mean(loads)) if len(loads) else 0.0
    return float(np.max(loads)) / mean if mean else None


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _sum_opt(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals)) if vals else None


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _finite(obj: Any) -> Any:
    """A copy with NaN / inf floats (Python or numpy) replaced by None: what strict JSON can hold."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj
