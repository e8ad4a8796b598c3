"""Check a Chrome trace against what Perfetto's JSON importer does with it.

Each rule mirrors a branch of Perfetto's importer (`src/trace_processor/importers/json/
json_trace_tokenizer.cc` and `json_trace_parser.cc`, google/perfetto at ec5d16b, Aug 2026); the
rules and the branch each one comes from are listed in docs/trace-format.md. A trace that passes
imports with no `json_*_failure`, `flow_*` or slice stats and with every event where it belongs.

Problems fall in three groups: the whole import aborts (top-level `traceEvents` not an array,
`displayTimeUnit` or `systemTraceEvents` not a string; a non-numeric `dur`/`tts`/`tdur`, after which
the tokenizer stops and the rest of the file is lost), one event is dropped or misplaced (missing or
non-numeric `ts`, pids above 2^32-1 mapped to 0, non-numeric counter values, flows with an id that
is not a hex string...), or the event is not shown (phases Perfetto skips, partially overlapping
`X` events, unbalanced `B`/`E`).

`validate_trace(obj_or_path) -> list[str]`: empty when valid; otherwise one line per broken rule
with the number of offending events and the first example.
"""
from __future__ import annotations

import gzip
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

#: phases Perfetto's parser imports (`P`: V8 CPU-profile samples, `T`: thread states)
PHASES = frozenset("BEXiIRbenCstfMPT")
#: phases it tokenizes and then skips without a stat: nothing of them is shown
IGNORED_PHASES = {"O": "object snapshot", "N": "object created", "D": "object destroyed",
                  "S": "deprecated async start", "F": "deprecated async finish",
                  "p": "deprecated async step"}
#: metadata names Perfetto's parser reads; any other `M` event is skipped silently (not a problem)
META_NAMES = {"process_name": "name", "thread_name": "name",
              "process_sort_index": "sort_index", "thread_sort_index": "sort_index"}
UINT32_MAX = 2 ** 32 - 1
# json::ParseValue on a string ts: a JSON number with no leading/trailing characters
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# base::CStringToUInt64(s, 16) = strtoull: optional space and sign, optional 0x, hex digits, nothing after
_HEX_ID = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:0[xX])?[0-9a-fA-F]+")


class _Problems:
    def __init__(self):
        self.items: dict[str, list] = {}

    def add(self, rule: str, index: int, ev: Any) -> None:
        entry = self.items.get(rule)
        if entry is None:
            self.items[rule] = [1, index, ev]
        else:
            entry[0] += 1

    def lines(self) -> list[str]:
        out = []
        for rule, (n, index, ev) in self.items.items():
            desc = _describe(ev)
            out.append(f"{rule}: {n} event{'s' if n != 1 else ''} (first: #{index} {desc})")
        return out


def _describe(ev: Any) -> str:
    if not isinstance(ev, dict):
        return repr(ev)[:80]
    keys = ("ph", "cat", "name", "pid", "tid", "ts", "dur")
    return "{" + ", ".join(f"{k}={ev[k]!r}" for k in keys if k in ev)[:160] + "}"


def _is_num(x: Any, allow_str: bool = True) -> bool:
    """A number the tokenizer's CoerceToTs takes: int, finite float, or a string holding a JSON number."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if allow_str and isinstance(x, str):
        return _JSON_NUMBER.fullmatch(x) is not None and math.isfinite(float(x))
    return False


def _num(x: Any) -> float:
    return float(x)


def _counter_value_ok(x: Any) -> bool:
    """The parser's C branch: int, double, or a string base::StringToDouble reads (strtod)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if isinstance(x, str):
        try:
            return math.isfinite(float(x))
        except ValueError:
            return False
    return False


def _pid_problem(v: Any) -> str | None:
    """CoerceToUint32: ints and doubles outside [0, 2^32-1] become 0; strings are interned; others unset."""
    if isinstance(v, str):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "is not a number or a string (Perfetto leaves it unset: 0)"
    if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
        return "is not an integer (Perfetto truncates it)"
    if not 0 <= v <= UINT32_MAX:
        return "is outside 0..2^32-1 (Perfetto maps it to 0)"
    return None


def _id_ok(x: Any) -> bool:
    """ExtractId: an id is a string or an integer (a double, bool or object is no id)."""
    return (isinstance(x, (int, str)) and not isinstance(x, bool)) and x != ""


def _flow_id_ok(x: Any) -> bool:
    """MaybeExtractFlowIdentifier: an integer, or a string that parses as hex (CStringToUInt64 base 16)."""
    if isinstance(x, str):
        return _HEX_ID.fullmatch(x) is not None
    return _id_ok(x)


def _flow_id(x: Any) -> Any:
    """The flow id Perfetto pairs on: a number as it is, a string parsed as hex ("0xFF" == "ff")."""
    if isinstance(x, str):
        t = x.strip().lstrip("+")
        neg = t.startswith("-")
        t = t.lstrip("-")
        t = t[2:] if t[:2].lower() == "0x" else t
        return -int(t, 16) if neg else int(t, 16)
    return x


