"""The cyclic garbage collector, kept out of the way of bulk work.

CPython frees almost everything by reference counting; the cyclic collector only finds
cycles. It runs a young collection every 700 net allocations of container objects and,
every so often, a full one that walks every tracked object in the process: the modules,
the ORM's metadata, the compiled definitions and the policy memos included. A planner
tick allocates a few hundred objects per patient (rows, records, decisions, row values)
and creates next to no cycles, so at the default thresholds the collector took about a
quarter of a tick's CPU (100,000 patients on SQLite, one process: 105-109 µs of CPU per
row, 76-79 µs with the young generation collected every 10,000 allocations; the tick
collected about 30,000 cyclic objects either way).

`bulk_collector()` raises the young generation's threshold for the work inside it and
puts the old one back after, so memory stays bounded (cycles are still collected, in
larger, rarer passes). `freeze_startup_heap()` takes what a process built at startup out
of every later pass.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BULK_THRESHOLDS = (10_000, 10, 10)
"""Young-generation threshold (allocations) and the two older generations' (passes)."""

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, int, int] | None = None


@contextmanager
def bulk_collector() -> Iterator[None]:
    """Collect cycles less often while inside (threads and nesting allowed: the thresholds
    the first one found are put back when the last one leaves). The thresholds are the
    process's own, so other threads' work inside the same span collects less often too."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(
                *(max(new, old) for new, old in zip(BULK_THRESHOLDS, _saved, strict=True))
            )
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None


def freeze_startup_heap() -> None:
    """Take what starting the process created (modules, the ORM's metadata, the SDKs, the
    definitions) out of the garbage collector's full passes, which otherwise walk all of it
    each time: in a dispatcher about 0.1 s of CPU per pass, several passes per 5,000
    messages. Called once the process is built; what lives from startup on is not garbage
    later (frozen objects are never freed by the collector, only by their reference
    counts)."""
    gc.collect()
    gc.freeze()
