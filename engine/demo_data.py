"""Synthetic patients for `engage demo`: deterministic from a seed, with phone numbers from
ranges reserved for fiction, and reminder dates placed so that some fall due right away.

Numbers (all valid to libphonenumber, so the real importer accepts them):
- US: 555-0100 to 555-0199 in any area code, reserved for fictional use (NANPA,
  https://nationalnanpa.com/number_resource_info/555_numbers.html).
- UK: Ofcom's drama numbers, 020 7946 0000-0999 (London), 0161 496 0000-0999 (Manchester)
  and 0141 496 0000-0999 (Glasgow). Ofcom's mobile drama range (07700 900xxx) is not a
  valid number to libphonenumber, so UK patients have geographic numbers.
- Australia: ACMA's numbers for creative works, 0x 5550 0000-9999 in each area code.

The roster (names, numbers, zones, consents) depends on the seed only; the prescriptions,
appointments and open slots are placed relative to the start time, so that wherever the
local time lets a reminder go, some patients there have one due now. Pure: stdlib only.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Place:
    """Where a share of the patients live, and the fictional numbers they get there."""

    country: str
    region: str
    zone: str
    prefix: str  # E.164 digits before the varying part
    first: int  # the varying part's first value
    size: int  # how many numbers the range holds
    width: int  # digits of the varying part
    weight: float  # share of the patients
    spanish: float = 0.0  # share of them who prefer Spanish
    clinic: str = "Main St Clinic"

    def number(self, index: int) -> str:
        return f"{self.prefix}{self.first + index:0{self.width}d}"


def _us(region: str, zone: str, area: str, weight: float, spanish: float = 0.1) -> Place:
    return Place("US", region, zone, f"+1{area}555", 100, 100, 4, weight, spanish)


def _uk(region: str, prefix: str, weight: float, clinic: str) -> Place:
    return Place("GB", region, "Europe/London", prefix, 0, 1000, 4, weight, clinic=clinic)


def _au(region: str, zone: str, prefix: str, first: int, weight: float) -> Place:
    return Place("AU", region, zone, prefix, first, 4000, 4, weight, clinic="Harbour Medical")


# Spread over zones from UTC-10 to UTC+11 so that, at any hour, some patients are awake.
PLACES: tuple[Place, ...] = (
    _us("NY", "America/New_York", "212", 0.07),
    _us("MA", "America/New_York", "617", 0.04),
    _us("FL", "America/New_York", "305", 0.06, spanish=0.5),
    _us("IL", "America/Chicago", "312", 0.05),
    _us("TX", "America/Chicago", "713", 0.05, spanish=0.4),
    _us("CO", "America/Denver", "303", 0.04),
    _us("AZ", "America/Phoenix", "602", 0.04, spanish=0.3),
    _us("CA", "America/Los_Angeles", "213", 0.06, spanish=0.4),
    _us("WA", "America/Los_Angeles", "206", 0.04),
    _us("AK", "America/Anchorage", "907", 0.03),
    _us("HI", "Pacific/Honolulu", "808", 0.04),
    _uk("LND", "+44207946", 0.10, "High Street Surgery"),
    _uk("MAN", "+44161496", 0.07, "Deansgate Health Centre"),
    _uk("GLG", "+44141496", 0.05, "Clyde Medical Practice"),
    _au("NSW", "Australia/Sydney", "+6125550", 0, 0.07),
    _au("VIC", "Australia/Melbourne", "+6135550", 0, 0.05),
    _au("QLD", "Australia/Brisbane", "+6175550", 0, 0.05),
    _au("WA", "Australia/Perth", "+6185550", 0, 0.05),
    _au("SA", "Australia/Adelaide", "+6185550", 5000, 0.03),
)

GIVEN = (
    "Olivia", "Liam", "Emma", "Noah", "Ava", "Oliver", "Mia", "Elijah", "Amelia", "James",
    "Harper", "Henry", "Evelyn", "Lucas", "Abigail", "Jack", "Ella", "Leo", "Grace", "Owen",
    "Chloe", "Isaac", "Ruby", "Theo", "Nora", "Samuel", "Hazel", "Arthur", "Ivy", "Finn",
)  # fmt: skip
FAMILY = (
    "Smith", "Johnson", "Brown", "Taylor", "Wilson", "Davies", "Evans", "Thomas", "Walker",
    "Wright", "Robinson", "Thompson", "White", "Hughes", "Edwards", "Green", "Hall", "Wood",
    "Harris", "Martin", "Clarke", "Jackson", "Lee", "Turner", "Hill", "Scott", "Cooper",
    "Ward", "Morris", "King", "Baker", "Nguyen", "Patel", "Kelly", "Murphy", "Campbell",
)  # fmt: skip
GIVEN_ES = (
    "Sofía", "Mateo", "Valentina", "Santiago", "Camila", "Diego", "Lucía", "Alejandro",
    "Isabella", "Javier", "Mariana", "Carlos", "Gabriela", "Andrés", "Daniela", "Luis",
    "Ximena", "Miguel", "Renata", "José",
)  # fmt: skip
FAMILY_ES = (
    "García", "Rodríguez", "Martínez", "Hernández", "López", "González", "Pérez", "Sánchez",
    "Ramírez", "Torres", "Flores", "Rivera", "Gómez", "Díaz", "Reyes", "Morales", "Cruz",
    "Ortiz", "Gutiérrez", "Chávez",
)  # fmt: skip
STATINS = ("atorvastatin", "rosuvastatin", "simvastatin", "pravastatin")
OTHER_MEDICATIONS = (
    ("metformin", "biguanide"),
    ("lisinopril", "ace-inhibitor"),
    ("levothyroxine", "thyroid-hormone"),
    ("amlodipine", "calcium-channel-blocker"),
)
PROVIDERS = ("Dr. Okafor", "Dr. Lindqvist", "Dr. Haddad", "Dr. Moreau", "Dr. Tanaka")
VISIT_KINDS = ("primary-care", "primary-care", "primary-care", "cardiology")
SLOT_TIMES = (time(9, 30), time(14, 0))
NOTICE = "2025-01"
CONSENTS_FROM = datetime(2024, 3, 4, tzinfo=UTC)


@dataclass(frozen=True)
class Timing:
    """When a campaign's reminder for a given day may go: its offsets from the anchor date
    (days) and the local window in which that day's reminder is due and not held back
    (from max(send time, quiet-hours start) to min(expiry, quiet-hours end))."""

    offsets: tuple[int, ...]
    opens: time
    closes: time


@dataclass(frozen=True)
class Roster:
    """One synthetic patient, as fixed by the seed."""

    external_id: str
    place: Place
    phone: str
    given_name: str
    family_name: str
    locale: str
    birth_date: date
    allow_phi_sms: bool


Row = dict[str, str]
MARGIN = timedelta(minutes=5)  # a reminder due now must stay sendable a while before it expires


def allocate(count: int, places: Sequence[Place] = PLACES) -> list[Place]:
    """`count` places in their weights' proportions (largest remainder), in a fixed order."""
    total = sum(p.weight for p in places)
    exact = [count * p.weight / total for p in places]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(places)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    return [p for p, n in zip(places, counts, strict=True) for _ in range(n)]


