"""Architecture handlers: one file per family that deviates from the common structure."""
from .base import MoEBinding, MoEHandler, register_handler, registered_handlers, unregister_handler

__all__ = ["MoEBinding", "MoEHandler", "register_handler", "unregister_handler", "registered_handlers"]
