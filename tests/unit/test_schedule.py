from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.core.domain import Appointment, Campaign, Patient, Prescription, Schedule
from engine.core.schedule import (
    idempotency_key,
    local_fields,
    next_local_time,
    occurrences,
    to_utc,
)

FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def make_patient(**overrides: Any) -> Patient:
    return Patient(**{"external_id": "p-1", "timezone": "America/New_York", **overrides})


def make_rx(**overrides: Any) -> Prescription:
    fields = {"rx_id": "RX1", "medication": "Lisinopril", "medication_class": "ace"}
    return Prescription(**{**fields, "refill_due": date(2024, 3, 12), **overrides})


def make_appointment(**overrides: Any) -> Appointment:
    fields = {"appointment_id": "A1", "kind": "checkup", "starts_at": utc(2024, 6, 10, 2)}
    return Appointment(**{**fields, **overrides})


def make_campaign(schedule: Schedule, **overrides: Any) -> Campaign:
    fields = {"id": "refill", "name": "Refill", "purpose": "adherence", "template": "refill"}
    fields |= {"anchor": "prescription", "where": None, "expires_after": timedelta(hours=12)}
    return Campaign(**{**fields, "schedule": schedule, **overrides})


RELATIVE_RX = Schedule("relative", time(9), relative_to="prescription.refill_due", offsets=(0, -3))


@pytest.mark.parametrize(
    ("zone", "day", "at", "expected_utc", "expected_local"),
    [
        ("America/New_York", date(2024, 1, 15), time(9), utc(2024, 1, 15, 14), "09:00-05:00"),
        # spring forward: 02:30 does not exist and moves forward by the gap
        (
            "America/New_York",
            date(2024, 3, 10),
            time(2, 30),
            utc(2024, 3, 10, 7, 30),
            "03:30-04:00",
        ),
        # fall back: 01:30 happens twice; the first one (EDT) is taken
        (
            "America/New_York",
            date(2024, 11, 3),
            time(1, 30),
            utc(2024, 11, 3, 5, 30),
            "01:30-04:00",
        ),
        ("Europe/Berlin", date(2024, 3, 31), time(2, 30), utc(2024, 3, 31, 1, 30), "03:30+02:00"),
        ("Europe/Berlin", date(2024, 10, 27), time(2, 30), utc(2024, 10, 27, 0, 30), "02:30+02:00"),
        (
            "Australia/Sydney",
            date(2024, 10, 6),
            time(2, 30),
            utc(2024, 10, 5, 16, 30),
            "03:30+11:00",
        ),
        ("Australia/Sydney", date(2024, 4, 7), time(2, 30), utc(2024, 4, 6, 15, 30), "02:30+11:00"),
        # a 30-minute gap moves by 30 minutes
        (
            "Australia/Lord_Howe",
            date(2024, 10, 6),
            time(2, 15),
            utc(2024, 10, 5, 15, 45),
            "02:45+11:00",
        ),
    ],
)
def test_to_utc_across_dst(
    zone: str, day: date, at: time, expected_utc: datetime, expected_local: str
) -> None:
    result = to_utc(day, at, zone)
    assert result == expected_utc
    assert result.tzinfo == UTC
    assert result.astimezone(ZoneInfo(zone)).isoformat(timespec="minutes")[11:] == expected_local


def test_relative_to_refill_sends_at_local_time_on_each_offset_sorted() -> None:
    # the refill is due two days after the spring-forward change: EST, then EDT
    found = occurrences(
        make_campaign(RELATIVE_RX),
        make_patient(),
        make_rx(),
        not_after=FAR_FUTURE,
        alive_at=LONG_AGO,
    )
    assert [(o.label, o.due_at) for o in found] == [
        ("-3d@2024-03-12", utc(2024, 3, 9, 14)),
        ("+0d@2024-03-12", utc(2024, 3, 12, 13)),
    ]
    assert [o.expires_at - o.due_at for o in found] == [timedelta(hours=12)] * 2
    assert {(o.campaign, o.patient, o.anchor) for o in found} == {
        ("refill", "p-1", "prescription:RX1")
    }


@pytest.mark.parametrize(
    ("zone", "expected_due"),
    [
        # 2024-06-10 02:00 UTC is still June 9 in Los Angeles: the day before is June 8
        ("America/Los_Angeles", utc(2024, 6, 8, 17)),
        # ... and already June 10 in Berlin: the day before is June 9
        ("Europe/Berlin", utc(2024, 6, 9, 8)),
    ],
)
def test_relative_to_appointment_uses_its_local_date(zone: str, expected_due: datetime) -> None:
    schedule = Schedule("relative", time(10), relative_to="appointment.starts_at", offsets=(-1,))
    campaign = make_campaign(schedule, anchor="appointment")
    found = occurrences(
        campaign,
        make_patient(timezone=zone),
        make_appointment(),
        not_after=FAR_FUTURE,
        alive_at=LONG_AGO,
    )
    assert [(o.label, o.due_at, o.anchor) for o in found] == [
        ("-1d@2024-06-10T02:00Z", expected_due, "appointment:A1")
    ]


