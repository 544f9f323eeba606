"""`engage consent grant|revoke`: record consent events in the append-only ledger."""

from __future__ import annotations

import click

from engine import audit
from engine.cli_decide import parse_at
from engine.core.domain import LEGAL_BASES, ConsentEvent
from engine.runtime import Runtime, UsageProblem, utcnow
from engine.store import consent_queries, queries


@click.group()
def consent() -> None:
    """Record a patient's consent or its withdrawal (never edits the ledger)."""


def _record(
    rt: Runtime,
    *,
    status: str,
    patient: str,
    purposes: tuple[str, ...],
    legal_basis: str | None,
    method: str,
    evidence: str | None,
    notice_version: str | None,
    by: str,
    at_text: str | None,
) -> None:
    at = parse_at(at_text)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        unknown = [p for p in purposes if p not in defs.purposes]
        if unknown:
            raise UsageProblem(
                f"unknown purpose {unknown[0]!r}; known: {', '.join(sorted(defs.purposes))}"
            )
        for purpose in purposes:
            event = ConsentEvent(
                patient=patient,
                purpose=purpose,
                status=status,  # type: ignore[arg-type]
                occurred_at=at,
                legal_basis=legal_basis,
                method=method,
                notice_version=notice_version,
                evidence=evidence,
                recorded_by=by,
            )
            try:
                row = consent_queries.record_consent_event(
                    session=session, keyring=rt.keyring, event=event, source="cli"
                )
            except (queries.UnknownPatient, queries.PatientErased) as exc:
                raise UsageProblem(str(exc)) from exc
            audit.record(
                session=session,
                actor=audit.cli_actor(by),
                action="consent_recorded",
                subject=f"patient:{patient}",
                details={"event": row.id, "purpose": purpose, "status": status, "method": method},
                now=utcnow(),
            )
        states = consent_queries.current_consents_for(
            session=session,
            keyring=rt.keyring,
            patient_external_id=patient,
            purposes=list(defs.purposes),
        )
    for purpose in purposes:
        state = states[purpose]
        basis = f" ({state.legal_basis})" if state.active and state.legal_basis else ""
        click.echo(f"{patient} {purpose}: {'active' if state.active else 'not active'}{basis}")


def _options(f):  # type: ignore[no-untyped-def]
    for option in reversed(
        [
            click.option("--patient", required=True, help="The patient's external id."),
            click.option(
                "--purpose",
                "purposes",
                required=True,
                multiple=True,
                help="A purpose from policies/purposes.yaml (repeatable).",
            ),
            click.option(
                "--method",
                required=True,
                help="How it was given or withdrawn: web_form, paper, phone, sms_keyword...",
            ),
            click.option("--evidence", help="What proves it (stored encrypted)."),
            click.option("--notice-version", help="The privacy notice version shown."),
            click.option("--by", "by", required=True, help="Who records it."),
            click.option("--at", "at_text", help="When it happened (ISO, default now)."),
        ]
    ):
        f = option(f)
    return f


@consent.command()
@_options
@click.option("--legal-basis", required=True, type=click.Choice(LEGAL_BASES))
@click.pass_obj
def grant(rt: Runtime, legal_basis: str, **kwargs: object) -> None:
    """Record that the patient gave consent for the purposes."""
    _record(rt, status="granted", legal_basis=legal_basis, **kwargs)  # type: ignore[arg-type]


@consent.command()
@_options
@click.pass_obj
def revoke(rt: Runtime, **kwargs: object) -> None:
    """Record that the patient withdrew consent for the purposes."""
    _record(rt, status="revoked", legal_basis=None, **kwargs)  # type: ignore[arg-type]


def register(group: click.Group) -> None:
    group.add_command(consent)
