"""What a profiling session records, one recorder per kind, chosen by the mode:

- `CounterRecorder` (every mode): the on-device routing counters of every MoE layer, grouped per
  device (`counters.DeviceCounters`), read once at the end into `LayerCounts`.
- `timing.PartTimer` ("timing" mode or ``cuda_events=True``): CUDA events around router / experts /
  shared per layer and phase.
- `KinetoRecorder` ("kineto" mode): owns the torch.profiler session — start, one `ProfilerStep#N`
  range and one profiler step per model forward, stop, export (in a background thread) — and the
  per-step counter snapshots that go into the trace.

The session (session.py) hooks the model and feeds the recorders; recorders never hook anything.
"""
from __future__ import annotations

import atexit
import gc
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moe_trace.analysis.rundata import PHASES, LayerCounts, LayerInfo, RunData
from moe_trace.errors import ProfileStateError
from moe_trace.trace import pending
from moe_trace.trace.format import PROFILER_STEP_PREFIX

from .counters import DeviceCounters
from .ranges import ProfilerRange, RecordGate


class CounterRecorder:
    """On-device counters of every MoE layer, one `DeviceCounters` per device."""

    def __init__(self, layers: list[LayerInfo], probs: list[bool]):
        self.layers = layers
        by_dev: dict[str, list[int]] = {}
        for info in layers:
            by_dev.setdefault(info.device, []).append(info.index)
        self.devices: dict[str, DeviceCounters] = {}
        self.where: dict[int, tuple[DeviceCounters, int]] = {}
        for dev, idxs in by_dev.items():
            dc = DeviceCounters(torch.device(dev), [layers[i].num_experts for i in idxs])
            self.devices[dev] = dc
            for local, i in enumerate(idxs):
                self.where[i] = (dc, local)
                dc.probs[local] = probs[i]
        self._layer_of = {(id(dc), local): i for i, (dc, local) in self.where.items()}
        for dev in by_dev:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(torch.device(dev))

    def set_step(self, phase: int, mask: torch.Tensor | None) -> None:
        """Phase and attention mask ([B, S] of the new positions, or None) of the forward that starts."""
        for dc in self.devices.values():
            dc.phase = phase
            dc.mask = mask

    def end_forward(self, capturing: bool) -> None:
        for dc in self.devices.values():
            dc.end_forward(capturing)

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Device copies of the running counts of every device (no sync)."""
        return {dev: dc.snapshot() for dev, dc in self.devices.items()}

    def layer_index(self, dc: DeviceCounters, local: int) -> int:
        return self._layer_of[(id(dc), local)]

    def collect(self) -> dict[str, list[LayerCounts | None]]:
        """Read every device once and build {phase: [LayerCounts per layer]}."""
        return self.counts_from({dev: dc.read() for dev, dc in self.devices.items()})

    def counts_from(self, host: dict[str, tuple]) -> dict[str, list[LayerCounts | None]]:
        """{phase: [LayerCounts]} from host arrays per device: (counts [P,L,E+2], k_hist [P,L,E+2],
        conf [P,L,2], padding [P,L], calls [P,L]) — a whole run, or the difference of two snapshots."""
        counts: dict[str, list[LayerCounts | None]] = {p: [None] * len(self.layers) for p in PHASES}
        for dev, (c, k, conf, pad, calls) in host.items():
            dc = self.devices[dev]
            for local in range(dc.L):
                i = self.layer_index(dc, local)
                E = self.layers[i].num_experts
                for p, phase in enumerate(PHASES):
                    kh = k[p, local]
                    last = int(np.nonzero(kh)[0].max()) if kh.any() else 0
                    # tokens from the device (one k-histogram entry per token), so they stay right
                    # under CUDA-graph replay, where host-side hooks ran only at capture
                    counts[phase][i] = LayerCounts(
                        tokens=int(kh.sum()), calls=int(calls[p, local]),
                        expert_counts=c[p, local, :E].astype(np.int64),
                        k_hist=kh[: max(last, self.layers[i].top_k) + 1].astype(np.int64),
                        excluded=int(c[p, local, E:dc.E + 1].sum()), dropped=int(c[p, local, dc.E + 1]),
                        padding_tokens=int(pad[p, local]),
                        top1_prob_sum=float(conf[p, local, 0]), entropy_sum=float(conf[p, local, 1]))
        return counts

    def peak_memory(self) -> dict[str, int]:
        return {dev: int(torch.cuda.max_memory_allocated(torch.device(dev)))
                for dev in self.devices if dev.startswith("cuda")}


# One moe-trace Kineto session per process at a time (Kineto's state is global: a second
# profiler started from another moe-trace session, in this thread or another, crashes it).
_LOCK = threading.Lock()
_RUNNING: "KinetoRecorder | None" = None
# Sessions attached to a user's profiler whose counters may still go into one of its exports.
_ATTACHED: list["KinetoRecorder"] = []
MAX_ATTACHED = 8
_ORIGINAL_EXPORT = None
# The next free `moe_trace/{phase}#{step}` number of each user profiler (None: one not known by its
# object): blocks attached one after another continue its numbering, so their step names never
# collide inside one window of it.
_NEXT_STEP: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_NEXT_STEP_UNKNOWN = [0]


def running_profilers() -> list:
    """The `torch.profiler.profile` objects entered and not yet exited, in any schedule state (wait
    and warmup included, where torch's profiler is not recording yet and nothing global says it
    runs). torch keeps no registry of them: the garbage collector's objects are searched, and only
    while one exists (torch's step tracker then holds its "ProfilerStep" key), so a run without a
    profiler pays nothing (the search takes ~0.2 s with a model loaded, once per kineto block). A
    profiler made with ``record_steps=False`` is found only while it records."""
    from torch.autograd.profiler import KinetoStepTracker
    from torch.profiler import profile

    if "ProfilerStep" not in getattr(KinetoStepTracker, "_step_dict", {"ProfilerStep": 0}):
        return []
    recording = torch._C._autograd._profiler_enabled()
    out = []
    for obj in gc.get_objects():
        if issubclass(type(obj), profile):  # type(): no __class__ property of odd objects runs
            inner = getattr(obj, "profiler", None)
            if getattr(obj, "step_rec_fn", None) is not None or (
                    recording and inner is not None and getattr(inner, "entered", False)
                    and getattr(inner, "kineto_results", None) is None):
                out.append(obj)
    return out


def trace_only_config(with_stack: bool) -> dict:
    """`experimental_config` of torch >= 2.13's `trace_only` for moe-trace's own profiler: its stop
    skips building the per-event objects that only `prof.events()` / `key_averages()` read (moe-trace
    reads the exported JSON; the file is the same). ~16% of the stop on the CPU box
    (benchmarks/profiler_stop_cost.py). Not with `with_stack` (torch turns it off there, with a warning);
    {} on an older torch."""
    if with_stack:
        return {}
    try:
        return {"experimental_config": torch._C._profiler._ExperimentalConfig(trace_only=True)}
    except (AttributeError, TypeError):  # torch < 2.13: no trace_only
        return {}


def _export_with_moe_trace(self, path, *args, **kwargs):
    """`torch.profiler.profile.export_chrome_trace` while moe-trace sessions are attached: the
    user's export, then the counters and metadata of the sessions attached to this very profiler
    added to that file (a session attached without knowing the profiler object goes by its ranges)."""
    result = _ORIGINAL_EXPORT(self, path, *args, **kwargs)
    for rec in list(_ATTACHED):
        if rec.user_profiler is not None and rec.user_profiler() is not self:
            continue
        try:
            rec.inject(path)
        except Exception as exc:  # the user's file stays as torch wrote it
            warnings.warn(f"moe-trace could not add its counters to {path}: {exc}", stacklevel=2)
    return result


def _install_export_hook() -> None:
    global _ORIGINAL_EXPORT
    from torch.profiler import profile

    if _ORIGINAL_EXPORT is None:
        _ORIGINAL_EXPORT = profile.export_chrome_trace
        profile.export_chrome_trace = _export_with_moe_trace


class KinetoRecorder:
    """The torch.profiler session of a "kineto" run and the trace files it becomes.

    Own profiler: `start()` enters a profiler, `begin_step(n)` / `end_step()` wrap every model
    forward in a `ProfilerStep#n` range (torch's own step ranges are turned off: they run from one
    `prof.step()` to the next, so a run of N forwards would get N+1 of them), `snapshot(...)` and
    `advance()` are called after every model forward (counter snapshot, then ``prof.step()``),
    `stop()` leaves the profiler. `export_async(run_data, run_id)` then saves the last window's raw
    trace and writes the moe-trace files under `logdir` in a background thread; `wait()` joins it and
    returns the files or raises its error (also at interpreter exit, for a writer nobody waited for).
    Windows of a schedule are saved by `on_trace_ready` while the run goes. `close()` removes the
    temp dir (the writer does, when it is still going).

    Attached (`attach=True`: the user's torch.profiler is running): no profiler is started and no
    ``prof.step()`` is called (the user's schedule and steps rule); every `export_chrome_trace` of the
    user's profiler — its `on_trace_ready`, `tensorboard_trace_handler` included — gets moe-trace's
    counters and metadata for the steps that trace holds, added to the user's file in place
    (`inject`), with every user event kept.
    """

    def __init__(self, logdir: Path, counters: CounterRecorder, *, schedule: Any = None, slim: bool = True,
                 record_shapes: bool = False, with_stack: bool = False, attach: bool = False,
                 run_factory: Callable[..., RunData] | None = None, run_id: str | None = None,
                 user_profiler: Any = None):
        self.logdir = Path(logdir)
        self.attach = attach
        # attached: a weak reference to the user's torch.profiler.profile (None: not known, e.g. a
        # legacy autograd profiler), so that only its exports get this session's counters
        self.user_profiler = weakref.ref(user_profiler) if user_profiler is not None else None
        self.run_factory = run_factory  # (counts, forward_calls, forward_tokens, padding) -> RunData
        self.run_id = run_id
        self.windows: list[tuple[Path, RunData]] = []  # attached: (user's file, the counts it holds)
        self.step_base = 0  # attached: the first step number in the user's profiler (see trace_step)
        self._next_step = 0
        self._spans: list[tuple[int, int]] = []  # attached: (first, last) snapshot of each window
        self._stopped = False
        self.counters = counters
        self.schedule = schedule
        self.slim = slim
        self.record_shapes = record_shapes
        self.with_stack = with_stack
        self.trace_files: list[Path] = []
        self._snapshots: list[tuple[int, int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self._raw_traces: list[Path] = []
        self._steps: tuple[int, list] | None = None
        self._prof = None
        self._gate: RecordGate | None = None  # open while the own profiler records a slim trace
        self._tmpdir: Path | None = None
        self._step_rf = None
        self._stopped_prof = None  # the last window's profiler, saved by the writer thread
        self._follower = None  # workers.Follower, spawned before the profiler's stop (slim, own profiler)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        #: perf_counter marks of the export ("profiler_stopped", "saved", "written"), for benchmarks, and
        #: "raw_bytes", the size of the raw file torch saved
        self.timings: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self._prof is not None

    # -- profiler lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        global _RUNNING
        with _LOCK:
            if _RUNNING is not None:
                raise ProfileStateError(
                    "another moe-trace kineto session is running (in this thread or another); torch.profiler "
                    "allows one per process: finish the first `with` block first, or use mode='stats'")
            _RUNNING = self
        try:
            self._start()
        except BaseException:
            self._close_gate()
            self._release()
            raise

    def _release(self) -> None:
        global _RUNNING
        with _LOCK:
            if _RUNNING is self:
                _RUNNING = None

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        if self.attach:
            with _LOCK:
                _install_export_hook()
                # sessions whose profiler is gone can never be exported: let their snapshots go
                _ATTACHED[:] = [r for r in _ATTACHED if r.user_profiler is None or r.user_profiler() is not None]
                _ATTACHED.append(self)
                del _ATTACHED[:-MAX_ATTACHED]
                prof = self.user_profiler() if self.user_profiler is not None else None
                self.step_base = self._next_step = (_NEXT_STEP.get(prof, 0) if prof is not None
                                                    else _NEXT_STEP_UNKNOWN[0])
            self._sched = None
            return

        acts = [ProfilerActivity.CPU]
        if any(d.startswith("cuda") for d in self.counters.devices) and torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
        sched = self.schedule
        if isinstance(sched, dict):
            sched = schedule(**sched)
        self._sched = sched
        self._tmpdir = Path(tempfile.mkdtemp(prefix="moe_trace_"))
        self._prof = profile(activities=acts, schedule=sched, record_shapes=self.record_shapes,
                             with_stack=self.with_stack,
                             on_trace_ready=self._on_trace_ready if sched is not None else None,
                             **trace_only_config(self.with_stack))
        self._prof.record_steps = False  # begin_step/end_step write one ProfilerStep#N per forward
        self._prof.__enter__()
        if self.slim and not self.with_stack:  # record only the host ops a slim trace keeps (ranges.py)
            self._gate = RecordGate.open(inside=ProfilerActivity.CUDA in acts)

    def trace_step(self, step: int) -> int:
        """The number of the session's forward `step` in trace names (`moe_trace/{phase}#{n}`): the
        step itself, or attached, `step_base + step`, so that blocks attached one after another to
        one user profiler never share a step name (their counters go by these names)."""
        n = self.step_base + step
        if self.attach and n >= self._next_step:
            self._next_step = n + 1
            prof = self.user_profiler() if self.user_profiler is not None else None
            with _LOCK:
                if prof is not None:
                    _NEXT_STEP[prof] = max(_NEXT_STEP.get(prof, 0), n + 1)
                else:
                    _NEXT_STEP_UNKNOWN[0] = max(_NEXT_STEP_UNKNOWN[0], n + 1)
        return n

    def begin_step(self, step: int) -> None:
        """Before a model forward: open its `ProfilerStep#{step}` range (HTA and torch-tb-profiler
        find iterations by these names)."""
        self.end_step()
        if self._prof is not None:
            self._step_rf = ProfilerRange(f"{PROFILER_STEP_PREFIX}{step}").__enter__()

    def end_step(self) -> None:
        rf, self._step_rf = self._step_rf, None
        if rf is not None:
            rf.__exit__(None, None, None)

    def snapshot(self, step: int, phase: int, tokens_cum: int) -> None:
        """After a model forward: device copies of the counters (no sync), for per-step counts."""
        self._snapshots.append((self.step_base + step, phase, tokens_cum, self.counters.snapshot()))

    def advance(self) -> None:
        """After a model forward (and its observers): one profiler step."""
        if self._prof is not None:
            self._prof.step()

    def _on_trace_ready(self, prof) -> None:
        path = self._tmpdir / f"raw{len(self._raw_traces)}.json"
        prof.export_chrome_trace(str(path))
        self._raw_traces.append(path)

    def stop(self) -> None:
        self._stopped = True
        self.end_step()
        self._close_gate()
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self._sched is None and self.slim:  # its interpreter starts while torch stops (~2 s on the H200)
            from moe_trace.trace.workers import Follower, follow_enabled, follow_parts

            if follow_enabled():
                self._follower = Follower(self._tmpdir / f"raw{len(self._raw_traces)}.json", follow_parts()).spawn()
        prof.__exit__(None, None, None)
        self.timings["profiler_stopped"] = time.perf_counter()
        if self._sched is None:
            self._stopped_prof = prof  # saved by the writer thread (export_async)

    def _close_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.close()

    def close(self) -> None:
        self._close_gate()
        self._release()
        if self._thread is not None and self._thread.is_alive():
            return  # the writer removes the temp dir when it is done
        follower, self._follower = self._follower, None
        if follower is not None:  # spawned at the stop, never used (no export)
            follower.close()
        self._stopped_prof = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- attached to the user's profiler -------------------------------------------------------------
    def inject(self, path) -> None:
        """Add this session's counters and metadata to the user's export `path` for the steps whose
        `moe_trace/{phase}#{step}` ranges it holds (nothing when it holds none). When another
        session's counters are already in that file (two blocks in one window of the user's
        profiler), this session's go into a copy of it next to it, `{name}.{run_id}.pt.trace.json[.gz]`
        (one file holds one run), without the other session's counters."""
        from moe_trace.trace.format import COUNTER_CAT, META_KEY, STEP_RE, TRACE_SUFFIXES, USER_ANNOTATION
        from moe_trace.trace.io import load_json
        from moe_trace.trace.writer import write_trace

        path = Path(path)
        if not path.is_file() or not self._snapshots:
            return
        raw = load_json(path)
        events = raw.get("traceEvents") if isinstance(raw, dict) else None
        if not isinstance(events, list):
            return
        keys = set()
        for e in events:
            if isinstance(e, dict) and e.get("cat") == USER_ANNOTATION:
                m = STEP_RE.match(str(e.get("name", "")))
                if m:
                    keys.add((m.group(1), int(m.group(2))))
        mine = [n for n, s in enumerate(self._snapshots) if (PHASES[s[1]], s[0]) in keys]
        if not mine:
            return
        first, last = mine[0], mine[-1]
        other = raw.get(META_KEY)
        if isinstance(other, dict) and other.get("run_id") != self.run_id:
            raw = dict(raw, traceEvents=[e for e in events if not (
                isinstance(e, dict) and e.get("ph") == "C" and e.get("cat") == COUNTER_CAT)])
            suffix = next((s for s in sorted(TRACE_SUFFIXES, key=len, reverse=True) if path.name.endswith(s)),
                          "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix)
            path = path.with_name(f"{path.name[:-len(suffix)]}.{self.run_id}{suffix}")
        run = self.window_run(first, last)
        steps = self.step_deltas()[first:last + 1]
        # one window number per span of steps: a window exported twice (two handlers) is one window
        # to analyze, which adds the counts of a run's distinct windows (trace/runs.py)
        if (first, last) not in self._spans:
            self._spans.append((first, last))
        write_trace(raw, run, steps, path, slim=False,
                    process=dict(process_info(), run_id=self.run_id, window=self._spans.index((first, last))))
        self.windows.append((path, run))
        self.trace_files.append(path)
        if self._stopped and last == len(self._snapshots) - 1:
            with _LOCK:  # every step of this session has gone into a user's file
                if self in _ATTACHED:
                    _ATTACHED.remove(self)

    def window_run(self, first: int, last: int) -> RunData:
        """RunData of the snapshots first..last (steps of one profiler window): counts are differences
        of the device snapshots before and after the window."""
        host = {}
        for dev in self.counters.devices:
            after = [t.cpu().numpy() if torch.is_tensor(t) else t for t in self._snapshots[last][3][dev]]
            if first:
                before = [t.cpu().numpy() if torch.is_tensor(t) else t for t in self._snapshots[first - 1][3][dev]]
            else:
                before = [np.zeros_like(a) for a in after]
            dc = self.counters.devices[dev]
            P = len(PHASES)
            c, k, pad, conf, calls, compiled_calls = (a - b for a, b in zip(after, before))
            host[dev] = (c.reshape(P, dc.L, dc.bins), k.reshape(P, dc.L, dc.bins), conf, pad.reshape(P, dc.L),
                         calls + compiled_calls.reshape(P, dc.L))
        counts = self.counters.counts_from(host)
        calls = {p: 0 for p in PHASES}
        tokens = {p: 0 for p in PHASES}
        for st in self.step_deltas()[first:last + 1]:
            calls[st["phase"]] += 1
            tokens[st["phase"]] += st["tokens"]
        padding = {p: max((c.padding_tokens for c in counts[p] if c is not None), default=0) for p in PHASES}
        return self.run_factory(counts, calls, tokens, padding)

    # -- export -----------------------------------------------------------------------------------
    def export(self, run_data: RunData, run_id: str, started_at: float | None = None) -> list[Path]:
        """Save the raw trace(s) and write the moe-trace traces under `logdir`, in this thread."""
        self.export_async(run_data, run_id, started_at, background=False)
        return self.wait()

    def export_async(self, run_data: RunData, run_id: str, started_at: float | None = None, *,
                     background: bool = True) -> None:
        """Start writing the traces (names: trace/writer.py) in a writer thread; `wait()` for them.

        Reads the counter snapshots here (one device copy), so the thread touches no device memory.
        The raw save (`export_chrome_trace`, C++) holds the GIL while it runs: the thread lets the
        caller's `with` block return first, then other Python threads pause for that part."""
        steps = self.step_deltas()
        process = dict(process_info(), run_id=run_id)
        go = threading.Event()
        try:  # the logdir exists when the block returns (the files appear when the writer is done)
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the writer reports it

        def work():
            go.wait()
            spawned, self._follower = self._follower, None
            cpu = None
            try:
                from moe_trace.trace.writer import write_run_traces

                pass1 = {}
                if self._stopped_prof is not None:
                    path = self._tmpdir / f"raw{len(self._raw_traces)}.json"
                    # slim pass 1 in a worker process while torch writes the raw file (workers.Follower)
                    follower = spawned.start() if spawned is not None and spawned.path == path else None
                    saved = False
                    try:
                        self._stopped_prof.export_chrome_trace(str(path))
                        saved = True
                        self.timings["saved"] = time.perf_counter()
                        cpu = time.thread_time()
                        self.timings["raw_bytes"] = path.stat().st_size  # not a mark: the raw file's size
                    finally:
                        got = follower.finish(saved) if follower is not None else None
                    if got is not None:
                        pass1[path] = got
                        self.timings["pass1_followed"] = time.perf_counter()
                        self.timings["follower_done"] = follower.done_at  # its last region (same clock)
                    self._stopped_prof = None
                    self._raw_traces.append(path)
                self.timings.setdefault("saved", time.perf_counter())
                self.trace_files += write_run_traces(self._raw_traces, run_data, steps, self.logdir, slim=self.slim,
                                                     process=process, started_at=started_at, pass1=pass1,
                                                     marks=self.timings)
                self.timings["written"] = time.perf_counter()
                if cpu is not None:  # not a mark: the writer thread's CPU seconds after the save (vs waiting)
                    self.timings["tail_thread_cpu"] = time.thread_time() - cpu
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                self._error = exc
            finally:
                if spawned is not None:  # finish() has closed it, unless it was not used
                    spawned.close()
                for raw in self._raw_traces:
                    raw.unlink(missing_ok=True)
                self._stopped_prof = None
                if self._tmpdir is not None:
                    shutil.rmtree(self._tmpdir, ignore_errors=True)
                    self._tmpdir = None

        if not background:
            go.set()
            work()
            return
        self._thread = threading.Thread(target=work, name="moe-trace-writer", daemon=False)
        self._thread.start()
        _PENDING.add(self)
        self._token = pending.register(self.logdir, self.wait)
        go.set()

    def wait(self) -> list[Path]:
        """The trace files, once written; raises the writer's error (every time it is asked)."""
        t = self._thread
        if t is not None:
            t.join()
        _PENDING.discard(self)
        if getattr(self, "_token", None) is not None:
            pending.done(self._token)
            self._token = None
        if self._error is not None:
            raise self._error
        return self.trace_files

    @property
    def writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def step_deltas(self) -> list[dict[str, Any]]:
        """Per-step counts (differences of successive device snapshots), read in one copy per device
        (computed once: the session's roofline and the trace export both use them)."""
        if self._steps is None or self._steps[0] != len(self._snapshots):
            self._steps = (len(self._snapshots), self._step_deltas())
        return self._steps[1]

    def _step_deltas(self) -> list[dict[str, Any]]:
        if not self._snapshots:
            return []
        layers_info = self.counters.layers
        host: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        n_snap = len(self._snapshots)
        for dev, dc in self.counters.devices.items():
            c, k, pad = (torch.stack([s[3][dev][j] for s in self._snapshots]).cpu().numpy() for j in range(3))
            shape = (n_snap, len(PHASES), dc.L, dc.bins)
            host[dev] = (c.reshape(shape), k.reshape(shape), pad.reshape(n_snap, len(PHASES), dc.L))
        steps = []
        prev_tokens = {p: 0 for p in range(len(PHASES))}
        for n, (step, phase, tokens_cum, _) in enumerate(self._snapshots):
            layers = {}
            padding = 0
            for dev, (c, k, pad) in host.items():
                dc = self.counters.devices[dev]
                dc_c = c[n, phase] - (c[n - 1, phase] if n else 0)
                dc_k = k[n, phase] - (k[n - 1, phase] if n else 0)
                dc_pad = pad[n, phase] - (pad[n - 1, phase] if n else 0)
                padding = max(padding, int(dc_pad.max(initial=0)))
                for local in range(dc.L):
                    i = self.counters.layer_index(dc, local)
                    E = layers_info[i].num_experts
                    layers[i] = {"expert_counts": dc_c[local, :E].tolist(),
                                 "k_hist": dc_k[local].tolist()}
            # a step's tokens leave out its padding positions, like the run's totals
            steps.append({"step": step, "phase": PHASES[phase], "tokens": tokens_cum - prev_tokens[phase] - padding,
                          "layers": layers})
            prev_tokens[phase] = tokens_cum
        return steps


_PENDING: "weakref.WeakSet[KinetoRecorder]" = weakref.WeakSet()


@atexit.register
def _finish_writers() -> None:
    """At interpreter exit: wait for trace writers nobody waited for, and report their errors."""
    for rec in list(_PENDING):
        try:
            files = rec.wait()
        except BaseException as exc:  # noqa: BLE001 - nothing above us to raise to any more
            print(f"moe-trace: error: writing the kineto trace failed: {exc}", file=sys.stderr)
        else:
            if files and os.environ.get("MOE_TRACE_VERBOSE"):
                print(f"moe-trace: wrote {', '.join(map(str, files))}", file=sys.stderr)


def process_info() -> dict[str, Any]:
    """Rank, world size, host name and pid of this process (trace metadata and file names)."""
    rank = world = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return {"dist_rank": rank, "world_size": world, "hostname": socket.gethostname(), "pid": os.getpid()}
