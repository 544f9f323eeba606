"""Synthetic patient population: CSV files in the import formats, deterministic by seed.

    python -m bench.population --patients 100000 --out var/pop100k [--start 2026-12-01]

The mix is shaped like a US health system with a European arm: zones, states with
stricter marketing hours, Spanish speakers, consents of every legal basis (and some
revoked), statin and other prescriptions with refills in the next month, appointments.
Patients come in blocks of BLOCK with a random stream each (`generate`), so bench.seed can
build blocks in parallel and the CSV files and a seeded database hold the same population.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

US_REGIONS = [  # (region, weight, zone, area codes)
    ("CA", 12, "America/Los_Angeles", ["213", "310", "415", "619"]),
    ("TX", 9, "America/Chicago", ["214", "512", "713"]),
    ("FL", 7, "America/New_York", ["305", "407", "813"]),
    ("NY", 6, "America/New_York", ["212", "516", "718"]),
    ("PA", 4, "America/New_York", ["215", "412"]),
    ("IL", 4, "America/Chicago", ["312", "773"]),
    ("OH", 4, "America/New_York", ["216", "614"]),
    ("GA", 3, "America/New_York", ["404", "678"]),
    ("WA", 2, "America/Los_Angeles", ["206", "425"]),
    ("OK", 1, "America/Chicago", ["405", "918"]),
    ("AZ", 2, "America/Phoenix", ["480", "602"]),
    ("CO", 2, "America/Denver", ["303", "720"]),
    ("HI", 1, "Pacific/Honolulu", ["808"]),
]
EU_COUNTRIES = [  # (country, weight, zone, region, mobile number pattern)
    ("DE", 4, "Europe/Berlin", "BE", "+49151{:08d}"),
    ("ES", 3, "Europe/Madrid", "MD", "+3461{:07d}"),
    ("FR", 2, "Europe/Paris", "IDF", "+3361{:07d}"),
    ("IE", 1, "Europe/Dublin", "D", "+35387{:07d}"),
    ("NL", 1, "Europe/Amsterdam", "NH", "+3161{:07d}"),
]
GIVEN = [
    "Maria",
    "James",
    "Aisha",
    "José",
    "Wei",
    "Olivia",
    "Liam",
    "Fatima",
    "Noah",
    "Zoë",
    "Emma",
    "Mateo",
    "Sofia",
    "Ethan",
    "Chloé",
    "Lucas",
    "Ana",
    "Hiroshi",
    "Grace",
    "Omar",
]
FAMILY = [
    "Lopez",
    "Smith",
    "Nguyen",
    "García",
    "Johnson",
    "Müller",
    "Kim",
    "Brown",
    "Okafor",
    "Rossi",
    "Martin",
    "Cohen",
    "Patel",
    "Silva",
    "O'Brien",
    "Schmidt",
    "Chen",
    "Diaz",
]
CLASSES = [
    ("statin", ["atorvastatin", "rosuvastatin", "simvastatin"], 45),
    ("ace_inhibitor", ["lisinopril", "enalapril"], 25),
    ("biguanide", ["metformin"], 20),
    ("ssri", ["sertraline", "escitalopram"], 10),
]
KINDS = ["primary-care", "cardiology", "lab", "vaccination"]
HEADERS = {
    "patients": "external_id,given_name,family_name,phone,timezone,locale,country,region,"
    "birth_date,allow_phi_sms",
    "prescriptions": "external_id,rx_id,medication,medication_class,refill_due,status",
    "appointments": "external_id,appointment_id,starts_at,kind,provider,location,status",
    "consents": "external_id,purpose,status,legal_basis,method,notice_version,occurred_at",
}
BLOCK = 100  # patients per independently seeded random stream


@dataclass(frozen=True)
class Population:
    patients: int
    seed: int = 7
    start: date = date(2026, 12, 1)
    eu_share: float = 0.12
    bad_share: float = 0.002


def _pick(rng: random.Random, items: list, weight_index: int = 1):
    return rng.choices(items, weights=[i[weight_index] for i in items])[0]


def _patient(rng: random.Random, n: int, pop: Population) -> tuple[list[str], str, bool]:
    """(patients.csv row, country, is_eu)."""
    if rng.random() < pop.eu_share:
        country, _, zone, region, pattern = _pick(rng, EU_COUNTRIES)
        phone = pattern.format(
            rng.randrange(10**7, 10**8) if "{:08d}" in pattern else rng.randrange(10**6, 10**7)
        )
        locale = "es" if country == "ES" else "en"
        eu = True
    else:
        region, _, zone, areas = _pick(rng, US_REGIONS)
        country, eu = "US", False
        phone = f"({rng.choice(areas)}) {rng.randrange(200, 999)}-{n % 10000:04d}"
        locale = "es" if rng.random() < 0.2 else "en"
    if rng.random() < 0.05:
        zone = ""  # inferred from the number at import
    if rng.random() < pop.bad_share:
        phone = "555-12"  # a typo, as real exports have: the import rejects the row
    born = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 66 * 365))
    row = [
        f"P{n:07d}",
        rng.choice(GIVEN),
        rng.choice(FAMILY),
        phone,
        zone,
        locale,
        country,
        region,
        born.isoformat(),
        "true" if rng.random() < 0.2 else "false",
    ]
    return row, country, eu


def _consents(rng: random.Random, pid: str, eu: bool, pop: Population) -> Iterator[list[str]]:
    granted = datetime.combine(
        pop.start - timedelta(days=rng.randrange(30, 900)), time(14), tzinfo=UTC
    )
    for purpose, share in (("adherence", 0.85), ("appointment", 0.8), ("marketing", 0.3)):
        if rng.random() >= share:
            continue
        if eu:
            basis = "explicit" if rng.random() < 0.8 else "express"
        elif purpose == "marketing":
            basis = "written" if rng.random() < 0.8 else "express"
        else:
            basis = rng.choice(["express", "express", "express", "written", "hipaa_authorization"])
        method = {"written": "web_form", "explicit": "web_form"}.get(basis, "intake_form")
        yield [pid, purpose, "granted", basis, method, "2025-01", granted.isoformat()]
        if rng.random() < 0.04:
            revoked = granted + timedelta(days=rng.randrange(1, 20))
            yield [pid, purpose, "revoked", "", "sms_keyword", "2025-01", revoked.isoformat()]


def _prescriptions(rng: random.Random, pid: str, pop: Population) -> Iterator[list[str]]:
    for i in range(rng.choice([0, 1, 1, 2])):
        cls, meds, _ = _pick(rng, CLASSES, 2)
        due = pop.start + timedelta(days=rng.randrange(0, 30))
        status = "active" if rng.random() < 0.93 else "stopped"
        yield [pid, f"{pid}-RX{i}", rng.choice(meds), cls, due.isoformat(), status]


def _appointments(rng: random.Random, pid: str, zone: str, pop: Population) -> Iterator[list[str]]:
    if rng.random() >= 0.35:
        return
    day = pop.start + timedelta(days=rng.randrange(0, 30))
    local_hour = rng.choice([8, 9, 10, 11, 13, 14, 15, 16])
    starts = datetime.combine(day, time(local_hour, rng.choice([0, 30])), tzinfo=UTC)
    offset = {
        "America/Los_Angeles": 8,
        "America/Chicago": 6,
        "America/New_York": 5,
        "America/Denver": 7,
        "America/Phoenix": 7,
        "Pacific/Honolulu": 10,
    }.get(zone, -1)
    starts += timedelta(hours=offset)
    status = "booked" if rng.random() < 0.9 else "cancelled"
    yield [
        pid,
        f"{pid}-A0",
        starts.isoformat(),
        rng.choice(KINDS),
        "Dr. Chen",
        "Main St Clinic",
        status,
    ]


@dataclass(frozen=True)
class PatientRows:
    """One patient's rows in each CSV file, in the import's column order."""

    patient: list[str]
    consents: list[list[str]]
    prescriptions: list[list[str]]
    appointments: list[list[str]]


def blocks(pop: Population) -> range:
    """The blocks the population is made of; each one can be generated on its own."""
    return range((pop.patients + BLOCK - 1) // BLOCK)


def generate(pop: Population, block: int) -> Iterator[PatientRows]:
    """The patients of one block (BLOCK of them, fewer in the last), deterministic by seed.

    Each block has its own random stream, so worker processes can build blocks in any
    order and N patients are always the first N of any larger population.
    """
    rng = random.Random(f"engage-population/{pop.seed}/{block}")
    for n in range(block * BLOCK, min(pop.patients, (block + 1) * BLOCK)):
        row, _country, eu = _patient(rng, n, pop)
        pid, zone = row[0], row[4]
        yield PatientRows(
            row,
            list(_consents(rng, pid, eu, pop)),
            list(_prescriptions(rng, pid, pop)),
            list(_appointments(rng, pid, zone, pop)),
        )


def write_population(pop: Population, out: Path) -> dict[str, int]:
    """Write the four CSV files into `out`; returns rows written per file."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: (out / f"{name}.csv").open("w", newline="", encoding="utf-8") for name in HEADERS
    }
    writers = {name: csv.writer(f) for name, f in files.items()}
    counts = dict.fromkeys(HEADERS, 0)
    try:
        for name, header in HEADERS.items():
            writers[name].writerow(header.split(","))
        for block in blocks(pop):
            for rows in generate(pop, block):
                writers["patients"].writerow(rows.patient)
                for name in ("consents", "prescriptions", "appointments"):
                    writers[name].writerows(getattr(rows, name))
                counts["patients"] += 1
                counts["consents"] += len(rows.consents)
                counts["prescriptions"] += len(rows.prescriptions)
                counts["appointments"] += len(rows.appointments)
    finally:
        for f in files.values():
            f.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--start", type=date.fromisoformat, default=date(2026, 12, 1))
    args = parser.parse_args(argv)
    counts = write_population(Population(args.patients, args.seed, args.start), args.out)
    for name, count in counts.items():
        print(f"{args.out / (name + '.csv')}: {count} rows")


if __name__ == "__main__":
    main()
