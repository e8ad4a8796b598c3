"""Router-logit log files: writers (JSON and columnar .npz shards) and one reader for both.

Two formats hold the same data:

* **JSON** (`format="json"`), the seed pipeline's format (one file per dataset,
  `{prefix}_{dataset}_internal_routing.json`, or one file when the path ends in `.json`)::

    {"config": "...", "strategy": "topk_baseline", "num_experts": E, "top_k": k, "dataset": "...",
     "num_layers": L, "moe_trace": {"schema": "moe-trace/routing-log/1", "layers": [...]},
     "samples": [{"sample_id": 0, "dataset": "...", "num_tokens": T, "loss": 2.3 | null,
                  "layers": [{"layer": 0, "router_logits_shape": [T, E],
                              "router_logits_sample": [[...E floats], ...],
                              "selected_experts": [[...k ints], ...],
                              "expert_weights": [[...k floats], ...]}, ...]}, ...]}

  The file is written sample by sample (the header first, `]}` at close), so memory stays bounded.
  A layer whose router exposes no logits has `"router_logits_shape": [T, 0]` and an empty list.

* **columnar** (`format="columnar"`), for large runs: a directory with `routing_meta.json` and
  shards `routing_shard_NNNNN.npz` (plain numpy arrays, no pickles). Per layer position `j`
  (`meta["layers"][j]`): `L{j:03d}_logits` [N,E] float16/float32, `L{j:03d}_indices` [N,k] int16/int32,
  `L{j:03d}_weights` [N,k] float32, `L{j:03d}_rows` [N] int64 (the sample's `uid`); per shard the sample
  table `sample_uid`, `sample_id`, `sample_dataset` (index into `meta["datasets"]`),
  `sample_num_tokens`, `sample_loss` (NaN = none).

`load_logs(paths)` reads files, directories or a mix of both into one `RoutingLog`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from moe_trace.errors import ConfigError, TraceError, short_reason

SCHEMA = "moe-trace/routing-log/1"
META_NAME = "routing_meta.json"
SHARD_FMT = "routing_shard_{:05d}.npz"
JSON_SUFFIX = "_internal_routing.json"


# ---------------------------------------------------------------------------------------------
# records handed from the logger to a writer
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """One sample's routing in one MoE layer (host numpy arrays)."""

    layer: int
    logits: np.ndarray | None  # [T, E] float32/float16, None when the router exposes no logits
    indices: np.ndarray  # [T, k] integer
    weights: np.ndarray  # [T, k] float32


@dataclass
class SampleRecord:
    sample_id: int
    dataset: str
    num_tokens: int
    loss: float | None
    layers: list[LayerRecord]


def layer_meta(layers: Sequence[Any]) -> list[dict[str, Any]]:
    """`[{"layer", "name", "num_experts", "top_k"}]` from LayerInfo objects or dicts."""
    out = []
    for l in layers:
        d = l if isinstance(l, dict) else l.to_dict()
        out.append({"layer": int(d.get("layer", d.get("index", 0))), "name": d.get("name"),
                    "num_experts": int(d.get("num_experts", 0)), "top_k": int(d.get("top_k", 0))})
    return out


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "moe"


