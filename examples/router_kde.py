"""Router-logit logging and a kernel density model of one layer's logits, with p-values of new tokens.

    python examples/router_kde.py [/path/to/checkpoint]      # needs the `routing` extra (scikit-learn, scipy)
"""
import sys
import tempfile

import torch

import moe_trace
from moe_trace.models import build_tiny_model, example_inputs, load_checkpoint
from moe_trace.routing import load_logs
from moe_trace.routing.kde import LogitKDE, kth_best_pvalues

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
logs = tempfile.mkdtemp(prefix="routing_logs_")
with moe_trace.profile(model, log_router_logits=logs) as run, torch.no_grad():
    model.generate(**example_inputs(model, batch=4, prompt_len=16), max_new_tokens=8, min_new_tokens=8,
                   do_sample=False)

log = load_logs(logs)
logits = log.layers[0].logits                            # [tokens, experts] of the first MoE layer
print(f"layer 0: {logits.shape[0]} tokens x {logits.shape[1]} experts logged")
half = logits.shape[0] // 2
kde = LogitKDE.fit(logits[:half].reshape(-1), "gaussian", "scott", layer=0)   # fit on the first half
p = kth_best_pvalues(kde, logits[half:], k_max=2)                            # score the second half
print(kde)
print(f"p-value of the best / 2nd-best logit, median over {p.shape[0]} held-out tokens: "
      f"{float(torch.tensor(p[:, 0]).median()):.4f} / {float(torch.tensor(p[:, 1]).median()):.4f}")
