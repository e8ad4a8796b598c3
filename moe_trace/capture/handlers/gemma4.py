"""Gemma 4 (and diffusion_gemma): router and experts are children of the decoder layer itself (no
block module); the router's first output is softmax probabilities, and the layer's dense `mlp`
runs in parallel with the experts (reported as the shared part)."""
from __future__ import annotations

from .. import sizes
from .generic import GenericHandler


class DecoderLayerMoEHandler(GenericHandler):
    name = "gemma4"
    router_outputs_probs = True

    def match(self, name, module, model):
        binding = super().match(name, module, model)
        if binding is None or binding.router is None or "gemma" not in type(binding.router).__name__.lower():
            return None
        mlp = getattr(module, "mlp", None)
        if mlp is not None and mlp is not binding.router and mlp not in binding.experts:
            dims = sizes.mlp_dims(mlp, binding.info.hidden_size)
            if dims:
                binding.shared = [mlp]
                binding.info.shared = [f"{name}.mlp"]
                binding.info.shared_expert_dim, binding.info.shared_gated = dims
                binding.info.sources["shared_expert_dim"] = "module (parallel dense mlp)"
        return binding
