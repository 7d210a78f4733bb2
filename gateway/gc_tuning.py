"""Garbage collection tuned for the serving process, which holds thousands of long-lived sessions.

With CPython's default thresholds (700, 10, 10) a gateway holding 3,000 sessions stalled its event
loop in collections: every few seconds in step with the heartbeat flush's allocations (young
collections of 11-17 ms, middle ones of ~55 ms) and, while sessions arrived, full collections of
30-290 ms growing with the sessions held: the worst second's heartbeat RTT p99 was 300-400 ms in
every run, echo's 5 ms (docs/performance.md, "The per-heartbeat cost"). Raising the thresholds
lets the young generation's garbage (a hello's cycles, a flush's parameters) be collected in
fewer, cheaper passes, and freezing what start-up allocated (modules, configuration, the schema:
never garbage) keeps it out of every later full collection. Measured the same way: no collection
over 5 ms in the steady window, the worst second 15 ms, RSS per 1,000 sessions unchanged.

Only for ``gateway serve`` (``gateway.cli``): a test process that starts many gateways keeps the
interpreter's defaults (freezing there would keep every earlier test's garbage for good).
"""

from __future__ import annotations

import gc

#: Allocations minus deallocations of tracked objects before a young collection (default 700).
GEN0_THRESHOLD = 20_000
#: Young collections before a middle one (default 10).
GEN1_THRESHOLD = 50
#: Middle collections before a full one (default 10; CPython also waits until the objects that
#: survived since the last full one are a quarter of those it holds).
GEN2_THRESHOLD = 100


def tune_for_serving() -> int:
    """Collect what start-up left, freeze the rest out of later collections and raise the
    thresholds; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    return gc.get_freeze_count()