def _header(config: str, strategy: str, layers: list[dict[str, Any]], dataset: str) -> dict[str, Any]:
    return {
        "config": config,
        "strategy": strategy,
        "num_experts": layers[0]["num_experts"] if layers else 0,
        "top_k": layers[0]["top_k"] if layers else 0,
        "dataset": dataset,
        "num_layers": len(layers),
        "moe_trace": {"schema": SCHEMA, "layers": layers},
    }


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
class JsonLogWriter:
    """Writes the seed's JSON log incrementally: one file per dataset, or one file for everything.

    `path` ending in `.json` = one file (its top-level `dataset` is the first sample's dataset, each
    sample also carries its own `dataset`); otherwise a directory with
    `{prefix}_{dataset}_internal_routing.json` per dataset.
    """

    def __init__(self, path: str | os.PathLike, *, config: str, strategy: str, layers: list[dict[str, Any]],
                 prefix: str | None = None):
        try:
            import orjson  # a core dependency; the stdlib json below is the slow fallback
        except ImportError:
            orjson = None
        self._orjson = orjson
        self.path = Path(path)
        self.single = self.path.suffix == ".json"
        self.config = config
        self.strategy = strategy
        self.layers = layers
        self.prefix = safe_name(prefix or config.split("/")[-1] or "moe")
        self._files: dict[str, Any] = {}
        self._count: dict[str, int] = {}
        self.paths: list[Path] = []

    def set_layers(self, layers: list[dict[str, Any]]) -> None:
        if not self._files:
            self.layers = layers

    def _file(self, dataset: str):
        key = "" if self.single else dataset
        f = self._files.get(key)
        if f is None:
            if self.single:
                p = self.path
            else:
                p = self.path / f"{self.prefix}_{safe_name(dataset)}{JSON_SUFFIX}"
            p.parent.mkdir(parents=True, exist_ok=True)
            f = open(p, "wb")
            head = json.dumps(_header(self.config, self.strategy, self.layers, dataset))
            f.write(head[:-1].encode() + b', "samples": [\n')
            self._files[key] = f
            self._count[key] = 0
            self.paths.append(p)
        return f, key

    def write(self, rec: SampleRecord) -> None:
        f, key = self._file(rec.dataset)
        layers = []
        for lr in rec.layers:
            n = int(lr.indices.shape[0])
            if lr.logits is None:
                logits, shape = [], [n, 0]
            else:
                logits = np.ascontiguousarray(lr.logits, dtype=np.float32)
                shape = [int(s) for s in logits.shape]
            layers.append({
                "layer": int(lr.layer),
                "router_logits_shape": shape,
                "router_logits_sample": logits,
                "selected_experts": np.ascontiguousarray(lr.indices, dtype=np.int64),
                "expert_weights": np.ascontiguousarray(lr.weights, dtype=np.float32),
            })
        loss = None if rec.loss is None or not np.isfinite(rec.loss) else float(rec.loss)
        obj = {"sample_id": int(rec.sample_id), "dataset": rec.dataset, "num_tokens": int(rec.num_tokens),
               "loss": loss, "layers": layers}
        if self._orjson is not None:
            data = self._orjson.dumps(obj, option=self._orjson.OPT_SERIALIZE_NUMPY)
        else:
            for lay in layers:
                for name in ("router_logits_sample", "selected_experts", "expert_weights"):
                    if isinstance(lay[name], np.ndarray):
                        lay[name] = lay[name].tolist()
            data = json.dumps(obj, separators=(",", ":")).encode()
        if self._count[key]:
            f.write(b",\n")
        f.write(data)
        self._count[key] += 1

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.write(b"\n]}\n")
            f.close()
        self._files.clear()


