"""Occurrences of a campaign for one patient, and local wall-clock times in UTC.

Local times are converted with zoneinfo. A wall-clock time that does not exist (the spring
forward gap) moves forward by the gap (02:30 -> 03:30); an ambiguous one (fall back) is
its first occurrence (PEP 495 fold=0 gives exactly both).
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import json
import json.encoder
from datetime import UTC, date, datetime, time, timedelta

from engine.core.domain import Appointment, Campaign, Occurrence, Patient, Prescription, Schedule
from engine.core.memo import keep
from engine.core.zones import get_zone

Anchor = Prescription | Appointment | None


@functools.lru_cache(maxsize=65_536)
def to_utc(local_date: date, at: time, zone: str) -> datetime:
    """The UTC instant of `at` on `local_date` in `zone` (gap: forward by the gap; fold: first)."""
    local = datetime.combine(local_date, at.replace(tzinfo=None, fold=0), tzinfo=get_zone(zone))
    return local.astimezone(UTC)


def local_fields(now: datetime, zone: str) -> dict[str, int | str]:
    """The patient's local clock at `now`: hour, minute, weekday (ISO, 1=Mon..7=Sun), date."""
    local = _aware(now, "now").astimezone(get_zone(zone))
    return {
        "hour": local.hour,
        "minute": local.minute,
        "weekday": local.isoweekday(),
        "date": local.date().isoformat(),
    }


def next_local_time(after: datetime, zone: str, at: time) -> datetime:
    """The first instant >= `after` (UTC) at which the wall clock in `zone` reads `at`.

    On a spring-forward day a time in the gap counts at the instant it was skipped to; on a
    fall-back day both instants of an ambiguous time count.
    """
    after = _aware(after, "after")
    tz = get_zone(zone)
    start = after.astimezone(tz).date()
    candidates = []
    for day in (start + timedelta(days=n) for n in range(-1, 3)):
        first = datetime.combine(day, at.replace(tzinfo=None, fold=0), tzinfo=tz)
        second = first.replace(fold=1)
        candidates.append(first.astimezone(UTC))
        if not _in_gap(first) and first.utcoffset() != second.utcoffset():
            candidates.append(second.astimezone(UTC))
    return min(c for c in candidates if c >= after)


def _in_gap(local: datetime) -> bool:
    back = local.astimezone(UTC).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) != local.replace(tzinfo=None)


def anchor_key(anchor: Anchor) -> str:
    """The anchor's stable name in keys: "prescription:<rx_id>", "appointment:<id>" or "none"."""
    if isinstance(anchor, Prescription):
        return f"prescription:{anchor.rx_id}"
    if isinstance(anchor, Appointment):
        return f"appointment:{anchor.appointment_id}"
    return "none"


def idempotency_key(campaign_id: str, patient_external_id: str, anchor: str, label: str) -> str:
    """One message per occurrence ever: the first 32 hex digits of the sha256 of the JSON array
    [campaign, patient, anchor, label] (JSON quoting keeps the join unambiguous).

    It deliberately leaves out the campaign version, template, time zone and send time, so
    edits and re-plans never produce a second message for the same occurrence.
    """
    if (  # what json.dumps writes for a list of strings (one key per occurrence planned)
        type(campaign_id) is str
        and type(patient_external_id) is str
        and type(anchor) is str
        and type(label) is str
    ):
        text = (
            f"[{_json_string(campaign_id)}, {_json_string(patient_external_id)}, "
            f"{_json_string(anchor)}, {_json_string(label)}]"
        )
    else:
        text = json.dumps([campaign_id, patient_external_id, anchor, label], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]


def occurrences(
    campaign: Campaign,
    patient: Patient,
    anchor: Anchor,
    *,
    not_after: datetime,
    alive_at: datetime,
) -> list[Occurrence]:
    """Every occurrence due at or before `not_after` and not yet expired at `alive_at`.

    Send times are computed in the patient's first zone (`patient.zones[0]`).
    """
    if not_after.utcoffset() is None or alive_at.utcoffset() is None:  # naive: say which
        _aware(not_after, "not_after")
        _aware(alive_at, "alive_at")
    _check_anchor(campaign, anchor)
    found = _due_times(campaign, anchor, patient.zones[0], not_after, alive_at)
    if not found:  # most anchors of a large population: no key to name
        return []
    key_anchor = anchor_key(anchor)
    return [
        Occurrence(
            campaign=campaign.id,
            patient=patient.external_id,
            anchor=key_anchor,
            label=label,
            due_at=due_at,
            expires_at=expires_at,
            idempotency_key=idempotency_key(campaign.id, patient.external_id, key_anchor, label),
        )
        for label, due_at, expires_at in found
    ]


Due = tuple[str, datetime, datetime]  # (label, due_at, expires_at)
_SHARED: dict[tuple[object, ...], tuple[Schedule, tuple[Due, ...]]] = {}
SHARED_LIMIT = 4096


def _due_times(
    campaign: Campaign, anchor: Anchor, zone: str, not_after: datetime, alive_at: datetime
) -> tuple[Due, ...]:
    """(label, due_at, expires_at) of the occurrences in the window, by due time then label.
    A schedule that does not depend on the anchor gives every patient of a zone the same
    ones: computed once per schedule, zone and window."""
    if campaign.schedule.kind == "relative" or isinstance(campaign.schedule.start, str):
        return _window(campaign, anchor, zone, not_after, alive_at)
    schedule = campaign.schedule
    key = (id(schedule), campaign.expires_after, zone, not_after, alive_at, not_after.tzinfo)
    key += (alive_at.tzinfo,)
    shared = _SHARED.get(key)
    if shared is not None and shared[0] is schedule:  # the id is not another's, reused
        return shared[1]
    found = _window(campaign, anchor, zone, not_after, alive_at)
    keep(_SHARED, key, (schedule, found), limit=SHARED_LIMIT)
    return found


