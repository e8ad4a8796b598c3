"""Kineto mode vs plain torch.profiler + tensorboard_trace_handler: time until the trace is on disk.

Interleaved A/B on the same model and generate (greedy, fixed new tokens), after one warm-up of each
variant; medians of --reps. Per repetition:

* ``kineto``: ``with moe_trace.profile(model, mode="kineto", logdir=...) as run: generate`` then
  ``run.trace_files`` (which waits for a background writer). ``total`` = entering the ``with`` block
  until the trace is on disk; ``block`` = until the ``with`` block returned; ``after_stop`` = from
  the profiler stopping until the block returned (``run.export_timings``, when the build records it).
* ``tb_handler``: ``with torch.profiler.profile(activities, on_trace_ready=tensorboard_trace_handler(dir))``
  around the same generate, its default (uncompressed JSON) export; ``total`` = entering the block
  until it returned (the handler writes the trace inside ``__exit__``).

Each variant also reports process CPU time (all threads) and the split `enter` (entering the block
until the generate starts), `generate` (the generate itself, synced) and `stop_to_disk` (the generate's
end until the trace is on disk: the profiler's stop, its save and, for kineto, moe-trace's writer).
``--threads N`` sets torch's intra-op threads (1 on a shared CPU box).

``after_stop_peak_mb`` = the same from the profiler's stop on (kineto: from the block's return, ~10 ms
after; plain: inside its on_trace_ready), i.e. what the export itself adds beyond torch's own stop,
which both variants pay. ``export_peak_mb`` = the peak RSS from the end of the generate until the trace is on disk (the
kernel's high-water mark, reset when the generate returns, so C++ holding the GIL hides nothing; plus
the export worker processes' peaks) minus RSS when the generate returned; compared with the size of
the raw trace (tb_handler's file, uncompressed Kineto JSON). Bytes per generated token for each file.
(Figures before 2026-12-02 03:10 sampled RSS from a Python thread, which cannot run while torch's
profiler stop or Kineto's save holds the GIL: they miss those phases' peaks.)

    python benchmarks/kineto_speed.py --tiny --layers 8 --new 48 --reps 5 --threads 1   # the CPU box case
    python benchmarks/kineto_speed.py --cases olmoe64,qwen3 --reps 5               # H200
    python benchmarks/kineto_speed.py --cases olmoe512 --reps 5                    # H200
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402

CASES = {  # the H200 cases (random weights, bf16, greedy)
    "olmoe64": dict(model="olmoe-1b-7b", batch=1, prompt=128, new=64),
    "olmoe512": dict(model="olmoe-1b-7b", batch=1, prompt=128, new=512),
    "qwen3": dict(model="qwen3-30b-a3b", batch=4, prompt=256, new=32),
}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_of(pid) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _cmdline(pid) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def rss() -> int:
    """RSS of this process plus its child processes (the export's worker processes count too). A child
    that has not exec'd yet (its command line is still ours) shares our pages: it is not counted again."""
    total = _rss_of("self")
    me = _cmdline("self")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return total
    kids = set()
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/children") as f:
                kids.update(f.read().split())
        except OSError:
            pass
    return total + sum(_rss_of(k) for k in kids if _cmdline(k) != me)


def _status_kb(pid, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakRSS:
    """Peak RSS of this process between start() and stop(), in bytes over the RSS at start().

    The kernel's own high-water mark (VmHWM, reset at start() through /proc/self/clear_refs), so the
    peak is exact even while C++ code (torch's profiler stop, Kineto's JSON save) holds the GIL and no
    Python thread can sample. Without clear_refs (not Linux, no permission) it falls back to sampling
    RSS in a thread. Child processes' peaks come from `TreeRSS` (a separate process: a sampling thread
    here took ~a quarter of the GIL from the export it measures, walking the threads of a CUDA process
    every 2 ms)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._t = None
        self._hwm = False

    def start(self):
        self.base = self.peak = _rss_of("self")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm = _status_kb("self", "VmHWM:") > 0
        except OSError:
            self._hwm = False
        self._stop.clear()
        self._t = None
        if not self._hwm:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()

    def _sample(self):
        self.peak = max(self.peak, _rss_of("self"))

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> int:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self._sample()
        own = _status_kb("self", "VmHWM:") if self._hwm else self.peak
        return max(own, self.peak) - self.base


_TREE_SAMPLER = r"""
import os, sys, select
root = int(sys.argv[1])
me = os.getpid()
def tree(pid):
    out = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [q for k in open(f"/proc/{pid}/task/{t}/children").read().split()
                        for q in tree(int(k)) if int(k) != me]
            except OSError:
                pass
    except OSError:
        pass
    return out
def rss(pid):
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
def hwm(pid):  # a child's own peak (kB in /proc/<pid>/status)
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
own = cmdline(root)
kids = {}  # each exec'd descendant's peak (a fork that has not exec'd shares the parent's pages)
def sample():
    pids = [q for q in tree(root)[1:] if q in kids or cmdline(q) != own]
    for q in pids:
        kids[q] = max(kids.get(q, 0), hwm(q))
    return rss(root) + sum(rss(q) for q in pids)
sys.stdin.readline()  # "mark": the window starts
kids.update((q, 0) for q in tree(root)[1:] if cmdline(q) != own)
first = sample()
kids = {q: 0 for q in kids}  # peaks from the mark on: a child that lives on keeps its own earlier peak
peak = first
while not select.select([sys.stdin], [], [], 0.003)[0]:
    peak = max(peak, sample())
peak = max(peak, sample())
print(peak - first, sum(kids.values()), flush=True)
"""


class TreeRSS:
    """The concurrent peak of the RSS summed over this process and all its descendants (the export's
    worker / follower processes), over the sum at start(): sampled every ~3 ms by a separate process,
    so also while torch's stop or Kineto's save holds this process's GIL. `PeakRSS` adds each
    process's own peak instead (an upper bound: those peaks need not coincide)."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", _TREE_SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)

    def mark(self):
        """The window starts (a line down a pipe: microseconds)."""
        self.p.stdin.write("mark\n")

    def stop(self) -> tuple[int, int]:
        """(the tree's concurrent peak over the sum at the mark, the sum of the children's own peaks)."""
        out, _ = self.p.communicate("x", timeout=30)
        try:
            tree, kids = map(int, out.split())
            return tree, kids
        except ValueError:
            return 0, 0


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def uncompressed_size(path: Path) -> int:
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    with gzip.open(path, "rb") as f:
        return sum(len(c) for c in iter(lambda: f.read(1 << 20), b""))


def run_kineto(model, inputs, gen, device, tmp: Path) -> dict:
    logdir = tmp / "kineto"
    shutil.rmtree(logdir, ignore_errors=True)
    mem = PeakRSS()
    tree = TreeRSS()
    gc.collect()
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    with moe_trace.profile(model, mode="kineto", logdir=logdir) as run:
        t_in = time.perf_counter()
        out = model.generate(**inputs, **gen)
        sync(device)
        t_gen = time.perf_counter()
        tree.mark()
        mem.start()
    t_block = time.perf_counter()
    peak = mem.stop()  # generate end -> profiler stopped (torch's own stop, as in plain's __exit__)
    mem2 = PeakRSS()
    mem2.start()       # the block returned ~10 ms after the profiler stopped: moe-trace's export from here
    files = run.trace_files  # waits for the writer
    t_disk = time.perf_counter()
    cpu = time.process_time() - c0
    after = mem2.stop()
    tree_peak, kids = tree.stop()
    peak = max(peak, after + mem2.base - mem.base) + kids  # an upper bound: the peaks need not coincide
    after += kids
    timings = getattr(run, "export_timings", None) or {}
    stopped = timings.get("profiler_stopped")
    phases = {}
    if stopped:  # the generate's end -> profiler stopped -> raw saved -> moe-trace file written
        phases = {"stop": stopped - t_gen, "save": timings.get("saved", stopped) - stopped,
                  "tail": timings.get("written", t_disk) - timings.get("saved", stopped),
                  # the tail's parts: the follower's lag after the save, reading its answers, the selection,
                  # pass 2, the write (gzip); each from the mark before it
                  **_parts(timings, ("saved", "follower_done", "pass1_followed", "pass1", "selected", "resolved",
                                     "written")),
                  "raw_mb": timings.get("raw_bytes", 0) / 1e6,
                  # CPU seconds of the writer thread in the tail: well below the tail, it waited (GIL, I/O)
                  **({"tail_cpu": timings["tail_thread_cpu"]} if "tail_thread_cpu" in timings else {})}
    f = files[0]
    return {"total": t_disk - t0, "block": t_block - t0, "cpu": cpu, "enter": t_in - t0, "generate": t_gen - t_in,
            "stop_to_disk": t_disk - t_gen,
            "after_stop": (t_block - stopped) if stopped else None, "tokens": out,
            "export_peak_mb": peak / 2 ** 20, "after_stop_peak_mb": after / 2 ** 20, "file_bytes": f.stat().st_size,
            "tree_peak_mb": tree_peak / 2 ** 20, "file_bytes_json": uncompressed_size(f), "timings": timings,
            "phases": phases}


def _parts(timings: dict, order: tuple) -> dict:
    """{"saved>follower_done": s, ...}: the time between consecutive marks the run recorded."""
    got = [k for k in order if isinstance(timings.get(k), float)]
    return {f"{a}>{b}": timings[b] - timings[a] for a, b in zip(got, got[1:])}


def run_tb_handler(model, inputs, gen, device, tmp: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    logdir = tmp / "tb"
    shutil.rmtree(logdir, ignore_errors=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    mem = PeakRSS()
    gc.collect()
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    handler = tensorboard_trace_handler(str(logdir))
    tree = TreeRSS()
    in_handler = {}

    def on_ready(prof):  # called after the profiler stopped: the export's own peak from here
        in_handler["stopped"] = time.perf_counter()
        in_handler["peak"] = PeakRSS()
        in_handler["peak"].start()
        handler(prof)
        in_handler["after"] = in_handler["peak"].stop()
        in_handler["saved"] = time.perf_counter()

    with profile(activities=acts, on_trace_ready=on_ready):
        t_in = time.perf_counter()
        out = model.generate(**inputs, **gen)
        sync(device)
        t_gen = time.perf_counter()
        tree.mark()
        mem.start()
    t_disk = time.perf_counter()
    cpu = time.process_time() - c0
    peak = mem.stop()
    tree_peak, kids = tree.stop()
    peak += kids
    f = next(logdir.glob("*.pt.trace.json*"))
    return {"total": t_disk - t0, "block": t_disk - t0, "cpu": cpu, "enter": t_in - t0, "generate": t_gen - t_in,
            "stop_to_disk": t_disk - t_gen, "after_stop": None, "tokens": out,
            "export_peak_mb": peak / 2 ** 20, "after_stop_peak_mb": in_handler.get("after", 0) / 2 ** 20,
            "tree_peak_mb": tree_peak / 2 ** 20, "file_bytes": f.stat().st_size,
            "file_bytes_json": uncompressed_size(f),
            "phases": {"stop": in_handler["stopped"] - t_gen, "save": in_handler["saved"] - in_handler["stopped"],
                       "tail": t_disk - in_handler["saved"]}}


def _with_env(name: str, value: str):
    """run_kineto with the environment variable `name` = value (MOE_TRACE_EXPORT_WORKERS: trace/workers.py;
    MOE_TRACE_RECORD_GATE: capture/ranges.py)."""
    def run(model, inputs, gen, device, tmp: Path) -> dict:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return run_kineto(model, inputs, gen, device, tmp)
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def _spare_workers() -> str:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return str(max(2, min(8, cpus - 1)))


#: kineto: moe-trace's default (export worker processes only where they fit, trace/workers.py; host ops
#: recorded only inside MoE ranges, capture/ranges.py RecordGate); kineto_serial: the export's passes in this
#: process only; kineto_workers: up to 8 worker processes whatever the raw size; kineto_ungated: every host op
#: recorded (MOE_TRACE_RECORD_GATE=0, as before the gate); tb_handler: plain torch.profiler +
#: tensorboard_trace_handler
VARIANTS = {"kineto": run_kineto, "tb_handler": run_tb_handler,
            "kineto_serial": _with_env("MOE_TRACE_EXPORT_WORKERS", "0"),
            "kineto_workers": _with_env("MOE_TRACE_EXPORT_WORKERS", _spare_workers()),
            "kineto_ungated": _with_env("MOE_TRACE_RECORD_GATE", "0")}


def build(name, layers, device, tiny):
    if tiny:
        from moe_trace.models import build_tiny_model

        return build_tiny_model("olmoe", device=device, num_hidden_layers=layers or 8).eval()
    from moe_trace.models.reference import build_reference_model

    return build_reference_model(name, num_hidden_layers=layers, dtype=torch.bfloat16, device=device).eval()


def profiled_tail(model, inputs, gen, device, tmp: Path, top: int) -> str:
    """One more kineto run (not timed) with cProfile in the writer thread around the tail's two calls
    (taking the follower's answers, writing the trace): the table of its `top` functions by own time."""
    import cProfile
    import io
    import pstats

    from moe_trace.trace import workers, writer

    prof = cProfile.Profile()  # enabled in the writer thread only (a profiler is per thread)

    def profiled(fn):
        def call(*a, **k):
            prof.enable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable()
        return call

    finish, write = workers.Follower.finish, writer.write_run_traces
    workers.Follower.finish, writer.write_run_traces = profiled(finish), profiled(write)
    try:
        run_kineto(model, inputs, gen, device, tmp)
    finally:
        workers.Follower.finish, writer.write_run_traces = finish, write
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def bench_case(label, model_name, batch, prompt, new, reps, device, tiny, layers,
               names=("kineto", "tb_handler"), warmup=True, profile_top: int = 0) -> dict:
    torch.manual_seed(0)
    model = build(model_name, layers, device, tiny)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    tmp = Path(tempfile.mkdtemp(prefix="moe_kspeed_"))
    variants = {k: VARIANTS[k] for k in names}
    res: dict[str, list[dict]] = {v: [] for v in variants}
    names = list(variants)
    try:
        with torch.no_grad():
            for v in names if warmup else ():  # warm-up
                variants[v](model, inputs, gen, device, tmp)
            for rep in range(reps):
                order = names[rep % len(names):] + names[:rep % len(names)]  # rotating order
                if rep % 2:
                    order = order[::-1]
                for v in order:
                    r = variants[v](model, inputs, gen, device, tmp)
                    res[v].append(r)
                    print(f"[{label}] rep {rep} {v:<10} total {r['total']:7.3f} s  cpu {r['cpu']:7.3f} s  "
                          f"block {r['block']:7.3f} s  "
                          f"export peak {r['export_peak_mb']:7.1f} MB  file {r['file_bytes'] / 1e6:7.2f} MB  "
                          f"enter {r['enter']:.3f} gen {r['generate']:.3f} "
                          + " ".join(f"{k} {x:.3f}" for k, x in r.get("phases", {}).items()),
                          flush=True)
            if profile_top:
                print(f"[{label}] the tail of one more kineto run under cProfile (writer thread):\n"
                      + profiled_tail(model, inputs, gen, device, tmp, profile_top), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    tok = batch * new
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("total", "cpu", "block", "enter", "generate", "stop_to_disk", "export_peak_mb",
                                                               "after_stop_peak_mb",
                                                               "tree_peak_mb", "file_bytes", "file_bytes_json")}
           for v, rs in res.items()}
    after = [r["after_stop"] for r in res["kineto"] if r["after_stop"] is not None]
    same = all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(res["kineto"], res["tb_handler"]))
    # without torch.use_deterministic_algorithms a batched bf16 MoE generate on a GPU may differ run to
    # run (atomics in index_add_ / scatter); whether each variant agrees with itself tells that apart
    # from moe-trace changing the computation (benchmarks/capture_checks.py checks it deterministically)
    same_within = {v: all(torch.equal(rs[0]["tokens"], r["tokens"]) for r in rs) for v, rs in res.items()}
    raw_mb = med["tb_handler"]["file_bytes_json"] / 2 ** 20
    summary = {
        "case": label, "model": "tiny-olmoe" if tiny else model_name, "layers": layers, "batch": batch,
        "prompt": prompt, "new": new, "reps": reps, "device": torch.cuda.get_device_name() if
        device.startswith("cuda") else "cpu",
        "median": med, "ratio_total": med["kineto"]["total"] / med["tb_handler"]["total"],
        "ratio_cpu": med["kineto"]["cpu"] / med["tb_handler"]["cpu"],
        "ratio_over_tb_handler": {v: med[v]["total"] / med["tb_handler"]["total"] for v in med},
        **({"ratio_workers_over_serial": med["kineto_workers"]["total"] / med["kineto_serial"]["total"]}
           if "kineto_serial" in med and "kineto_workers" in med else {}),
        "ratios_per_rep": [k["total"] / t["total"] for k, t in zip(res["kineto"], res["tb_handler"])],
        "median_of_paired_ratios": statistics.median(k["total"] / t["total"] for k, t in zip(res["kineto"], res["tb_handler"])),
        "phases_median": {v: {k: statistics.median(r["phases"][k] for r in rs if k in r.get("phases", {}))
                              for k in dict.fromkeys(k for r in rs for k in r.get("phases", {}))}
                          for v, rs in res.items()},
        "per_rep": {v: [{k: r[k] for k in ("total", "enter", "generate", "stop_to_disk", "tree_peak_mb")} | r.get("phases", {})
                        for r in rs] for v, rs in res.items()},
        "threads": torch.get_num_threads(),
        "after_stop_max_s": max(after) if after else None,
        "raw_trace_mb": raw_mb,
        "export_peak_over_raw": med["kineto"]["export_peak_mb"] / raw_mb if raw_mb else None,
        "after_stop_peak_over_raw": med["kineto"]["after_stop_peak_mb"] / raw_mb if raw_mb else None,
        "tree_peak_over_raw": {v: med[v]["tree_peak_mb"] / raw_mb for v in med} if raw_mb else None,
        "bytes_per_token": {"kineto_file": med["kineto"]["file_bytes"] / tok,
                            "kineto_json": med["kineto"]["file_bytes_json"] / tok,
                            "tb_handler_json": med["tb_handler"]["file_bytes_json"] / tok},
        "slim_over_plain_bytes": med["kineto"]["file_bytes"] / med["tb_handler"]["file_bytes"],
        "same_tokens": same,
        "same_tokens_within_variant": same_within,
        "kineto_timings_last": res["kineto"][-1].get("timings"),
    }
    print(f"\n## {label}: {summary['model']} batch {batch} prompt {prompt} new {new}, reps {reps}, {summary['device']}")
    print("| variant | total s (median) | process CPU s | enter s | generate s | stop to disk s | block s | "
          "export peak MB | after-stop peak MB | tree peak MB | file MB | json MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in names:
        m = med[v]
        print(f"| {v} | {m['total']:.3f} | {m['cpu']:.3f} | {m['enter']:.3f} | {m['generate']:.3f} | "
              f"{m['stop_to_disk']:.3f} | {m['block']:.3f} | {m['export_peak_mb']:.1f} | {m['after_stop_peak_mb']:.1f} | "
              f"{m['tree_peak_mb']:.1f} | {m['file_bytes'] / 1e6:.2f} | {m['file_bytes_json'] / 1e6:.2f} |")
    print(f"kineto / tb_handler total: x{summary['ratio_total']:.3f} (process CPU x{summary['ratio_cpu']:.3f}, "
          f"per rep {', '.join(f'{x:.2f}' for x in summary['ratios_per_rep'])}); block after profiler stop (max): "
          f"{summary['after_stop_max_s']}; export peak / raw trace: {summary['export_peak_over_raw']} (after the "
          f"profiler stopped: {summary['after_stop_peak_over_raw']}; concurrent peak of the process tree / raw: "
          f"{summary['tree_peak_over_raw']}); "
          f"slim file / plain file: {summary['slim_over_plain_bytes']:.3f}; same tokens: {same} "
          f"(each variant with itself: {same_within})", flush=True)
    print("phases (median s): " + "; ".join(f"{v} " + ", ".join(f"{k} {x:.3f}" for k, x in ph.items())
                                              for v, ph in summary["phases_median"].items()), flush=True)
    print("total / tb_handler total: " + ", ".join(f"{v} x{r:.3f}" for v, r in summary["ratio_over_tb_handler"].items())
          + (f"; kineto_workers / kineto_serial: x{summary['ratio_workers_over_serial']:.3f}"
             if "ratio_workers_over_serial" in summary else ""), flush=True)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)} (GPU); default: one case "
                    "from --model/--batch/--prompt/--new")
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--tiny", action="store_true", help="the tiny random OLMoE (CPU box case)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="append one JSON line per case here")
    ap.add_argument("--variants", default="kineto,tb_handler",
                    help=f"comma list of {', '.join(VARIANTS)} (must hold kineto and tb_handler)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up round (long cases only)")
    ap.add_argument("--profile-tail", type=int, default=0, metavar="N",
                    help="after the repetitions, one more kineto run with cProfile in the writer thread: its N "
                         "functions of most own time")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 on a shared CPU box: a busy core stalls every 2-thread op)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    todo = [(c, CASES[c]) for c in args.cases.split(",")] if args.cases else \
        [("custom", dict(model=args.model, batch=args.batch, prompt=args.prompt, new=args.new))]
    for label, c in todo:
        s = bench_case(label, c["model"], c["batch"], c["prompt"], c["new"], args.reps, device, args.tiny, args.layers,
                       names=tuple(args.variants.split(",")), warmup=not args.no_warmup,
                       profile_top=args.profile_tail)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(s, default=str) + "\n")


if __name__ == "__main__":
    main()
