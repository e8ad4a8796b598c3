"""Trace parse benchmark: throughput (MB/s of uncompressed JSON) and peak RSS of `read_trace`.

Generates a large synthetic Kineto-like trace with the event mix measured on an OLMoE-1B-7B run
(docs: /work/shared/research/measured-facts.md: cpu_op 245k, ac2g flows 164k, cuda_runtime 81k,
kernel 73k, user_annotation 2k, gpu_user_annotation 2k per 576k events), written in the exact
text layout torch 2.13's `export_chrome_trace` uses (one key per line). From it the benchmark
writes the moe-trace files (`write_trace`, full and slim), then times `read_trace` on each in a
fresh subprocess and reads its peak RSS with `resource.getrusage`. HTA's loader is timed the same
way when `hta` is importable (`--hta-python` picks an interpreter that has it).

    python benchmarks/trace_parse_bench.py --mb 200 [--workdir DIR] [--keep] [--hta-python PY]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST_PID = 41234
GPU_STREAM = 7


class _Writer:
    """Writes events in torch 2.13's Chrome-trace text layout."""

    def __init__(self, fh):
        self.fh = fh
        self.first = True
        self.counts: dict[str, int] = {}

    def _emit(self, text: str, kind: str) -> None:
        self.fh.write(text if self.first else ",\n" + text)
        self.first = False
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def x(self, cat, name, pid, tid, ts_ns, dur_ns, args: str) -> None:
        self._emit(
            '  {\n    "ph": "X",\n    "cat": "%s",\n    "name": "%s",\n    "pid": %s,\n    "tid": %s,\n'
            '    "ts": %s,\n    "dur": %s\n    ,\n    "args": {\n      %s\n    }\n  }'
            % (cat, name, pid, tid, _us(ts_ns), _us(dur_ns), args), cat)

    def flow(self, ph, fid, pid, tid, ts_ns) -> None:
        tail = ',\n    "bp": "e"' if ph == "f" else ""
        self._emit('  {\n    "ph": "%s",\n    "id": %d,\n    "pid": %s,\n    "tid": %s,\n    "ts": %s,\n'
                   '    "cat": "ac2g",\n    "name": "ac2g"%s\n  }' % (ph, fid, pid, tid, _us(ts_ns), tail), "flow")

    def meta(self, name, pid, tid, key, value) -> None:
        v = json.dumps(value)
        self._emit('  {\n    "ph": "M",\n    "name": "%s",\n    "ts": 0.000,\n    "pid": %s,\n    "tid": %s,\n'
                   '    "args": {\n      "%s": %s\n    }\n  }' % (name, pid, tid, key, v), "M")


def _us(ns: int) -> str:
    return "%d.%03d" % divmod(ns, 1000)