def _window(
    campaign: Campaign, anchor: Anchor, zone: str, not_after: datetime, alive_at: datetime
) -> tuple[Due, ...]:
    found = []
    first_day, last_day = _day_bounds(alive_at, campaign.expires_after, not_after)
    for label, day in _local_dates(campaign.schedule, anchor, zone, first_day, last_day):
        due_at = to_utc(day, campaign.schedule.at, zone)
        expires_at = due_at + campaign.expires_after
        if due_at <= not_after and expires_at > alive_at:
            found.append((label, due_at, expires_at))
    return tuple(sorted(found, key=lambda d: (d[1], d[0])))


_ANCHOR_TYPES = {"prescription": Prescription, "appointment": Appointment, "none": type(None)}


def _check_anchor(campaign: Campaign, anchor: Anchor) -> None:
    if not isinstance(anchor, _ANCHOR_TYPES[campaign.anchor]):
        raise ValueError(
            f"campaign {campaign.id!r} is anchored on {campaign.anchor!r}, "
            f"got {type(anchor).__name__}"
        )


def _day_bounds(
    alive_at: datetime, expires_after: timedelta, not_after: datetime
) -> tuple[date, date]:
    """The local dates that may hold an occurrence of the window: a date more than a day
    outside it cannot qualify in any zone (UTC-12 to UTC+14), so its zone arithmetic is
    skipped. (Equal instants in other zones may have other dates: the zones are keys.)"""
    return _bounds(alive_at, alive_at.tzinfo, expires_after, not_after, not_after.tzinfo)


@functools.lru_cache(maxsize=256)
def _bounds(
    alive_at: datetime, _: object, expires_after: timedelta, not_after: datetime, __: object
) -> tuple[date, date]:
    first_day = (alive_at - expires_after).date() - timedelta(days=2)
    return first_day, not_after.date() + timedelta(days=2)


def _local_dates(
    schedule: Schedule, anchor: Anchor, zone: str, first_day: date, last_day: date
) -> list[tuple[str, date]]:
    """(label, local date) of the schedule's occurrences dated first_day..last_day."""
    if schedule.kind == "relative":
        base = _anchor_date(schedule.relative_to, anchor, zone)
        days = [(offset, base + timedelta(days=offset)) for offset in schedule.offsets]
        inside = [(offset, day) for offset, day in days if first_day <= day <= last_day]
        if not inside:  # most anchors: no label to write
            return []
        cycle = _anchor_value(anchor)
        return [(f"{offset:+d}d@{cycle}", day) for offset, day in inside]
    if schedule.kind == "recurring":
        dated = _labelled(_recurring_dates(schedule, anchor, zone))
    elif schedule.on is None:
        raise ValueError("a 'once' schedule needs 'on'")
    else:
        dated = [("once", schedule.on)]
    return [(label, day) for label, day in dated if first_day <= day <= last_day]


@functools.lru_cache(maxsize=4096)
def _labelled(days: tuple[date, ...]) -> list[tuple[str, date]]:
    """(ISO date label, date) pairs; shared, not to be mutated."""
    return [(day.isoformat(), day) for day in days]


def _recurring_dates(schedule: Schedule, anchor: Anchor, zone: str) -> tuple[date, ...]:
    if schedule.every is None or schedule.count is None or schedule.start is None:
        raise ValueError("a 'recurring' schedule needs 'every', 'start' and 'count'")
    start = schedule.start
    if isinstance(start, str):
        start = _anchor_date(start, anchor, zone)
    return _series(schedule.every, start, schedule.count)


@functools.lru_cache(maxsize=4096)
def _series(every: str, start: date, count: int) -> tuple[date, ...]:
    """The dates of a recurring schedule (shared by every patient with the same start)."""
    if every == "month":
        return tuple(_add_months(start, n) for n in range(count))
    step = timedelta(days=7 if every == "week" else 1)
    return tuple(start + step * n for n in range(count))


def _add_months(start: date, months: int) -> date:
    """Same day of month `months` later, clipped to that month's last day (Jan 31 -> Feb 28)."""
    year, month = divmod(start.month - 1 + months, 12)
    year, month = start.year + year, month + 1
    return date(year, month, min(start.day, calendar.monthrange(year, month)[1]))


def _anchor_date(field: str | None, anchor: Anchor, zone: str) -> date:
    """The anchor's local date: a refill date as is, an appointment's start in `zone`."""
    if field == "prescription.refill_due" and isinstance(anchor, Prescription):
        return anchor.refill_due
    if field == "appointment.starts_at" and isinstance(anchor, Appointment):
        starts_at = _aware(anchor.starts_at, "appointment.starts_at")
        return starts_at.astimezone(get_zone(zone)).date()
    raise ValueError(f"schedule refers to {field!r}, which the anchor does not have")


def _anchor_value(anchor: Anchor) -> str:
    """The anchor's date as stored, independent of any zone: a new refill cycle or a moved
    appointment is a new occurrence, an edit of anything else is not."""
    if isinstance(anchor, Prescription):
        return anchor.refill_due.isoformat()
    if isinstance(anchor, Appointment):
        return (
            _aware(anchor.starts_at, "appointment.starts_at")
            .astimezone(UTC)
            .strftime("%Y-%m-%dT%H:%MZ")
        )
    return "none"


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value
