"""Fault-injection hooks for reliability tests (torch-free, so the data stages can use them too)."""

from __future__ import annotations

import os


def fault(name: str) -> str | None:
    """The value of one fault-injection hook from GPTFORGE_FAULT (comma-separated `name=value` or `name@value`),
    e.g. `nan_loss@steps=30-40,save_sleep=2`; None when unset. Used only by reliability tests."""
    for part in os.environ.get("GPTFORGE_FAULT", "").split(","):
        key, sep, value = part.strip().partition("@" if "@" in part else "=")
        if sep and key == name:
            return value
    return None


def fault_seconds(name: str) -> float:
    value = fault(name)
    return float(value) if value else 0.0
