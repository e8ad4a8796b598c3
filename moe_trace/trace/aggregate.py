"""Running totals of the events a reader hands over (both parsers feed the same `Aggregate`).

Memory is bounded by the number of range instances (CPU and GPU), steps and counter events, never
by the number of events.
"""
from __future__ import annotations

import json
from typing import Any

from .format import (COUNTER_CAT, DEVICE_CATS, GPU_USER_ANNOTATION, META_KEY, PROFILER_STEP_RE, RANGE_RE, READ_CATS,
                     STEP_RE, USER_ANNOTATION)


def str_of(raw: bytes) -> str:
    """A JSON string token (with its quotes) as text."""
    if b"\\" in raw:
        return json.loads(raw)
    return raw[1:-1].decode("utf-8", "replace")


class BadEvent(ValueError):
    """An event the reader cannot aggregate (the reader turns it into a TraceError naming the file)."""


class Aggregate:
    """Running totals; memory bounded by the number of distinct ranges and GPU annotation instances."""

    def __init__(self):
        self.devices: dict[Any, list] = {}  # pid -> [kernels, kernel_us, memcpy_n, memcpy_us, memset_n, memset_us, t0, t1]
        self.cpu: dict[tuple, list] = {}  # (pid, phase, layer, part) -> [us, n]
        self.gpu: dict[tuple, list] = {}
        self.spans: dict[tuple, list] = {}  # (pid, external id) -> [t0, t1, phase, layer, part, dur|None]
        # CPU range instances, to put each range (and, by its External id, its GPU span) in its step:
        # (pid, external id | None, ts, dur, part)
        self.ranges: list[tuple] = []
        self.steps: dict[tuple, dict] = {}  # (pid, step) -> {phase, ts, dur}
        self.pstep: dict[int, float] = {}
        self.user_annotations = 0
        self.counters: list[tuple] = []  # (name, pid, ts, args)
        self.names: dict[Any, str] = {}
        self.events = 0
        self._parsed: dict[bytes | str, tuple | None] = {}

    def set_metadata(self, meta: dict) -> None:
        mt = meta.get(META_KEY)
        if isinstance(mt, dict) and isinstance(mt.get("pid_names"), dict):
            for k, v in mt["pid_names"].items():
                self.names[pidkey(k)] = str(v)

    def device_activity(self, code: int, pid, ts: float, dur: float) -> None:
        d = self.devices.get(pid)
        if d is None:
            d = self.devices[pid] = [0, 0.0, 0, 0.0, 0, 0.0, ts, ts + dur]
        d[2 * code] += 1
        d[2 * code + 1] += dur
        if ts < d[6]:
            d[6] = ts
        if ts + dur > d[7]:
            d[7] = ts + dur

    def _classify(self, raw) -> tuple | None:
        """('range', phase, layer, part) | ('step', phase, n) | ('pstep', n) | None, cached per name."""
        c = self._parsed.get(raw, False)
        if c is not False:
            return c
        name = str_of(raw) if isinstance(raw, bytes) else raw
        c = None
        if isinstance(name, str):
            m = RANGE_RE.match(name)
            if m:
                c = ("range", m.group(1), int(m.group(2)), m.group(3))
            else:
                m = STEP_RE.match(name)
                if m:
                    c = ("step", m.group(1), int(m.group(2)))
                else:
                    m = PROFILER_STEP_RE.match(name)
                    if m:
                        c = ("pstep", int(m.group(1)))
        if len(self._parsed) < 100_000:
            self._parsed[raw] = c
        return c

    def annotation(self, gpu: bool, raw, pid, ts: float, dur: float, ext) -> None:
        if not gpu:
            self.user_annotations += 1
        c = self._classify(raw)
        if c is None:
            return
        kind = c[0]
        if kind == "range":
            _, phase, layer, part = c
            if gpu:
                if ext is not None:
                    s = self.spans.get((pid, ext))
                    if s is None:  # one range instance: its spans on several streams are unioned
                        self.spans[(pid, ext)] = [ts, ts + dur, phase, layer, part, dur]
                    else:
                        s[0] = min(s[0], ts)
                        s[1] = max(s[1], ts + dur)
                        s[5] = None
                    return
                acc = self.gpu.setdefault((pid, phase, layer, part), [0.0, 0])
            else:
                acc = self.cpu.setdefault((pid, phase, layer, part), [0.0, 0])
                self.ranges.append((pid, ext, ts, dur, part))
            acc[0] += dur
            acc[1] += 1
        elif gpu:
            return
        elif kind == "step":
            key = (pid, c[2])
            if key not in self.steps:
                self.steps[key] = {"phase": c[1], "ts": ts, "dur": dur}
        else:
            self.pstep.setdefault(c[1], dur)

    def add_event(self, ev: dict) -> None:
        cat = ev.get("cat")
        pid = ev.get("pid")
        if not isinstance(cat, (str, type(None))) or not isinstance(pid, (int, float, str, type(None))):
            raise BadEvent(f"an event has a {'cat' if not isinstance(cat, (str, type(None))) else 'pid'} that is "
                           f"{type(cat if not isinstance(cat, (str, type(None))) else pid).__name__}, not a "
                           f"{'string' if not isinstance(cat, (str, type(None))) else 'number or string'}")
        if cat not in _WANTED_CATS:
            if ev.get("ph") == "M" and ev.get("name") == "process_name":
                args = ev.get("args")
                if isinstance(args, dict) and isinstance(args.get("name"), str):
                    self.names.setdefault(pidkey(ev.get("pid")), args["name"])
            return
        ph = ev.get("ph")
        if ph == "X":
            code = DEVICE_CATS.get(cat) if isinstance(cat, str) else None
            try:
                ts = fnum(ev.get("ts"))
                dur = fnum(ev.get("dur"))
            except (TypeError, ValueError):
                return
            if code is not None:
                self.device_activity(code, pidkey(ev.get("pid")), ts, dur)
            elif cat in (USER_ANNOTATION, GPU_USER_ANNOTATION):
                gpu = cat == GPU_USER_ANNOTATION
                args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
                ext = args.get("External id")
                name = ev.get("name")
                self.annotation(gpu, name if isinstance(name, str) else None, pidkey(ev.get("pid")), ts, dur,
                                ext if isinstance(ext, int) else None)
        elif ph == "C" and cat == COUNTER_CAT:
            try:
                ts = fnum(ev.get("ts"))
            except (TypeError, ValueError):
                return
            args = ev.get("args")
            if isinstance(args, dict):
                self.counters.append((ev.get("name"), pidkey(ev.get("pid")), ts, args))


_WANTED_CATS = READ_CATS


def fnum(x) -> float:
    if isinstance(x, bool):
        raise TypeError
    return float(x)


def pidkey(x):
    if isinstance(x, str):
        try:
            return int(x)
        except ValueError:
            return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


