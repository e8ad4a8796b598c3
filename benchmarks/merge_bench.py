"""`moe-trace merge` vs `analyze` on the same input: wall, CPU seconds and peak RSS, interleaved.

Generates `--ranks` moe-trace files of one run (raw Kineto layout of `trace_parse_bench.py`'s
generator, ~`--mb` MB each, rank r's `baseTimeNanoseconds` r * 1.234567 ms later so merge has to
re-base every timestamp, then `write_trace(slim=False)` as plain .json), and times, each in a fresh
subprocess (imports excluded; CPU = user + sys of all threads, `resource.getrusage`; peak = VmHWM):

  analyze      moe_trace.analyze(DIR)
  merge        moe_trace.merge_traces(DIR, OUT)

  merge@base   the same merge, imported from another checkout (`--baseline DIR`, e.g. the commit before
               a change: `git archive REV | tar -x -C DIR`), for an interleaved before / after

in rounds (analyze, merge[, merge@base], analyze, merge, ...), and prints each run (CPU split into user
and sys: writing the output is mostly sys), then medians and the per-round ratio to analyze (the box is
shared: ratios from one round are the figure to compare).

    python benchmarks/merge_bench.py --mb 150 --ranks 2 --repeat 5 [--workdir DIR --reuse] [--gz] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIFT_NS = 1_234_567

_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
what, src, out = sys.argv[1:4]
from moe_trace.trace import analyze, merge_traces
hwm0, cpu0 = _probe()
sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
t0 = time.perf_counter()
if what == "analyze":
    analyze(src, progress=False)
else:
    merge_traces(src, out)
dt = time.perf_counter() - t0
hwm, cpu = _probe()
print(json.dumps({"wall": dt, "cpu": cpu - cpu0, "sys": resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0,
                  "peak_mib": hwm / 1024, "base_mib": hwm0 / 1024}))
"""


def generate(work: Path, mb: float, ranks: int) -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.trace_parse_bench import generate_raw_trace, make_run
    from moe_trace.trace import write_trace

    total = 0
    for r in range(ranks):
        raw = work / f"raw{r}.json"
        info = generate_raw_trace(raw, mb, seed=r)
        with open(raw, "r+b") as fh:  # later base time on rank r (same digit count, so a plain overwrite)
            head = fh.read(4096)
            old = b"1790857026000000000"
            i = head.index(old)
            fh.seek(i)
            fh.write(str(int(old) + r * SHIFT_NS).encode())
        run, steps = make_run(info, seed=r)
        run.run_id = "merge-bench"
        out = work / "in" / f"rank{r}.pt.trace.json"
        write_trace(raw, run, steps, out, slim=False,
                    process={"dist_rank": r, "world_size": ranks, "hostname": "bench", "pid": 41234})
        raw.unlink()
        total += out.stat().st_size
    return total


def child(what: str, src: Path, out: Path, root: Path = ROOT) -> dict | None:
    """One measurement in a fresh interpreter that imports moe_trace from `root`."""
    from benchmarks.trace_parse_bench import _PROBE

    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PROBE + _CHILD, what, str(src), str(out)], capture_output=True,
                          text=True, env=env, cwd=root)
    if proc.returncode != 0:
        print(f"  ({what} failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=150.0, help="size of each rank's raw trace (MB)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (medians are reported)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the inputs already in --workdir")
    ap.add_argument("--gz", action="store_true", help="write the merged file gzip-compressed")
    ap.add_argument("--baseline", default=None, help="another checkout whose merge runs as merge@base")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe_trace_merge_bench_"))
    (work / "in").mkdir(parents=True, exist_ok=True)
    src = work / "in"
    if args.reuse and any(src.glob("*.pt.trace.json")):
        size = sum(p.stat().st_size for p in src.glob("*.pt.trace.json"))
    else:
        t0 = time.perf_counter()
        size = generate(work, args.mb, args.ranks)
        print(f"generated {args.ranks} files, {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
    mb = size / 1e6
    out = work / ("merged.json.gz" if args.gz else "merged.json")
    whats = ["analyze", "merge"] + (["merge@base"] if args.baseline else [])
    res: dict[str, list[dict]] = {w: [] for w in whats}
    for rnd in range(args.repeat):
        for w in whats:
            root = Path(args.baseline).resolve() if w == "merge@base" else ROOT
            r = child(w.split("@")[0], src, out, root)
            out.unlink(missing_ok=True)  # every merge writes a new file (none to replace)
            if r:
                res[w].append(r)
                print(f"round {rnd} {w:<10} wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s (sys {r['sys']:5.2f})  "
                      f"peak {r['peak_mib']:5.0f} MiB (imports {r['base_mib']:.0f})", flush=True)
    print(f"\ninput {mb:.0f} MB ({len(list(src.glob('*.pt.trace.json')))} files); medians of {args.repeat}:")
    med = {w: {k: statistics.median(x[k] for x in v) for k in ("wall", "cpu", "sys", "peak_mib")}
           for w, v in res.items() if v}
    for w, m in med.items():
        print(f"  {w:<10} wall {m['wall']:6.2f} s  cpu {m['cpu']:6.2f} s (sys {m['sys']:5.2f})  "
              f"{mb / m['cpu']:5.0f} MB per CPU s  peak {m['peak_mib']:5.0f} MiB")
    if "analyze" in med:
        for w in med:
            if w != "analyze":
                ratios = [x["cpu"] / a["cpu"] for x, a in zip(res[w], res["analyze"])]
                walls = [x["wall"] / a["wall"] for x, a in zip(res[w], res["analyze"])]
                print(f"  {w} / analyze (per round, median): cpu x{statistics.median(ratios):.2f}, "
                      f"wall x{statistics.median(walls):.2f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
