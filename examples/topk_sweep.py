"""A top-k sweep: latency and routing of generate() for k = 1, 2, 4 (what `moe-trace sweep top-k` does).

    python examples/topk_sweep.py [/path/to/checkpoint]
"""
import sys
import tempfile

from moe_trace.experiments.sweep import run_sweep
from moe_trace.models import build_tiny_model, load_checkpoint

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
out = tempfile.mkdtemp(prefix="sweep_")
result = run_sweep(model, "top-k", [1, 2, 4], repeats=2, warmup=1, max_new_tokens=4, out_dir=out,
                   plots=False, progress=False)
cols = ["value", "n", "prefill_ms_mean", "decode_ms_mean", "k_mean_mean"]
print(result.to_dataframe()[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
print("wrote", *result.paths.values())
