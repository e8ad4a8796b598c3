"""The observer protocol: the one way other components follow a profiled model.

Only the session hooks the model. Every model forward becomes a `Step` (phase, step number, batch
and positions, the attention mask of the new positions, labels) that the session hands to its
observers, together with every routing decision. The router-logit logger
(`moe_trace.routing.logger.RouterLogger`) and the sweep's forward timer
(`moe_trace.experiments.sweep.ForwardTimer`) are observers.

Every method is optional; the session calls, in this order:

- ``check()`` — when the ``with`` block starts, before anything runs: raise `ConfigError` for a
  setting that cannot work (an unwritable output path, ...);
- ``on_step_start(step: Step)`` — first thing when a model forward starts (before moe-trace's own
  work for the step), on the host, no sync;
- ``on_route(layer: LayerInfo, phase: str, step: int, logits, weights, indices)`` — inside the
  router / experts hook, with device tensors (`logits` [T,E] or None, `weights` / `indices` [T,k]);
  the observer must not sync (copy with ``non_blocking=True`` into its own buffers);
- ``on_forward_end(step: Step, output)`` — right after the forward returned, before moe-trace's own
  end-of-step work (counter flush, profiler step), with the model's output;
- ``on_step_end(step: int, phase: str)`` — after moe-trace's end-of-step work;
- ``close()`` — once when the ``with`` block ends (also when the body raised); the session removes
  its hooks before, and keeps closing the other observers when one fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import torch


@dataclass
class Step:
    """One model forward as the session sees it (host-side facts only, no sync)."""

    index: int                      # 0-based, in call order over all phases
    phase: str                      # "prefill" / "decode" (see docs/capture.md "Phases")
    batch: int | None               # sequences in the forward (None: no token input found)
    positions: int                  # new positions per sequence
    tokens: int                     # batch * positions
    attention_mask: torch.Tensor | None = None  # [batch, positions]: the mask of the new positions
    labels: torch.Tensor | None = None


@runtime_checkable
class Observer(Protocol):
    """What the session calls (each method optional; see the module docstring)."""

    def on_route(self, layer: Any, phase: str, step: int, logits: Any, weights: Any, indices: Any) -> None: ...


_METHODS = ("check", "on_step_start", "on_route", "on_forward_end", "on_step_end", "close")


class ObserverSet:
    """The session's observers, with each method pre-bound (so hooks pay one list walk, no getattr)."""

    def __init__(self, observers: Iterable[Any] = ()):
        self.items: list[Any] = []
        self._bound: dict[str, list] = {m: [] for m in _METHODS}
        for obs in observers:
            self.add(obs)

    def add(self, obs: Any) -> None:
        self.items.append(obs)
        for m in _METHODS:
            fn = getattr(obs, m, None)
            if callable(fn):
                self._bound[m].append(fn)

    def __bool__(self) -> bool:
        return bool(self.items)

    def wants_routes(self) -> bool:
        return bool(self._bound["on_route"])

    def check(self) -> None:
        for fn in self._bound["check"]:
            fn()

    def step_start(self, step: Step) -> None:
        for fn in self._bound["on_step_start"]:
            fn(step)

    def route(self, layer, phase: str, step: int, logits, weights, indices) -> None:
        for fn in self._bound["on_route"]:
            fn(layer, phase, step, logits, weights, indices)

    def forward_end(self, step: Step, output: Any) -> None:
        for fn in self._bound["on_forward_end"]:
            fn(step, output)

    def step_end(self, step: int, phase: str) -> None:
        for fn in self._bound["on_step_end"]:
            fn(step, phase)

    def close(self) -> list[BaseException]:
        """Close every observer; returns the errors (the caller re-raises the first after cleanup)."""
        errors = []
        for fn in self._bound["close"]:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - every observer must get its close()
                errors.append(e)
        return errors
