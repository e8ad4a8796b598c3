"""Quickstart: profile generate() of an MoE model and print the report.

    python examples/quickstart.py                    # a tiny random-weight OLMoE on the CPU (no download)
    python examples/quickstart.py /path/to/checkpoint
"""
import sys

import torch

import moe_trace
from moe_trace.models import build_tiny_model, example_inputs, load_checkpoint

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
inputs = example_inputs(model, batch=2, prompt_len=8)     # or tokenizer(prompts, return_tensors="pt")

print(moe_trace.detect(model))                            # the MoE layers found, with their sizes
with moe_trace.profile(model, mode="timing") as run, torch.no_grad():
    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
report = run.report()
print(report)                                             # counts, k, balance, FLOPs, ms per phase
report.to_json("report.json")
print("wrote report.json")