def load(obj_or_path: Any) -> Any:
    if isinstance(obj_or_path, (str, os.PathLike)):
        p = Path(obj_or_path)
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        from .io import no_gc

        with no_gc():
            return orjson.loads(data)
    return obj_or_path


def validate_trace(obj_or_path: Any) -> list[str]:
    """Problems Perfetto would have with this trace (a dict, a list of events, or a file path)."""
    try:
        obj = load(obj_or_path)
    except FileNotFoundError:
        return [f"file not found: {obj_or_path}"]
    except (OSError, EOFError, orjson.JSONDecodeError) as exc:
        return [f"not readable as (gzipped) JSON: {exc}"]
    top: list[str] = []
    if isinstance(obj, dict):
        events = obj.get("traceEvents", [])
        if not isinstance(events, list):
            return ["top level: traceEvents is not an array (Perfetto aborts the import)"]
        if "traceEvents" not in obj and "systemTraceEvents" not in obj:
            return ["top level: an object without a traceEvents array"]
        for key in ("displayTimeUnit", "systemTraceEvents"):
            if key in obj and not isinstance(obj[key], str):
                top.append(f"top level: {key} is not a string (Perfetto aborts the import)")
    elif isinstance(obj, list):
        events = obj
    else:
        return ["top level: neither an object with traceEvents nor an array of events"]
    probs = _Problems()
    flows: list[tuple] = []  # (ts, index, ph, (cat, name, id), (pid, tid), binds to the enclosing slice)
    slices: dict[tuple, list] = defaultdict(list)  # (pid, tid) -> [(start_ns, end_ns, slack, index)]
    be: dict[tuple, int] = defaultdict(int)
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            probs.add("event is not an object", i, ev)
            continue
        if not ev:
            continue  # "{}" is skipped silently (a common trailing element)
        ph = ev.get("ph")
        if not isinstance(ph, str) or len(ph) != 1:
            probs.add("missing or non-string 'ph'", i, ev)
            continue
        if ph not in PHASES:
            what = IGNORED_PHASES.get(ph)
            probs.add(f"phase {ph!r} ({what}) is ignored by Perfetto" if what else f"unknown phase {ph!r}", i, ev)
            continue
        stop = next((k for k in ("dur", "tts", "tdur") if k in ev and not _is_num(ev[k])), None)
        if stop is not None:
            probs.add(f"non-numeric '{stop}' (Perfetto's tokenizer stops here: this and every later event "
                      "is lost)", i, ev)
            continue
        for k in ("pid", "tid"):
            if k in ev:
                why = _pid_problem(ev[k])
                if why:
                    probs.add(f"'{k}' {why}", i, ev)
        if "ts" not in ev:
            if ph != "M":
                probs.add("missing 'ts' (only M events may omit it)", i, ev)
                continue
        elif not _is_num(ev["ts"]) and ph != "M":  # an M event's bad ts is read as 0
            probs.add("'ts' is not numeric", i, ev)
            continue
        if "args" in ev and not isinstance(ev["args"], dict):
            probs.add("'args' is not an object", i, ev)
        if "bind_id" in ev and ph in "XBbn":
            if not _flow_id_ok(ev["bind_id"]):
                probs.add("'bind_id' is not an integer or a hex string (no flow)", i, ev)
            elif not (ev.get("flow_in") is True or ev.get("flow_out") is True):
                probs.add("'bind_id' without flow_in/flow_out true (flow_without_direction)", i, ev)
        if ph == "X":
            dur = ev.get("dur")
            if dur is None or _num(dur) < 0:
                probs.add("X event without a numeric 'dur' >= 0", i, ev)
                continue
            ts = _num(ev["ts"])
            start = round(ts * 1000)
            slack = 0 if abs(ts) < 2 ** 43 else math.ceil(math.ulp(ts) * 1000)
            slices[(_key(ev.get("pid")), _key(ev.get("tid")))].append((start, start + round(_num(dur) * 1000), slack, i))
        elif ph == "T":
            if "dur" not in ev:
                probs.add("T (thread state) event without 'dur'", i, ev)
        elif ph == "C":
            args = ev.get("args")
            if args is None:
                probs.add("C event without an object 'args'", i, ev)
            elif not isinstance(args, dict):
                pass  # reported above
            elif not args:
                probs.add("C event with empty 'args' (no counter value)", i, ev)
            elif not all(_counter_value_ok(v) for v in args.values()):
                probs.add("C event with a non-numeric args value", i, ev)
        elif ph == "M":
            name = ev.get("name")
            key = META_NAMES.get(name)
            args = ev.get("args")
            if key is not None and isinstance(args, dict) and key in args:
                val = args[key]
                if key == "name" and not (isinstance(val, str) and val):
                    probs.add(f"M {name} without a non-empty string args.name", i, ev)
                elif key == "sort_index" and (isinstance(val, bool) or not isinstance(val, (int, float))
                                              or not math.isfinite(val)):
                    probs.add(f"M {name} without a numeric args.sort_index", i, ev)
            elif key is not None:
                probs.add(f"M {name} without args.{key} (has no effect)", i, ev)
        elif ph in "ben":
            id2 = ev.get("id2")
            has_id2 = isinstance(id2, dict) and (_id_ok(id2.get("local")) or _id_ok(id2.get("global")))
            if not (_id_ok(ev.get("id")) or has_id2):
                probs.add(f"async '{ph}' event without 'id' or 'id2'", i, ev)
            if "pid" not in ev:
                probs.add(f"async '{ph}' event without 'pid'", i, ev)
        elif ph in "stf":
            if "id" not in ev:
                probs.add(f"flow '{ph}' event without 'id'", i, ev)
            elif not _flow_id_ok(ev["id"]):
                probs.add(f"flow '{ph}' event whose 'id' is not an integer or a hex string (flow_invalid_id)", i, ev)
            else:
                flows.append((_num(ev["ts"]), i, ph, (_key(ev.get("cat")), _key(ev.get("name")), _flow_id(ev["id"])),
                              (_key(ev.get("pid")), _key(ev.get("tid"))), ph != "f" or ev.get("bp") == "e"))
        elif ph in "iIR":
            scope = ev.get("s")
            if scope == "g":
                pass
            elif scope == "p":
                if "pid" not in ev:
                    probs.add("process-scoped instant without 'pid'", i, ev)
            elif "tid" not in ev:  # "t", missing, or any other value: a thread instant
                probs.add("thread-scoped instant without 'tid'", i, ev)
        elif ph == "B":
            be[(_key(ev.get("pid")), _key(ev.get("tid")))] += 1
        elif ph == "E":
            k = (_key(ev.get("pid")), _key(ev.get("tid")))
            if be[k] <= 0:
                probs.add("E event without an open B on its thread", i, ev)
            else:
                be[k] -= 1
    _check_flows(flows, slices, events, probs)
    out = top + probs.lines()
    unclosed = sum(v for v in be.values() if v > 0)
    if unclosed:
        out.append(f"B events never closed by an E: {unclosed}")
    pairs, example = _overlaps(slices, events)
    if pairs:
        out.append(f"partially overlapping X events on one thread: {pairs} pair{'s' if pairs != 1 else ''} "
                   f"(Perfetto moves them to an overflow track; first: {example})")
    return out