class ColumnarLogWriter:
    """Buffers finished samples and writes `.npz` shards of about `shard_tokens` tokens each."""

    def __init__(self, path: str | os.PathLike, *, config: str, strategy: str, layers: list[dict[str, Any]],
                 logits_dtype: str = "float16", shard_tokens: int = 65536, compress: bool = False):
        self.path = Path(path)
        if self.path.suffix == ".json":
            raise ValueError("the columnar format writes a directory; give a directory path, not a .json file")
        self.config = config
        self.strategy = strategy
        self.layers = layers
        self.logits_dtype = np.dtype(logits_dtype)
        self.shard_tokens = int(shard_tokens)
        self.compress = compress
        self.datasets: list[str] = []
        self.shards: list[str] = []
        self.paths: list[Path] = []
        self._buf: list[SampleRecord] = []
        self._buf_tokens = 0
        self._uid = 0
        self._tokens = 0
        self._samples = 0
        self._opened = False

    def set_layers(self, layers: list[dict[str, Any]]) -> None:
        if not self.shards:
            self.layers = layers

    def write(self, rec: SampleRecord) -> None:
        if not self._opened:
            self.path.mkdir(parents=True, exist_ok=True)
            self._opened = True
            self._write_meta()
        if rec.dataset not in self.datasets:
            self.datasets.append(rec.dataset)
        self._buf.append(rec)
        self._buf_tokens += rec.num_tokens
        if self._buf_tokens >= self.shard_tokens:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self._buf:
            return
        recs, self._buf, self._buf_tokens = self._buf, [], 0
        n = len(recs)
        uids = np.arange(self._uid, self._uid + n, dtype=np.int64)
        self._uid += n
        arrays: dict[str, np.ndarray] = {
            "sample_uid": uids,
            "sample_id": np.array([r.sample_id for r in recs], dtype=np.int64),
            "sample_dataset": np.array([self.datasets.index(r.dataset) for r in recs], dtype=np.int32),
            "sample_num_tokens": np.array([r.num_tokens for r in recs], dtype=np.int64),
            "sample_loss": np.array([np.nan if r.loss is None else r.loss for r in recs], dtype=np.float64),
        }
        pos_of = {m["layer"]: j for j, m in enumerate(self.layers)}
        for j, meta in enumerate(self.layers):
            parts_l, parts_i, parts_w, parts_r = [], [], [], []
            have_logits = True
            for uid, r in zip(uids, recs):
                for lr in r.layers:
                    if pos_of.get(lr.layer) != j:
                        continue
                    parts_i.append(lr.indices)
                    parts_w.append(lr.weights)
                    parts_r.append(np.full(lr.indices.shape[0], uid, dtype=np.int64))
                    if lr.logits is None:
                        have_logits = False
                    else:
                        parts_l.append(lr.logits)
            if not parts_i:
                continue
            idt = np.int16 if meta["num_experts"] < 32767 else np.int32
            arrays[f"L{j:03d}_indices"] = np.concatenate([p.astype(idt) for p in parts_i])
            arrays[f"L{j:03d}_weights"] = np.concatenate([p.astype(np.float32) for p in parts_w])
            arrays[f"L{j:03d}_rows"] = np.concatenate(parts_r)
            if have_logits and parts_l:
                arrays[f"L{j:03d}_logits"] = np.concatenate([p.astype(self.logits_dtype) for p in parts_l])
        name = SHARD_FMT.format(len(self.shards))
        tmp = self.path / (name + ".tmp.npz")
        (np.savez_compressed if self.compress else np.savez)(tmp, **arrays)
        os.replace(tmp, self.path / name)
        self.shards.append(name)
        self.paths.append(self.path / name)
        self._samples += n
        self._tokens += int(arrays["sample_num_tokens"].sum())
        self._write_meta()

    def _write_meta(self) -> None:
        meta = _header(self.config, self.strategy, self.layers, self.datasets[0] if self.datasets else "")
        meta.update({"schema": SCHEMA, "format": "columnar", "datasets": list(self.datasets),
                     "shards": list(self.shards), "samples": self._samples, "tokens": self._tokens,
                     "layers": self.layers, "logits_dtype": self.logits_dtype.name})
        meta.pop("moe_trace", None)
        tmp = self.path / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.path / META_NAME)
        if self.path / META_NAME not in self.paths:
            self.paths.insert(0, self.path / META_NAME)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._opened:
            self._write_shard()
            self._write_meta()


def make_writer(fmt: str, path, **kw):
    if fmt == "json":
        kw.pop("logits_dtype", None)
        kw.pop("shard_tokens", None)
        return JsonLogWriter(path, **kw)
    if fmt == "columnar":
        kw.pop("prefix", None)
        return ColumnarLogWriter(path, **kw)
    raise ValueError(f"unknown routing log format {fmt!r}: use 'json' or 'columnar'")


# ---------------------------------------------------------------------------------------------
# the in-memory view the analysis uses
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerRouting:
    """All recorded tokens of one MoE layer: `rows[n]` is the token's sample (index into the log's
    sample table)."""

    layer: int
    num_experts: int
    top_k: int
    logits: np.ndarray | None  # [N, E] float32
    indices: np.ndarray  # [N, k]
    weights: np.ndarray  # [N, k] float32
    rows: np.ndarray  # [N] int64

    @property
    def num_tokens(self) -> int:
        return int(self.indices.shape[0])

    def subset(self, mask: np.ndarray) -> "LayerRouting":
        return LayerRouting(self.layer, self.num_experts, self.top_k,
                            None if self.logits is None else self.logits[mask], self.indices[mask],
                            self.weights[mask], self.rows[mask])

    def expert_counts(self) -> np.ndarray:
        idx = self.indices.astype(np.int64).ravel()
        idx = idx[(idx >= 0) & (idx < self.num_experts)]
        return np.bincount(idx, minlength=self.num_experts)


