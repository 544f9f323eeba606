"""Campaign settings in plain words, for the people who write and review campaigns.

Pure: a schedule or a duration in, a sentence out ("3 days before each prescription refill
is due, and on the day, at 10:00 in the patient's time zone").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, time, timedelta

from engine.core.domain import Schedule

ZONE = "in the patient's time zone"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
EVERY = {"day": "every day", "week": "every week", "month": "every month"}
WEEK = 7 * 86_400
_UNITS = (("week", WEEK), ("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1))


@dataclass(frozen=True)
class AnchorWords:
    """How a sentence names the per-patient date a schedule counts from."""

    each: str  # after an offset: "3 days before <each>"
    on_day: str  # offset 0 first: "<on_day>, and 3 days after"
    day: str  # a recurring start: "every day from <day>"


ANCHORS = {
    "prescription.refill_due": AnchorWords(
        "each prescription refill is due",
        "on the day each prescription refill is due",
        "the day each prescription refill is due",
    ),
    "appointment.starts_at": AnchorWords(
        "each appointment", "on the day of each appointment", "the day of each appointment"
    ),
}


def anchor_words(field: str | None) -> AnchorWords:
    found = ANCHORS.get(field or "")
    if found is not None:
        return found
    name = field or "anchor date"
    return AnchorWords(f"each {name}", f"on each {name}", f"each {name}")


def describe_schedule(schedule: Schedule) -> str:
    """When a campaign's messages go out, in one sentence."""
    at = f"at {clock(schedule.at)} {ZONE}"
    if schedule.kind == "relative":
        if not schedule.offsets:
            return "never: the schedule has no offsets"
        return f"{_relative(schedule)}, {at}"
    if schedule.kind == "recurring":
        return f"{_recurring(schedule)}, {at}"
    if schedule.on is None:
        return f"once, {at} (no date set)"
    return f"once on {day_text(schedule.on)} {at}"


def _relative(schedule: Schedule) -> str:
    words = anchor_words(schedule.relative_to)
    first, *rest = sorted(set(schedule.offsets))
    lead = words.on_day if first == 0 else f"{offset_text(first)} {words.each}"
    others = [offset_text(o) for o in rest]
    if not others:
        return lead
    if len(others) == 1:
        return f"{lead}, and {others[0]}"
    return f"{lead}, {', '.join(others[:-1])}, and {others[-1]}"


def offset_text(days: int) -> str:
    """-3 -> "3 days before", 0 -> "on the day", 1 -> "1 day after"."""
    if days == 0:
        return "on the day"
    unit = "day" if abs(days) == 1 else "days"
    return f"{abs(days)} {unit} {'before' if days < 0 else 'after'}"


def _recurring(schedule: Schedule) -> str:
    every = EVERY.get(schedule.every or "", f"every {schedule.every}")
    start = schedule.start
    if isinstance(start, date):
        since = f" from {day_text(start)}"
    elif isinstance(start, str):
        since = f" from {anchor_words(start).day}"
    else:
        since = ""
    count = schedule.count
    times = "" if count is None else ", once" if count == 1 else f", {count} times"
    return f"{every}{since}{times}"


def describe_duration(value: timedelta) -> str:
    """A duration as people say it: "10 hours", "3 days", "1 day and 12 hours"; weeks only
    when the whole duration is a number of weeks ("2 weeks", but "10 days")."""
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "no time"
    units = _UNITS if seconds % WEEK == 0 else _UNITS[1:]
    parts = []
    for unit, size in units:
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount} {unit}{'' if amount == 1 else 's'}")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def clock(value: time) -> str:
    return f"{value.hour:02d}:{value.minute:02d}"


def day_text(value: date) -> str:
    """1 Dec 2026: day first, month abbreviated, unambiguous in any country."""
    return f"{value.day} {MONTHS[value.month - 1]} {value.year}"
