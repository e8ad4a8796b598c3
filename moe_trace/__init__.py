"""moe-trace: make Mixture-of-Experts inference visible.

    with moe_trace.profile(model) as run:
        model.generate(**inputs, max_new_tokens=64)
    print(run.report())
"""
from .analysis import LayerInfo, Report, RunData
from .capture import MoEHandler, ProfileRun, detect, profile, register_handler, unregister_handler
from .errors import (ConfigError, MoeTraceError, NoMoELayersError, ProfileStateError, TraceError,
                     UnknownArchitectureError)

__version__ = "0.1.0"


def analyze(path) -> Report:
    """Rebuild the `Report` of a run from its trace file(s): a `.pt.trace.json[.gz]` or a directory."""
    from .trace.reader import analyze as _analyze

    return _analyze(path)


__all__ = ["profile", "detect", "analyze", "register_handler", "unregister_handler", "MoEHandler", "ProfileRun",
           "Report", "RunData", "LayerInfo", "MoeTraceError", "NoMoELayersError", "UnknownArchitectureError",
           "ProfileStateError", "ConfigError", "TraceError", "__version__"]