@dataclass
class RoutingLog:
    config: str
    strategy: str
    datasets: list[str]
    layers: list[LayerRouting]
    sample_id: np.ndarray  # [S]
    sample_dataset: np.ndarray  # [S] index into datasets
    sample_num_tokens: np.ndarray  # [S]
    sample_loss: np.ndarray  # [S] float, NaN = none
    sources: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k if self.layers else 0

    @property
    def num_samples(self) -> int:
        return int(len(self.sample_id))

    def layer(self, index: int) -> LayerRouting:
        for l in self.layers:
            if l.layer == index:
                return l
        raise KeyError(f"no MoE layer {index} in this log (layers: {[l.layer for l in self.layers]})")

    def token_dataset(self, layer: LayerRouting) -> np.ndarray:
        """Dataset index of every token of `layer`."""
        return self.sample_dataset[layer.rows]

    def sample_mask(self, datasets: Iterable[str] | None = None, samples: np.ndarray | None = None) -> np.ndarray:
        m = np.ones(self.num_samples, dtype=bool)
        if datasets is not None:
            codes = [self.datasets.index(d) for d in datasets if d in self.datasets]
            m &= np.isin(self.sample_dataset, codes)
        if samples is not None:
            m &= samples
        return m

    def select(self, sample_mask: np.ndarray) -> "RoutingLog":
        """A log of the samples where `sample_mask` is true (row indices renumbered)."""
        keep = np.flatnonzero(sample_mask)
        remap = np.full(self.num_samples, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        layers = []
        for l in self.layers:
            sub = l.subset(sample_mask[l.rows])
            sub.rows = remap[sub.rows]
            layers.append(sub)
        return RoutingLog(self.config, self.strategy, list(self.datasets), layers, self.sample_id[keep],
                          self.sample_dataset[keep], self.sample_num_tokens[keep], self.sample_loss[keep],
                          list(self.sources))

    def summary(self) -> dict[str, Any]:
        return {"config": self.config, "strategy": self.strategy, "datasets": list(self.datasets),
                "samples": self.num_samples, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "top_k": self.top_k,
                "tokens_per_dataset": {d: int(self.sample_num_tokens[self.sample_dataset == i].sum())
                                       for i, d in enumerate(self.datasets)}}


class _Builder:
    """Accumulates samples of one or more sources, honouring a per-dataset token cap."""

    def __init__(self, max_tokens_per_dataset: int | None, datasets: Sequence[str] | None,
                 layers: Sequence[int] | None):
        self.cap = max_tokens_per_dataset
        self.want_datasets = set(datasets) if datasets else None
        self.want_layers = set(layers) if layers is not None else None
        self.config = ""
        self.strategy = ""
        self.datasets: list[str] = []
        self.tokens: dict[str, int] = {}
        self.layer_meta: dict[int, dict[str, Any]] = {}
        self.parts: dict[int, dict[str, list]] = {}
        self.samples: list[tuple[int, int, int, float]] = []
        self.sources: list[str] = []

    def room(self, dataset: str) -> int | None:
        """Tokens still allowed for `dataset` (None = unlimited, 0 = skip)."""
        if self.want_datasets is not None and dataset not in self.want_datasets:
            return 0
        if self.cap is None:
            return None
        return max(0, self.cap - self.tokens.get(dataset, 0))

    def add_meta(self, config: str, strategy: str, layers: list[dict[str, Any]]) -> None:
        self.config = self.config or config
        self.strategy = self.strategy or strategy
        for m in layers:
            old = self.layer_meta.get(m["layer"])
            if old is not None and old["num_experts"] != m["num_experts"]:
                raise TraceError(f"routing logs disagree on layer {m['layer']}: {old['num_experts']} vs "
                                 f"{m['num_experts']} experts; analyse logs of one model at a time")
            self.layer_meta.setdefault(m["layer"], dict(m))

    def add_sample(self, sample_id: int, dataset: str, num_tokens: int, loss: float | None,
                   layers: Iterable[tuple[int, np.ndarray | None, np.ndarray, np.ndarray]]) -> bool:
        room = self.room(dataset)
        if room == 0:
            return False
        if dataset not in self.datasets:
            self.datasets.append(dataset)
        row = len(self.samples)
        take = None if room is None else min(room, num_tokens)
        n_tok = num_tokens if take is None else take
        self.samples.append((int(sample_id), self.datasets.index(dataset), int(n_tok),
                             np.nan if loss is None else float(loss)))
        self.tokens[dataset] = self.tokens.get(dataset, 0) + n_tok
        for layer, logits, idx, w in layers:
            if self.want_layers is not None and layer not in self.want_layers:
                continue
            if layer not in self.layer_meta:
                e = logits.shape[1] if logits is not None and logits.ndim == 2 else int(idx.max(initial=-1)) + 1
                self.layer_meta[layer] = {"layer": layer, "name": None, "num_experts": int(e),
                                          "top_k": int(idx.shape[1]) if idx.ndim == 2 else 0}
            p = self.parts.setdefault(layer, {"logits": [], "indices": [], "weights": [], "rows": [],
                                              "no_logits": False})
            if take is not None:
                logits = None if logits is None else logits[:take]
                idx, w = idx[:take], w[:take]
            n = idx.shape[0]
            if logits is None or logits.size == 0 and n:
                p["no_logits"] = True
            else:
                p["logits"].append(np.asarray(logits, dtype=np.float32))
            p["indices"].append(idx)
            p["weights"].append(np.asarray(w, dtype=np.float32))
            p["rows"].append(np.full(n, row, dtype=np.int64))
        return True

    def build(self) -> RoutingLog:
        layers = []
        for li in sorted(self.parts):
            p = self.parts[li]
            m = self.layer_meta[li]
            k = max((a.shape[1] for a in p["indices"] if a.ndim == 2), default=m.get("top_k", 0))
            idx = [a.reshape(-1, k) if a.size else np.zeros((0, k), np.int64) for a in p["indices"]]
            w = [a.reshape(-1, k) if a.size else np.zeros((0, k), np.float32) for a in p["weights"]]
            e = m["num_experts"]
            logits = None
            if not p["no_logits"]:
                logits = np.concatenate([a.reshape(-1, e) for a in p["logits"]]) if p["logits"] else \
                    np.zeros((0, e), np.float32)
            layers.append(LayerRouting(li, e, int(m.get("top_k") or k), logits,
                                       np.concatenate(idx) if idx else np.zeros((0, k), np.int64),
                                       np.concatenate(w) if w else np.zeros((0, k), np.float32),
                                       np.concatenate(p["rows"]) if p["rows"] else np.zeros(0, np.int64)))
        s = self.samples
        return RoutingLog(
            config=self.config, strategy=self.strategy, datasets=list(self.datasets), layers=layers,
            sample_id=np.array([x[0] for x in s], dtype=np.int64),
            sample_dataset=np.array([x[1] for x in s], dtype=np.int64),
            sample_num_tokens=np.array([x[2] for x in s], dtype=np.int64),
            sample_loss=np.array([x[3] for x in s], dtype=np.float64),
            sources=list(self.sources))


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
_BIG_JSON = 256 * 1024 * 1024


def _read_json(path: Path, b: _Builder) -> None:
    try:
        if path.stat().st_size < _BIG_JSON:
            try:
                from orjson import loads
            except ImportError:
                loads = json.loads
            try:
                with open(path, "rb") as f:
                    doc = loads(f.read())
                header, samples = doc, doc.get("samples", [])
            except ValueError:  # truncated (a run that never called close()): keep its complete samples
                header, samples = _json_header(path), _iter_json_samples(path)
        else:  # stream samples one at a time
            header = _json_header(path)
            samples = _iter_json_samples(path)
    except (ValueError, OSError) as exc:
        raise TraceError(f"{path}: not a readable routing log ({short_reason(exc)}); was the run interrupted before "
                         "close()?") \
            from exc
    if not isinstance(header, dict) or "samples" not in header and "num_layers" not in header:
        raise TraceError(f"{path}: not a routing log (no 'samples' key)")
    mt = header.get("moe_trace") or {}
    lmeta = mt.get("layers") if isinstance(mt, dict) else None
    dataset_default = str(header.get("dataset") or path.stem.replace(JSON_SUFFIX[:-5], ""))
    b.add_meta(str(header.get("config", "")), str(header.get("strategy", "")),
               [dict(m) for m in lmeta] if lmeta else [])
    if not lmeta:  # a seed-pipeline log: sizes from the header
        e, k = int(header.get("num_experts", 0) or 0), int(header.get("top_k", 0) or 0)
        b.layer_meta.setdefault("_default", {"num_experts": e, "top_k": k})
    for s in samples:
        ds = str(s.get("dataset") or dataset_default)
        if b.room(ds) == 0:
            continue
        layers = []
        for ld in s.get("layers", []):
            li = int(ld.get("layer", len(layers)))
            idx = np.asarray(ld.get("selected_experts", []), dtype=np.int64)
            w = np.asarray(ld.get("expert_weights", []), dtype=np.float32)
            lg = ld.get("router_logits_sample")
            shape = ld.get("router_logits_shape") or []
            logits = None
            if lg is not None and len(lg) and not (len(shape) == 2 and shape[1] == 0):
                logits = np.asarray(lg, dtype=np.float32)
            if li not in b.layer_meta and "_default" in b.layer_meta:
                d = b.layer_meta["_default"]
                e = d["num_experts"] or (logits.shape[1] if logits is not None else 0)
                b.layer_meta[li] = {"layer": li, "name": None, "num_experts": e,
                                    "top_k": d["top_k"] or (idx.shape[1] if idx.ndim == 2 else 0)}
            if idx.ndim != 2:
                k = b.layer_meta.get(li, {}).get("top_k", 0)
                idx = idx.reshape(-1, k) if k else idx.reshape(0, 0)
                w = w.reshape(idx.shape)
            layers.append((li, logits, idx, w))
        n = int(s.get("num_tokens") or (layers[0][2].shape[0] if layers else 0))
        b.add_sample(int(s.get("sample_id", len(b.samples))), ds, n, s.get("loss"), layers)
    b.layer_meta.pop("_default", None)


def _json_header(path: Path) -> dict[str, Any]:
    """The top-level keys before `"samples"` of a big JSON log, without reading the samples."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    i = head.find(b'"samples"')
    if i > 0:
        try:
            return json.loads(head[:i].rstrip().rstrip(b",") + b"}")
        except ValueError:
            pass
    try:
        import ijson
    except ImportError as exc:
        raise TraceError(f"{path}: reading a routing log over 256 MB needs the ijson package") from exc
    header: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            for prefix, event, value in ijson.parse(f):
                if prefix == "samples":
                    break
                if prefix and "." not in prefix and event in ("string", "number", "boolean", "null"):
                    header[prefix] = value
    except ijson.JSONError as exc:
        raise TraceError(f"{path}: not a readable routing log ({short_reason(exc)})") from exc
    return header


def _iter_json_samples(path: Path):
    try:
        import ijson
    except ImportError as exc:
        raise TraceError(f"{path}: reading a routing log over 256 MB needs the ijson package") from exc
    n = 0
    try:
        with open(path, "rb") as f:
            for s in ijson.items(f, "samples.item", use_float=True):
                n += 1
                yield s
    except ijson.JSONError as exc:
        if not n:
            raise TraceError(f"{path}: truncated or invalid routing log ({exc})") from exc
        warnings.warn(f"{path}: the log ends early (a run interrupted before close()?); read its first {n} "
                      "complete samples", stacklevel=2)


def _read_columnar(root: Path, b: _Builder) -> None:
    try:
        meta = json.loads((root / META_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise TraceError(f"{root}: cannot read {META_NAME} ({exc})") from exc
    layers = [dict(m) for m in meta.get("layers", [])]
    b.add_meta(str(meta.get("config", "")), str(meta.get("strategy", "")), layers)
    datasets = list(meta.get("datasets", []))
    shards = list(meta.get("shards", [])) or sorted(p.name for p in root.glob("routing_shard_*.npz"))
    if not shards:
        raise TraceError(f"{root}: a columnar routing log without shards (did the run call close()?)")
    for name in shards:
        try:
            z = np.load(root / name, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TraceError(f"{root / name}: unreadable shard ({exc})") from exc
        with z:
            uids = z["sample_uid"]
            ids, dsc, ntok, loss = z["sample_id"], z["sample_dataset"], z["sample_num_tokens"], z["sample_loss"]
            per_layer = {}
            for j, m in enumerate(layers):
                if f"L{j:03d}_indices" not in z.files:
                    continue
                rows = z[f"L{j:03d}_rows"]
                order = np.argsort(rows, kind="stable")
                rows = rows[order]
                lg = z[f"L{j:03d}_logits"][order] if f"L{j:03d}_logits" in z.files else None
                per_layer[m["layer"]] = (rows, lg, z[f"L{j:03d}_indices"][order], z[f"L{j:03d}_weights"][order])
            for s in range(len(uids)):
                ds = datasets[int(dsc[s])] if int(dsc[s]) < len(datasets) else str(int(dsc[s]))
                if b.room(ds) == 0:
                    continue
                ls = []
                for li, (rows, lg, idx, w) in per_layer.items():
                    a, c = np.searchsorted(rows, uids[s]), np.searchsorted(rows, uids[s], side="right")
                    ls.append((li, None if lg is None else lg[a:c], idx[a:c], w[a:c]))
                lv = float(loss[s])
                b.add_sample(int(ids[s]), ds, int(ntok[s]), None if np.isnan(lv) else lv, ls)


def find_logs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files/directories into log files (`.json`) and columnar directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise TraceError(f"{p}: no such file or directory")
        if p.is_dir():
            if (p / META_NAME).exists():
                found.append(p)
                continue
            logs = sorted(p.glob(f"*{JSON_SUFFIX}"))
            subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / META_NAME).exists())
            if not logs and not subs:
                logs = sorted(x for x in p.glob("*.json") if x.name != META_NAME and _looks_like_log(x))
            found.extend(logs + subs)
        elif p.name == META_NAME or p.suffix == ".npz":
            found.append(p.parent)
        else:
            found.append(p)
    if not found:
        raise TraceError(f"no routing logs in {', '.join(map(str, paths))} (expected *{JSON_SUFFIX} files "
                         f"or a directory with {META_NAME}); write some with `moe-trace routing-log`")
    out, seen = [], set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _looks_like_log(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"samples"' in head or b'"num_layers"' in head


def load_logs(paths, *, datasets: Sequence[str] | None = None, layers: Sequence[int] | None = None,
              max_tokens_per_dataset: int | None = None) -> RoutingLog:
    """Read routing logs (JSON files, columnar directories, or directories of either) into one
    `RoutingLog`. `max_tokens_per_dataset` keeps the first N tokens of each dataset (bounded memory on
    big logs); `datasets` / `layers` keep only those."""
    b = _Builder(max_tokens_per_dataset, datasets, layers)
    for p in find_logs(paths):
        b.sources.append(str(p))
        if p.is_dir():
            _read_columnar(p, b)
        else:
            _read_json(p, b)
    if layers is not None and b.layer_meta:
        missing = sorted(set(layers) - set(b.layer_meta))
        if missing:
            raise ConfigError(f"layer(s) {', '.join(map(str, missing))} not in the routing logs (their MoE layers: "
                              f"{', '.join(map(str, sorted(b.layer_meta)))})")
    log = b.build()
    if not log.layers or not log.num_samples:
        raise TraceError(f"the routing logs {', '.join(b.sources)} hold no samples"
                         + (f" of datasets {list(datasets)}" if datasets else ""))
    return log
