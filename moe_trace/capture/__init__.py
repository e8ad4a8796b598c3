"""Capture: detection, architecture handlers, hooks and on-device counters, the profile session."""
from .detect import detect, find_bindings, format_layers
from .handlers import MoEBinding, MoEHandler, register_handler, unregister_handler
from .observers import Observer, Step
from .options import ProfileOptions
from .session import MODES, ProfileRun, profile, range_name, step_name

__all__ = ["detect", "find_bindings", "format_layers", "MoEBinding", "MoEHandler", "register_handler",
           "unregister_handler", "MODES", "Observer", "ProfileOptions", "ProfileRun", "Step", "profile",
           "range_name", "step_name"]
