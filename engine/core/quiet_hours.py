"""Allowed local-time windows: is a wall-clock time inside one, and when does one next hold
in every zone a patient may be in (DST-safe, with zoneinfo)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.core.zones import get_zone

SEARCH_HORIZON = timedelta(days=7)


def in_window(clock: time, start: time, end: time) -> bool:
    """Is the wall-clock time inside [start, end)? end < start is an overnight window."""
    if start < end:
        return start <= clock < end
    return clock >= start or clock < end


def next_window_start(
    now: datetime,
    zones: Sequence[str],
    start: time,
    end: time,
    *,
    horizon: timedelta = SEARCH_HORIZON,
) -> datetime | None:
    """For a `now` outside the window: the earliest later instant at which [start, end)
    holds in every zone, or None if there is none within `horizon`.

    The instants inside are an intersection of unions of intervals, so the first one after
    `now` is where some zone's clock enters the window: at a window start (both folds on a
    fall-back day) or at a DST transition (a start inside a spring-forward gap is entered
    at the transition, the first valid instant after it). Those candidates are tried in order.
    """
    infos = [get_zone(z) for z in zones]
    limit = now + horizon
    streams: list[Iterable[datetime]] = [
        _window_starts(zone, now, start, horizon.days + 2) for zone in infos
    ]
    transitions = sorted(t for zone in infos for t in _transitions(zone, now, limit))
    if transitions:
        streams.append(transitions)
    for instant in streams[0] if len(streams) == 1 else heapq.merge(*streams):
        if instant > limit:
            return None
        inside = (in_window(instant.astimezone(z).time(), start, end) for z in infos)
        if instant > now and all(inside):
            return instant
    return None


def _window_starts(zone: ZoneInfo, now: datetime, clock: time, days: int) -> Iterator[datetime]:
    """In order, the UTC instants at which the zone's clock shows `clock` on the local days
    from today on: one a day, two on a fall-back day, none in a spring-forward gap."""
    today = now.astimezone(zone).date()
    for offset in range(days):
        naive = datetime.combine(today + timedelta(days=offset), clock)
        utc_offset = zone.utcoffset(naive)
        if utc_offset == zone.utcoffset(naive.replace(fold=1)) and utc_offset is not None:
            yield (naive - utc_offset).replace(tzinfo=UTC)
            continue
        for fold in (0, 1):
            instant = naive.replace(tzinfo=zone, fold=fold).astimezone(UTC)
            if instant.astimezone(zone).replace(tzinfo=None) == naive:
                yield instant


def _transitions(zone: ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """The zone's UTC-offset change in (after, until], to the second (at most one is
    looked for: no zone changes twice within the week searched)."""
    lo, hi = int(after.timestamp()), int(until.timestamp())
    if _offset(zone, lo) == _offset(zone, hi):
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _offset(zone, mid) == _offset(zone, lo) else (lo, mid)
    return [datetime.fromtimestamp(hi, UTC)]


def _offset(zone: ZoneInfo, timestamp: int) -> timedelta | None:
    return datetime.fromtimestamp(timestamp, zone).utcoffset()
