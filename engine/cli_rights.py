"""`engage erase`, `engage export-patient` and `engage requests list|add`: data subjects'
rights (GDPR Art. 15, 17) and the register of their requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from engine import rights
from engine.cli_decide import parse_at
from engine.runtime import Runtime, UsageProblem, utcnow
from engine.store import queries


@click.command()
@click.argument("external_id")
@click.option("--by", "by", required=True, help="Who erases (recorded in the audit log).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def erase(rt: Runtime, external_id: str, by: str, yes: bool) -> None:
    """Erase a patient (GDPR Art. 17): destroy their data key, delete what identifies them,
    cancel pending messages. The consent ledger, decisions and audit log stay; a number
    that opted out stays suppressed. This cannot be undone."""
    if not yes:
        click.confirm(f"Erase patient {external_id}? Their data can never be read back", abort=True)
    now = utcnow()
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        try:
            done = rights.erase_patient(
                session=session,
                keyring=rt.keyring,
                defs=defs,
                external_id=external_id,
                actor=f"cli:{by}",
                now=now,
            )
        except (rights.UnknownPatient, rights.PatientErased) as exc:
            raise UsageProblem(f"{exc}; nothing was changed") from exc
    counts = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in done.counts.items())
    click.echo(f"erased patient {external_id} (request {done.request_id}): {counts}")
    if done.suppressed:
        click.echo("their number stays on the suppression list (blind index only)")


@click.command("export-patient")
@click.argument("external_id")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON to this file (mode 0600) instead of standard output.",
)
@click.option("--by", "by", default=None, help="Who exports (default: the OS user).")
@click.pass_obj
def export_patient(rt: Runtime, external_id: str, output: Path | None, by: str | None) -> None:
    """Everything held on a patient as one JSON document (GDPR Art. 15); audited."""
    actor = f"cli:{by or os.environ.get('USER', 'unknown')}"
    if output is not None and output.exists():
        raise UsageProblem(f"{output} exists; choose another file (it is never overwritten)")
    with rt.session_factory.begin() as session:
        rt.require_schema()
        try:
            document = rights.export_patient(
                session=session,
                keyring=rt.keyring,
                external_id=external_id,
                actor=actor,
                now=utcnow(),
            )
        except (rights.UnknownPatient, rights.PatientErased) as exc:
            raise UsageProblem(str(exc)) from exc
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        if output is None:
            click.echo(text, nl=False)
            return
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    click.echo(f"wrote {output} (mode 0600): it holds the patient's personal data", err=True)


@click.group()
def requests() -> None:
    """The register of access and erasure requests and their due dates (one month)."""


@requests.command("list")
@click.option(
    "--status", "status_", type=click.Choice(rights.STATUSES), help="Only requests in this state."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(rt: Runtime, status_: str | None, as_json: bool) -> None:
    """Open requests by due date, then the closed ones."""
    rt.require_schema()
    now = utcnow()
    with rt.session_factory() as session:
        rows = rights.list_requests(session=session, status_=status_)
    items = [
        {
            "id": r.id,
            "kind": r.kind,
            "patient": r.patient_external_id,
            "received_at": r.received_at.isoformat(),
            "due_at": r.due_at.isoformat(),
            "status": r.status,
            "overdue": r.status == "open" and r.due_at < now,
            "completed_at": r.completed_at.isoformat() if r.completed_at else None,
            "handled_by": r.handled_by,
        }
        for r in rows
    ]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no requests")
    for i in items:
        late = " OVERDUE" if i["overdue"] else ""
        click.echo(
            f"#{i['id']} {i['kind']:<8} {i['patient']:<16} received {i['received_at'][:10]} "
            f"due {i['due_at'][:10]} {i['status']}{late}"
        )


@requests.command("add")
@click.argument("kind", type=click.Choice(rights.KINDS))
@click.argument("external_id")
@click.option("--by", "by", required=True, help="Who registers it.")
@click.option("--received", "received", help="When it was received (ISO, default now).")
@click.option("--note", help="How it came in (no health details).")
@click.pass_obj
def add(
    rt: Runtime, kind: str, external_id: str, by: str, received: str | None, note: str | None
) -> None:
    """Register a request; it is due one calendar month after receipt (GDPR Art. 12(3))."""
    rt.require_schema()
    now = utcnow()
    with rt.session_factory.begin() as session:
        try:
            row = rights.add_request(
                session=session,
                kind=kind,
                external_id=external_id,
                received_at=parse_at(received) if received else now,
                actor=f"cli:{by}",
                now=now,
                note=note,
            )
        except (rights.RequestProblem, queries.UnknownPatient) as exc:
            raise UsageProblem(str(exc)) from exc
        click.echo(f"request #{row.id}: {kind} for {external_id}, due {row.due_at.date()}")


@requests.command("refuse")
@click.argument("request_id", type=int)
@click.option("--by", "by", required=True, help="Who refuses it.")
@click.option("--reason", required=True, help="Why (kept with the request; no health details).")
@click.pass_obj
def refuse(rt: Runtime, request_id: int, by: str, reason: str) -> None:
    """Close an open request without acting on it, with the reason."""
    rt.require_schema()
    with rt.session_factory.begin() as session:
        try:
            row = rights.refuse_request(
                session=session,
                request_id=request_id,
                reason=reason,
                actor=f"cli:{by}",
                now=utcnow(),
            )
        except rights.RequestProblem as exc:
            raise UsageProblem(str(exc)) from exc
        click.echo(f"request #{row.id} refused")


def register(group: click.Group) -> None:
    for command in (erase, export_patient, requests):
        group.add_command(command)
