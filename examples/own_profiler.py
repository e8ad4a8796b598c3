"""Your own torch.profiler loop with moe-trace inside: your schedule, your trace files, MoE data in them.

A real profiling loop: `schedule(wait=1, warmup=1, active=2)`, `tensorboard_trace_handler(dir)` and
`prof.step()` after every generate. `moe_trace.profile(model, profiler=prof)` attaches to your
profiler (it starts none and never calls `prof.step()`): the router / experts / shared ranges of
every MoE layer show up in your `key_averages()` and trace, and the file your handler writes gets
moe-trace's counters and metadata, so `moe_trace.analyze(dir)` (or TensorBoard's MoE tab) reports
exactly the generates your schedule recorded.

    python examples/own_profiler.py [/path/to/checkpoint]
"""
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

import moe_trace
from moe_trace.models import build_tiny_model, example_inputs, load_checkpoint

model = load_checkpoint(sys.argv[1]) if len(sys.argv) > 1 else build_tiny_model("olmoe")
inputs = example_inputs(model, batch=2, prompt_len=8)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
out_dir = Path(tempfile.mkdtemp(prefix="own_profiler_"))

# steps 0 (wait) and 1 (warmup) are not recorded, steps 2 and 3 are; one step per generate
sched = schedule(wait=1, warmup=1, active=2, repeat=1)
with profile(activities=activities, schedule=sched, on_trace_ready=tensorboard_trace_handler(str(out_dir))) as prof:
    # profiler=prof: attach although the schedule is still waiting (the profiler is not recording yet)
    with moe_trace.profile(model, profiler=prof) as run, torch.no_grad():
        for _ in range(4):
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            prof.step()

moe_rows = [e for e in prof.key_averages() if e.key.startswith("moe_trace/")]
print(f"{len(moe_rows)} moe_trace ranges in your profiler, e.g.:")
for e in sorted((e for e in moe_rows if "#" not in e.key), key=lambda e: -e.cpu_time_total)[:5]:
    print(f"  {e.key:<32} calls {e.count:>4}  cpu {e.cpu_time_total / 1e3:8.3f} ms")

recorded = moe_trace.analyze(out_dir)       # what your trace file holds: the 2 recorded generates
print(recorded)
print(f"your trace: {sorted(out_dir.glob('*.pt.trace.json*'))[0]}")
print(f"view it: tensorboard --logdir {out_dir}  (MoE tab)")
print(f"the whole block (all 4 generates): {run.report().to_dict()['phases']['prefill']['forward_calls']} prefill "
      "forwards")
