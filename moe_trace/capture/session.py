"""`moe_trace.profile(model)`: hooks on every router / experts / shared module, counters on the
device, optional CUDA-event timing and Kineto traces. Everything is removed on exit."""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from moe_trace.analysis.report import Report
from moe_trace.analysis.rundata import PHASES, LayerCounts, RunData
from moe_trace.errors import ConfigError, ProfileStateError
from moe_trace.trace.format import new_run_id, range_name, step_name

from .counters import DeviceCounters, Pending
from .detect import find_bindings
from .handlers.base import MoEBinding, MoEHandler
from .parallel import parallel_layout
from .selection import Middleware, resolve_selector, selector_middleware
from .timing import PartTimer

MODES = ("stats", "timing", "kineto")
_ACTIVE_ATTR = "_moe_trace_active_run"


def _profiler_on() -> bool:
    return torch._C._autograd._profiler_enabled()




def _phase_and_tokens(args: tuple, kwargs: dict) -> tuple[int, int]:
    x = kwargs.get("input_ids")
    if x is None and args and torch.is_tensor(args[0]):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None or not torch.is_tensor(x):
        return 0, 0
    if x.dim() == 1:
        return (0 if x.shape[0] > 1 else 1), int(x.shape[0])
    batch, seq = int(x.shape[0]), int(x.shape[1])
    return (0 if seq > 1 else 1), batch * seq


