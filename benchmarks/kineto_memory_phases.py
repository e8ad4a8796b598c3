"""Where a kineto run's host memory goes after the generate, phase by phase (one run, H200).

OLMoE-1B-7B (random bf16 weights), batch 1, prompt 128, N new tokens (default 512) under
`moe_trace.profile(mode="kineto")`; RSS (this process + export workers) sampled every 5 ms and
split at the recorder's marks: torch's profiler stop, the block's return, the raw save, the written
file. A Python sampler cannot run while C++ holds the GIL (Kineto's JSON save): that phase shows no
samples.

    python benchmarks/kineto_memory_phases.py 512
"""
import gc, os, sys, time, threading, tempfile
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
import moe_trace
from moe_trace.models.reference import build_reference_model
from benchmarks.kineto_speed import rss
torch.manual_seed(0)
m = build_reference_model("olmoe-1b-7b", num_hidden_layers=None, dtype=torch.bfloat16, device="cuda").eval()
ids = torch.randint(3, m.config.vocab_size, (1, 128), device="cuda")
inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
torch.set_grad_enabled(False)
m.generate(**inp, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
samples = []
stop = threading.Event()
def sample():
    while not stop.wait(0.005):
        samples.append((time.perf_counter(), rss()))
new = int(sys.argv[1]) if len(sys.argv) > 1 else 512
tmp = Path(tempfile.mkdtemp())
gc.collect(); torch.cuda.synchronize()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
with moe_trace.profile(m, mode="kineto", logdir=tmp) as run:
    m.generate(**inp, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0); torch.cuda.synchronize()
    tg = time.perf_counter()
tb = time.perf_counter(); files = run.trace_files; td = time.perf_counter(); stop.set()
tm = run.export_timings
marks = [("start", t0), ("generate end", tg), ("profiler stopped", tm["profiler_stopped"]), ("block end", tb),
         ("raw saved", tm["saved"]), ("written", tm["written"]), ("on disk", td)]
base = max(r for t, r in samples if t <= tg)
print(f"new {new}: RSS at generate end {base/2**20:.0f} MB; raw save done at +{tm['saved']-tg:.1f} s, written +{tm['written']-tg:.1f} s")
for (a, ta), (b, tb_) in zip(marks, marks[1:]):
    seg = [r for t, r in samples if ta <= t <= tb_]
    if seg:
        print(f"  {a} -> {b} ({tb_-ta:.1f} s): peak {max(seg)/2**20:.0f} MB (+{(max(seg)-base)/2**20:.0f} over generate end)")
print("raw size MB:", [p.stat().st_size/2**20 for p in tmp.glob("*")], flush=True)
