"""Registers the built-in handlers, most specific first; the generic one goes last."""
from .aria import GroupedGemmExpertsHandler
from .base import register_handler
from .dbrx import DbrxHandler
from .doge import ProductKeyEmbeddingHandler
from .gemma4 import DecoderLayerMoEHandler
from .generic import GenericHandler
from .jetmoe import JetMoeHandler
from .legacy import LegacyModuleListHandler
from .llama4 import DenseExpertsHandler
from .named_routing import NamedRoutingHandler
from .seq2seq import CapacityRoutedHandler

BUILTIN = [CapacityRoutedHandler, GroupedGemmExpertsHandler, ProductKeyEmbeddingHandler, DecoderLayerMoEHandler, DenseExpertsHandler, DbrxHandler, JetMoeHandler, LegacyModuleListHandler,
           NamedRoutingHandler, GenericHandler]
for _h in BUILTIN:
    register_handler(_h, first=False)