def generate_raw_trace(path: str | Path, target_mb: float, *, layers: int = 16, num_experts: int = 64,
                       top_k: int = 8, seed: int = 0) -> dict:
    """Write a Kineto-layout raw trace of about `target_mb` MB. Returns the info to build RunData.

    Every step: ProfilerStep#s > moe_trace/{phase}#s > per layer: attention ops, then the
    `moe_trace/{phase}/L{i:03d}/router` and `.../experts` ranges. Each "op group" is
    aten::linear > aten::mm > cudaLaunchKernel plus aten::view (3 cpu_op, 1 cuda_runtime), one
    kernel on GPU 0 and an ac2g flow pair, like the measured mix.
    """
    rng = random.Random(seed)
    target = int(target_mb * 1e6)
    path = Path(path)
    steps: list[dict] = []
    ext = [0]
    corr = [0]
    with open(path, "w") as fh:
        fh.write('{\n  "schemaVersion": 1,\n  "deviceProperties": [\n    {\n      "id": 0, "name": "NVIDIA H100 80GB HBM3", '
                 '"totalGlobalMem": 85029158912,\n      "computeMajor": 9, "computeMinor": 0,\n      "numSms": 132\n    }\n  ],\n'
                 '  "displayTimeUnit": "ms",\n  "baseTimeNanoseconds": 1790857026000000000,\n  "traceEvents": [\n')
        w = _Writer(fh)
        w.meta("process_name", HOST_PID, 0, "name", "python")
        w.meta("process_labels", HOST_PID, 0, "labels", "CPU")
        w.meta("process_sort_index", HOST_PID, 0, "sort_index", HOST_PID)
        w.meta("thread_name", HOST_PID, HOST_PID, "name", f"thread {HOST_PID} (python)")
        w.meta("process_name", 0, 0, "name", "python")
        w.meta("process_labels", 0, 0, "labels", "GPU 0")
        w.meta("process_sort_index", 0, 0, "sort_index", 5000000)
        w.meta("thread_name", 0, GPU_STREAM, "name", f"stream {GPU_STREAM}")
        cpu_t = 4_532_332_491_477_032  # ns since baseTimeNanoseconds, like Kineto
        gpu_t = cpu_t
        s = 0
        tokens_prompt = 128

        def group(name: str, kernel: str, cpu_start: int) -> tuple[int, int, int]:
            """One op group; returns (cpu_end, kernel_start, kernel_end)."""
            nonlocal gpu_t
            ext[0] += 1
            corr[0] += 1
            e, c = ext[0], corr[0]
            lin_dur = 60_000
            dims = '"Input Dims": [[1, 2048], [2048, 1024], []], "Input type": ["c10::BFloat16", "c10::BFloat16", ""], ' \
                   '"Input Strides": [[2048, 1], [1, 2048], []], "Concrete Inputs": ["", "", ""]'
            w.x("cpu_op", name, HOST_PID, HOST_PID, cpu_start, lin_dur,
                f'"External id": {e},"Record function id": 0, "Sequence number": {e}, "Fwd thread id": 0, '
                f'"Ev Idx": {e}, {dims}')
            w.x("cpu_op", "aten::mm", HOST_PID, HOST_PID, cpu_start + 5_000, 45_000,
                f'"External id": {e + 1},"Record function id": 0, "Ev Idx": {e + 1}, {dims}')
            launch = cpu_start + 20_000
            w.x("cuda_runtime", "cudaLaunchKernel", HOST_PID, HOST_PID, launch, 8_000,
                f'"External id": {e + 1},  "cbid": 211, "correlation": {c}')
            k_start = max(gpu_t + 1_500, launch + 6_000)
            k_dur = rng.randint(8_000, 40_000)
            w.x("kernel", kernel, 0, GPU_STREAM, k_start, k_dur,
                f'"External id": {e + 1},  "queued": 0, "device": 0, "context": 1,  "stream": {GPU_STREAM}, '
                f'"correlation": {c}, "registers per thread": 128, "shared memory": 49152, '
                f'"blocks per SM": 1.939394, "warps per SM": 7.757576, "grid": [256, 1, 1], "block": [128, 1, 1], '
                f'"est. achieved occupancy %": 12')
            w.flow("s", c, HOST_PID, HOST_PID, launch)
            w.flow("f", c, 0, GPU_STREAM, k_start)
            w.x("cpu_op", "aten::view", HOST_PID, HOST_PID, cpu_start + lin_dur + 2_000, 3_000,
                f'"External id": {e + 2},"Record function id": 0, "Ev Idx": {e + 2}')
            ext[0] += 2
            gpu_t = k_start + k_dur
            return cpu_start + lin_dur + 6_000, k_start, k_start + k_dur

        def ranged(label: str, n: int, kernel: str, cpu_start: int) -> int:
            ext[0] += 1
            e = ext[0]
            t = cpu_start + 2_000
            k0 = k1 = None
            for _ in range(n):
                t, ks, ke = group("aten::linear", kernel, t)
                k0 = ks if k0 is None else k0
                k1 = ke
            t += 2_000
            w.x("user_annotation", label, HOST_PID, HOST_PID, cpu_start, t - cpu_start,
                f'"External id": {e},"Record function id": 0, "Ev Idx": {e}')
            w.x("gpu_user_annotation", label, 0, GPU_STREAM, k0 - 1, k1 - k0 + 2,
                f'"External id": {e}')
            return t + 1_000

        while fh.tell() < target:
            phase = "prefill" if s == 0 else "decode"
            tokens = tokens_prompt if s == 0 else 1
            steps.append({"step": s, "phase": phase, "tokens": tokens})
            step_start = cpu_t
            t = cpu_t + 10_000
            for i in range(layers):
                for _ in range(30):  # attention, norms, residuals
                    t, _, _ = group("aten::linear", "sm90_xmma_gemm_bf16bf16_bf16f32", t)
                t = ranged(f"moe_trace/{phase}/L{i:03d}/router", 8, "void at::native::softmax_warp_forward", t)
                t = ranged(f"moe_trace/{phase}/L{i:03d}/experts", 30, "grouped_gemm_kernel", t)
            end = t + 10_000
            ext[0] += 2
            w.x("user_annotation", f"ProfilerStep#{s}", HOST_PID, HOST_PID, step_start, end - step_start + 20_000,
                f'"External id": {ext[0]},"Record function id": 0, "Ev Idx": {ext[0]}')
            w.x("user_annotation", f"moe_trace/{phase}#{s}", HOST_PID, HOST_PID, step_start + 5_000,
                end - step_start, f'"External id": {ext[0] + 1},"Record function id": 0, "Ev Idx": {ext[0] + 1}')
            cpu_t = max(end, gpu_t) + 50_000
            s += 1
        fh.write('\n  ],\n  "traceName": "%s"\n}\n' % path.name)
        counts = dict(w.counts)
    return {"steps": steps, "layers": layers, "num_experts": num_experts, "top_k": top_k,
            "host_pid": HOST_PID, "event_counts": counts, "bytes": path.stat().st_size}


