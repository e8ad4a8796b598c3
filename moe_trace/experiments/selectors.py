"""Moved to `moe_trace.selectors`; this module re-exports it so old imports keep working."""
from moe_trace.selectors import *  # noqa: F401,F403
from moe_trace.selectors import __all__  # noqa: F401
from moe_trace.selectors.core import _kneedle_step, _parse_value, _pos_int  # noqa: F401
