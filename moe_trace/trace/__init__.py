"""Kineto traces with MoE counters: the format (`format`), file handling (`io`), writer, streaming
reader / analyzer (`reader` and its parts), merge and validator. docs/design.md has the layout."""
from .merge import merge_traces
from .reader import PlainTraceSummary, TraceData, analyze, read_metadata, read_trace, read_traces
from .validate import validate_trace
from .writer import write_trace

__all__ = ["write_trace", "read_trace", "read_traces", "read_metadata", "analyze", "merge_traces",
           "validate_trace", "TraceData", "PlainTraceSummary"]
