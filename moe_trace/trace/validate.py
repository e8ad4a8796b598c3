"""Check a Chrome trace against the JSON rules Perfetto documents and implements.

Rules (Perfetto `docs/faq.md`, `getting-started/other-formats.md` and its JSON importer
`src/trace_processor/importers/json/json_trace_{tokenizer,parser_impl}.cc`):

* the file is a JSON object with a `traceEvents` array, or a bare array of events;
* every event is an object whose `ph` is a phase Perfetto imports: `B E X` (slices), `i I R`
  (instants), `b e n` (async), `C` (counters), `s t f` (flows), `M` (metadata). Others (`P`
  samples, `O N D` objects, the deprecated `S T F` async) are ignored by Perfetto and reported;
* `ts` is present (only `M` may omit it) and numeric (a number, or a numeric string, which Perfetto
  coerces); `X` has a numeric `dur` >= 0;
* `pid` / `tid` are integers >= 0 or strings (Perfetto interns strings, "brittle" but accepted);
* no top-level field of an event holds an array (Perfetto's tokenizer stops the whole import with
  "unsupported JSON dictionary with array"); arrays inside `args` are fine;
* `C`: `args` is an object and every value is a finite number (anything else is a
  `json_parser_failure` and no counter);
* `M`: name is one of `process_name`, `thread_name` (args.name a string), `process_labels`
  (args.labels a string), `process_sort_index`, `thread_sort_index` (args.sort_index an integer);
* `b e n` have an `id` (or `id2` with `local`/`global`); `s t f` have an `id` (or `bind_id`);
  instants' scope `s` is `g`, `p` or `t`;
* complete events nest properly per (pid, tid): two `X` events on one thread either nest or are
  disjoint (Perfetto does not display partially overlapping slices); `B`/`E` balance per thread.

`validate_trace(obj_or_path) -> list[str]`: empty when valid; otherwise one line per broken rule
with the number of offending events and the first example.
"""
from __future__ import annotations

import gzip
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

PHASES = frozenset("BEXiIRbenCstfM")
IGNORED_PHASES = {"P": "sample", "O": "object snapshot", "N": "object created", "D": "object destroyed",
                  "S": "deprecated async start", "T": "deprecated async step", "F": "deprecated async finish"}
META_NAMES = {"process_name": ("name", str), "thread_name": ("name", str), "process_labels": ("labels", str),
              "process_sort_index": ("sort_index", int), "thread_sort_index": ("sort_index", int)}


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
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if allow_str and isinstance(x, str):
        try:
            return math.isfinite(float(x))
        except ValueError:
            return False
    return False


def _num(x: Any) -> float:
    return float(x)


def _id_ok(x: Any) -> bool:
    return (isinstance(x, (int, str)) and not isinstance(x, bool)) and x != ""


def load(obj_or_path: Any) -> Any:
    if isinstance(obj_or_path, (str, os.PathLike)):
        p = Path(obj_or_path)
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        from .writer import no_gc

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
    if isinstance(obj, dict):
        events = obj.get("traceEvents")
        if not isinstance(events, list):
            return ["top level: an object without a traceEvents array"]
    elif isinstance(obj, list):
        events = obj
    else:
        return ["top level: neither an object with traceEvents nor an array of events"]
    probs = _Problems()
    slices: dict[tuple, list] = defaultdict(list)  # (pid, tid) -> [(start_ns, end_ns, slack, index)]
    be: dict[tuple, int] = defaultdict(int)
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            probs.add("event is not an object", i, ev)
            continue
        ph = ev.get("ph")
        if not isinstance(ph, str) or len(ph) != 1:
            probs.add("missing or non-string 'ph'", i, ev)
            continue
        if ph not in PHASES:
            what = IGNORED_PHASES.get(ph)
            probs.add(f"phase {ph!r} ({what}) is ignored by Perfetto" if what else f"unknown phase {ph!r}", i, ev)
            continue
        arr = next((k for k, v in ev.items() if isinstance(v, list)), None)
        if arr is not None:
            probs.add(f"event field {arr!r} holds an array (Perfetto's JSON tokenizer rejects the file)", i, ev)
            continue
        for k in ("pid", "tid"):
            if k in ev:
                v = ev[k]
                if not ((isinstance(v, int) and not isinstance(v, bool) and v >= 0) or isinstance(v, str)):
                    probs.add(f"'{k}' is not an integer >= 0 or a string", i, ev)
        if "ts" not in ev:
            if ph != "M":
                probs.add("missing 'ts' (only M events may omit it)", i, ev)
                continue
        elif not _is_num(ev["ts"]):
            probs.add("'ts' is not numeric", i, ev)
            continue
        if "args" in ev and not isinstance(ev["args"], dict):
            probs.add("'args' is not an object", i, ev)
        if ph == "X":
            dur = ev.get("dur")
            if not _is_num(dur) or _num(dur) < 0:
                probs.add("X event without a numeric 'dur' >= 0", i, ev)
                continue
            ts = _num(ev["ts"])
            start = round(ts * 1000)
            slack = 0 if abs(ts) < 2 ** 43 else math.ceil(math.ulp(ts) * 1000)
            slices[(_key(ev.get("pid")), _key(ev.get("tid")))].append((start, start + round(_num(dur) * 1000), slack, i))
        elif ph == "C":
            args = ev.get("args")
            if not isinstance(args, dict):
                probs.add("C event without an object 'args'", i, ev)
            elif not args:
                probs.add("C event with empty 'args' (no counter value)", i, ev)
            elif not all(_is_num(v, allow_str=False) for v in args.values()):
                probs.add("C event with a non-numeric args value", i, ev)
        elif ph == "M":
            name = ev.get("name")
            spec = META_NAMES.get(name)
            if spec is None:
                probs.add(f"M event with unknown name {name!r}", i, ev)
            else:
                key, typ = spec
                args = ev.get("args")
                val = args.get(key) if isinstance(args, dict) else None
                if not isinstance(val, typ) or isinstance(val, bool):
                    probs.add(f"M {name} without args.{key} of type {typ.__name__}", i, ev)
        elif ph in "ben":
            id2 = ev.get("id2")
            has_id2 = isinstance(id2, dict) and (_id_ok(id2.get("local")) or _id_ok(id2.get("global")))
            if not (_id_ok(ev.get("id")) or has_id2):
                probs.add(f"async '{ph}' event without 'id' or 'id2'", i, ev)
            if "pid" not in ev:
                probs.add(f"async '{ph}' event without 'pid'", i, ev)
        elif ph in "stf":
            if not (_id_ok(ev.get("id")) or _id_ok(ev.get("bind_id"))):
                probs.add(f"flow '{ph}' event without 'id'", i, ev)
        elif ph in "iIR":
            if "s" in ev and ev["s"] not in ("g", "p", "t"):
                probs.add("instant event with a scope 's' other than g, p, t", i, ev)
        elif ph == "B":
            be[(_key(ev.get("pid")), _key(ev.get("tid")))] += 1
        elif ph == "E":
            k = (_key(ev.get("pid")), _key(ev.get("tid")))
            if be[k] <= 0:
                probs.add("E event without an open B on its thread", i, ev)
            else:
                be[k] -= 1
    out = probs.lines()
    unclosed = sum(v for v in be.values() if v > 0)
    if unclosed:
        out.append(f"B events never closed by an E: {unclosed}")
    pairs, example = _overlaps(slices, events)
    if pairs:
        out.append(f"partially overlapping X events on one thread: {pairs} pair{'s' if pairs != 1 else ''} "
                   f"(first: {example})")
    return out


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
