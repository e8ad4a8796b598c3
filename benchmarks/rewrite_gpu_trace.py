"""Re-write a recorded moe-trace full trace with the current writer, slim and full.

The raw Kineto events of FULL_TRACE (its moe_trace header, counters and added process names removed)
go through `write_trace` again; the run comes from the header, the steps from the header and the
counter events (k_hist rebuilt from k_mean: exact for fixed-top-k families such as OLMoE, checked).

    python benchmarks/rewrite_gpu_trace.py FULL_TRACE OUTDIR

tests/data/gpu_olmoe_tiny_{slim,full}.pt.trace.json.gz were made this way from an H200 recording
(benchmarks/record_gpu_trace.py, torch 2.11) after the writer changed; a fresh recording replaces them.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_trace.analysis import RunData  # noqa: E402
from moe_trace.trace import validate_trace, write_trace  # noqa: E402
from moe_trace.trace.format import COUNTER_CAT, COUNTER_RE, STEP_RE  # noqa: E402


def recording_parts(obj: dict) -> tuple[dict, RunData, list[dict], list[dict]]:
    """A parsed moe-trace trace split into (header, run, steps, raw Kineto events); `obj` keeps the rest
    of its top level (its "moe_trace" and "traceEvents" keys are popped). The raw events are the
    trace's without moe-trace's counters and its added "host" process name."""
    hdr = obj.pop("moe_trace")
    run = RunData.from_dict(hdr["run"])
    ev = obj.pop("traceEvents")
    by_ts: dict = {}
    for e in ev:
        if e.get("cat") == COUNTER_CAT and e.get("ph") == "C":
            m = COUNTER_RE.match(e["name"])
            by_ts.setdefault(e["ts"], {}).setdefault(int(m.group(1)), {})[m.group(2)] = e["args"]
    top_k = {layer.index: layer.top_k for layer in run.layers}
    ranges = sorted((e["ts"], e["name"]) for e in ev if e.get("cat") == "user_annotation" and STEP_RE.match(e["name"]))
    steps = []
    for (ts, _), s in zip(ranges, hdr["steps"]):
        layers = {}
        for li, d in (by_ts.get(ts) or {}).items():
            counts = [d["expert_tokens"][k] for k in sorted(d["expert_tokens"])]
            k = top_k[li]
            kh = [0] * (k + 1)
            kh[k] = sum(counts) // k
            assert kh[k] == 0 or abs(d["k_mean"]["k_mean"] - k) < 1e-9, (li, d["k_mean"])
            layers[li] = {"expert_counts": counts, "k_hist": kh}
        steps.append({**s, "layers": layers})
    raw = [e for e in ev if e.get("cat") != COUNTER_CAT
           and not (e.get("ph") == "M" and (e.get("args") or {}).get("name") == "host")]
    return hdr, run, steps, raw


def main(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    obj = json.loads(gzip.decompress(src.read_bytes()))
    hdr, run, steps, obj["traceEvents"] = recording_parts(obj)
    raw = out / "raw.json"
    raw.write_text(json.dumps(obj, indent=2))  # one key per line, like Kineto's own export
    for slim in (True, False):
        p = out / f"gpu_olmoe_tiny_{'slim' if slim else 'full'}.pt.trace.json.gz"
        write_trace(raw, run, steps, p, slim=slim, process=hdr["process"])
        print(f"{p}: {p.stat().st_size / 1e3:.1f} KB, validate_trace: {validate_trace(p) or 'ok'}")
    raw.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
