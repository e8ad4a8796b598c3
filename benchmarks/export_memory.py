"""Peak host memory and wall time of the kineto export (`write_trace` on a raw Kineto file), A/B.

A synthetic GPU-heavy raw trace is built from the committed H200 recording
(tests/data/gpu_olmoe_tiny_full.pt.trace.json.gz, its moe_trace header, counters and added process
names removed, as benchmarks/rewrite_gpu_trace.py does), its events replicated with shifted ts,
correlation, External id and flow ids until the raw file reaches --mb MB, one event per line like
Kineto's export. Each measurement is a fresh subprocess that imports moe_trace from a source root and
writes the trace (slim by default); it reports ru_maxrss before and after the write (the difference is
the export's extra peak, compared with the raw file's size) and the write's wall time. With
--baseline ROOT (a checkout of the old code, e.g. `git worktree add /tmp/base main`) the two roots run
interleaved and their outputs are compared event by event.

    python benchmarks/export_memory.py [--mb 150] [--repeat 3] [--full] [--baseline ROOT]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "gpu_olmoe_tiny_full.pt.trace.json.gz"

_CHILD = r"""
import json, resource, sys, time, pickle
sys.path.insert(0, sys.argv[1])
from moe_trace.analysis import RunData
from moe_trace.trace import write_trace
spec = pickle.load(open(sys.argv[2], "rb"))
run = RunData.from_dict(spec["run"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
write_trace(spec["raw"], run, spec["steps"], sys.argv[3], slim=spec["slim"], process=spec["process"])
dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": after, "wall_s": dt}))
"""


def build_raw(out: Path, mb: float, copies: int | None = None) -> dict:
    """Write the synthetic raw trace to `out` (`copies` of the recording's events, else as many as
    make `mb` MB); returns the spec (run dict, steps, process, copies). Copy 0 is the recording as is."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.rewrite_gpu_trace import recording_parts

    obj = json.loads(gzip.decompress(DATA.read_bytes()))
    hdr, _run, steps, ev = recording_parts(obj)
    ev = [e for e in ev if not (e.get("ph") == "M" and (e.get("args") or {}).get("name") == "GPU 0")]
    meta = [e for e in ev if e.get("ph") == "M"]
    body = [e for e in ev if e.get("ph") != "M"]
    ts = [e["ts"] for e in body if isinstance(e.get("ts"), (int, float))]
    span = (max(ts) - min(ts)) * 1.01 + 1.0
    ids = [v for e in body for v in ((e.get("args") or {}).get("correlation"), (e.get("args") or {}).get("External id"),
                                      e.get("id")) if isinstance(v, int)]
    id_step = max(ids) + 1
    one = sum(len(json.dumps(e)) + 2 for e in body)
    copies = copies or max(1, int(mb * 1e6 / one))
    with open(out, "wb") as fh:
        fh.write(json.dumps(obj)[:-1].encode() + b', "traceEvents": [\n')
        fh.write(b",\n".join(json.dumps(e).encode() for e in meta))
        for k in range(copies):
            lines = []
            for e in body:
                e = dict(e)
                if isinstance(e.get("ts"), (int, float)):
                    e["ts"] = round(e["ts"] + k * span, 3)
                if isinstance(e.get("id"), int):
                    e["id"] += k * id_step
                a = e.get("args")
                if isinstance(a, dict):
                    a = dict(a)
                    for key in ("correlation", "External id"):
                        if isinstance(a.get(key), int) and a[key] > 0:
                            a[key] += k * id_step
                    e["args"] = a
                lines.append(json.dumps(e).encode())
            fh.write(b",\n" + b",\n".join(lines))
        fh.write(b"\n]}\n")
    return {"run": hdr["run"], "steps": steps, "process": hdr["process"], "copies": copies}


def measure(root: Path, spec_path: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(spec_path), str(out)], check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    return json.loads(r.stdout.strip().splitlines()[-1])


def events_of(path: Path) -> list:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=150.0, help="size of the synthetic raw trace (MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="write full traces instead of slim ones")
    ap.add_argument("--baseline", type=Path, help="source root of the old code to compare with (interleaved)")
    ap.add_argument("--workdir", type=Path, help="where the raw trace is built (default: a temp dir)")
    a = ap.parse_args()
    import pickle

    work = a.workdir or Path(tempfile.mkdtemp(prefix="export_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw.json"
    spec = build_raw(raw, a.mb)
    spec.update(raw=str(raw), slim=not a.full)
    spec_path = work / "spec.pkl"
    spec_path.write_bytes(pickle.dumps(spec))
    raw_mb = raw.stat().st_size / 1e6
    print(f"raw trace: {raw_mb:.1f} MB ({spec['copies']} copies of the H200 recording), "
          f"{'full' if a.full else 'slim'} export, {a.repeat} interleaved runs")
    roots = {"new": ROOT}
    if a.baseline:
        roots = {"old": a.baseline.resolve(), "new": ROOT}
    res: dict = {k: [] for k in roots}
    for i in range(a.repeat):
        for name, root in roots.items():
            m = measure(root, spec_path, work / f"{name}.pt.trace.json.gz")
            res[name].append(m)
            print(f"  run {i} {name}: extra peak {(m['peak_kb'] - m['before_kb']) / 1e3:.1f} MB, "
                  f"peak RSS {m['peak_kb'] / 1e3:.1f} MB, {m['wall_s']:.2f} s")
    for name, ms in res.items():
        extra = statistics.median((m["peak_kb"] - m["before_kb"]) / 1e3 for m in ms)
        wall = statistics.median(m["wall_s"] for m in ms)
        print(f"{name}: median extra peak {extra:.1f} MB = {extra / raw_mb:.2f} x raw, median wall {wall:.2f} s")
    if "old" in roots:
        same = (work / "old.pt.trace.json.gz").exists() and \
            events_of(work / "old.pt.trace.json.gz") == events_of(work / "new.pt.trace.json.gz")
        print(f"old and new write the same events in the same order: {same}")
    out = work / "new.pt.trace.json.gz"
    print(f"output: {out.stat().st_size / 1e6:.1f} MB gz")
    if not a.workdir:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
