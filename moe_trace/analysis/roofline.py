"""Roofline figures per MoE layer and phase: weight bytes read and FLOPs against the measured time.

Bytes read by one forward of a layer = distinct experts that got a token in that forward x bytes per
expert + router weights + shared-expert weights (activations are not counted: at decode they are tiny
next to the weights). Summed over the phase's forwards, divided by the measured router + experts +
shared time, this gives the achieved TB/s; FLOPs (the report's analytic count) give TFLOP/s. Peaks come
from a table of known GPUs, matched on the device name the run recorded, or from an override
(`Report(peak=...)`, `MOE_TRACE_PEAK="TBPS,TFLOPS"`, `--peak-tbps/--peak-tflops`).
"""
from __future__ import annotations

import os
import re
from typing import Any

from .rundata import PHASES, LayerCounts, LayerInfo

# (name pattern, HBM TB/s, dense bf16 tensor TFLOP/s) from the vendors' data sheets, most specific first
KNOWN_GPUS = (
    (r"H200 NVL", 4.8, 835.0),
    (r"H200", 4.8, 989.0),
    (r"H100 NVL", 3.9, 835.0),
    (r"H100.*PCIe", 2.0, 756.0),
    (r"H100", 3.35, 989.0),   # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"GH200", 4.0, 989.0),
    (r"B200", 8.0, 2250.0),
    (r"A100.*PCI[Ee].*40|A100-PCIE-40", 1.555, 312.0),
    (r"A100.*80GB PCIe", 1.935, 312.0),
    (r"A100.*40GB", 1.555, 312.0),
    (r"A100", 2.039, 312.0),  # SXM4 80GB
    (r"L40S", 0.864, 362.0),
    (r"\bL4\b", 0.3, 121.0),
    (r"V100", 0.9, 125.0),
)


def known_peak(device_name: str | None) -> dict[str, Any] | None:
    """{"name", "tbps", "tflops", "source"} of a known GPU name (as torch / Kineto spell it), else None."""
    if not device_name:
        return None
    for pattern, tbps, tflops in KNOWN_GPUS:
        if re.search(pattern, device_name):
            return {"name": device_name, "tbps": tbps, "tflops": tflops, "source": "table"}
    return None


def resolve_peak(device_name: str | None, override: dict[str, float] | None = None) -> dict[str, Any] | None:
    """The peak for a device: an explicit override, then MOE_TRACE_PEAK, then the table of known GPUs."""
    if override:
        return {"name": device_name, "tbps": override.get("tbps"), "tflops": override.get("tflops"),
                "source": "override"}
    env = os.environ.get("MOE_TRACE_PEAK")
    if env:
        try:
            tbps, tflops = (float(x) for x in env.split(","))
        except ValueError:
            from moe_trace.errors import ConfigError

            raise ConfigError(f"MOE_TRACE_PEAK={env!r}: expected 'TBPS,TFLOPS', e.g. 4.8,989") from None
        return {"name": device_name, "tbps": tbps, "tflops": tflops, "source": "MOE_TRACE_PEAK"}
    return known_peak(device_name)


def expert_reads(layer: LayerInfo, c: LayerCounts, k_mean: float) -> tuple[float, str]:
    """(distinct experts read summed over forwards, "counted" | "estimate")."""
    if layer.dense_experts:
        return float(c.calls * layer.num_experts), "counted"
    if c.expert_reads:
        return float(c.expert_reads), "counted"
    if not c.calls or not c.tokens:
        return 0.0, "counted"
    # expected distinct experts when each of t tokens picks k of E experts uniformly
    e = layer.num_experts
    per_call_tokens = c.tokens / c.calls
    p_unused = (1.0 - min(k_mean, e) / e) ** per_call_tokens
    return c.calls * e * (1.0 - p_unused), "estimate"


def layer_phase(layer: LayerInfo, c: LayerCounts, flops_total: int, k_mean: float,
                time_ms: dict[str, float | None] | None, peak: dict[str, Any] | None) -> dict[str, Any]:
    reads, source = expert_reads(layer, c, k_mean)
    nbytes = reads * layer.expert_bytes + c.calls * (layer.router_bytes + layer.shared_bytes)
    ms = None
    if time_ms:
        parts = [time_ms.get(k) for k in ("router_ms", "experts_ms", "shared_ms")]
        ms = sum(v for v in parts if v is not None) if any(v is not None for v in parts) else None
    return _figures({"forwards": int(c.calls), "expert_reads": reads, "reads_source": source,
                     "bytes": float(nbytes), "flops": int(flops_total), "time_ms": ms}, peak,
                    known=bool(layer.expert_bytes))


