"""Router-logit logging and distribution analysis (KDE models, p-values, plots).

    with moe_trace.profile(model, log_router_logits="routing_logs") as run:
        model.generate(**inputs, max_new_tokens=32)

    from moe_trace.routing import load_logs, run_analysis, AnalysisConfig
    summary = run_analysis("routing_logs", AnalysisConfig(output_dir="routing_analysis"))

See docs/routing.md. scikit-learn, scipy and matplotlib (the `routing` extra) are imported only
by the analysis, never by logging.
"""
from .kde import DEFAULT_KERNELS, DEFAULT_TRIMS, KERNELS, LogitKDE, ModelSet, ks_uniform, trim_logits
from .logfile import LayerRouting, RoutingLog, load_logs
from .logger import RouterLogger
from .pipeline import AnalysisConfig, ByteTokenizer, load_prompts, run_analysis, run_logging

__all__ = ["RouterLogger", "load_logs", "RoutingLog", "LayerRouting", "LogitKDE", "ModelSet", "trim_logits",
           "ks_uniform", "KERNELS", "DEFAULT_KERNELS", "DEFAULT_TRIMS", "AnalysisConfig", "run_analysis",
           "run_logging", "load_prompts", "ByteTokenizer"]