def roster(seed: int, count: int) -> list[Roster]:
    """The patients D0001..: each place's numbers are used in order, so none repeats."""
    places = allocate(count)
    random.Random(seed).shuffle(places)
    used: dict[str, int] = {}
    patients = []
    for i, place in enumerate(places, start=1):
        rng = random.Random(f"{seed}:patient:{i}")
        key = f"{place.prefix}:{place.first}"
        index = used.get(key, 0)
        if index >= place.size:
            raise ValueError(f"too many patients for the fictional numbers of {place.region}")
        used[key] = index + 1
        spanish = rng.random() < place.spanish
        patients.append(
            Roster(
                external_id=f"D{i:04d}",
                place=place,
                phone=place.number(index),
                given_name=rng.choice(GIVEN_ES if spanish else GIVEN),
                family_name=rng.choice(FAMILY_ES if spanish else FAMILY),
                locale="es" if spanish else "en",
                birth_date=date(1940, 1, 1) + timedelta(days=rng.randrange(365 * 64)),
                allow_phi_sms=rng.random() < 0.4,
            )
        )
    return patients


def patient_rows(patients: Sequence[Roster]) -> list[Row]:
    return [
        {
            "external_id": p.external_id,
            "given_name": p.given_name,
            "family_name": p.family_name,
            "phone": p.phone,
            "timezone": p.place.zone,
            "locale": p.locale,
            "country": p.place.country,
            "region": p.place.region,
            "birth_date": p.birth_date.isoformat(),
            "allow_phi_sms": "true" if p.allow_phi_sms else "false",
            "mrn": f"MRN-{700000 + int(p.external_id[1:])}",
        }
        for p in patients
    ]


def consent_rows(seed: int, patients: Sequence[Roster], now: datetime) -> list[Row]:
    """Most gave their number for care (express consent to adherence and appointment
    texts); some gave none, some revoked later, some only for appointments, and a few
    signed written consent to marketing."""
    rows = []
    for p in patients:
        rng = random.Random(f"{seed}:consent:{p.external_id}")
        # Fixed times, whatever `now` is: a second import of the same ledger adds nothing.
        granted_at = CONSENTS_FROM + timedelta(days=rng.randint(0, 540), hours=rng.randint(8, 18))
        granted_at = min(granted_at, _hour(now - timedelta(days=60)))
        kind = rng.random()
        if kind < 0.08:
            continue
        purposes = ("appointment",) if kind < 0.16 else ("adherence", "appointment")
        for purpose in purposes:
            rows.append(_consent(p, purpose, "granted", "express", "intake_form", granted_at))
        if 0.16 <= kind < 0.24:
            revoked_at = granted_at + timedelta(days=rng.randint(3, 25))
            for purpose in purposes:
                rows.append(_consent(p, purpose, "revoked", "", "phone_call", revoked_at))
        elif rng.random() < 0.2:
            signed_at = granted_at + timedelta(days=1)
            rows.append(_consent(p, "marketing", "granted", "written", "web_form", signed_at))
    return rows


