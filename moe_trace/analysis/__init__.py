"""Metrics and reports from raw counts. Imports nothing from capture, trace or the CLI."""
from .metrics import balance, flops, k_stats
from .report import SCHEMA, Report
from .rundata import PARTS, PHASES, LayerCounts, LayerInfo, RunData

__all__ = ["Report", "RunData", "LayerInfo", "LayerCounts", "PHASES", "PARTS", "SCHEMA", "balance", "flops", "k_stats"]
