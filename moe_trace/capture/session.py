"""`moe_trace.profile(model)`: the profiling session.

Data flow (docs/design.md "Capture"): `ProfileOptions` (options.py) -> `ProfileRun.__enter__` finds
the MoE layers (detect.py), builds the recorders the mode asks for (recorders.py: device counters
always, the CUDA-event `PartTimer` for "timing", the `KinetoRecorder` for "kineto"), binds the
router middleware (moe_trace.selectors) and installs the hooks. The session is the only component
that hooks the model: each model forward becomes a `Step` handed to the recorders and to the
observers (observers.py: the router-logit logger, the sweep's timer, yours). `__exit__` removes every
hook, closes the observers, reads the counters once into `RunData` and lets the Kineto recorder
export. Everything is removed on exit, also when the body raises.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from moe_trace.analysis.report import Report
from moe_trace.analysis.rundata import PHASES, RunData
from moe_trace.errors import ConfigError, ProfileStateError
from moe_trace.selectors import Middleware, SelectorMiddleware, resolve_selector
from moe_trace.trace.format import new_run_id, range_name, step_name

from .compiled import CompiledGuard
from .counters import Pending
from .detect import find_bindings
from .environment import environment
from .handlers.base import MoEBinding, MoEHandler
from .observers import ObserverSet, Step
from .options import MODES, ProfileOptions
from .parallel import parallel_layout
from .ranges import ProfilerRange
from .recorders import CounterRecorder, KinetoRecorder, process_info, running_profilers
from .timing import PartTimer

__all__ = ["MODES", "ProfileOptions", "ProfileRun", "profile", "range_name", "step_name"]
_ACTIVE_ATTR = "_moe_trace_active_run"


def _profiler_on() -> bool:
    return torch._C._autograd._profiler_enabled()


def _in_backward() -> bool:
    """True while autograd runs a backward in this thread (activation checkpointing re-runs module
    forwards there; they are not forwards of the model). Asked only outside a model forward; never
    inside compiled code (a compiled backward runs no module hooks)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _read_step(index: int, args: tuple, kwargs: dict) -> Step:
    """Phase, batch and positions of one model forward from its inputs (host metadata, no sync)."""
    x = kwargs.get("input_ids")
    if x is None and args and torch.is_tensor(args[0]):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    labels = kwargs.get("labels")
    labels = labels if torch.is_tensor(labels) else None
    if x is None or not torch.is_tensor(x):
        return Step(index, PHASES[0], None, 0, 0, labels=labels)
    if x.dim() == 1:
        n = int(x.shape[0])
        return Step(index, PHASES[0 if n > 1 else 1], None, n, n, labels=labels)
    batch, seq = int(x.shape[0]), int(x.shape[1])
    mask = kwargs.get("attention_mask")
    mask = mask[:, -seq:] if torch.is_tensor(mask) and mask.dim() == 2 else None
    return Step(index, PHASES[0 if seq > 1 else 1], batch, seq, batch * seq, attention_mask=mask, labels=labels)


def _generation_phase(gen: dict, positions: int, kwargs: dict) -> str:
    """The phase of a forward inside `generate`, by generation progress (host ints only, no sync):
    every forward before the prompt's positions are all in the cache is `prefill` (chunked prefill
    included; a 1-token prompt too), later one-position forwards are `decode` and later several-
    position forwards score candidates (assisted / speculative / prompt-lookup decoding): `verify`.
    Without a cache (`use_cache=False`) every forward after the first recomputes the whole sequence
    to add one token: `decode`."""
    gen["forwards"] += 1
    if gen["done"] < gen["prompt"]:
        gen["done"] += positions
        return "prefill"
    cached = kwargs.get("past_key_values", kwargs.get("cache")) is not None and kwargs.get("use_cache") is not False
    if not cached:  # use_cache=False: the whole sequence again, to add one token
        gen["recomputed"] = gen.get("recomputed", False) or positions > 1
        return "decode"
    return "decode" if positions == 1 else "verify"


