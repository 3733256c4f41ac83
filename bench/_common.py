"""Shared bits of the benchmark scripts: percentiles and the table they print."""

from __future__ import annotations

import numpy as np


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


def table(title: str, rows: list[tuple[str, str, float, float, str]]) -> str:
    """rows: (path, unit, ours, ceiling, note). Ratio is ours/ceiling for throughput and
    ceiling/ours for latency and cost (unit ending in 'ms' or starting with 'us/'), so
    higher is always better."""
    out = [
        title,
        "",
        "| path | unit | Myelin | bare-library ceiling | ratio | note |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for path, unit, ours, ceiling, note in rows:
        cost = unit.endswith("ms") or unit.startswith("us/")
        ratio = ceiling / ours if cost else ours / ceiling
        out.append(f"| {path} | {unit} | {ours:,.3f} | {ceiling:,.3f} | {ratio:.2f}x | {note} |")
    return "\n".join(out)