def make_run(info: dict, seed: int = 0):
    """RunData + per-step counts consistent with the generated trace (every step recorded)."""
    import numpy as np

    from moe_trace.analysis import LayerInfo, RunData

    rng = np.random.default_rng(seed)
    E, K, L = info["num_experts"], info["top_k"], info["layers"]
    layers = [LayerInfo(index=i, name=f"model.layers.{i}.mlp", family="olmoe", num_experts=E, top_k=K,
                        hidden_size=2048, expert_dim=1024, device="cuda:0") for i in range(L)]
    run = RunData.empty({"family": "olmoe", "name": "synthetic"}, layers, max_k=K)
    steps = []
    for st in info["steps"]:
        p, T = st["phase"], st["tokens"]
        entry = {"step": st["step"], "phase": p, "tokens": T, "layers": {}}
        for i in range(L):
            counts = rng.multinomial(T * K, np.ones(E) / E)
            kh = np.zeros(K + 1, dtype=np.int64)
            kh[K] = T
            c = run.counts[p][i]
            c.tokens += T
            c.calls += 1
            c.expert_counts = c.expert_counts + counts
            c.k_hist = c.k_hist + kh
            entry["layers"][i] = {"expert_counts": counts.tolist(), "k_hist": kh.tolist()}
        run.forward_calls[p] = run.forward_calls.get(p, 0) + 1
        run.forward_tokens[p] = run.forward_tokens.get(p, 0) + T
        steps.append(entry)
    return run, steps


# Peak memory is the child's VmHWM (/proc/self/status): ru_maxrss would include the parent's RSS
# at fork time on Linux. CPU seconds (user + sys, all threads) are reported next to wall seconds
# because on a shared 2-core box wall time moves with other load.
_PROBE = r"""
import resource
def _probe():
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    r = resource.getrusage(resource.RUSAGE_SELF)
    return hwm, r.ru_utime + r.ru_stime
"""

_READ_CHILD = _PROBE + r"""
import json, sys, time
path = sys.argv[1]
from moe_trace.trace import read_trace
hwm0, cpu0 = _probe()
t0 = time.perf_counter()
td = read_trace(path, progress=False)
dt = time.perf_counter() - t0
hwm, cpu = _probe()
print(json.dumps({"seconds": dt, "cpu": cpu - cpu0, "hwm_kb": hwm, "base_kb": hwm0,
                  "events": td.event_count, "parser": td.parser}))
"""

