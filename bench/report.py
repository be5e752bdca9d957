"""Printing benchmark figures uniformly, and the measurements every benchmark needs."""

from __future__ import annotations

import resource
import statistics
import sys
from collections.abc import Sequence


def header(title: str, detail: str = "") -> None:
    print(f"\n== {title}" + (f" — {detail}" if detail else ""), flush=True)


def figure(name: str, value: float, unit: str, *, goal: str = "") -> None:
    shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3f}"
    print(f"   {name:<52} {shown:>14} {unit}" + (f"   (goal {goal})" if goal else ""), flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), in MiB."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 1024 / 1024
