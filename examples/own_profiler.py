"""Your own torch.profiler loop with moe-trace inside: your schedule, your trace, MoE ranges in it.

moe-trace sees that a profiler is running and opens `moe_trace/<phase>/L<layer>/<part>` ranges, so the
router / experts / shared time of every MoE layer shows up in your `key_averages()` and trace, while
`run.report()` gives the routing counts of the same generates.

    python examples/own_profiler.py [/path/to/checkpoint]
"""
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import moe_trace
from moe_trace.models import build_tiny_model, example_inputs, load_checkpoint

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
inputs = example_inputs(model, batch=2, prompt_len=8)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
out_dir = Path(tempfile.mkdtemp(prefix="own_profiler_"))

# moe-trace decides at `with moe_trace.profile(...)` whether to open ranges: the profiler must be
# recording by then (a schedule whose first step is wait/warmup is not yet recording).
with profile(activities=activities) as prof:
    with moe_trace.profile(model, mode="stats") as run, torch.no_grad():
        for _ in range(3):                       # one profiler step per generate
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            prof.step()
prof.export_chrome_trace(str(out_dir / "trace.json"))

moe_rows = [e for e in prof.key_averages() if e.key.startswith("moe_trace/")]
print(f"{len(moe_rows)} moe_trace ranges in your profiler, e.g.:")
for e in sorted((e for e in moe_rows if "#" not in e.key), key=lambda e: -e.cpu_time_total)[:5]:
    print(f"  {e.key:<32} calls {e.count:>4}  cpu {e.cpu_time_total / 1e3:8.3f} ms")
print(run.report())
print(f"your trace: {out_dir / 'trace.json'}")