_HTA_CHILD = _PROBE + r"""
import json, logging, sys, time
logging.disable(logging.WARNING)
path = sys.argv[1]
from hta.common.trace_parser import parse_trace_dataframe
from hta.configs.parser_config import ParserConfig, ParserBackend
cfg = ParserConfig()
cfg.set_parser_backend(ParserBackend.IJSON_BATCH_AND_COMPRESS)
hwm0, cpu0 = _probe()
t0 = time.perf_counter()
meta, df, sym = parse_trace_dataframe(path, cfg)
dt = time.perf_counter() - t0
hwm, cpu = _probe()
print(json.dumps({"seconds": dt, "cpu": cpu - cpu0, "hwm_kb": hwm, "base_kb": hwm0,
                  "events": int(len(df)), "parser": "hta ijson_batch_and_compress"}))
"""


def _child(code: str, *args: str, python: str = sys.executable) -> dict | None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  (child failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="size of the raw uncompressed trace (MB)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--repeat", type=int, default=2, help="runs per file (best is reported)")
    ap.add_argument("--hta-python", default=None, help="a Python with HTA (holistictraceanalysis) installed")
    ap.add_argument("--no-hta", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse the files already in --workdir")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moe_trace.trace import write_trace

    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe_trace_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw_kineto.json"
    full_gz = work / "full.pt.trace.json.gz"
    full_json = work / "full.pt.trace.json"
    slim_gz = work / "slim.pt.trace.json.gz"
    if not (args.reuse and all(p.exists() for p in (raw, full_gz, full_json, slim_gz))):
        t0 = time.perf_counter()
        info = generate_raw_trace(raw, args.mb)
        print(f"generated {raw} {info['bytes'] / 1e6:.1f} MB, {sum(info['event_counts'].values())} events "
              f"{info['event_counts']}, {len(info['steps'])} steps in {time.perf_counter() - t0:.1f} s")
        run, steps = make_run(info)
        t0 = time.perf_counter()
        write_trace(raw, run, steps, full_gz, slim=False)
        print(f"write_trace full -> {full_gz.stat().st_size / 1e6:.1f} MB gz in {time.perf_counter() - t0:.1f} s")
        with gzip.open(full_gz, "rb") as src, open(full_json, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        t0 = time.perf_counter()
        write_trace(raw, run, steps, slim_gz, slim=True)
        print(f"write_trace slim -> {slim_gz.stat().st_size / 1e6:.1f} MB gz in {time.perf_counter() - t0:.1f} s")
    files = {"raw Kineto layout (.json, no moe metadata)": raw, "moe-trace full (.json)": full_json,
             "moe-trace full (.json.gz)": full_gz, "moe-trace slim (.json.gz)": slim_gz}

    def usize(p: Path) -> int:
        if p.suffix == ".gz":
            n = 0
            with gzip.open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    n += len(chunk)
            return n
        return p.stat().st_size

    print(f"\n{'file':<46} {'MB':>6} {'wall s':>7} {'MB/s':>6} {'cpu s':>6} {'MB/cpu-s':>8} "
          f"{'peak MiB':>8} {'(imports)':>9}  parser")

    def row(label: str, mb: float, r: dict) -> None:
        print(f"{label:<46} {mb:>6.1f} {r['seconds']:>7.2f} {mb / r['seconds']:>6.0f} {r['cpu']:>6.2f} "
              f"{mb / max(r['cpu'], 1e-9):>8.0f} {r['hwm_kb'] / 1024:>8.0f} {r['base_kb'] / 1024:>9.0f}  {r['parser']}")

    for label, p in files.items():
        mb = usize(p) / 1e6
        best = None
        for _ in range(args.repeat):
            r = _child(_READ_CHILD, str(p))
            if r and (best is None or r["seconds"] < best["seconds"]):
                best = r
        if best:
            row(label, mb, best)
    if not args.no_hta:
        py = args.hta_python or sys.executable
        probe = subprocess.run([py, "-c", "import hta"], capture_output=True)
        if probe.returncode == 0:
            for label in ("moe-trace full (.json.gz)", "raw Kineto layout (.json, no moe metadata)"):
                p = files[label]
                r = _child(_HTA_CHILD, str(p), python=py)
                if r:
                    row("HTA 0.5: " + label, usize(p) / 1e6, r)
        else:
            print("HTA not importable: skipped (pip install holistictraceanalysis==0.5.0, or --hta-python)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
