"""The soak: the platform under a steady load for many minutes, with faults (one every
~30 s) during its first 60%, reporting memory and lag as it goes and at the end.

Event time runs 18 times faster than the clock (three hours of events in ten minutes), so
every window state fills to its steady size (the longest window is an hour) within the
first third of the run. The last 35% runs without faults, so no restart resets a
process's memory there: over it, nothing should grow. Passes when no acknowledged event is
lost or duplicated, no Myelin service grew by more than ``GROWTH_MB`` over that last stretch,
and the lag drained. The engines' memory (nats-server caches stream blocks, redis-server
holds the states) is reported beside it."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from pathlib import Path

from faults.checker import classify
from faults.harness import (
    MODES,
    faulted_run_parts,
    format_rss,
)
from faults.workload import clickstream

log = logging.getLogger("faults.soak")
FAULTS = (
    "kill features",
    "restart redis",
    "kill ingest",
    "stop features",
    "kill warehouse",
    "restart nats",
    "kill inference",
    "stop ingest-2",
    "warehouse down",
    "kill ingest-2",
)
GROWTH_MB = 50.0  # allowed RSS growth of one service over the second half of the run
ENGINES = ("nats-server", "redis-server")
EVENT_TIME_SPAN_MS = 3 * 3600_000


async def run_soak(minutes: float, seed: int, workdir: Path, rate: float = 2_500) -> bool:
    rng = random.Random(seed)
    n = int(minutes * 60 * rate)
    order = list(FAULTS)
    rng.shuffle(order)
    faults = tuple(order[k % len(order)] for k in range(max(1, int(minutes * 60 * 0.6 / 30))))
    mode = replace(
        MODES["short"],
        name="soak",
        duration_s=minutes * 60,
        rate=rate,
        warehouse_down_s=20,
        faults=faults,
        fault_share=0.6,
    )
    workload = clickstream(
        n, seed=seed, start_ms=int(time.time() * 1000), span_ms=int(minutes * 60_000), users=2_000
    )
    parts = await faulted_run_parts(mode, workload, workdir / "soak", seed=seed)
    c = classify(parts.load.acked, parts.effects, parts.raw)
    print(f"soak: {minutes:g} min at {rate:,.0f} events/s, {n:,} events, {len(faults)} faults")
    for t, name, outcome in parts.faults.entries:
        print(f"  {t:7.1f}s  {name:<18} {outcome}")
    print("memory over time (RSS MB):")
    for t, sample in parts.rss_timeline:
        print(f"  {t:6.0f}s  {format_rss(sample)}")
    t_end, drained = parts.rss_after_drain
    print(f"  {t_end:6.0f}s  {format_rss(drained)}  (after draining and the checker's queries)")
    print(f"lag when the load stopped: {parts.lag_at_end}")
    print(f"drained {parts.drained_s:.1f}s after the load stopped")
    print(
        f"events: stored once {c.stored_once:,}, lost {c.lost:,}, duplicated {c.duplicated:,}, "
        f"not in raw history {c.missing_raw:,}, never taken by ingest {len(parts.load.gave_up):,}"
    )
    quiet = parts.rss_timeline[int(len(parts.rss_timeline) * 0.65)]
    last = parts.rss_timeline[-1]
    growth = {k: last[1][k] - quiet[1].get(k, last[1][k]) for k in last[1]}
    grew = {k: round(g) for k, g in growth.items() if g > GROWTH_MB and k not in ENGINES}
    print(
        f"memory growth from {quiet[0]:.0f}s to {last[0]:.0f}s, without faults (MB): "
        f"{ {k: round(g) for k, g in growth.items()} }"
    )
    ok = c.ok and not parts.load.gave_up and not grew and parts.drained_s < 120
    print(
        "RESULT: "
        + (
            "PASS"
            if ok
            else f"FAIL (grew past {GROWTH_MB:.0f} MB: {grew})"
            if grew
            else "RESULT: FAIL"
        )
    )
    return ok
