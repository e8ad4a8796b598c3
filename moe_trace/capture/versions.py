"""Which transformers versions moe-trace supports, checked once before detection.

Supported: transformers >= 4.57 and < 6 (CI tests 4.57.6 and the pinned 5.x of
`.ci/constraints.txt`). The 4.x layouts (expert `nn.ModuleList`s, routers that return
`(topk_indices, topk_weights)`, 4.x experts call signatures) have their own handlers; a family that
4.57 ships but cannot run is refused with the version it needs (`require`).
"""
from __future__ import annotations

import functools

from moe_trace.errors import UnsupportedTransformersError

MINIMUM = (4, 57)
BELOW = (6, 0)
SUPPORTED = ">=4.57,<6"
TESTED = ("4.57.6", "5.24.0")


def _parse(version: str) -> tuple[int, int]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def installed() -> str:
    import transformers

    return str(transformers.__version__)


@functools.lru_cache(maxsize=8)
def _check(version: str) -> None:
    if not (MINIMUM <= _parse(version) < BELOW):
        raise UnsupportedTransformersError(
            f"transformers {version} is not supported: moe-trace works with transformers {SUPPORTED} "
            f"(tested: {', '.join(TESTED)}); install one, e.g. pip install 'transformers{SUPPORTED}'")


def check_transformers() -> None:
    """Raise `UnsupportedTransformersError` (one clear line) unless the installed transformers is supported."""
    _check(installed())


def major() -> int:
    return _parse(installed())[0]


def require(family: str, minimum: str, why: str) -> None:
    """Refuse `family` on a transformers older than `minimum`, naming the version that works."""
    if _parse(installed()) < _parse(minimum):
        raise UnsupportedTransformersError(
            f"{family} needs transformers >= {minimum} (installed: {installed()}): {why}; "
            f"upgrade with pip install 'transformers>={minimum},<6'")