def _check_flows(flows: list, slices: dict, events: list, probs: _Problems) -> None:
    """Flow v1 events in time order, as catapult's importer pairs them (trace_event_importer.js
    createFlowSlices_, keyed by id, cat and name) and Perfetto's FlowTracker: an `f`/`t` needs an open
    `s` (catapult: "Found flow phase f ... but no flow start found" import warning; Perfetto:
    flow_end_without_start / flow_step_without_start), an `f` closes it; an `s`, a `t` and an `f` with
    `bp: "e"` bind to the X slice enclosing their ts on their thread (Perfetto: flow_no_enclosing_slice;
    catapult: "does not start/end at an actual slice")."""
    import bisect

    if not flows:
        return
    tracks = {}
    for key, items in slices.items():
        items = sorted(items)
        ends, m = [], -1
        for a, b, slack, _ in items:
            m = max(m, b + slack)
            ends.append(m)
        tracks[key] = ([a - slack for a, _, slack, _ in items], ends)
    open_ = set()
    for ts, i, ph, key, track, enclosed in sorted(flows, key=lambda f: (f[0], f[1])):
        if enclosed:
            starts, ends = tracks.get(track, ((), ()))
            t = round(ts * 1000)
            k = bisect.bisect_right(starts, t) - 1
            if k < 0 or ends[k] < t:
                probs.add(f"flow '{ph}' event not inside an X slice on its thread (flow_no_enclosing_slice)",
                          i, events[i])
        if ph == "s":
            open_.add(key)
        elif key not in open_:
            probs.add(f"flow '{ph}' event without an earlier 's' of its id, cat and name "
                      "(flow_end_without_start; catapult warns)", i, events[i])
        elif ph == "f":
            open_.discard(key)


def _key(x: Any) -> Any:
    return x if isinstance(x, (int, str)) else repr(x)


def _overlaps(slices: dict[tuple, list], events: list) -> tuple[int, str]:
    """Count pairs of X events on one (pid, tid) that overlap without nesting."""
    pairs = 0
    example = ""
    for items in slices.values():
        items.sort(key=lambda x: (x[0], -x[1]))
        stack: list[tuple[int, int, int, int]] = []
        for start, end, slack, i in items:
            while stack and stack[-1][1] <= start + max(slack, stack[-1][2]):
                stack.pop()
            for s_start, s_end, s_slack, j in reversed(stack):
                if end <= s_end + max(slack, s_slack):
                    break  # nested in this one, hence in every enclosing one
                pairs += 1
                if not example:
                    example = f"#{j} {_describe(events[j])} and #{i} {_describe(events[i])}"
            stack.append((start, end, slack, i))
    return pairs, example
