"""moe-trace: make Mixture-of-Experts inference visible.

    with moe_trace.profile(model) as run:
        model.generate(**inputs, max_new_tokens=64)
    print(run.report())

Importing the package is cheap: torch and transformers load on first use of the capture API, so
`moe_trace.analyze` and the TensorBoard plugin start fast.
"""
from .analysis import LayerInfo, Report, RunData
from .errors import (ConfigError, MoeTraceError, NoMoELayersError, ProfileStateError, TraceError,
                     UnknownArchitectureError, UnsupportedTransformersError)

__version__ = "0.1.0"

_CAPTURE = {"profile", "detect", "register_handler", "unregister_handler", "MoEHandler", "ProfileRun"}


def __getattr__(name):
    if name in _CAPTURE:
        from . import capture

        return getattr(capture, name)
    raise AttributeError(f"module 'moe_trace' has no attribute {name!r}")


def analyze(path, *, progress: bool | None = None, ep_size: int | None = None, run: str | None = None,
            all_runs: bool = False):
    """Rebuild the `Report` of a run from its trace file(s): a `.pt.trace.json[.gz]` or a directory.
    A directory with several runs gives the newest (a warning names the others); `run=ID` picks one,
    `all_runs=True` returns `{run id: Report}`, newest first. `ep_size=N` adds the load per
    expert-parallel rank for N ranks (contiguous placement)."""
    from .trace.reader import analyze as _analyze

    return _analyze(path, progress=progress, ep_size=ep_size, run=run, all_runs=all_runs)


__all__ = ["profile", "detect", "analyze", "register_handler", "unregister_handler", "MoEHandler", "ProfileRun",
           "Report", "RunData", "LayerInfo", "MoeTraceError", "NoMoELayersError", "UnknownArchitectureError",
           "ProfileStateError", "ConfigError", "TraceError", "UnsupportedTransformersError", "__version__"]
