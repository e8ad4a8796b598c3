"""`RouterLogger`: an observer (docs/design.md "Observers") that records full router logits, the
selected experts and their weights per sample and MoE layer, and writes them incrementally.

Hot path (`on_route`, called inside every router forward hook): no `.item()`, `.tolist()` or
synchronisation. Tensors are sliced (host metadata only), optionally narrowed on the device
(logits to float16, indices to int16) and copied with `non_blocking=True` into pinned host
buffers (CUDA) or cloned (CPU). A CUDA event is recorded after each copy.

`on_step_end` (after every model forward) drains the copies whose events have completed every
`flush_every` steps (blocking only when too many are pending, or at a cap / close), splits them
into samples and hands finished samples to a writer (`logfile.JsonLogWriter` or
`logfile.ColumnarLogWriter`), so host memory holds only unfinished samples plus at most a few
steps of copies.

Samples. Explicit: `begin_sample(sample_id | [ids], dataset=..., labels=...)` starts a batch of
samples; every following step (prefill and decode) belongs to it until the next `begin_sample`.
Automatic (no `begin_sample` ever called, the `profile()` path): each prefill starts a new batch;
its batch size comes from the model's input, which the session hands over in `on_step_start`
(standalone: `attach(model)` hooks the model for it), otherwise the whole prefill batch is one sample.
Rows of a step are split evenly by sequence (`hidden_states.view(-1, H)` is sequence-major);
when an attention mask is known, padded prefill positions are dropped.

Caps: `max_tokens` (tokens recorded, counted once per step, exact: the step that crosses the cap
is cut) and `max_samples`. Once a cap is reached the logger stops recording (`logger.full`).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moe_trace.checks import output_dir, output_file
from moe_trace.errors import ConfigError

from .logfile import LayerRecord, SampleRecord, layer_meta, make_writer

DEFAULT_PATH = "routing_logs"
_OPTIONS = ("path", "format", "max_tokens", "max_samples", "flush_every", "logits_dtype", "model_name",
            "strategy", "dataset", "record_logits", "shard_tokens", "labels", "record_loss", "prefix",
            "phases", "compress")


@dataclass
class _Batch:
    uids: list[int]  # keys of RouterLogger._samples
    keep: int  # sequences of this batch that are recorded (max_samples)
    labels: Any = None
    mask: Any = None  # [B, S] attention mask (host or device tensor), prefill only
    loss: Any = None  # tensor [] or [B] (device) / float
    pending: int = 0  # chunks not yet drained
    closed: bool = False  # a later batch began: no more chunks will arrive
    infer: bool = False  # batch size unknown: learn it from the first decode step


@dataclass
class _Sample:
    sample_id: int
    dataset: str
    parts: dict[int, list] = field(default_factory=dict)  # layer -> [(logits, idx, w)]
    loss: float | None = None
    written: bool = False


@dataclass
class _Chunk:
    layer: int
    phase: str
    batch: _Batch
    rows_total: int  # rows of this step (before the cap cut)
    keep_rows: int
    logits: torch.Tensor | None
    weights: torch.Tensor
    indices: torch.Tensor
    event: Any = None
    mask: Any = None  # host bool array of kept rows or None


class RouterLogger:
    """Observer that logs router logits per sample and layer. See the module docstring."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, *, layers: Sequence[Any] | None = None,
                 format: str | None = None, max_tokens: int | None = None, max_samples: int | None = None,
                 flush_every: int = 8, logits_dtype: str = "float32", model_name: str | None = None,
                 strategy: str = "topk_baseline", dataset: str = "default", record_logits: bool = True,
                 shard_tokens: int = 65536, record_loss: bool = True, prefix: str | None = None,
                 phases: Sequence[str] = ("prefill", "decode"), compress: bool = False):
        self.path = Path(path)
        fmt = format or ("json" if self.path.suffix == ".json" else "json")
        if fmt not in ("json", "columnar"):
            raise ConfigError(f"log_router_logits format {fmt!r} is unknown: use 'json' or 'columnar'")
        if fmt == "columnar" and self.path.suffix == ".json":
            raise ConfigError(f"the columnar routing log is a directory; {self.path} ends in .json")
        if logits_dtype not in ("float16", "float32"):
            raise ConfigError(f"logits_dtype must be 'float16' or 'float32', not {logits_dtype!r}")
        for name, v in (("max_tokens", max_tokens), ("max_samples", max_samples)):
            if v is not None and int(v) < 0:
                raise ConfigError(f"{name} must be >= 0, not {v}")
        if int(flush_every) < 1:
            raise ConfigError("flush_every must be >= 1")
        self.format = fmt
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.max_samples = None if max_samples is None else int(max_samples)
        self.flush_every = int(flush_every)
        self.logits_dtype = logits_dtype
        self.model_name = model_name
        self.strategy = strategy
        self.dataset = dataset
        self.record_logits = record_logits
        self.shard_tokens = shard_tokens
        self.record_loss = record_loss
        self.prefix = prefix
        self.phases = tuple(phases)
        self.compress = compress
        self.layers: list[Any] = list(layers) if layers is not None else []
        self._writer = None
        self._samples: dict[int, _Sample] = {}  # unfinished samples only
        self._uid = 0
        self._batches: list[_Batch] = []
        self._batch: _Batch | None = None
        self._explicit = False
        self._fresh_batch = False  # begin_sample called since the last step
        self._chunks: list[_Chunk] = []
        self._step_key: tuple[int, str] | None = None
        self._step_keep = 0
        self._step_rows_per_seq: int | None = None
        self._step_mask = None
        self._steps_since_flush = 0
        self.tokens_recorded = 0
        self.samples_started = 0
        self.samples_written = 0
        self._stopped = False
        self._closed = False
        self._hooks: list[Any] = []
        self._next_input: dict[str, Any] = {}
        self._labels = None
        self._next_auto_id = 0
        self._warned: set[str] = set()
        self._layer_ids: set[int] = {int(getattr(l, "index", 0)) for l in self.layers}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_arg(cls, arg: Any, layers: Sequence[Any] | None = None, model: Any = None) -> "RouterLogger":
        """Build from `profile(..., log_router_logits=arg)`: a path, True (default path), a dict of
        options (see `_OPTIONS`; `labels` is an alias of `record_loss`) or a RouterLogger."""
        if isinstance(arg, RouterLogger):
            logger = arg
        elif arg is True:
            logger = cls(DEFAULT_PATH)
        elif isinstance(arg, (str, os.PathLike)):
            logger = cls(arg)
        elif isinstance(arg, dict):
            unknown = sorted(set(arg) - set(_OPTIONS))
            if unknown:
                raise ConfigError(f"log_router_logits: unknown option(s) {unknown}; known: {list(_OPTIONS)}")
            opts = dict(arg)
            if "labels" in opts:
                opts["record_loss"] = bool(opts.pop("labels"))
            logger = cls(**opts)
        else:
            raise ConfigError(f"log_router_logits must be a path, True, a dict of options or a RouterLogger, "
                              f"not {type(arg).__name__}")
        if layers is not None:
            logger.bind(layers)
        if model is not None:
            logger.bind_model(model)
        return logger

    def bind(self, layers: Sequence[Any]) -> None:
        """Set the MoE layers (LayerInfo list) before recording starts."""
        self.layers = list(layers)
        self._layer_ids = {int(getattr(l, "index", 0)) for l in self.layers}
        if self._writer is not None:
            self._writer.set_layers(layer_meta(self.layers))

    def bind_model(self, model: torch.nn.Module) -> "RouterLogger":
        """Take the model's name for the log (no hooks: inside `profile()` the session hands the
        logger every step through the observer protocol)."""
        if self.model_name is None:
            cfg = getattr(model, "config", None)
            self.model_name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or \
                type(model).__name__
        return self

    def attach(self, model: torch.nn.Module) -> "RouterLogger":
        """Standalone use (without `profile()`): watch the model's top-level forward yourself, i.e.
        batch size / attention mask of each forward (so sequences become separate samples and padding
        is dropped) and `outputs.loss` when the model was called with labels. Inside `profile()` the
        session calls `on_step_start` / `on_forward_end` instead, and a logger attached here ignores them."""
        self.bind_model(model)
        self._hooks.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._post_hook, with_kwargs=True))
        return self

    # -- observer protocol: steps ------------------------------------------------------------------
    def on_step_start(self, step: Any) -> None:
        """A model forward starts (`moe_trace.capture.observers.Step`)."""
        if self._hooks:
            return
        info: dict[str, Any] = {}
        if step.batch is not None:
            info["batch"] = int(step.batch)
            info["seq"] = int(step.positions)
            if step.attention_mask is not None:
                info["mask"] = step.attention_mask
        self._next_input = info
        self._labels = step.labels

    def on_forward_end(self, step: Any, output: Any) -> None:
        """The forward returned `output`: the loss of the batch when labels were given."""
        if self._hooks:
            return
        self._record_output(output)

    def _pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        info: dict[str, Any] = {}
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            info["batch"] = int(ids.shape[0])
            info["seq"] = int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and "seq" in info:
            info["mask"] = mask[:, -info["seq"]:]
        self._next_input = info
        self._labels = kwargs.get("labels")
        return None

    def _post_hook(self, module, args, kwargs, output):
        self._record_output(output)
        return None

    def _record_output(self, output: Any) -> None:
        b = self._batch
        if not self.record_loss or b is None or b.loss is not None or self._stopped:
            return
        labels = self._labels if isinstance(self._labels, torch.Tensor) else b.labels
        self._labels = None
        logits = getattr(output, "logits", None)
        if isinstance(labels, torch.Tensor) and isinstance(logits, torch.Tensor) and logits.dim() == 3:
            if labels.dim() == 1:
                labels = labels.unsqueeze(0)
            if tuple(labels.shape) == tuple(logits.shape[:2]) and labels.shape[0] == len(b.uids):
                self.record_loss_value(per_sample_loss(logits.detach(), labels.to(logits.device)))
                return
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and len(b.uids) == 1:
            self.record_loss_value(loss.detach())

    # -- samples --------------------------------------------------------------------------------
    def begin_sample(self, sample_id: int | Sequence[int], dataset: str | None = None, labels: Any = None) -> None:
        """Start a new sample (or a batch of samples: a list of ids, one per sequence)."""
        ids = [int(sample_id)] if isinstance(sample_id, (int, np.integer)) else [int(s) for s in sample_id]
        self._explicit = True
        self._new_batch(ids, dataset or self.dataset, labels)
        self._fresh_batch = True

    def record_loss_value(self, loss: Any) -> None:
        """The loss of the current batch (float, or a tensor [] / [B]; copied without a sync)."""
        if self._batch is None:
            return
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            loss = _to_host(loss.float() if loss.dtype != torch.float32 else loss)
        self._batch.loss = loss

    def _new_batch(self, ids: list[int], dataset: str, labels: Any = None) -> _Batch:
        if self._batch is not None:
            self._batch.closed = True
        room = len(ids) if self.max_samples is None else max(0, min(len(ids), self.max_samples - self.samples_started))
        uids = []
        for j, sid in enumerate(ids):
            uids.append(self._add_sample(_Sample(sid, dataset, written=j >= room)))  # beyond room: never recorded
        self.samples_started += room
        b = _Batch(uids=uids, keep=room, labels=labels)
        self._batches.append(b)
        self._batch = b
        self._maybe_stop()
        return b

    def _resize_batch(self, b: _Batch, nseq: int) -> None:
        """The first decode step of an auto batch shows its batch size (one row per sequence)."""
        b.infer = False
        if nseq <= 1 or nseq == len(b.uids):
            return
        first = self._samples[b.uids[0]]
        sid0 = first.sample_id
        self._next_auto_id = max(self._next_auto_id, sid0 + nseq)
        for u in b.uids:
            self._samples.pop(u, None)
        self.samples_started -= b.keep
        room = nseq if self.max_samples is None else max(0, min(nseq, self.max_samples - self.samples_started))
        uids = []
        for j in range(nseq):
            uids.append(self._add_sample(_Sample(sid0 + j, first.dataset, written=j >= room)))
        self.samples_started += room
        b.uids, b.keep = uids, room

    def _add_sample(self, s: _Sample) -> int:
        self._uid += 1
        self._samples[self._uid] = s
        return self._uid

    @property
    def full(self) -> bool:
        """True once a cap is reached: no further sample will be recorded (the current one may still
        be recording until the cap on tokens or the next sample)."""
        self._maybe_stop()
        return self._stopped or (self.max_samples is not None and self.samples_started >= self.max_samples)

    def _maybe_stop(self) -> None:
        if self.max_tokens is not None and self.tokens_recorded >= self.max_tokens:
            self._stopped = True
        if self.max_samples is not None and self.samples_started >= self.max_samples \
                and self._batch is not None and self._batch.keep == 0:
            self._stopped = True  # a batch beyond the cap began: the allowed ones are over

    # -- observer protocol --------------------------------------------------------------------------
    def on_route(self, layer, phase: str, step: int, logits, weights, indices) -> None:
        if self._closed:
            return
        key = (step, phase)
        rows = int(indices.shape[0]) if indices is not None else int(logits.shape[0])
        if key != self._step_key:
            self._start_step(key, phase, rows)
        if self._step_keep <= 0 or indices is None:
            return
        li = int(getattr(layer, "index", layer))
        if li not in self._layer_ids:
            self._layer_ids.add(li)
            if not isinstance(layer, int):
                self.layers.append(layer)
        keep = min(self._step_keep, rows)
        if indices.dim() == 1:
            indices = indices.unsqueeze(-1)
        if weights is None:
            weights = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        elif weights.dim() == 1:
            weights = weights.unsqueeze(-1)
        ne = int(getattr(layer, "num_experts", 0) or 0)
        idx = indices[:keep].detach().to(torch.int16 if 0 < ne < 32767 else torch.int32)
        w = weights[:keep].detach()
        lg = None
        if self.record_logits and logits is not None:
            lg = logits[:keep].detach()
            if self.logits_dtype == "float16" and lg.dtype == torch.float32:
                lg = lg.to(torch.float16)
        chunk = _Chunk(li, phase, self._batch, rows, keep, None if lg is None else _to_host(lg),
                       _to_host(w), _to_host(idx), mask=self._step_mask)
        if idx.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            chunk.event = ev
        self._batch.pending += 1
        self._chunks.append(chunk)

    def _start_step(self, key: tuple[int, str], phase: str, rows: int) -> None:
        self._step_key = key
        info, self._next_input = self._next_input, {}
        self._step_keep = 0
        self._step_mask = None
        if self._stopped:
            return
        if phase == "prefill" and not self._explicit:
            n = info.get("batch")
            first, self._next_auto_id = self._next_auto_id, self._next_auto_id + (n or 1)
            b = self._new_batch(list(range(first, first + (n or 1))), self.dataset)
            b.infer = n is None
        elif self._batch is not None and self._batch.infer and phase == "decode":
            self._resize_batch(self._batch, rows)
        elif self._batch is None:  # a decode step before any prefill: one sample per row
            first, self._next_auto_id = self._next_auto_id, self._next_auto_id + max(1, rows)
            self._new_batch(list(range(first, first + max(1, rows))), self.dataset)
        if self._stopped or phase not in self.phases:
            return
        b = self._batch
        nseq = len(b.uids)
        rps = rows // nseq if nseq and rows % nseq == 0 else None
        if rps is None and "unsplit" not in self._warned:
            self._warned.add("unsplit")
            warnings.warn(f"router rows ({rows}) are not a multiple of the batch's {nseq} sequences; "
                          "the rows of such steps all go to the batch's first sample", stacklevel=3)
        keep = (rows if b.keep else 0) if rps is None else b.keep * rps
        if self.max_tokens is not None:
            keep = min(keep, max(0, self.max_tokens - self.tokens_recorded))
        mask = info.get("mask")
        if mask is not None and phase == "prefill" and rps is not None and tuple(mask.shape) == (nseq, rps):
            self._step_mask = _to_host(mask.detach())
        self._step_keep = keep
        self.tokens_recorded += keep

    def on_step_end(self, step: int, phase: str) -> None:
        if self._closed:
            return
        self._steps_since_flush += 1
        self._maybe_stop()
        if self._stopped:
            self._drain(block=True)
            self._finish_batches(final=True)
        elif self._steps_since_flush >= self.flush_every:
            self._steps_since_flush = 0
            self._drain(block=False)

    def flush(self) -> None:
        """Drain every pending copy (blocking) and write the finished samples."""
        self._drain(block=True)

    def check(self) -> None:
        """Raise `ConfigError` now if the log cannot be written at `path` (the session calls this
        when its `with` block starts, before anything runs)."""
        if self.format == "json" and self.path.suffix == ".json":
            output_file(self.path, "log_router_logits path")
        else:
            output_dir(self.path, "log_router_logits directory")

    def close(self) -> None:
        """Write what is left and close the files; the hooks of `attach()` are removed even when
        writing fails (the error is raised after)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain(block=True)
            self._finish_batches(final=True)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> "RouterLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def paths(self) -> list[Path]:
        """Files written so far."""
        return list(self._writer.paths) if self._writer is not None else []

    def stats(self) -> dict[str, Any]:
        return {"tokens_recorded": self.tokens_recorded, "samples_started": self.samples_started,
                "samples_written": self.samples_written, "full": self._stopped,
                "paths": [str(p) for p in self.paths], "format": self.format}

    # -- draining -------------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        limit = 4 * self.flush_every * max(1, len(self.layers))
        done = 0
        for ch in self._chunks:
            if ch.batch.infer and not ch.batch.closed and not block:
                break  # its batch size is still unknown
            if ch.event is not None and not ch.event.query():
                if block or len(self._chunks) - done > limit:
                    ch.event.synchronize()
                else:
                    break
            self._absorb(ch)
            done += 1
        del self._chunks[:done]
        self._finish_batches(final=False)
        if self._writer is not None:
            self._writer.flush()

    def _absorb(self, ch: _Chunk) -> None:
        b = ch.batch
        b.pending -= 1
        idx = ch.indices.numpy()
        w = ch.weights.float().numpy() if ch.weights.dtype in (torch.bfloat16, torch.float16) else ch.weights.numpy()
        lg = None
        if ch.logits is not None:
            lg = ch.logits.float().numpy() if ch.logits.dtype == torch.bfloat16 else ch.logits.numpy()
            if self.logits_dtype == "float32":
                lg = lg.astype(np.float32, copy=False)
        nseq = len(b.uids)
        rps = ch.rows_total // nseq if nseq and ch.rows_total % nseq == 0 else None
        keep_mask = None
        if ch.mask is not None:
            keep_mask = ch.mask.numpy().astype(bool).reshape(-1)[: ch.keep_rows]
        if rps is None:
            spans = [(b.uids[0], 0, ch.keep_rows)]
        else:
            spans = [(b.uids[s], s * rps, min(ch.keep_rows, (s + 1) * rps))
                     for s in range(min(b.keep, math.ceil(ch.keep_rows / rps)))]
        for uid, a, c in spans:
            if c <= a:
                continue
            sel = slice(a, c)
            parts = (None if lg is None else lg[sel], idx[sel], w[sel])
            if keep_mask is not None:
                m = keep_mask[sel]
                if not m.all():
                    parts = tuple(None if p is None else p[m] for p in parts)
            smp = self._samples.get(uid)
            if smp is not None and not smp.written:
                smp.parts.setdefault(ch.layer, []).append(parts)

    def _finish_batches(self, final: bool) -> None:
        still = []
        for b in self._batches:
            if b.pending == 0 and (b.closed or final):
                self._write_batch(b)
            else:
                still.append(b)
        self._batches = still

    def _write_batch(self, b: _Batch) -> None:
        losses: list[float | None] = [None] * len(b.uids)
        if b.loss is not None:
            lv = b.loss
            if isinstance(lv, torch.Tensor):
                arr = lv.float().reshape(-1).numpy()
                if arr.size == len(b.uids):
                    losses = [float(x) for x in arr]
                elif arr.size == 1 and len(b.uids) == 1:
                    losses = [float(arr[0])]
                elif arr.size == 1:  # a batch mean: not a per-sample loss
                    losses = [None] * len(b.uids)
            else:
                losses = [float(lv)] * len(b.uids) if len(b.uids) == 1 else [None] * len(b.uids)
        for j, uid in enumerate(b.uids):
            s = self._samples.pop(uid, None)
            if s is None or s.written:
                continue
            s.written = True
            if not s.parts:
                continue
            layers = []
            ntok = 0
            for li in sorted(s.parts):
                ps = s.parts[li]
                lg = None if any(p[0] is None for p in ps) else np.concatenate([p[0] for p in ps])
                idx = np.concatenate([p[1] for p in ps])
                w = np.concatenate([p[2] for p in ps])
                layers.append(LayerRecord(li, lg, idx, w))
                ntok = max(ntok, idx.shape[0])
            self._write(SampleRecord(s.sample_id, s.dataset, ntok, losses[j], layers))
            s.parts = {}
            self.samples_written += 1

    def _write(self, rec: SampleRecord) -> None:
        if self._writer is None:
            meta = layer_meta(sorted(self.layers, key=lambda l: getattr(l, "index", 0)))
            if self.model_name is None and self.layers:
                self.model_name = getattr(self.layers[0], "family", None)
            self._writer = make_writer(
                self.format, self.path, config=str(self.model_name or "unknown"), strategy=self.strategy,
                layers=meta, prefix=self.prefix or (str(self.model_name).rstrip('/').split('/')[-1] if self.model_name else 'moe'), logits_dtype=self.logits_dtype, shard_tokens=self.shard_tokens,
                **({"compress": self.compress} if self.format == "columnar" else {}))
        self._writer.write(rec)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t` that is valid once the current stream reaches this point (no sync)."""
    if t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf
    return t.detach().clone()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence ([B,S,V] logits, [B,S] labels) -> [B]; the
    causal-LM convention of HF models (labels shifted inside). No host sync."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                           ignore_index=ignore_index, reduction="none").view(lb.shape)
    valid = (lb != ignore_index).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1.0)