@pytest.mark.parametrize(
    ("every", "start", "count", "expected_labels"),
    [
        ("day", date(2024, 3, 9), 3, ["2024-03-09", "2024-03-10", "2024-03-11"]),
        ("week", date(2024, 2, 22), 2, ["2024-02-22", "2024-02-29"]),
        ("month", date(2024, 1, 31), 4, ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]),
        ("month", date(2023, 12, 15), 2, ["2023-12-15", "2024-01-15"]),
        ("day", "prescription.refill_due", 2, ["2024-03-12", "2024-03-13"]),
        ("day", date(2024, 3, 9), 0, []),
    ],
)
def test_recurring(every: str, start: date | str, count: int, expected_labels: list[str]) -> None:
    schedule = Schedule("recurring", time(9), every=every, start=start, count=count)
    found = occurrences(
        make_campaign(schedule), make_patient(), make_rx(), not_after=FAR_FUTURE, alive_at=LONG_AGO
    )
    assert [o.label for o in found] == expected_labels
    local_times = {o.due_at.astimezone(ZoneInfo("America/New_York")).time() for o in found}
    assert local_times <= {time(9)}


def test_recurring_from_an_appointment_starts_on_its_local_date() -> None:
    schedule = Schedule("recurring", time(9), every="day", start="appointment.starts_at", count=1)
    found = occurrences(
        make_campaign(schedule, anchor="appointment"),
        make_patient(timezone="America/Los_Angeles"),
        make_appointment(),
        not_after=FAR_FUTURE,
        alive_at=LONG_AGO,
    )
    assert [(o.label, o.due_at) for o in found] == [("2024-06-09", utc(2024, 6, 9, 16))]


def test_once_without_anchor() -> None:
    schedule = Schedule("once", time(8, 30), on=date(2024, 7, 4))
    found = occurrences(
        make_campaign(schedule, anchor="none"),
        make_patient(timezone="Europe/Berlin"),
        None,
        not_after=FAR_FUTURE,
        alive_at=LONG_AGO,
    )
    assert [(o.label, o.anchor, o.due_at) for o in found] == [
        ("once", "none", utc(2024, 7, 4, 6, 30))
    ]


def test_zone_unknown_uses_the_first_candidate_zone() -> None:
    patient = make_patient(timezone=None, candidate_timezones=("America/Chicago", "America/Denver"))
    found = occurrences(
        make_campaign(RELATIVE_RX), patient, make_rx(), not_after=FAR_FUTURE, alive_at=LONG_AGO
    )
    assert found[0].due_at == utc(2024, 3, 9, 15)


def test_a_new_refill_cycle_is_a_new_occurrence_and_other_edits_are_not() -> None:
    def keys(rx: Prescription) -> set[str]:
        found = occurrences(
            make_campaign(RELATIVE_RX),
            make_patient(),
            rx,
            not_after=FAR_FUTURE,
            alive_at=LONG_AGO,
        )
        return {o.idempotency_key for o in found}

    first = keys(make_rx())
    assert keys(make_rx(medication="Atorvastatin", status="on-hold")) == first
    assert keys(make_rx(refill_due=date(2024, 4, 11))).isdisjoint(first)


# due: -3d at 2024-03-09 14:00Z, +0d at 2024-03-12 13:00Z; each expires 12 h later
@pytest.mark.parametrize(
    ("not_after", "alive_at", "expected_labels"),
    [
        (utc(2024, 3, 9, 13, 59), LONG_AGO, []),
        (utc(2024, 3, 9, 14), LONG_AGO, ["-3d@2024-03-12"]),  # due exactly now is due
        (utc(2024, 3, 12, 13), utc(2024, 3, 10, 1, 59), ["-3d@2024-03-12", "+0d@2024-03-12"]),
        (utc(2024, 3, 12, 13), utc(2024, 3, 10, 2), ["+0d@2024-03-12"]),  # expired: gone
        (FAR_FUTURE, utc(2024, 3, 13, 1), []),
    ],
)
def test_window(not_after: datetime, alive_at: datetime, expected_labels: list[str]) -> None:
    found = occurrences(
        make_campaign(RELATIVE_RX),
        make_patient(),
        make_rx(),
        not_after=not_after,
        alive_at=alive_at,
    )
    assert [o.label for o in found] == expected_labels


@pytest.mark.parametrize(
    ("campaign_anchor", "anchor"),
    [
        ("prescription", None),
        ("prescription", make_appointment()),
        ("appointment", make_rx()),
        ("none", make_rx()),
    ],
)
def test_anchor_must_match_the_campaign(campaign_anchor: str, anchor: object) -> None:
    campaign = make_campaign(RELATIVE_RX, anchor=campaign_anchor)
    with pytest.raises(ValueError, match="anchored on"):
        occurrences(campaign, make_patient(), anchor, not_after=FAR_FUTURE, alive_at=LONG_AGO)


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule("relative", time(9), relative_to="appointment.starts_at", offsets=(0,)),
        Schedule("recurring", time(9), every="day", start=date(2024, 1, 1)),
        Schedule("once", time(9)),
    ],
)
def test_incomplete_schedules_are_rejected(schedule: Schedule) -> None:
    with pytest.raises(ValueError):
        occurrences(
            make_campaign(schedule),
            make_patient(),
            make_rx(),
            not_after=FAR_FUTURE,
            alive_at=LONG_AGO,
        )


