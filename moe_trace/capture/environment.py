"""What a run's settings card shows besides the profiler's own options: versions, date, devices, dtype,
and the workload's shape (batch, prompt length, new tokens). Read once at the end of a run."""
from __future__ import annotations

import datetime
import platform
from typing import Any

import torch
from torch import nn


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            return torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError):
            return device
    return platform.processor() or platform.machine() or device


def environment(model: nn.Module, devices: list[str], first_prefill: tuple[int, int] | None,
                forward_calls: dict[str, int]) -> dict[str, Any]:
    """`settings` entries: versions, UTC date, device names, dtype, batch / prompt length / new tokens."""
    import moe_trace

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        tf_version = None
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    prefills = forward_calls.get("prefill", 0)
    workload = {"batch": first_prefill[0] if first_prefill else None,
                "prompt_len": first_prefill[1] if first_prefill else None,
                "generate_calls": prefills,
                # decode forwards per generate call: new tokens - 1 (the prefill makes the first one)
                "new_tokens": (forward_calls.get("decode", 0) // prefills + 1) if prefills else None}
    return {"versions": {"moe_trace": moe_trace.__version__, "torch": torch.__version__,
                         "transformers": tf_version, "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "devices": {d: device_name(d) for d in devices},
            "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes) or None,
            "workload": workload}
