"""Strict JSON for metric dicts."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None, recursively: strict JSON (a VOC AP of a class without ground
    truth is NaN, which ``json.dumps`` would write as the non-standard ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