def test_naive_times_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        occurrences(
            make_campaign(RELATIVE_RX),
            make_patient(),
            make_rx(),
            not_after=datetime(2100, 1, 1),
            alive_at=LONG_AGO,
        )


def test_idempotency_key_ignores_version_template_zone_and_send_time() -> None:
    def keys(campaign: Campaign, patient: Patient) -> list[str]:
        found = occurrences(campaign, patient, make_rx(), not_after=FAR_FUTURE, alive_at=LONG_AGO)
        return [o.idempotency_key for o in found]

    original = make_campaign(RELATIVE_RX, version="v1")
    edited = replace(
        original, version="v2", template="refill-v2", schedule=replace(RELATIVE_RX, at=time(17))
    )
    moved = make_patient(timezone="Asia/Tokyo")
    assert keys(original, make_patient()) == keys(edited, moved)
    assert len(set(keys(original, make_patient()))) == 2


def test_idempotency_key_format_is_frozen() -> None:
    # changing the key format would send every pending occurrence a second time;
    # the pre-image is the JSON array '["refill", "p-1", "prescription:RX1", "-3d"]'
    assert idempotency_key("refill", "p-1", "prescription:RX1", "-3d") == (
        "6cc1f9fc051f3a499affc2be52b1ef9c"
    )


@pytest.mark.parametrize(
    ("fields", "other"),
    [
        (("refill", "p-1", "none", "once"), ("refill", "p-2", "none", "once")),
        (("refill", "p-1", "none", "once"), ("refill2", "p-1", "none", "once")),
        (
            ("refill", "p-1", "prescription:RX1", "-3d"),
            ("refill", "p-1", "prescription:RX2", "-3d"),
        ),
        (
            ("refill", "p-1", "prescription:RX1", "-3d"),
            ("refill", "p-1", "prescription:RX1", "+0d"),
        ),
        (("ab", "c", "none", "once"), ("a", "bc", "none", "once")),  # no ambiguous joins
        (("a|b", "c", "none", "once"), ("a", "b|c", "none", "once")),
    ],
)
def test_idempotency_key_distinguishes_occurrences(
    fields: tuple[str, str, str, str], other: tuple[str, str, str, str]
) -> None:
    key = idempotency_key(*fields)
    assert len(key) == 32 and int(key, 16) >= 0
    assert key != idempotency_key(*other)


@pytest.mark.parametrize(
    ("now", "zone", "expected"),
    [
        (utc(2024, 3, 10, 4, 59), "America/New_York", (23, 59, 6, "2024-03-09")),
        (utc(2024, 3, 10, 7, 0), "America/New_York", (3, 0, 7, "2024-03-10")),
        (utc(2024, 3, 11, 12, 15), "Europe/Berlin", (13, 15, 1, "2024-03-11")),
        (utc(2024, 6, 30, 14, 0), "Australia/Sydney", (0, 0, 1, "2024-07-01")),
    ],
)
def test_local_fields(now: datetime, zone: str, expected: tuple[int, int, int, str]) -> None:
    fields = local_fields(now, zone)
    assert (fields["hour"], fields["minute"], fields["weekday"], fields["date"]) == expected


@pytest.mark.parametrize(
    ("after", "zone", "at", "expected"),
    [
        (utc(2024, 1, 15, 12), "America/New_York", time(9), utc(2024, 1, 15, 14)),
        (utc(2024, 1, 15, 14), "America/New_York", time(9), utc(2024, 1, 15, 14)),
        (utc(2024, 1, 15, 14, 1), "America/New_York", time(9), utc(2024, 1, 16, 14)),
        # late evening UTC is already the next local day in Tokyo
        (utc(2024, 1, 15, 22), "Asia/Tokyo", time(8), utc(2024, 1, 15, 23)),
        # spring forward: 02:30 is skipped; its place is 03:30 EDT
        (utc(2024, 3, 10, 5), "America/New_York", time(2, 30), utc(2024, 3, 10, 7, 30)),
        # the next 08:00 after a DST change keeps its wall-clock time
        (utc(2024, 3, 9, 14), "America/New_York", time(8), utc(2024, 3, 10, 12)),
        (utc(2024, 10, 26, 7), "Europe/Berlin", time(8), utc(2024, 10, 27, 7)),
        # fall back: between the two 01:30s, the second one is next
        (utc(2024, 11, 3, 5, 45), "America/New_York", time(1, 30), utc(2024, 11, 3, 6, 30)),
        (utc(2024, 4, 6, 15, 45), "Australia/Sydney", time(2, 30), utc(2024, 4, 6, 16, 30)),
        (utc(2024, 10, 5, 15), "Australia/Sydney", time(2, 30), utc(2024, 10, 5, 16, 30)),
    ],
)
def test_next_local_time(after: datetime, zone: str, at: time, expected: datetime) -> None:
    assert next_local_time(after, zone, at) == expected
