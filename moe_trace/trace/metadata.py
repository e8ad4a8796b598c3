"""Checks of a trace's `moe_trace` metadata key before it becomes `RunData`.

Every problem is one `TraceError` naming the file, where in the key it is and what is wrong;
implausible values (zero experts, negative counts, a count list of the wrong length) are rejected,
not reported. Non-finite statistics are fine: the writer stores them as the strings `"NaN"`,
`"Infinity"`, `"-Infinity"` (strict JSON; older files have `null`), and they come back as floats
(null as NaN).
"""
from __future__ import annotations

import math
from typing import Any

from moe_trace.analysis import PARTS, PHASES, RunData
from moe_trace.errors import TraceError

from .format import MERGED_PREFIX, SCHEMA_PREFIX

MAX_EXPERTS = 1 << 20
MAX_LAYERS = 1 << 16
MAX_INT = 1 << 62
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_LAYER_INTS = ("hidden_size", "expert_dim", "expert_hidden_size", "shared_expert_dim", "router_flops_per_token",
               "expert_bytes", "router_bytes", "shared_bytes")


class _Bad(Exception):
    pass


def encode_nonfinite(obj: Any) -> Any:
    """A copy of `obj` with NaN / inf floats as the strings "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_nonfinite(v) for v in obj]
    return obj


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Bad(f"{where} is {_what(v)}, not an integer")
    if v < lo or v > hi:
        raise _Bad(f"{where} is {v}, outside [{lo}, {hi}]")
    return v


def _float(v: Any, where: str, *, null_ok: bool = True) -> float | None:
    if v is None:
        if null_ok:
            return math.nan
        raise _Bad(f"{where} is null")
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _Bad(f"{where} is {_what(v)}, not a number")
    return float(v)


def _dict(v: Any, where: str, required: bool = True) -> dict:
    if v is None and not required:
        return {}
    if not isinstance(v, dict):
        raise _Bad(f"{where} is {_what(v)}, not an object" if v is not None else f"{where} is missing")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _Bad(f"{where} is {_what(v)}, not a list" if v is not None else f"{where} is missing")
    return v


def _what(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    return {dict: "an object", list: "a list"}.get(type(v), type(v).__name__)


def _layer(d: Any, where: str) -> dict:
    d = dict(_dict(d, where))
    d["index"] = _int(d.get("index"), f"{where}.index", 0, MAX_LAYERS * 16)
    for key in ("name", "family"):
        if not isinstance(d.get(key), str):
            raise _Bad(f"{where}.{key} is {_what(d.get(key))}, not a string")
    d["num_experts"] = _int(d.get("num_experts"), f"{where}.num_experts", 1, MAX_EXPERTS)
    d["top_k"] = _int(d.get("top_k"), f"{where}.top_k", 0, d["num_experts"])
    for key in _LAYER_INTS:
        if key in d:
            d[key] = _int(d[key], f"{where}.{key}")
    for key in ("device", "handler"):
        if key in d and not isinstance(d[key], str):
            raise _Bad(f"{where}.{key} is {_what(d[key])}, not a string")
    if "shared" in d and not (isinstance(d["shared"], list) and all(isinstance(x, str) for x in d["shared"])):
        raise _Bad(f"{where}.shared is not a list of module names")
    if "sources" in d and not isinstance(d["sources"], dict):
        raise _Bad(f"{where}.sources is {_what(d['sources'])}, not an object")
    return d


def _counts(d: Any, where: str, num_experts: int) -> dict:
    d = _dict(d, where)
    ec = _list(d.get("expert_counts"), f"{where}.expert_counts")
    if len(ec) != num_experts:
        raise _Bad(f"{where}.expert_counts has {len(ec)} entries for a layer of {num_experts} experts")
    kh = _list(d.get("k_hist", [0]), f"{where}.k_hist")
    if not kh or len(kh) > MAX_EXPERTS + 1:
        raise _Bad(f"{where}.k_hist has {len(kh)} entries")
    return {
        "tokens": _int(d.get("tokens", 0), f"{where}.tokens"),
        "calls": _int(d.get("calls", 0), f"{where}.calls"),
        "expert_counts": [_int(x, f"{where}.expert_counts[{i}]") for i, x in enumerate(ec)],
        "k_hist": [_int(x, f"{where}.k_hist[{i}]") for i, x in enumerate(kh)],
        "excluded": _int(d.get("excluded", 0), f"{where}.excluded"),
        "dropped": _int(d.get("dropped", 0), f"{where}.dropped"),
        "top1_prob_sum": _float(d.get("top1_prob_sum", 0.0), f"{where}.top1_prob_sum"),
        "entropy_sum": _float(d.get("entropy_sum", 0.0), f"{where}.entropy_sum"),
        "expert_reads": _int(d.get("expert_reads", 0), f"{where}.expert_reads"),
        "padding_tokens": _int(d.get("padding_tokens", 0), f"{where}.padding_tokens"),
    }


def _phase_ints(v: Any, where: str) -> dict:
    v = _dict(v, where, required=False)
    return {str(p): _int(n, f"{where}.{p}") for p, n in v.items()}


OPTIONAL_PHASES = ("verify",)  # phases that traces of earlier versions do not have


def check_run(d: Any, where: str = "run") -> dict:
    """A checked, normalised copy of a `RunData.to_dict()`; raises _Bad."""
    d = _dict(d, where)
    model = _dict(d.get("model", {}), f"{where}.model")
    layers_raw = _list(d.get("layers"), f"{where}.layers")
    if len(layers_raw) > MAX_LAYERS:
        raise _Bad(f"{where}.layers has {len(layers_raw)} entries")
    layers = [_layer(x, f"{where}.layers[{i}]") for i, x in enumerate(layers_raw)]
    counts_raw = _dict(d.get("counts"), f"{where}.counts")
    counts = {}
    for p in PHASES:
        if p not in counts_raw and p not in OPTIONAL_PHASES:
            raise _Bad(f"{where}.counts has no {p!r} entry")
        # a phase added later (verify) is absent from older traces: no forwards there
        cs = _list(counts_raw.get(p, [{"expert_counts": [0] * l["num_experts"]} for l in layers]),
                   f"{where}.counts.{p}")
        if len(cs) != len(layers):
            raise _Bad(f"{where}.counts.{p} has {len(cs)} entries for {len(layers)} layers")
        counts[p] = [_counts(c, f"{where}.counts.{p}[{i}]", layers[i]["num_experts"]) for i, c in enumerate(cs)]
    timing = d.get("timing")
    if timing is not None:
        timing = _dict(timing, f"{where}.timing")
        out = {}
        for p in PHASES:
            rows = _list(timing.get(p, [{} for _ in layers] if p in OPTIONAL_PHASES else None),
                         f"{where}.timing.{p}")
            if len(rows) != len(layers):
                raise _Bad(f"{where}.timing.{p} has {len(rows)} entries for {len(layers)} layers")
            out[p] = []
            for i, row in enumerate(rows):
                row = _dict(row, f"{where}.timing.{p}[{i}]")
                out[p].append({f"{k}_ms": (None if row.get(f"{k}_ms") is None
                                           else _float(row.get(f"{k}_ms"), f"{where}.timing.{p}[{i}].{k}_ms"))
                               for k in PARTS})
        timing = out
    ts = d.get("timing_source")
    if ts is not None and not isinstance(ts, str):
        raise _Bad(f"{where}.timing_source is {_what(ts)}, not a string")
    run_id = d.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise _Bad(f"{where}.run_id is {_what(run_id)}, not a string")
    return dict(d, model=model, layers=layers, counts=counts, timing=timing,
                forward_calls=_phase_ints(d.get("forward_calls"), f"{where}.forward_calls"),
                forward_tokens=_phase_ints(d.get("forward_tokens"), f"{where}.forward_tokens"),
                padding_tokens=_phase_ints(d.get("padding_tokens"), f"{where}.padding_tokens"),
                peak_memory=_phase_ints(d.get("peak_memory"), f"{where}.peak_memory"),
                settings=_dict(d.get("settings", {}), f"{where}.settings"))


def _steps(v: Any, where: str) -> list[dict]:
    out = []
    for i, s in enumerate(_list(v if v is not None else [], where)):
        s = _dict(s, f"{where}[{i}]")
        phase = s.get("phase")
        if phase is not None and phase not in PHASES:
            raise _Bad(f"{where}[{i}].phase is {phase!r}, not one of {', '.join(PHASES)}")
        out.append({"step": _int(s.get("step"), f"{where}[{i}].step"), "phase": phase,
                    "tokens": None if s.get("tokens") is None else _int(s.get("tokens"), f"{where}[{i}].tokens")})
    return out


def _process(v: Any, where: str) -> dict:
    p = dict(_dict(v, where, required=False))
    for key in ("dist_rank", "world_size", "window"):
        if p.get(key) is not None:
            p[key] = _int(p[key], f"{where}.{key}", 0, 1 << 24)
    if p.get("pid") is not None and not (isinstance(p["pid"], (int, str)) and not isinstance(p["pid"], bool)):
        raise _Bad(f"{where}.pid is {_what(p['pid'])}, not an integer")
    for key in ("hostname", "run_id"):
        if p.get(key) is not None and not isinstance(p[key], str):
            raise _Bad(f"{where}.{key} is {_what(p[key])}, not a string")
    return p


def _pid(v: Any, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Bad(f"{where} is {_what(v)}, not an integer or string")
    return v


def check(path, mt: Any) -> tuple[dict, list[RunData], dict]:
    """Check the `moe_trace` key of `path`: `(normalised key, runs, {pid: part index})`."""
    try:
        mt = dict(_dict(mt, "the key"))
        schema = mt.get("schema")
        if schema is not None and not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX)):
            raise _Bad(f"schema is {schema!r}, not a moe-trace schema id")
        for key in ("run_id",):
            if mt.get(key) is not None and not isinstance(mt[key], str):
                raise _Bad(f"{key} is {_what(mt[key])}, not a string")
        if mt.get("started_at") is not None:
            mt["started_at"] = _float(mt["started_at"], "started_at", null_ok=False)
        runs: list[RunData] = []
        pid_part: dict = {}
        if "parts" in mt or (isinstance(schema, str) and schema.startswith(MERGED_PREFIX)):
            parts = _list(mt.get("parts"), "parts")
            for i, part in enumerate(parts):
                part = _dict(part, f"parts[{i}]")
                runs.append(RunData.from_dict(check_run(part.get("run"), f"parts[{i}].run")))
                for j, pid in enumerate(_list(part.get("pids", []), f"parts[{i}].pids")):
                    pid_part[_pidkey(_pid(pid, f"parts[{i}].pids[{j}]"))] = i
                _steps(part.get("steps"), f"parts[{i}].steps")
                _process(part.get("process"), f"parts[{i}].process")
        else:
            runs.append(RunData.from_dict(check_run(mt.get("run"))))
            mt["steps"] = _steps(mt.get("steps"), "steps")
            mt["process"] = _process(mt.get("process"), "process")
        names = _dict(mt.get("pid_names", {}), "pid_names")
        for k, v in names.items():
            if not isinstance(v, str):
                raise _Bad(f"pid_names[{k!r}] is {_what(v)}, not a string")
    except _Bad as exc:
        raise TraceError(f"{path} has damaged moe-trace metadata: 'moe_trace'.{exc} (the file was changed after "
                         "moe-trace wrote it); re-run the profiling to get a new trace") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # RunData.from_dict on what passed the checks
        raise TraceError(f"{path} has damaged moe-trace metadata ({type(exc).__name__}); re-run the profiling to "
                         "get a new trace") from None
    return mt, runs, pid_part


def _pidkey(x):
    from .aggregate import pidkey

    return pidkey(x)
