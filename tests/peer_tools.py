"""Run HTA's and torch-tb-profiler's parsers on trace files and print what each shows, as JSON.

Runs in the side virtualenv that `.ci/run` builds (HolisticTraceAnalysis 0.5.0 needs pandas < 3;
torch-tb-profiler 0.4.3), never in the main one: `tests/test_peer_tools.py` calls

    <tools-python> tests/peer_tools.py TRACE [TRACE ...]

and asserts on the output. Each trace is read by the tools' own entry points, as a user would:
HTA `TraceAnalysis(trace_files={0: path})` (then its kernel, temporal and user-annotation
breakdowns), torch-tb-profiler `RunProfileData.parse` + `RunGenerator.generate_run_profile` (what its
TensorBoard plugin runs for the Overview, Operator and Kernel views). This file imports nothing of
moe-trace.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import warnings


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH = ("cuda_runtime", "cuda_driver")


def _linked(df, cat_of) -> dict:
    if "index_correlation" not in df.columns:
        return {"kernels_with_launch": 0, "gpu_rows_with_launch": 0}
    cat_at = dict(zip(df["index"].tolist(), cat_of))
    k = g = 0
    for c, ic in zip(cat_of, df["index_correlation"].tolist()):
        if c in GPU_WORK and ic > 0 and cat_at.get(ic) in LAUNCH:
            g += 1
            k += c == "kernel"
    return {"kernels_with_launch": k, "gpu_rows_with_launch": g}


def _hta(path: str) -> dict:
    from hta.trace_analysis import TraceAnalysis

    d = tempfile.mkdtemp(prefix="hta_")
    try:
        # HTA wants a directory of traces or a rank -> file map; a copy keeps the caller's dir clean
        local = os.path.join(d, os.path.basename(path))
        shutil.copy(path, local)
        ta = TraceAnalysis(trace_files={0: local}, trace_dir=d)
        df = ta.t.get_trace(0)
        names = ta.t.symbol_table.get_sym_table()
        cat_of = [names[c] for c in df["cat"]]
        name_of = [names[n] for n in df["name"]]
        out = {"ranks": ta.t.get_ranks(), "iterations": [int(i) for i in ta.t.get_iterations(0)],
               "rows": len(df),
               "kernel_rows": sum(c == "kernel" for c in cat_of),
               "gpu_rows": sum(c in GPU_WORK for c in cat_of),
               # HTA's own link (transform_correlation_to_index): a GPU row's index_correlation is the
               # index of the host row with its correlation; count the rows whose linked row is a launch
               **_linked(df, cat_of),
               "moe_annotations": sorted({n for c, n in zip(cat_of, name_of)
                                          if c in ("user_annotation", "gpu_user_annotation")
                                          and n.startswith("moe_trace/")})[:50],
               "profiler_steps": sorted({n for n in name_of if n.startswith("ProfilerStep#")})}
        for key, call in (("kernel_breakdown", lambda: ta.get_gpu_kernel_breakdown(visualize=False)),
                          ("temporal_breakdown", lambda: ta.get_temporal_breakdown(visualize=False)),
                          ("user_annotation_breakdown",
                           lambda: ta.get_gpu_user_annotation_breakdown(visualize=False))):
            try:
                res = call()
                if isinstance(res, tuple):  # kernel breakdown: (by type, by kernel)
                    out[key] = {"by_type": res[0].to_dict("records"), "kernels": len(res[1])}
                elif res is None:
                    out[key] = None
                else:
                    out[key] = json.loads(res.to_json(orient="records"))
            except Exception as exc:  # noqa: BLE001 - report what the tool does, the test decides
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        gpu = df[df["stream"].ne(-1)]
        # HTA 0.5.0 rounds float (ns) timestamps: ts up, end down (`round_down_time_stamps`), so a kernel
        # shorter than 1 us that starts and ends inside one microsecond gets dur -1; its temporal
        # breakdown then fails `assert non_compute_time >= 0`. Count those rows, and when the default
        # breakdown fails, run it again with HTA's own switch for that rounding (HTA_DISABLE_NS_ROUNDING=1).
        out["negative_gpu_durations"] = int((gpu["dur"] < 0).sum())
        if isinstance(out["temporal_breakdown"], dict) and "error" in out["temporal_breakdown"]:
            os.environ["HTA_DISABLE_NS_ROUNDING"] = "1"
            try:
                ta2 = TraceAnalysis(trace_files={0: local}, trace_dir=d)
                out["temporal_breakdown_ns_rounding_off"] = json.loads(
                    ta2.get_temporal_breakdown(visualize=False).to_json(orient="records"))
            except Exception as exc:  # noqa: BLE001
                out["temporal_breakdown_ns_rounding_off"] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                del os.environ["HTA_DISABLE_NS_ROUNDING"]
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _tbp(path: str) -> dict:
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    cache = tempfile.mkdtemp(prefix="tbp_")
    try:
        data = RunProfileData.parse("worker0", None, path, cache)
        prof = RunGenerator("worker0", None, data).generate_run_profile()
        steps = [{"name": name, "total_us": float(c.costs[-1])}
                 for name, c in zip(data.steps_names, data.steps_costs)]
        perf = prof.overview.get("performance") or [{}]
        ops = prof.operation_table_by_name or {}
        op_rows = ops.get("data") if isinstance(ops, dict) else None
        kt = prof.kernel_table if data.has_kernel else None
        kernel_rows = len(kt["data"]["rows"]) if isinstance(kt, dict) and "data" in kt else 0
        tree_names: list[str] = []

        def walk(node, depth=0):
            if depth > 64:
                return
            for child in getattr(node, "children", []) or []:
                tree_names.append(child.name)
                walk(child, depth + 1)

        for root in data.tid2tree.values():
            walk(root)
        return {"views": list(prof.views), "steps": steps, "avg_step_us": perf[0].get("value"),
                "has_kernel": bool(data.has_kernel), "has_runtime": bool(data.has_runtime),
                "operator_rows": len(op_rows) if op_rows is not None else None,
                "operators": sorted({r["name"] for r in (op_rows or [])})[:50],
                "kernel_rows": kernel_rows,
                "moe_in_tree": sorted({n for n in tree_names if n.startswith("moe_trace/")})[:50]}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(paths: list[str]) -> int:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    result = {}
    for p in paths:
        entry = {}
        for tool, fn in (("hta", _hta), ("tbp", _tbp)):
            try:
                entry[tool] = fn(p)
            except Exception as exc:  # noqa: BLE001
                entry[tool] = {"error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc(limit=6)}
        result[p] = entry
    sys.stdout.write("\n" + "PEER_TOOLS_JSON " + json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