def _consent(p: Roster, purpose: str, status: str, basis: str, method: str, at: datetime) -> Row:
    return {
        "external_id": p.external_id,
        "purpose": purpose,
        "status": status,
        "legal_basis": basis,
        "method": method,
        "notice_version": NOTICE,
        "occurred_at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


def _hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def reminder_day(rng: random.Random, local_now: datetime, timing: Timing) -> date:
    """The local day of this patient's next reminder: today when it is due now (most of
    those whose local time lets it go) or later today; otherwise one of the next days."""
    today, clock = local_now.date(), local_now.time()
    closes = (datetime.combine(today, timing.closes) - MARGIN).time()
    draw = rng.random()
    if timing.opens <= clock <= closes and draw < 0.75:
        return today
    if clock < timing.opens and draw < 0.4:
        return today
    return today + timedelta(days=rng.randint(1, 6))


def prescription_rows(
    seed: int, patients: Sequence[Roster], now: datetime, timing: Timing | None
) -> list[Row]:
    """Statins (the refill campaign's audience) for most, other medicines for some."""
    rows = []
    for p in patients:
        rng = _anchor_rng(seed, "rx", p, now)
        local_now = now.astimezone(ZoneInfo(p.place.zone))
        if rng.random() < 0.8:
            day = _anchor_day(rng, local_now, timing)
            status = "active" if rng.random() < 0.9 else rng.choice(("on-hold", "completed"))
            rows.append(_rx(p, "RX1", rng.choice(STATINS), "statin", day, status))
        if rng.random() < 0.35:
            medication, kind = rng.choice(OTHER_MEDICATIONS)
            day = local_now.date() + timedelta(days=rng.randint(1, 40))
            rows.append(_rx(p, "RX2", medication, kind, day, "active"))
    return rows


def _rx(p: Roster, suffix: str, medication: str, kind: str, due: date, status: str) -> Row:
    return {
        "external_id": p.external_id,
        "rx_id": f"{p.external_id}-{suffix}",
        "medication": medication,
        "medication_class": kind,
        "refill_due": due.isoformat(),
        "status": status,
    }


def appointment_rows(
    seed: int, patients: Sequence[Roster], now: datetime, timing: Timing | None
) -> list[Row]:
    rows = []
    for p in patients:
        rng = _anchor_rng(seed, "visit", p, now)
        if rng.random() >= 0.55:
            continue
        zone = ZoneInfo(p.place.zone)
        day = _anchor_day(rng, now.astimezone(zone), timing)
        starts = datetime.combine(day, time(8, 30), zone)
        starts += timedelta(minutes=30 * rng.randint(0, 16))
        rows.append(
            {
                "external_id": p.external_id,
                "appointment_id": f"{p.external_id}-A1",
                "starts_at": starts.isoformat(),
                "kind": rng.choice(VISIT_KINDS),
                "provider": rng.choice(PROVIDERS),
                "location": p.place.clinic,
                "status": "booked" if rng.random() < 0.92 else "cancelled",
            }
        )
    return rows


def _anchor_rng(seed: int, what: str, p: Roster, now: datetime) -> random.Random:
    """Draws that stay the same for a patient through one local day (a restart the same
    day places the same reminders, which then are not sent twice)."""
    local_day = now.astimezone(ZoneInfo(p.place.zone)).date()
    return random.Random(f"{seed}:{what}:{p.external_id}:{local_day.isoformat()}")


def _anchor_day(rng: random.Random, local_now: datetime, timing: Timing | None) -> date:
    """The anchor date (refill due, visit day) whose reminder falls on `reminder_day`."""
    if timing is None or not timing.offsets:
        return local_now.date() + timedelta(days=rng.randint(1, 14))
    day = reminder_day(rng, local_now, timing)
    return day - timedelta(days=rng.choice(timing.offsets))


def slot_rows(kind: str, now: datetime, days: int = 10) -> list[Row]:
    """Open slots of `kind` on the coming weekdays, at one clinic per country."""
    clinics: dict[str, Place] = {}
    for place in PLACES:
        clinics.setdefault(place.country, place)
    rows = []
    for place in clinics.values():
        zone = ZoneInfo(place.zone)
        today = now.astimezone(zone).date()
        for offset in range(1, days + 1):
            day = today + timedelta(days=offset)
            if day.weekday() >= 5:
                continue
            for at in SLOT_TIMES:
                starts = datetime.combine(day, at, zone)
                rows.append(
                    {
                        "slot_id": f"demo-{place.country}-{starts:%Y%m%d-%H%M}",
                        "kind": kind,
                        "provider": PROVIDERS[(day.toordinal() + at.hour) % len(PROVIDERS)],
                        "location": place.clinic,
                        "starts_at": starts.isoformat(),
                        "duration_min": "30",
                    }
                )
    return rows


def write_csv(path: Path, rows: Sequence[Row], header: Sequence[str]) -> Path:
    """Write rows readable by their owner only (they hold synthetic names and numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    path.chmod(0o600)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)
    return path