def _read_decoder_step(index: int, kwargs: dict) -> Step:
    """A decoder step of an encoder-decoder model (generate passes `decoder_input_ids` and the
    encoder's outputs): prefill while the decoder's cache is empty, decode after."""
    x = kwargs["decoder_input_ids"]
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # 4.x / 5.x spelling
    get_len = getattr(cache, "get_seq_length", None)
    past = get_len() if callable(get_len) else (0 if cache is None else 1)
    batch, seq = int(x.shape[0]), int(x.shape[-1])
    mask = kwargs.get("decoder_attention_mask")
    mask = mask[:, -seq:] if torch.is_tensor(mask) and mask.dim() == 2 else None
    return Step(index, PHASES[0 if past == 0 else 1], batch, seq, batch * seq, attention_mask=mask)


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model: `generate` runs it outside the model's forward."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    enc = get() if callable(get) else None
    return enc if isinstance(enc, nn.Module) and enc is not model else None


class ProfileRun:
    """A profiling session; use as a context manager around `model.generate(...)` or forwards.

    `profile(model, mode, **options)` builds it; the options are `ProfileOptions` (options.py)."""

    def __init__(self, model: nn.Module, mode: str = "stats", **options: Any):
        self.options = ProfileOptions.from_call(mode, **options)
        self.model = model
        self.mode = self.options.mode
        self.logdir = self.options.logdir
        self.selector = resolve_selector(self.options.selector)
        self.router_middleware = self.options.router_middleware
        self.kineto = None
        self._run_data: RunData | None = None
        self._handles: list[Any] = []
        self._encoder: nn.Module | None = None
        self._inside = False

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "ProfileRun":
        if getattr(self.model, _ACTIVE_ATTR, None) is not None:
            raise ProfileStateError("this model is already being profiled: moe_trace.profile cannot be nested "
                                    "or run concurrently on one model; finish the first `with` block first")
        opts = self.options
        self.bindings: list[MoEBinding] = find_bindings(self.model)
        self.layers = [b.info for b in self.bindings]
        self._middleware = self._build_middleware()
        self.observers = ObserverSet(opts.observers)
        if opts.log_router_logits is not None:
            # routing.logger/logfile sit below capture (docs/design.md); imported lazily for start-up time
            from moe_trace.routing.logger import RouterLogger

            self.observers.add(RouterLogger.from_arg(opts.log_router_logits, self.layers, model=self.model))
        self.observers.check()
        self._incomplete: str | None = None
        self.report_file = None  # stats / timing with a logdir: the report JSON written at exit
        # recorders, chosen by the mode
        self.counters = CounterRecorder(self.layers, [b.handler.router_outputs_probs for b in self.bindings])
        self._timer = PartTimer() if opts.cuda_events else None
        # a torch.profiler already running (yours, or profiler=prof): attach to it, never start a second
        user_prof = self._user_profiler()
        self.attached = opts.kineto and (user_prof is not None or _profiler_on())
        self.kineto = KinetoRecorder(opts.logdir, self.counters, schedule=opts.schedule, slim=opts.slim,
                                     record_shapes=opts.record_shapes, with_stack=opts.with_stack,
                                     attach=self.attached, run_factory=self._window_run_data,
                                     user_profiler=user_prof) \
            if opts.kineto else None
        self.forward_calls = {p: 0 for p in PHASES}
        self.forward_tokens = {p: 0 for p in PHASES}
        self._phase = 0
        self._step = -1
        self._current: Step | None = None
        self._first_prefill: tuple[int, int] | None = None
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
        self._gen: dict | None = None  # the running generate() call's progress (see _generation_phase)
        self._recomputed = False
        self._compiled_ranges = False  # set inside compiled code that skipped its ranges
        self._run_id = new_run_id()  # shared by the ranks of a torchrun job (docs/trace-format.md)
        if self.kineto is not None:
            self.kineto.run_id = self._run_id
        self._started_at = time.time()
        self._compiled = CompiledGuard(self.model)
        setattr(self.model, _ACTIVE_ATTR, self)
        try:
            self._install_hooks()
            self._wrap_generate()
            self._compiled.enter()  # compiled code that reaches the model retraces with the hooks
            if self.kineto is not None:
                self.kineto.start()
        except BaseException:
            self._remove_hooks()
            if self.kineto is not None:
                self.kineto.close()
            raise
        self._inside = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._inside = False
        try:
            if self.kineto is not None:
                self.kineto.stop()
        finally:
            self._remove_hooks()
            self._compiled.exit()  # compiled code that holds moe-trace's hooks must not outlive the block
        errors = self.observers.close()
        if exc_type is not None:
            self._incomplete = exc_type.__name__
        try:
            self._run_data = self._collect()
            if self.kineto is not None and not self.attached:  # also when the body raised: written, marked
                # the writer thread saves and writes the trace; trace_files / report() wait for it
                self.kineto.export_async(self._run_data, self._run_id, self._started_at)
            elif self.kineto is None and self.options.logdir is not None:  # stats / timing with a logdir
                self._write_report_file()
        finally:
            if self.kineto is not None:
                self.kineto.close()
        if errors and exc_type is None:
            raise errors[0]
        return False

    def _write_report_file(self) -> None:
        """`{worker}.{run_id}.report.json` in the logdir (never replacing another run's file)."""
        from moe_trace.trace.format import trace_file_name, worker_name
        from moe_trace.trace.io import atomic_write, write_under_free_name

        text = Report(self._run_data).to_json().encode()
        worker = worker_name(process_info())
        self.report_file = write_under_free_name(self._run_id, lambda tag: atomic_write(
            self.options.logdir / trace_file_name(worker, tag, suffix=".report.json"), [text], gz=False,
            overwrite=False), self.options.logdir, error=ConfigError)

    def _user_profiler(self):
        """The user's running torch.profiler.profile to attach to (kineto mode): `profiler=`, else the
        one entered and not exited — in any schedule state, its wait / warmup steps included."""
        opts = self.options
        if opts.profiler is not None:
            if not (opts.profiler in running_profilers() or getattr(opts.profiler, "step_rec_fn", None)):
                raise ConfigError("profiler= must be a running torch.profiler.profile: call moe_trace.profile("
                                  "model, profiler=prof) inside `with torch.profiler.profile(...) as prof:`")
            return opts.profiler
        if not opts.kineto:
            return None
        found = running_profilers()
        if len(found) > 1:
            recording = [p for p in found if getattr(getattr(p, "profiler", None), "entered", False)]
            if len(recording) != 1:
                raise ConfigError(f"{len(found)} torch.profiler.profile objects are running: say which one "
                                  "moe-trace attaches to with moe_trace.profile(model, profiler=prof)")
            found = recording
        return found[0] if found else None

    # -- results ------------------------------------------------------------------------------
    @property
    def run_data(self) -> RunData:
        if self._inside:
            raise ProfileStateError("the run is still going: call report() after the `with` block")
        if self._run_data is None:
            raise ProfileStateError("nothing recorded yet: use `with moe_trace.profile(model) as run:` first")
        return self._run_data

    @property
    def trace_files(self) -> list:
        """The kineto trace files of this run (waits for the background writer; raises its error).
        Attached to the user's profiler: the user's files, as their exports get moe-trace's data (also
        inside and after the block)."""
        if self.kineto is None:
            return []
        if self.attached:
            return self.kineto.trace_files
        if self._inside:
            return []
        return self.kineto.wait()

    @property
    def export_timings(self) -> dict[str, float]:
        """perf_counter marks of the kineto export ("profiler_stopped", "saved", "written", and the passes'
        own), the raw file's size ("raw_bytes") and the writer thread's CPU seconds after the save
        ("tail_thread_cpu")."""
        return dict(self.kineto.timings) if self.kineto is not None else {}

    def report(self, peak: dict[str, float] | None = None) -> Report:
        """Metrics of the run (counts, k, load balance, FLOPs, timing per layer, phase and device).
        In kineto mode without CUDA events the timing is the trace's GPU (or CPU) range times, exactly
        what `moe_trace.analyze(logdir)` reports; kineto mode waits for the trace writer, so a writer
        error is raised here. `peak`: see `Report`."""
        run = self.run_data
        files = self.trace_files
        if run.timing is None and files and not self.attached:
            run = self._with_trace_timing(run)
        return Report(run, peak=peak)

    def _with_trace_timing(self, run: RunData) -> RunData:
        if getattr(self, "_trace_timed", None) is None:
            import dataclasses

            from moe_trace.trace.reader import read_trace, report_of

            traced = report_of([read_trace(f, progress=False) for f in self.trace_files]).run
            self._trace_timed = dataclasses.replace(run, timing=traced.timing, timing_source=traced.timing_source)
        return self._trace_timed

    # -- hooks --------------------------------------------------------------------------------
    def _build_middleware(self) -> dict[int, Middleware]:
        """One middleware per layer: `selector=` becomes a `SelectorMiddleware` (weights="mass") bound
        to each layer; a plain `router_middleware=` callable is used as given."""
        if self.selector is None and self.router_middleware is None:
            return {}
        mw = self.router_middleware
        if mw is None:
            mw = SelectorMiddleware(self.selector, weights="mass")
        out = {}
        for b in self.bindings:
            if not b.handler.supports_selectors:
                raise ConfigError(f"selectors and router middleware are not supported for layer {b.info.name} "
                                  f"({b.info.family}, handler {b.handler.name}): its experts do not take "
                                  "top-k indices and weights")
            if isinstance(mw, SelectorMiddleware) and self.router_middleware is None:
                eager = b.info.experts_implementation in (None, "eager")
                out[b.info.index] = mw.bind(b.info.num_experts, top_k=b.info.top_k,
                                            probs_in=b.handler.router_outputs_probs, eager=eager,
                                            label=f"layer {b.info.index}")
            else:
                out[b.info.index] = mw
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
        encoder = self._encoder = _encoder_of(self.model)  # seq2seq generate: the encoder run is a prefill step
        if encoder is not None:
            step_modules.append(encoder)
        for mod in step_modules:
            add(mod.register_forward_pre_hook(self._model_pre, with_kwargs=True))
            add(mod.register_forward_hook(self._model_post, always_call=True))
        spans = self._timer is not None or self.kineto is not None or _profiler_on()
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

    def _wrap_generate(self) -> None:
        """Phases by generation progress need the prompt length at `generate` entry: the model's
        `generate` is wrapped on the instance (nothing it computes changes) and restored on exit."""
        gen_fn = getattr(self.model, "generate", None)
        if not callable(gen_fn) or getattr(self.model.config if hasattr(self.model, "config") else None,
                                           "is_encoder_decoder", False):
            self._generate_saved = None
            return
        had_own = "generate" in self.model.__dict__
        self._generate_saved = (had_own, self.model.__dict__.get("generate"))
        run = self

        @functools.wraps(gen_fn)
        def generate(*args, **kwargs):
            x = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            outer = run._gen
            if torch.is_tensor(x) and x.dim() >= 2:
                run._gen = {"prompt": int(x.shape[1]), "done": 0, "forwards": 0}
            try:
                return gen_fn(*args, **kwargs)
            finally:
                if run._gen is not None and run._gen.get("recomputed"):
                    run._recomputed = True
                run._gen = outer

        generate._moe_trace_wrapper = True
        self.model.generate = generate

    def _unwrap_generate(self) -> None:
        saved = getattr(self, "_generate_saved", None)
        self._generate_saved = None
        if saved is None:
            return
        had_own, own = saved
        if getattr(self.model.__dict__.get("generate"), "_moe_trace_wrapper", False):
            if had_own:
                self.model.generate = own
            else:
                del self.model.generate

    def _remove_hooks(self) -> None:
        self._unwrap_generate()
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
        self._step += 1
        if self._encoder is not None and kwargs.get("input_ids") is None \
                and torch.is_tensor(kwargs.get("decoder_input_ids")):
            step = _read_decoder_step(self._step, kwargs)  # seq2seq generate: a decoder step
        else:
            step = _read_step(self._step, args, kwargs)
            gen = self._gen
            if gen is not None and module is not self._encoder and step.batch is not None:
                phase = _generation_phase(gen, step.positions, kwargs)
                if phase != step.phase:
                    step = dataclasses.replace(step, phase=phase)
        if module is self._encoder and step.phase != PHASES[0]:  # a one-token source is still prefill
            step = dataclasses.replace(step, phase=PHASES[0])
        self._current = step
        self.observers.step_start(step)
        phase = step.phase
        self._phase = PHASES.index(phase)
        if self._phase == 0 and self._first_prefill is None and step.batch is not None:
            self._first_prefill = (step.batch, step.positions)
        self.forward_calls[phase] += 1
        self.forward_tokens[phase] += step.tokens
        self.counters.set_step(self._phase, step.attention_mask)
        if self.kineto is not None:
            self.kineto.begin_step(self._step)
        if _profiler_on():
            n = self.kineto.trace_step(self._step) if self.kineto is not None else self._step
            self._step_range = ProfilerRange(step_name(phase, n)).__enter__()
        return None

    def _model_post(self, module, args, output):
        self._depth -= 1
        if self._depth > 0:
            return None
        phase = PHASES[self._phase]
        if self._current is not None:
            self.observers.forward_end(self._current, output)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        # with grad on, count now: queued router outputs would keep the forward's graph alive
        self.counters.end_forward(capturing or torch.is_grad_enabled())
        self._scores.clear()
        self._router_routing.clear()
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        kineto = self.kineto
        if kineto is not None:
            kineto.end_step()
            kineto.snapshot(self._step, self._phase, self.forward_tokens[phase])
        self.observers.step_end(self._step, phase)
        if kineto is not None:
            kineto.advance()
        return None

    def _open(self, key: int, layer: int, part: str, device: torch.device) -> None:
        if torch.compiler.is_compiling():  # docs/capture.md "Compiled models": the graph stays whole,
            self._compiled_ranges = True  # so its parts get no range and no timer (counts are exact)
            return
        if _profiler_on():
            rf = ProfilerRange(range_name(PHASES[self._phase], layer, part), span=True).__enter__()
            self._ranges.setdefault(key, []).append(rf)
        if self._timer is not None:
            self._timer.start(key, self._phase, layer, part, device)

    def _close(self, key: int) -> None:
        if torch.compiler.is_compiling():
            return
        if self._timer is not None:
            self._timer.stop(key)
        stack = self._ranges.get(key)
        if stack:
            stack.pop().__exit__(None, None, None)

    def _part_pre(self, layer: int, part: str, device: torch.device):
        def hook(module, args):
            if not self._depth and _in_backward():
                return  # activation-checkpointing recompute: not a forward of the model
            self._open(id(module), layer, part, device)
        return hook

    def _part_post(self, layer: int, part: str):
        def hook(module, args, output):
            self._close(id(module))
        return hook

    def _router_post(self, b: MoEBinding, spans: bool):
        i = b.info.index
        dc, local = self.counters.where[i]
        fast = not self.observers.wants_routes()  # observers get every call with its scores through _record

        def hook(module, args, output):
            if spans:
                self._close(id(module))
            if not self._depth and _in_backward():
                # activation-checkpointing recompute inside backward: the forward was counted already;
                # keep the scores a middleware needs to route the recompute the same way
                if i in self._middleware:
                    self._scores[i] = b.handler.logits_from_router(output)
                return
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
                    if not self._depth and _in_backward():
                        return result  # recompute in backward (activation checkpointing): counted already
                    self._record(b, idx, w)
                    if i in self._probing and not torch.compiler.is_compiling():
                        self._end_probe(i, idx, w, spans)  # (a hook handle cannot be removed in a graph)
            if not self._depth and _in_backward():
                return result
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
        dc, local = self.counters.where[i]
        scores = self._scores.get(i)
        if scores is not None and (scores.dim() != 2 or scores.shape[0] != idx.shape[0]):
            scores = scores.reshape(idx.shape[0], -1) if scores.numel() % max(idx.shape[0], 1) == 0 else None
        dc.queue(Pending(local, self._phase, idx, w, scores, b.handler.router_outputs_probs, dc.mask))
        if torch.compiler.is_compiling():  # inside torch.compile'd code (docs/capture.md "Compiled models")
            if self.observers.wants_routes():
                self._route_eagerly(b.info, scores, w, idx)
            return
        self.observers.route(b.info, PHASES[self._phase], self._step, scores, w, idx)

    @torch.compiler.disable
    def _route_eagerly(self, info, scores, w, idx) -> None:
        """Observers are Python: inside compiled code they run outside the graph (one graph break),
        reading the step here so that the graph does not specialize on it."""
        self.observers.route(info, PHASES[self._phase], self._step, scores, w, idx)

    # -- collect ----------------------------------------------------------------------------------
    def _collect(self) -> RunData:
        counts = self.counters.collect()
        if self.kineto is not None:  # per-forward counts: the distinct experts each forward read
            for st in self.kineto.step_deltas():
                for i, rec in st["layers"].items():
                    counts[st["phase"]][i].expert_reads += sum(1 for x in rec["expert_counts"] if x)
        padding = {p: max((c.padding_tokens for c in counts[p] if c is not None), default=0) for p in PHASES}
        # positions whose attention mask is 0 are not tokens (docs/capture.md "Padding")
        forward_tokens = {p: self.forward_tokens[p] - padding[p] for p in PHASES}
        timing, source = (None, None)
        if self._timer is not None:
            timing, source = self._timer.resolve(len(self.layers))
        notes = []
        silent = self._silent_layers(counts)
        if silent:
            msg = (f"MoE layer(s) {', '.join(str(i) for i in silent)} saw {sum(self.forward_calls.values())} "
                   "model forward(s) but recorded no routing: their router / experts hooks never ran (a model "
                   "compiled in a way moe-trace cannot see into, or a block that bypasses its MoE module); "
                   "their counts are missing, not zero")
            notes.append(msg)
            warnings.warn("moe-trace: " + msg, RuntimeWarning, stacklevel=3)
            print("moe-trace: warning: " + msg, file=sys.stderr)
        sel = self.selector
        n_bad, example = sel.non_finite() if callable(getattr(sel, "non_finite", None)) else (0, None)
        if n_bad:
            msg = (f"selector {getattr(sel, 'spec', sel)!s} returned {n_bad} non-finite k value(s) (e.g. {example}); "
                   "those tokens used k=1: return finite numbers of experts")
            notes.append(msg)
            warnings.warn("moe-trace: " + msg, RuntimeWarning, stacklevel=3)
        kin = self.kineto
        if kin is not None and not self.attached and kin.schedule is not None and not kin._raw_traces:
            msg = (f"the schedule's active window was never reached in {sum(self.forward_calls.values())} model "
                   "forward(s): no trace was written; lower wait/warmup or run more steps")
            notes.append(msg)
            warnings.warn("moe-trace: " + msg, RuntimeWarning, stacklevel=3)
        if self._compiled_ranges:
            notes.append("MoE layers ran inside torch.compile'd code: moe-trace keeps the compiled graph whole, "
                         "so their router / experts / shared parts have no trace range and no CUDA-event timer "
                         "(per-part times are missing for those forwards); counts are exact, and in kineto mode "
                         "each forward's ProfilerStep range holds its kernels")
        if self._recomputed:
            notes.append("use_cache=False: every decode forward recomputed the whole sequence, so decode "
                         "tokens count the recomputed positions (1 prefill + N-1 decode forwards for N new tokens)")
        if self._incomplete is not None:
            notes.append(f"incomplete run: the profiled block raised {self._incomplete}; the counts cover "
                         f"the {sum(self.forward_calls.values())} model forward(s) before it")
        return self._make_run(counts, dict(self.forward_calls), forward_tokens, padding, timing, source, notes)

    def _silent_layers(self, counts) -> list[int]:
        """Layers without any routing call in a run that had model forwards (skipped blocks exempt)."""
        if not sum(self.forward_calls.values()):
            return []
        skipped = [name for name, m in self.model.named_modules()
                   if getattr(m.__dict__.get("forward"), "_moe_trace_skipped", False)]
        out = []
        for i, layer in enumerate(self.layers):
            if any(counts[p][i] is not None and (counts[p][i].calls or counts[p][i].tokens) for p in PHASES):
                continue
            if any(layer.name == n or layer.name.startswith(n + ".") for n in skipped):
                continue
            out.append(layer.index)
        return out

    def _window_run_data(self, counts, forward_calls, forward_tokens, padding) -> RunData:
        """RunData of the steps of one window of the user's profiler (attached kineto)."""
        return self._make_run(counts, forward_calls, forward_tokens, padding, None, None, [])

    def _make_run(self, counts, forward_calls, forward_tokens, padding, timing, source, notes) -> RunData:
        cfg = getattr(self.model, "config", None)
        model_info = {"family": self.layers[0].family if self.layers else None,
                      "name": getattr(cfg, "_name_or_path", None) or type(self.model).__name__,
                      "class": type(self.model).__name__}
        settings = {"mode": self.mode, "selector": _describe(self.selector),
                    "router_middleware": _describe(self.router_middleware), "slim": self.options.slim,
                    "parallel": parallel_layout(self.model, [e for b in self.bindings for e in b.experts]),
                    **environment(self.model, list(self.counters.devices), self._first_prefill, forward_calls)}
        if self.attached:
            settings["attached_profiler"] = True
        if self._incomplete is not None:
            settings["incomplete"] = True
        if notes:
            settings["notes"] = notes
        return RunData(model=model_info, layers=self.layers, counts=counts,
                       forward_calls=forward_calls, forward_tokens=forward_tokens,
                       padding_tokens=padding, timing=timing, timing_source=source,
                       peak_memory=self.counters.peak_memory(), settings=settings, run_id=self._run_id)


def _standard_router_routing(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, weights) of a transformers-5 router output `(logits, top_k_weights, top_k_index)`."""
    if isinstance(output, tuple) and len(output) == 3 and all(torch.is_tensor(t) for t in output):
        return output[2], output[1]
    return None


def _describe(obj) -> str | None:
    if obj is None:
        return None
    return getattr(obj, "name", None) or repr(obj)


def profile(model: nn.Module, mode: str = "stats", **options: Any) -> ProfileRun:
    """Profile the MoE layers of `model` inside a `with` block. Modes: "stats" (routing counters),
    "timing" (+ CUDA-event timing of router / experts / shared), "kineto" (+ torch.profiler traces
    with MoE counters under `logdir`). `options` are the fields of `ProfileOptions` (logdir, selector,
    router_middleware, observers, log_router_logits, schedule, slim, record_shapes, with_stack,
    cuda_events, profiler); docs/capture.md describes each."""
    return ProfileRun(model, mode, **options)
