"""The seed-style `MOEProfiler` API (the earlier profiler's calls) on top of moe_trace.profile.

    python examples/seed_profiler.py [/path/to/checkpoint]
"""
import sys

import torch

from moe_trace.compat import MOEProfiler
from moe_trace.experiments import selectors
from moe_trace.models import build_tiny_model, example_inputs, load_checkpoint

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
inputs = example_inputs(model, batch=2, prompt_len=8)

profiler = MOEProfiler(model, selection_fn=selectors.kneedle_selector)   # profiling starts here
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
df = profiler.get_metrics_df()                                            # stops and reads the counters
print(df[["layer", "phase", "tokens", "k_mean", "active_experts", "gini"]].to_string(index=False))
print(profiler.generate_report())
