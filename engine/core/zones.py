"""Time zones by IANA name, each loaded once per process.

zoneinfo keeps only the last 8 zones it built strongly referenced, so a population
spread over more zones rebuilt (re-read and re-parsed) them over and over: about a
tenth of a planner tick's time went there.
"""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo


@cache
def get_zone(name: str) -> ZoneInfo:
    """ZoneInfo(name), cached (an unknown name raises ZoneInfoNotFoundError, uncached)."""
    return ZoneInfo(name)
