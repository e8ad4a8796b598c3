"""The moe-trace trace format in one place: names, their patterns, file names, schema ids, categories.

Everything that writes a trace (capture, `writer.py`, `merge.py`) or reads one (`reader.py` and its
parts, the TensorBoard plugin) takes these names from here. The format is described in
docs/trace-format.md and docs/design.md.

* `record_function` ranges: `moe_trace/{phase}/L{i:03d}/{part}` (one part of one MoE layer) and
  `moe_trace/{phase}#{step}` (one model forward); torch.profiler's own `ProfilerStep#{n}`.
* counter events (`"ph": "C"`, `"cat": "moe_trace"`): `moe_trace/L{i:03d} {metric}`.
* files: `{worker}.{run_id}.pt.trace.json.gz` (`.{window}` before `.pt` for the 2nd, 3rd, ...
  window of a scheduled profiler); older files are `{worker}[.{window}].pt.trace.json[.gz]`.
* metadata: the top-level key `"moe_trace"` (before `traceEvents`), schema `moe-trace/trace/1`
  (per-process file) or `moe-trace/merged/1` (`moe-trace merge` output).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import socket
import uuid

# -- metadata ----------------------------------------------------------------------------------------
META_KEY = "moe_trace"
SCHEMA = "moe-trace/trace/1"
MERGED_SCHEMA = "moe-trace/merged/1"
SCHEMA_PREFIX = "moe-trace/"
MERGED_PREFIX = "moe-trace/merged"

# -- range, step and counter names ---------------------------------------------------------------------
NAME_PREFIX = "moe_trace/"
PROFILER_STEP_PREFIX = "ProfilerStep#"
COUNTER_METRICS = ("expert_tokens", "k_mean", "active_experts")

RANGE_RE = re.compile(r"^moe_trace/(prefill|decode|verify)/L(\d+)/(router|experts|shared)$")
STEP_RE = re.compile(r"^moe_trace/(prefill|decode|verify)#(\d+)$")
PROFILER_STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
COUNTER_RE = re.compile(r"^moe_trace/L(\d+) (expert_tokens|k_mean|active_experts)$")


def range_name(phase: str, layer: int, part: str) -> str:
    """The `record_function` name of one part (router / experts / shared) of one MoE layer."""
    return f"{NAME_PREFIX}{phase}/L{layer:03d}/{part}"


def step_name(phase: str, step: int) -> str:
    """The `record_function` name of one model forward."""
    return f"{NAME_PREFIX}{phase}#{step}"


def counter_name(layer: int, metric: str) -> str:
    """The name of a per-step counter event of one MoE layer (`metric` in COUNTER_METRICS)."""
    return f"{NAME_PREFIX}L{layer:03d} {metric}"


def expert_key(e: int) -> str:
    """The args key of expert `e` in an `expert_tokens` counter event."""
    return f"e{e:03d}"


# -- event categories ----------------------------------------------------------------------------------
COUNTER_CAT = "moe_trace"
USER_ANNOTATION = "user_annotation"
GPU_USER_ANNOTATION = "gpu_user_annotation"
#: GPU work, with the index of its (count, µs) pair in the reader's per-device totals
DEVICE_CATS = {"kernel": 0, "gpu_memcpy": 1, "gpu_memset": 2}
GPU_WORK_CATS = frozenset(DEVICE_CATS)
GPU_CATS = GPU_WORK_CATS | {GPU_USER_ANNOTATION}
HOST_CATS = frozenset({"cpu_op", USER_ANNOTATION, "cuda_runtime", "cuda_driver", "python_function",
                       "cpu_instant_event"})
#: what the reader aggregates (everything else is skipped unparsed on the fast path)
READ_CATS = GPU_CATS | {USER_ANNOTATION, COUNTER_CAT}
#: categories kept by a slim trace (plus M metadata, counters and the moe_trace / ProfilerStep ranges)
SLIM_CATS = GPU_CATS
#: GPU-event args a slim trace keeps (what HTA and our reader use); launch geometry, registers,
#: occupancy and queue fields are dropped: they are most of a kernel event's bytes.
SLIM_GPU_ARGS = frozenset({"device", "stream", "correlation", "External id", "bytes"})

# -- file names -----------------------------------------------------------------------------------------
TRACE_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz")
TRACE_GLOBS = tuple("*" + s for s in TRACE_SUFFIXES)
TRACE_FILE_RE = re.compile(r"\.pt\.trace\.json(?:\.gz)?$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_trace_name(name: str) -> bool:
    """Whether a file name is a trace file name (`*.pt.trace.json` or `*.pt.trace.json.gz`)."""
    return TRACE_FILE_RE.search(name) is not None


def worker_name(process: dict) -> str:
    """`[rank{r}_]{hostname}_{pid}`: the part of a file name that says which process wrote it."""
    rank = process.get("dist_rank")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", str(process.get("hostname") or socket.gethostname()))
    return (f"rank{rank}_" if rank is not None else "") + f"{host}_{process.get('pid', os.getpid())}"


def trace_file_name(worker: str, run_id: str | None, window: int = 0, suffix: str = ".pt.trace.json.gz") -> str:
    """`{worker}.{run_id}[.{window}]{suffix}` (`run_id` None: the pre-run-id layout)."""
    parts = [worker] + ([run_id] if run_id else []) + ([str(window)] if window else [])
    return ".".join(parts) + suffix


# -- run identity ----------------------------------------------------------------------------------------
RUN_ID_ENV = "MOE_TRACE_RUN_ID"
_seq = itertools.count()


def job_token(environ: dict | None = None) -> tuple[str, str]:
    """What the ranks of one job share without talking to each other: `(token, source)`.

    In order: `MOE_TRACE_RUN_ID` (set it to name a run yourself); torchrun's `TORCHELASTIC_RUN_ID`
    unless it is the default `none` (`--standalone` makes it a fresh uuid, multi-node jobs pass
    `--rdzv-id`); for a one-node torchrun job without an id, the launching agent (the parent
    process) with `MASTER_ADDR`/`MASTER_PORT` and the restart count; for a multi-node job
    without an id, `MASTER_ADDR`/`MASTER_PORT` and the restart count only (two such jobs on the
    same address and port share it: pass `--rdzv-id` or set `MOE_TRACE_RUN_ID`). Outside torchrun:
    a fresh uuid (a plain process is a job of its own).
    """
    env = os.environ if environ is None else environ
    if env.get(RUN_ID_ENV):
        return env[RUN_ID_ENV], "env"
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    rid = env.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return f"{rid}/{restart}", "torchelastic"
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        master = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{restart}"
        if env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
            return f"{socket.gethostname()}/{os.getppid()}/{master}", "torchrun-local"
        return master, "torchrun-master"
    return uuid.uuid4().hex, "uuid"


def new_run_id(environ: dict | None = None) -> str:
    """A run id for one `profile()` run: `{12 hex of the job token}-{n}`, n counting this process's runs.

    The ranks of one job run the same program, so their n-th runs get the same id (see `job_token`).
    A user-given `MOE_TRACE_RUN_ID` that is already a valid id is used as it is for the first run.
    """
    token, source = job_token(environ)
    n = next(_seq)
    if source == "env" and RUN_ID_RE.match(token) and "-" not in token:
        return token if n == 0 else f"{token}-{n}"
    return f"{hashlib.sha1(token.encode()).hexdigest()[:12]}-{n}"

