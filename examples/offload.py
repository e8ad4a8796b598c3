"""A model split by an accelerate device map, part of it offloaded (weights loaded per forward).

On a GPU box: `device_map="auto"` puts what fits on the GPUs and offloads the rest. With no GPU this
example offloads the last decoder layers to disk, so accelerate's hooks stream their weights in on
every forward; moe-trace counts those layers like any other.

    python examples/offload.py [/path/to/checkpoint]
"""
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

import moe_trace
from moe_trace.models import example_inputs, save_tiny_checkpoint

path = sys.argv[1] if len(sys.argv) > 1 else str(save_tiny_checkpoint("olmoe", tempfile.mkdtemp(prefix="tiny_")))
if torch.cuda.is_available():
    device_map = "auto"
else:
    n = AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("cpu" if i < n - 1 else "disk") for i in range(n)}}
model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map,
                                             offload_folder=tempfile.mkdtemp(prefix="offload_")).eval()
print("placement:", sorted(set(model.hf_device_map.values()), key=str))

inputs = example_inputs(model, batch=2, prompt_len=8)
with moe_trace.profile(model, mode="stats") as run, torch.no_grad():
    model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(run.report())
