"""Schedules and durations in words, for every kind of schedule."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, time, timedelta
from typing import Any

import pytest

from engine.core.describe import describe_duration, describe_schedule, offset_text
from engine.core.domain import Schedule

REFILL, VISIT = "prescription.refill_due", "appointment.starts_at"


def make_schedule(kind: str, **overrides: Any) -> Schedule:
    return Schedule(**{"kind": kind, "at": time(10), **overrides})


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # relative to a per-patient date
        (
            make_schedule("relative", relative_to=REFILL, offsets=(-3, 0)),
            "3 days before each prescription refill is due, and on the day, "
            "at 10:00 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=REFILL, offsets=(0, -3)),  # any order
            "3 days before each prescription refill is due, and on the day, "
            "at 10:00 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=REFILL, offsets=(0,)),
            "on the day each prescription refill is due, at 10:00 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=VISIT, offsets=(-2,), at=time(9, 30)),
            "2 days before each appointment, at 09:30 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=VISIT, offsets=(-1, 0, 1)),
            "1 day before each appointment, on the day, and 1 day after, "
            "at 10:00 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=VISIT, offsets=(0, 7)),
            "on the day of each appointment, and 7 days after, at 10:00 in the patient's time zone",
        ),
        (
            make_schedule("relative", relative_to=REFILL, offsets=()),
            "never: the schedule has no offsets",
        ),
        # recurring
        (
            make_schedule(
                "recurring", every="month", start=date(2026, 12, 1), count=12, at=time(11)
            ),
            "every month from 1 Dec 2026, 12 times, at 11:00 in the patient's time zone",
        ),
        (
            make_schedule("recurring", every="day", start=REFILL, count=30, at=time(9)),
            "every day from the day each prescription refill is due, 30 times, "
            "at 09:00 in the patient's time zone",
        ),
        (
            make_schedule("recurring", every="week", start=VISIT, count=1),
            "every week from the day of each appointment, once, "
            "at 10:00 in the patient's time zone",
        ),
        # once
        (
            make_schedule("once", on=date(2027, 1, 15), at=time(8, 5)),
            "once on 15 Jan 2027 at 08:05 in the patient's time zone",
        ),
        (make_schedule("once"), "once, at 10:00 in the patient's time zone (no date set)"),
    ],
)
def test_schedule_in_words(schedule: Schedule, expected: str) -> None:
    assert describe_schedule(schedule) == expected


@pytest.mark.parametrize(
    ("days", "expected"),
    [(-3, "3 days before"), (-1, "1 day before"), (0, "on the day"), (1, "1 day after")],
)
def test_offsets_in_words(days: int, expected: str) -> None:
    assert offset_text(days) == expected


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (timedelta(hours=10), "10 hours"),
        (timedelta(hours=24), "1 day"),
        (timedelta(days=3), "3 days"),
        (timedelta(days=14), "2 weeks"),
        (timedelta(days=10), "10 days"),
        (timedelta(days=1, hours=12), "1 day and 12 hours"),
        (timedelta(hours=1, minutes=30, seconds=5), "1 hour, 30 minutes and 5 seconds"),
        (timedelta(minutes=1), "1 minute"),
        (timedelta(0), "no time"),
    ],
)
def test_durations_in_words(duration: timedelta, expected: str) -> None:
    assert describe_duration(duration) == expected


def test_describing_loads_no_edge_library() -> None:
    probe = (
        "import sys, engine.core.describe\n"
        "print(','.join(m for m in ('flask', 'sqlalchemy', 'twilio', 'psycopg') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