def _figures(row: dict[str, Any], peak: dict[str, Any] | None, known: bool = True) -> dict[str, Any]:
    ms, nbytes, fl = row["time_ms"], row["bytes"], row["flops"]
    sec = ms / 1e3 if ms else None
    row["bytes_known"] = known
    row["intensity_flop_per_byte"] = fl / nbytes if nbytes else None
    row["achieved_tbps"] = nbytes / sec / 1e12 if sec and known else None
    row["achieved_tflops"] = fl / sec / 1e12 if sec else None
    tb, tf = (peak or {}).get("tbps"), (peak or {}).get("tflops")
    row["bandwidth_share"] = row["achieved_tbps"] / tb if tb and row["achieved_tbps"] is not None else None
    row["compute_share"] = row["achieved_tflops"] / tf if tf and row["achieved_tflops"] is not None else None
    return row


def roofline(layers: list[LayerInfo], counts: dict[str, list[LayerCounts]], flops_of, k_mean_of,
             timing: dict[str, list[dict]] | None, device_names: dict[str, str],
             override: dict[str, float] | None = None) -> dict[str, Any]:
    """Per layer and phase rows plus phase totals (see the module docstring). `flops_of(i, phase)` and
    `k_mean_of(i, phase)` come from the report, so the FLOPs are the report's own."""
    peaks = {dev: resolve_peak(device_names.get(dev), override) for dev in {l.device for l in layers}}
    out_layers = []
    totals = {p: {"forwards": 0, "expert_reads": 0.0, "bytes": 0.0, "flops": 0, "time_ms": None} for p in PHASES}
    for i, layer in enumerate(layers):
        row = {"index": layer.index, "device": layer.device, "phases": {}}
        for p in PHASES:
            t = timing[p][i] if timing else None
            r = layer_phase(layer, counts[p][i], flops_of(i, p), k_mean_of(i, p), t, peaks[layer.device])
            row["phases"][p] = r
            tot = totals[p]
            tot["forwards"] = max(tot["forwards"], r["forwards"])
            tot["expert_reads"] += r["expert_reads"]
            tot["bytes"] += r["bytes"]
            tot["flops"] += r["flops"]
            if r["time_ms"] is not None:
                tot["time_ms"] = (tot["time_ms"] or 0.0) + r["time_ms"]
        out_layers.append(row)
    one_peak = next(iter(peaks.values())) if len(set(map(str, peaks.values()))) == 1 else None
    known = all(l.expert_bytes for l in layers)
    phases = {p: _figures(dict(totals[p], reads_source=_src(out_layers, p)), one_peak, known) for p in PHASES}
    return {"peak": one_peak, "peaks": peaks, "phases": phases, "layers": out_layers,
            "bytes_per_expert": [l.expert_bytes for l in layers],
            "note": "bytes = distinct experts per forward x bytes per expert + router + shared weights"}


def _src(rows: list[dict], phase: str) -> str:
    srcs = {r["phases"][phase]["reads_source"] for r in rows}
    return srcs.pop() if len(srcs) == 1 else "mixed"


def format_roofline(rf: dict[str, Any]) -> list[str]:
    """Text lines: one per phase with bytes, FLOPs, time, achieved TB/s and TFLOP/s and their peak share."""
    peak = rf.get("peak")
    lines = []
    head = "  roofline (MoE weights read / FLOPs vs measured time"
    if peak and peak.get("tbps"):
        head += f"; peak {peak['tbps']:g} TB/s, {peak['tflops']:g} TFLOP/s from {peak['source']}"
        if peak.get("name"):
            head += f" ({peak['name']})"
    lines.append(head + "):")
    for p in PHASES:
        r = rf["phases"][p]
        if not r["forwards"]:
            continue
        txt = (f"    {p:<8} {_si(r['bytes'])}B read ({r['reads_source']} expert reads), "
               f"{_si(r['flops'])}FLOP")
        if r["time_ms"] is not None:
            txt += f" in {r['time_ms']:.3f} ms: "
            txt += f"{r['achieved_tbps']:.3g} TB/s" if r["achieved_tbps"] is not None else "? TB/s"
            if r["bandwidth_share"] is not None:
                txt += f" ({100 * r['bandwidth_share']:.1f}% of peak)"
            txt += f", {r['achieved_tflops']:.3g} TFLOP/s"
            if r["compute_share"] is not None:
                txt += f" ({100 * r['compute_share']:.2f}% of peak)"
        else:
            txt += " (no time measured)"
        if r["intensity_flop_per_byte"] is not None:
            txt += f"; {r['intensity_flop_per_byte']:.3g} FLOP/byte"
        lines.append(txt)
    return lines


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g} "
