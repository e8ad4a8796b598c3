"""`moe-trace analyze` and `moe-trace merge`: the trace post-processor."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from moe_trace.errors import ConfigError



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="report of a moe-trace Kineto trace file or a directory of them",
        description="Stream a .pt.trace.json[.gz] file (or every one under a directory) and print the MoE "
                    "report: counts, load balance, k, FLOPs and per-layer router/experts/shared time from the "
                    "trace's GPU (or CPU) ranges.")
    p.add_argument("path", help="a trace file, or a directory searched recursively for *.pt.trace.json[.gz]")
    p.add_argument("--json", metavar="F", help="also write the report as JSON (docs/report-format.md)")
    p.add_argument("--csv", metavar="F", help="also write one CSV row per layer and phase")
    p.add_argument("--per-device", action="store_true",
                   help="print the per-device table (tokens, FLOPs, range times, kernel time per GPU)")
    p.add_argument("--ep-size", type=int, metavar="N",
                   help="also show the load per expert-parallel rank with the experts placed contiguously over N "
                        "ranks (shown by default for runs that were expert parallel)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even for large files")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--run", metavar="ID",
                      help="analyze the run with this id (or a unique prefix of it) when the directory holds several "
                           "runs (default: the newest, and a warning lists the others)")
    runs.add_argument("--all-runs", action="store_true",
                      help="report every run of the directory separately, newest first (--json/--csv: one file per "
                           "run, the run id added to the name)")
    p.set_defaults(func=_cmd_analyze)

    m = subparsers.add_parser(
        "merge", help="merge per-rank traces into one Perfetto timeline",
        description="Merge every trace under DIR into one file: timestamps on one clock "
                    "(baseTimeNanoseconds), unique pids named 'rank{r} host' / 'rank{r} GPU {n}'.")
    m.add_argument("dir", help="directory with the per-rank .pt.trace.json[.gz] files")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (.json or .json.gz); open it in https://ui.perfetto.dev")
    m.set_defaults(func=_cmd_merge)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from moe_trace.trace.reader import read_traces, runs_of
    from moe_trace.trace.runs import run_report, select_run

    from moe_trace.analysis.report import check_ep_size
    from moe_trace.checks import output_file

    check_ep_size(args.ep_size)
    for flag, dest in (("--json", args.json), ("--csv", args.csv)):
        if dest:
            output_file(dest, flag)  # before reading: a bad output place fails in a second, not after the work
            _not_an_input(dest, args.path, flag)
    if args.json and args.csv and Path(args.json).resolve() == Path(args.csv).resolve():
        raise ConfigError(f"--json and --csv name the same file {args.json}; give each its own")
    progress = False if args.no_progress else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            datas = read_traces(args.path, progress=progress)
            if not any(d.is_moe for d in datas):
                for d in datas:
                    print(d.summary)
            runs = runs_of(datas, args.path)  # raises the TraceError that says what is missing
            chosen = runs if args.all_runs else [select_run(runs, args.run, args.path)]
            reports = [(r, run_report(r, ep_size=args.ep_size)) for r in chosen]
            for _, report in reports:
                report.to_dict()  # a bad --ep-size is a ConfigError with its fix, raised here
        finally:
            for w in caught:
                print(f"moe-trace: warning: {w.message}", file=sys.stderr)
    for run, report in reports:
        if args.all_runs:
            print(f"== run {run.describe()} ==")
        print(report)
        if args.per_device:
            print(_per_device(report, run.files))
        for fmt, dest in (("json", args.json), ("csv", args.csv)):
            if dest:
                out = _per_run_path(dest, run.id if args.all_runs else None)
                report.to_json(out) if fmt == "json" else report.to_csv(out)
                print(f"wrote {out}")
    return 0


def _not_an_input(dest: str, path: str, flag: str) -> None:
    """Refuse to write the report over a trace being analyzed (the user's data)."""
    from moe_trace.trace.format import is_trace_name

    d, src = Path(dest).resolve(), Path(path).resolve()
    if d == src or (src.is_dir() and is_trace_name(d.name) and src in d.parents):
        raise ConfigError(f"{flag} {dest} is a trace that analyze reads; writing the report there would destroy it: "
                          "pass another name (e.g. report.json)")


def _per_run_path(dest: str, rid: str | None) -> str:
    """`report.json` -> `report.{run id}.json` for --all-runs (run ids are file-name safe)."""
    if rid is None:
        return dest
    import re
    from pathlib import Path

    p = Path(dest)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rid)
    return str(p.with_name(f"{p.stem}.{safe}{p.suffix}"))


def _per_device(report, datas) -> str:
    lines = ["per device (MoE layers):",
             f"  {'device':<16} {'layers':>6} {'tokens':>9} {'GFLOPs':>10} {'router ms':>10} {'experts ms':>11} "
             f"{'shared ms':>10} {'peak MiB':>9}"]
    for d in report.to_dict()["devices"]:
        peak = d.get("peak_memory_bytes")
        lines.append(f"  {d['device']:<16} {d['layers']:>6} {d['tokens']:>9} {d['flops']['total'] / 1e9:>10.4f} "
                     f"{_ms(d['router_ms']):>10} {_ms(d['experts_ms']):>11} {_ms(d['shared_ms']):>10} "
                     f"{(f'{peak / 2**20:.0f}' if peak else '-'):>9}")
    rows = []
    scopes = set()
    for td in datas:
        if not td.is_moe:
            continue
        if td.summary.devices:
            scopes.add(td.summary.kernel_scope)
        who = f"rank{td.rank} " if td.rank is not None and len(datas) > 1 else ""
        for name, dev in td.summary.devices.items():
            busy = f"{100 * dev['kernel_ms'] / dev['span_ms']:.1f}%" \
                if dev["span_ms"] and td.summary.kernel_scope == "all" else "-"  # slim: not the busy time
            rows.append(f"  {who + name:<16} {dev['kernels']:>8} {dev['kernel_ms']:>11.3f} {dev['memcpy_ms']:>10.3f} "
                        f"{busy:>6}")
    if rows:
        from moe_trace.trace.result import kernel_scope_text

        scope = "moe_ranges" if "moe_ranges" in scopes else "all"
        lines.append(f"GPU activity in the trace: {kernel_scope_text(scope)}"
                     + (" (some files are slim)" if len(scopes) > 1 else "") + ":")
        lines.append(f"  {'device':<16} {'kernels':>8} {'kernel ms':>11} {'memcpy ms':>10} {'busy':>6}")
        lines.extend(rows)
    else:
        lines.append("GPU activity in the trace: none (CPU-only trace)")
    return "\n".join(lines)


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _cmd_merge(args: argparse.Namespace) -> int:
    from moe_trace.trace.merge import merge_traces

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = merge_traces(args.dir, args.output)
    for w in caught:
        print(f"moe-trace: warning: {w.message}", file=sys.stderr)
    print(f"wrote {out} (open it in https://ui.perfetto.dev)")
    return 0


__all__ = ["register"]