class ProfileRun:
    """A profiling session; use as a context manager around `model.generate(...)` or forwards."""

    def __init__(self, model: nn.Module, mode: str = "stats", *, logdir: str | os.PathLike | None = None,
                 selector: Any = None, router_middleware: Middleware | None = None,
                 observers: Iterable[Any] = (), log_router_logits: Any = None,
                 schedule: Callable | dict | None = None, slim: bool = True,
                 record_shapes: bool = False, with_stack: bool = False, cuda_events: bool | None = None):
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if selector is not None and router_middleware is not None:
            raise ConfigError("pass either selector= or router_middleware=, not both")
        if router_middleware is not None and not callable(router_middleware):
            raise ConfigError("router_middleware must be a callable (logits, weights, indices) -> (weights, indices)")
        self.model = model
        self.mode = mode
        self.logdir = Path(logdir) if logdir is not None else (Path("runs") / "moe_trace" if mode == "kineto" else None)
        self.selector = resolve_selector(selector)
        self.router_middleware = router_middleware
        self.observers = list(observers)
        self.log_router_logits = log_router_logits
        self.schedule = schedule
        self.slim = slim
        self.record_shapes = record_shapes
        self.with_stack = with_stack
        # CUDA-event (host-clock on CPU) timing: on in "timing" mode; kineto can add it to compare with the trace
        self.cuda_events = (mode == "timing") if cuda_events is None else bool(cuda_events)
        self.trace_files: list[Path] = []
        self._run_data: RunData | None = None
        self._handles: list[Any] = []
        self._inside = False

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "ProfileRun":
        if getattr(self.model, _ACTIVE_ATTR, None) is not None:
            raise ProfileStateError("this model is already being profiled: moe_trace.profile cannot be nested "
                                    "or run concurrently on one model; finish the first `with` block first")
        self.bindings: list[MoEBinding] = find_bindings(self.model)
        self.layers = [b.info for b in self.bindings]
        self._middleware = self._build_middleware()
        if self.log_router_logits is not None:
            from moe_trace.routing.logger import RouterLogger  # lazy: routing sits above capture

            self.observers.append(RouterLogger.from_arg(self.log_router_logits, self.layers, model=self.model))
        # counters per device
        by_dev: dict[str, list[int]] = {}
        for b in self.bindings:
            by_dev.setdefault(b.info.device, []).append(b.info.index)
        self._counters: dict[str, DeviceCounters] = {}
        self._where: dict[int, tuple[DeviceCounters, int]] = {}
        for dev, idxs in by_dev.items():
            dc = DeviceCounters(torch.device(dev), [self.layers[i].num_experts for i in idxs])
            self._counters[dev] = dc
            for local, i in enumerate(idxs):
                self._where[i] = (dc, local)
                dc.probs[local] = self.bindings[i].handler.router_outputs_probs
        self.forward_calls = {p: 0 for p in PHASES}
        self.forward_tokens = {p: 0 for p in PHASES}
        self._phase = 0
        self._step = -1
        self._depth = 0
        self._scores: dict[int, Any] = {}
        # Layers whose experts were seen to receive the router's own index and weight tensors are
        # counted in the router's post-hook, and their experts lose their hook (one hook per layer).
        self._router_routing: dict[int, tuple] = {}
        self._probing: set[int] = set()
        self._count_at_router: set[int] = set()
        self._experts_handles: dict[int, Any] = {}
        self._ranges: dict[int, list] = {}
        self._step_range = None
        self._timer = PartTimer() if self.cuda_events else None
        self._snapshots: list[tuple[int, int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self._raw_traces: list[Path] = []
        self._prof = None
        self._run_id = new_run_id()  # shared by the ranks of a torchrun job (docs/trace-format.md)
        self._started_at = time.time()
        for dev in by_dev:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(torch.device(dev))
        setattr(self.model, _ACTIVE_ATTR, self)
        try:
            self._install_hooks()
            if self.mode == "kineto":
                self._start_profiler()
        except BaseException:
            self._remove_hooks()
            raise
        self._inside = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._inside = False
        try:
            if self.mode == "kineto":
                self._stop_profiler()
        finally:
            self._remove_hooks()
        for obs in self.observers:
            close = getattr(obs, "close", None)
            if close:
                close()
        self._run_data = self._collect()
        if self.mode == "kineto" and exc_type is None:
            self._write_traces()
        return False

    # -- results ------------------------------------------------------------------------------
    @property
    def run_data(self) -> RunData:
        if self._inside:
            raise ProfileStateError("the run is still going: call report() after the `with` block")
        if self._run_data is None:
            raise ProfileStateError("nothing recorded yet: use `with moe_trace.profile(model) as run:` first")
        return self._run_data

    def report(self) -> Report:
        """Metrics of the run (counts, k, load balance, FLOPs, timing per layer, phase and device)."""
        return Report(self.run_data)

    # -- hooks --------------------------------------------------------------------------------
    def _build_middleware(self) -> dict[int, Middleware]:
        if self.selector is None and self.router_middleware is None:
            return {}
        out = {}
        for b in self.bindings:
            if not b.handler.supports_selectors:
                raise ConfigError(f"selectors and router middleware are not supported for layer {b.info.name} "
                                  f"({b.info.family}, handler {b.handler.name}): its experts do not take "
                                  "top-k indices and weights")
            if self.router_middleware is not None:
                out[b.info.index] = self.router_middleware
            else:
                eager = b.info.experts_implementation in (None, "eager")
                out[b.info.index] = selector_middleware(self.selector, b.info, probs_in=b.handler.router_outputs_probs,
                                                        pad_with_sentinel=eager)
        return out

    def _install_hooks(self) -> None:
        """Counting needs a router post-hook and an experts pre-hook per layer. Ranges and timers need
        pre/post hooks on every part; they are installed only when something will use them (a timer,
        kineto mode, or a profiler already running when the block starts)."""
        add = self._handles.append
        # Steps: the model's forward, and its base model's for generation loops that call the inner
        # model directly (block diffusion); only the outermost active call counts (see _depth).
        step_modules = [self.model]
        base = getattr(self.model, "base_model", None)
        if isinstance(base, nn.Module) and base is not self.model:
            step_modules.append(base)
        for mod in step_modules:
            add(mod.register_forward_pre_hook(self._model_pre, with_kwargs=True))
            add(mod.register_forward_hook(self._model_post, always_call=True))
        spans = self._timer is not None or self.mode == "kineto" or _profiler_on()
        self.ranges_enabled = spans
        for b in self.bindings:
            i = b.info.index
            dev = torch.device(b.info.device)
            if b.router is not None:
                if spans:
                    add(b.router.register_forward_pre_hook(self._part_pre(i, "router", dev)))
                add(b.router.register_forward_hook(self._router_post(b, spans), always_call=True))
            if self._may_count_at_router(b):
                self._probing.add(i)
            for j, ex in enumerate(b.experts):
                handle = ex.register_forward_pre_hook(self._experts_pre(b, first=(j == 0), spans=spans), with_kwargs=True)
                add(handle)
                if j == 0:
                    self._experts_handles[i] = handle
                if spans:
                    add(ex.register_forward_hook(self._part_post(i, "experts"), always_call=True))
            for sh in b.shared if spans else ():
                add(sh.register_forward_pre_hook(self._part_pre(i, "shared", dev)))
                add(sh.register_forward_hook(self._part_post(i, "shared"), always_call=True))

    def _may_count_at_router(self, b: MoEBinding) -> bool:
        """Counting can move to the router when the handler reads routing from the standard experts call
        `experts(hidden, top_k_index, top_k_weights)` and nothing changes routing in between."""
        h = type(b.handler)
        return (b.router is not None and len(b.experts) == 1 and b.info.index not in self._middleware
                and h.routing_from_experts is MoEHandler.routing_from_experts
                and h.routing_from_router is MoEHandler.routing_from_router)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for stack in self._ranges.values():
            for rf in reversed(stack):
                try:
                    rf.__exit__(None, None, None)
                except Exception:
                    pass
        self._ranges.clear()
        if self._step_range is not None:
            try:
                self._step_range.__exit__(None, None, None)
            except Exception:
                pass
            self._step_range = None
        if getattr(self.model, _ACTIVE_ATTR, None) is self:
            delattr(self.model, _ACTIVE_ATTR)

    def _model_pre(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:
            return None
        self._phase, tokens = _phase_and_tokens(args, kwargs)
        self._step += 1
        phase = PHASES[self._phase]
        self.forward_calls[phase] += 1
        self.forward_tokens[phase] += tokens
        for dc in self._counters.values():
            dc.phase = self._phase
        if _profiler_on():
            self._step_range = torch.autograd.profiler.record_function(step_name(phase, self._step))
            self._step_range.__enter__()
        return None

    def _model_post(self, module, args, output):
        self._depth -= 1
        if self._depth > 0:
            return None
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        for dc in self._counters.values():
            dc.end_forward(capturing)
        self._scores.clear()
        self._router_routing.clear()
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self.mode == "kineto":
            snap = {dev: dc.snapshot() for dev, dc in self._counters.items()}
            tokens = self.forward_tokens[PHASES[self._phase]]
            self._snapshots.append((self._step, self._phase, tokens, snap))
        for obs in self.observers:
            fn = getattr(obs, "on_step_end", None)
            if fn:
                fn(self._step, PHASES[self._phase])
        if self._prof is not None:
            self._prof.step()
        return None

    def _open(self, key: int, layer: int, part: str, device: torch.device) -> None:
        if _profiler_on():
            rf = torch.autograd.profiler.record_function(range_name(PHASES[self._phase], layer, part))
            rf.__enter__()
            self._ranges.setdefault(key, []).append(rf)
        if self._timer is not None:
            self._timer.start(key, self._phase, layer, part, device)

    def _close(self, key: int) -> None:
        if self._timer is not None:
            self._timer.stop(key)
        stack = self._ranges.get(key)
        if stack:
            stack.pop().__exit__(None, None, None)

    def _part_pre(self, layer: int, part: str, device: torch.device):
        def hook(module, args):
            self._open(id(module), layer, part, device)
        return hook

    def _part_post(self, layer: int, part: str):
        def hook(module, args, output):
            self._close(id(module))
        return hook

    def _router_post(self, b: MoEBinding, spans: bool):
        i = b.info.index
        dc, local = self._where[i]
        fast = not self.observers  # observers get every call with its scores through _record

        def hook(module, args, output):
            if spans:
                self._close(id(module))
            if fast and i in self._count_at_router:
                dc.queue_router_output(local, output)  # the hot path: one append, all else at flush
                return
            self._scores[i] = b.handler.logits_from_router(output)
            routed = b.handler.routing_from_router(b, output)
            if routed is None and (i in self._count_at_router or i in self._probing):
                routed = _standard_router_routing(output)
                if i in self._probing:
                    self._router_routing[i] = routed
                    routed = None
            if routed is not None:
                self._record(b, routed[0], routed[1])
        return hook

    def _experts_pre(self, b: MoEBinding, first: bool, spans: bool):
        i = b.info.index
        dev = torch.device(b.info.device)
        mw = self._middleware.get(i)

        def hook(module, args, kwargs):
            result = None
            if first and i not in self._count_at_router:
                routed = b.handler.routing_from_experts(args, kwargs)
                if routed is not None:
                    idx, w = routed
                    if mw is not None:
                        w, idx = mw(self._scores.get(i), w, idx)
                        result = b.handler.replace_experts_routing(args, kwargs, idx, w)
                    self._record(b, idx, w)
                    if i in self._probing:
                        self._end_probe(i, idx, w, spans)
            if spans:
                self._open(id(module), i, "experts", dev)
            return result
        return hook

    def _end_probe(self, i: int, idx: torch.Tensor, w: torch.Tensor, spans: bool) -> None:
        """First experts call of layer i: if it got the router's very tensors (`is`, no sync), count at
        the router from now on and drop the experts' hook unless spans still need it."""
        self._probing.discard(i)
        seen = self._router_routing.pop(i, None)
        if seen is not None and seen[0] is idx and seen[1] is w:
            self._count_at_router.add(i)
            if not spans:
                self._experts_handles[i].remove()

    def _record(self, b: MoEBinding, idx: torch.Tensor, w: torch.Tensor) -> None:
        i = b.info.index
        dc, local = self._where[i]
        scores = self._scores.get(i)
        if scores is not None and (scores.dim() != 2 or scores.shape[0] != idx.shape[0]):
            scores = scores.reshape(idx.shape[0], -1) if scores.numel() % max(idx.shape[0], 1) == 0 else None
        dc.queue(Pending(local, self._phase, idx, w, scores, b.handler.router_outputs_probs))
        for obs in self.observers:
            obs.on_route(b.info, PHASES[self._phase], self._step, scores, w, idx)

    # -- kineto ---------------------------------------------------------------------------------
    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU]
        if any(l.device.startswith("cuda") for l in self.layers) and torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
        sched = self.schedule
        if isinstance(sched, dict):
            sched = schedule(**sched)
        self._tmpdir = Path(tempfile.mkdtemp(prefix="moe_trace_"))
        self._prof = profile(activities=acts, schedule=sched, record_shapes=self.record_shapes,
                             with_stack=self.with_stack,
                             on_trace_ready=self._on_trace_ready if sched is not None else None)
        self._prof.__enter__()

    def _on_trace_ready(self, prof) -> None:
        path = self._tmpdir / f"raw{len(self._raw_traces)}.json"
        prof.export_chrome_trace(str(path))
        self._raw_traces.append(path)

    def _stop_profiler(self) -> None:
        prof, self._prof = self._prof, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        if self.schedule is None:
            path = self._tmpdir / "raw0.json"
            prof.export_chrome_trace(str(path))
            self._raw_traces.append(path)

    def _write_traces(self) -> None:
        from moe_trace.trace.writer import write_run_traces

        self.trace_files += write_run_traces(self._raw_traces, self.run_data, self._step_deltas(), self.logdir,
                                             slim=self.slim, process=dict(_process_info(), run_id=self._run_id),
                                             started_at=self._started_at)
        for raw in self._raw_traces:
            raw.unlink(missing_ok=True)

    def _step_deltas(self) -> list[dict[str, Any]]:
        """Per-step counts (differences of successive device snapshots), read in one copy per device."""
        if not self._snapshots:
            return []
        host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for dev, dc in self._counters.items():
            c = torch.stack([s[3][dev][0] for s in self._snapshots]).cpu().numpy()
            k = torch.stack([s[3][dev][1] for s in self._snapshots]).cpu().numpy()
            shape = (len(self._snapshots), len(PHASES), dc.L, dc.bins)
            host[dev] = (c.reshape(shape), k.reshape(shape))
        steps = []
        prev_tokens = {p: 0 for p in range(len(PHASES))}
        for n, (step, phase, tokens_cum, _) in enumerate(self._snapshots):
            layers = {}
            for dev, (c, k) in host.items():
                dc = self._counters[dev]
                dc_c = c[n, phase] - (c[n - 1, phase] if n else 0)
                dc_k = k[n, phase] - (k[n - 1, phase] if n else 0)
                for local in range(dc.L):
                    i = next(g for g, (d, l) in self._where.items() if d is dc and l == local)
                    E = self.layers[i].num_experts
                    layers[i] = {"expert_counts": dc_c[local, :E].tolist(),
                                 "k_hist": dc_k[local].tolist()}
            steps.append({"step": step, "phase": PHASES[phase], "tokens": tokens_cum - prev_tokens[phase],
                          "layers": layers})
            prev_tokens[phase] = tokens_cum
        return steps

    # -- collect ----------------------------------------------------------------------------------
    def _collect(self) -> RunData:
        counts = {p: [None] * len(self.layers) for p in PHASES}
        for dev, dc in self._counters.items():
            c, k, conf = dc.read()
            for i, (d, local) in self._where.items():
                if d is not dc:
                    continue
                E = self.layers[i].num_experts
                for p, phase in enumerate(PHASES):
                    kh = k[p, local]
                    last = int(np.nonzero(kh)[0].max()) if kh.any() else 0
                    # tokens from the device (one k-histogram entry per token), so they stay right
                    # under CUDA-graph replay, where host-side hooks ran only at capture
                    counts[phase][i] = LayerCounts(
                        tokens=int(kh.sum()), calls=int(dc.calls[p, local]),
                        expert_counts=c[p, local, :E].astype(np.int64),
                        k_hist=kh[: max(last, self.layers[i].top_k) + 1].astype(np.int64),
                        excluded=int(c[p, local, E:].sum()),
                        top1_prob_sum=float(conf[p, local, 0]), entropy_sum=float(conf[p, local, 1]))
        timing, source = (None, None)
        if self._timer is not None:
            timing, source = self._timer.resolve(len(self.layers))
        peak = {}
        for dev in self._counters:
            if dev.startswith("cuda"):
                peak[dev] = int(torch.cuda.max_memory_allocated(torch.device(dev)))
        cfg = getattr(self.model, "config", None)
        model_info = {"family": self.layers[0].family if self.layers else None,
                      "name": getattr(cfg, "_name_or_path", None) or type(self.model).__name__,
                      "class": type(self.model).__name__}
        settings = {"mode": self.mode, "selector": _describe(self.selector),
                    "router_middleware": _describe(self.router_middleware), "slim": self.slim,
                    "parallel": parallel_layout(self.model, [e for b in self.bindings for e in b.experts])}
        return RunData(model=model_info, layers=self.layers, counts=counts,
                       forward_calls=dict(self.forward_calls), forward_tokens=dict(self.forward_tokens),
                       timing=timing, timing_source=source, peak_memory=peak, settings=settings,
                       run_id=self._run_id)


def _standard_router_routing(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, weights) of a transformers-5 router output `(logits, top_k_weights, top_k_index)`."""
    if isinstance(output, tuple) and len(output) == 3 and all(torch.is_tensor(t) for t in output):
        return output[2], output[1]
    return None


def _describe(obj) -> str | None:
    if obj is None:
        return None
    return getattr(obj, "name", None) or repr(obj)


def _process_info() -> dict[str, Any]:
    rank = world = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return {"dist_rank": rank, "world_size": world, "hostname": socket.gethostname(), "pid": os.getpid()}


def profile(model: nn.Module, mode: str = "stats", **kwargs) -> ProfileRun:
    """Profile the MoE layers of `model` inside a `with` block. Modes: "stats" (routing counters),
    "timing" (+ CUDA-event timing of router / experts / shared), "kineto" (+ torch.profiler traces
    with MoE counters under `logdir`). See docs/capture.md for every option."""
    return ProfileRun(model, mode, **kwargs)
