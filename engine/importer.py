"""Import CSV files and FHIR R4 bundles: bad rows are reported by line, good rows kept.

A file's kind comes from its header (or from being a JSON FHIR bundle), never its name.
Rows are validated first (engine.import_rows) and written in batches, each in a
savepoint and committed: a row the database refuses is retried alone and rejected
alone. Re-importing a file changes nothing: records are upserted by their ids and
consent events are deduplicated by (patient, purpose, status, occurred_at).
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine import audit, fhir_import
from engine.crypto import Keyring
from engine.gc_tuning import bulk_collector
from engine.import_csv import Row, csv_rows, open_csv, undecodable
from engine.import_rows import (
    WRITERS,
    Context,
    Outcome,
    Rejected,
    RowError,
    parse_appointment,
    parse_consent,
    parse_patient,
    parse_prescription,
    parse_slot,
)

COLUMNS: dict[str, tuple[str, ...]] = {
    kind: tuple(columns.split(","))
    for kind, columns in {
        "patients": "external_id,given_name,family_name,phone,timezone,locale,country,region,"
        "birth_date,allow_phi_sms",
        "prescriptions": "external_id,rx_id,medication,medication_class,refill_due,status",
        "appointments": "external_id,appointment_id,starts_at,kind,provider,location,status",
        "consents": "external_id,purpose,status,legal_basis,method,notice_version,occurred_at",
        "slots": "slot_id,kind,provider,location,starts_at,duration_min",
    }.items()
}
OPTIONAL = {
    "patients": {"given_name", "family_name", "timezone", "locale", "country", "region"}
    | {"birth_date", "allow_phi_sms"},
    "prescriptions": {"status"},
    "appointments": {"provider", "location", "status"},
    "consents": {"legal_basis", "method", "notice_version"},
    "slots": {"provider", "location", "duration_min"},
}
MARKERS = (
    ("slot_id", "slots"),
    ("rx_id", "prescriptions"),
    ("appointment_id", "appointments"),
    ("purpose", "consents"),
    ("phone", "patients"),
    ("given_name", "patients"),
)
ORDER = ("patients", "fhir", "slots", "prescriptions", "appointments", "consents")
PROGRESS_MIN_ROWS = 2000
DB_ERRORS = (IntegrityError, DataError)
Label = int | str


@dataclass(frozen=True)
class Rejection:
    file: str
    row: Label
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


@dataclass
class FileReport:
    file: str
    kind: str
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return f"{self.file}: {self.error}"
        return (
            f"{self.file} ({self.kind}): {self.imported} imported, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.rejected} rejected"
        )


@dataclass
class ImportReport:
    files: list[FileReport] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejections and not any(f.error for f in self.files)

    def lines(self) -> list[str]:
        """What a user reads: one summary per file, its warnings, then every rejection."""
        out = []
        for report in self.files:
            out.append(report.summary())
            out.extend(f"{report.file}: warning: {w}" for w in report.warnings)
        return out + [str(r) for r in self.rejections]


class HeaderError(ValueError):
    pass


def detect_kind(header: Sequence[str]) -> str:
    """The CSV kind whose columns the header has; HeaderError naming what is wrong."""
    columns = set(header)
    kind = next((k for marker, k in MARKERS if marker in columns), None)
    if kind is None:
        expected = "; ".join(f"{k}.csv: {','.join(c)}" for k, c in COLUMNS.items())
        raise HeaderError(f"unrecognised header ({','.join(header)}); expected one of: {expected}")
    missing = [c for c in COLUMNS[kind] if c not in columns and c not in OPTIONAL[kind]]
    if missing:
        raise HeaderError(f"{kind} file is missing column(s): {', '.join(missing)}")
    return kind


def import_files(
    paths: Iterable[str | Path],
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    progress: bool = True,
    purposes: Collection[str] | None = None,
    declared_attributes: Collection[str] = frozenset(),
    actor: str = "import",
    batch_size: int = 500,
    now: datetime | None = None,
) -> ImportReport:
    """Import every file, patients first, so other files may refer to them.

    `purposes`: the known consent purposes (None accepts any); `declared_attributes`:
    extra patient columns to keep as attributes (others are reported as warnings).
    New consent events leave one audit entry for the whole import, with counts by file.
    """
    context = Context(keyring, purposes, frozenset(declared_attributes), actor)
    sources = sorted((_source(Path(p)) for p in paths), key=lambda s: ORDER.index(s.kind))
    report = ImportReport()
    consents: dict[str, dict[str, int]] = {}
    with bulk_collector():
        for source in sources:
            file_report = FileReport(file=str(source.path), kind=source.kind)
            report.files.append(file_report)
            if source.error:
                file_report.error = source.error
                continue
            rejections: list[Rejection] = []
            with session_factory() as session:
                context = replace(context, source=f"import:{source.path.name}")
                run = _FileImport(source, session, context, file_report, rejections)
                run.run(show_progress=progress, batch_size=batch_size)
            if run.consents:
                consents[source.path.name] = dict(sorted(run.consents.items()))
            report.rejections += sorted(rejections, key=lambda r: _position(r.row))
    if any(c.get("imported") or c.get("updated") for c in consents.values()):
        with session_factory.begin() as session:
            audit.record(
                session=session,
                actor=actor if ":" in actor else f"cli:{actor}",
                action="consents_imported",
                details={"files": consents},
                now=now or datetime.now(UTC),
            )
    return report


def _position(label: Label) -> int:
    """Where a rejected row is in its file: the CSV line, or the FHIR entry index."""
    if isinstance(label, int):
        return label
    return int(label.removeprefix("entry[").partition("]")[0])


# --- sources ---------------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    kind: str
    error: str | None = None
    header: list[str] = field(default_factory=list)
    bundle: fhir_import.Bundle | None = None

    def rows(self) -> Iterator[Row]:
        if self.bundle is not None:
            for r in self.bundle.rows:
                yield r.label, r.kind, r.values, r.error
            return
        yield from csv_rows(self.path, self.header, self.kind)

    def total(self) -> int:
        if self.bundle is not None:
            return len(self.bundle.rows)
        with self.path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _source(path: Path) -> _Source:
    try:
        with open_csv(path) as handle:
            if handle.read(4096).lstrip().startswith("{"):
                return _bundle_source(path)
            handle.seek(0)
            header = [c.strip().lower() for c in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return _Source(path, "patients", error=f"cannot read: {exc}")
    if not header:
        return _Source(path, "patients", error="the file is empty (a header row is needed)")
    if any(undecodable(c) for c in header):
        return _Source(path, "patients", error="the header row is not valid UTF-8")
    try:
        return _Source(path, detect_kind(header), header=header)
    except HeaderError as exc:
        return _Source(path, "patients", error=str(exc))


def _bundle_source(path: Path) -> _Source:
    try:
        bundle = fhir_import.read_bundle(path)
    except fhir_import.BundleError as exc:
        return _Source(path, "fhir", error=str(exc))
    return _Source(path, "fhir", bundle=bundle)


def _extra_columns(source: _Source, context: Context) -> list[str]:
    extra = [c for c in source.header if c not in COLUMNS[source.kind]]
    ignored = [c for c in extra if source.kind != "patients" or c not in context.attributes]
    if not ignored:
        return []
    why = "not declared in policies/data.yaml" if source.kind == "patients" else "not used"
    return [f"column(s) {', '.join(ignored)} {why}; ignored"]


# --- one file --------------------------------------------------------------------------------


class _FileImport:
    """Validates rows, writes them in batches, and counts and rejects into the reports."""

    def __init__(
        self,
        source: _Source,
        session: Session,
        context: Context,
        report: FileReport,
        rejections: list[Rejection],
    ) -> None:
        self.source, self.session, self.context = source, session, context
        self.report, self.rejections = report, rejections
        self.pending: list[tuple[Label, Any]] = []
        self.kind = ""
        self.batch_size = 500
        self.seen: dict[tuple[str, Any], Label] = {}
        self.consents: Counter[str] = Counter()  # consent rows by outcome, for the audit

    def run(self, *, show_progress: bool, batch_size: int) -> None:
        source, self.batch_size = self.source, batch_size
        if source.bundle is not None:
            ignored = source.bundle.ignored.items()
            self.report.warnings += [f"{n} {t} entries ignored" for t, n in sorted(ignored)]
        else:
            self.report.warnings += _extra_columns(source, self.context)
        with _progress(show_progress, source) as advance:
            try:
                for label, kind, values, error in source.rows():
                    advance()
                    if kind != self.kind:
                        self.flush()
                        self.kind = kind
                    self.add(label, kind, values, error)
            except (UnicodeDecodeError, csv.Error) as exc:  # the rows before it are kept
                self.report.error = f"stopped reading ({exc}); the rows before were imported"
        self.flush()

    def add(self, label: Label, kind: str, values: dict[str, str], error: str | None) -> None:
        if error:
            return self.reject(label, error)
        try:
            parsed = parse(kind, values, self.context)
        except RowError as exc:
            return self.reject(label, str(exc))
        key = record_key(kind, parsed)
        if key is not None and (kind, key[1]) in self.seen:
            first = self.seen[(kind, key[1])]
            where = f"line {first}" if isinstance(first, int) else first
            return self.reject(label, f"duplicate of {where} (same {key[0]})")
        if key is not None:
            self.seen[(kind, key[1])] = label
        self.pending.append((label, parsed))
        if len(self.pending) >= self.batch_size:
            self.flush()
        return None

    def reject(self, label: Label, reason: str) -> None:
        self.report.rejected += 1
        if self.kind == "consents":
            self.consents["rejected"] += 1
        self.rejections.append(Rejection(self.report.file, label, reason))

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        items = [parsed for _, parsed in batch]
        outcomes = _write(self.session, self.kind, items, self.context)
        for (label, _), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Rejected):
                self.reject(label, outcome.reason)
            else:
                setattr(self.report, outcome, getattr(self.report, outcome) + 1)
                if self.kind == "consents":
                    self.consents[outcome] += 1
        self.session.commit()


def parse(kind: str, values: Mapping[str, str], context: Context) -> Any:
    """The record(s) of one row of `kind`; RowError with every reason it is wrong."""
    if kind == "patients":
        return parse_patient(values, context.attributes)
    if kind == "consents":
        return parse_consent(values, context.purposes, context.actor)
    return PARSERS[kind](values)


PARSERS: dict[str, Callable[[Mapping[str, str]], Any]] = {
    "prescriptions": parse_prescription,
    "appointments": parse_appointment,
    "slots": parse_slot,
}


def record_key(kind: str, parsed: Any) -> tuple[str, Any] | None:
    """(what, value) making two rows of one file the same record; None for consents."""
    if kind == "patients":
        return "external_id", parsed.patient.external_id
    if kind == "prescriptions":
        return "external_id and rx_id", (parsed[0], parsed[1].rx_id)
    if kind == "appointments":
        return "appointment_id", parsed[1].appointment_id
    if kind == "slots":
        return "slot_id", parsed.slot_id
    return None


@contextmanager
def _progress(enabled: bool, source: _Source) -> Iterator[Callable[[], None]]:
    """A progress bar on an interactive terminal for files of more than ~2,000 rows."""
    if not (enabled and sys.stderr.isatty()) or source.total() <= PROGRESS_MIN_ROWS:
        yield lambda: None
        return
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"importing {source.path.name}", total=source.total())
        yield lambda: bar.advance(task)


def _write(session: Session, kind: str, items: list[Any], context: Context) -> list[Outcome]:
    """Write a batch in a savepoint; if the database refuses it, each row in its own."""
    writer = WRITERS[kind]
    try:
        with session.begin_nested():
            return writer(session, items, context)
    except DB_ERRORS:
        pass
    outcomes: list[Outcome] = []
    for item in items:
        try:
            with session.begin_nested():
                outcomes.extend(writer(session, [item], context))
        except DB_ERRORS as exc:
            first_line = str(exc.orig).strip().splitlines()[0]
            outcomes.append(Rejected(f"the database refused the row: {first_line}"))
    return outcomes
