"""`POST /api/v1/consents` (consents.record): append one event to the consent ledger, as
`engage consent grant|revoke` does, recorded by the token and audited in one transaction."""

from __future__ import annotations

from datetime import timedelta

from flask import Response, current_app

from engine import audit
from engine.core.domain import ConsentEvent
from engine.store import consent_queries
from engine.store.codec import PatientErased
from engine.web import runtime_of, ui
from engine.web.api import models as api
from engine.web.api.common import BadRequest, answer, api_blueprint, body, documented
from engine.web.api.patients import consents_out, find_patient
from engine.web.auth import api_requires

blueprint = api_blueprint("api_consents", __name__)
ORDER = 81
# Clocks differ a little between the caller's system and ours; the future is refused.
CLOCK_SKEW = timedelta(minutes=5)


@blueprint.post("/consents")
@documented(
    summary="Record a consent or its withdrawal",
    description=(
        "Appends one event to the patient's append-only consent ledger (recorded_by is the "
        "token) and answers with the patient's current consent. 404: unknown patient; "
        "409: the patient has been erased; 400: unknown purpose or legal basis."
    ),
    answer=api.ConsentRecorded,
    status=201,
    body=api.ConsentRequest,
    errors=(404, 409),
    tag="consents",
)
@api_requires("consents.record")
def record_consent() -> Response:
    q = body(api.ConsentRequest)
    now = ui.now()
    at = q.occurred_at or now
    if at > now + CLOCK_SKEW:
        raise BadRequest("occurred_at", "a consent event cannot be in the future")
    event = ConsentEvent(
        patient=q.patient,
        purpose=q.purpose,
        status=q.status,
        occurred_at=at,
        legal_basis=q.legal_basis,
        method=q.method,
        notice_version=q.notice_version,
        evidence=q.evidence,
        recorded_by=ui.actor(),
    )
    with ui.transaction() as db:
        defs = ui.definitions(db)
        if q.purpose not in defs.purposes:
            known = ", ".join(sorted(defs.purposes))
            raise BadRequest("purpose", f"unknown purpose; known: {known}")
        patient = find_patient(db, q.patient, field="patient")
        try:
            row = consent_queries.record_consent_event(
                session=db, keyring=runtime_of(current_app).keyring, event=event, source="api"
            )
        except PatientErased:
            raise BadRequest("patient", "this patient has been erased", status=409) from None
        states = consent_queries.consent_states_for_many(
            session=db, patient_ids=[patient.id], purposes=list(defs.purposes)
        )[patient.id]
        audit.record(
            session=db,
            actor=ui.actor(),
            action="consent_recorded",
            subject=f"patient:{q.patient}",
            details={"event": row.id, "purpose": q.purpose, "status": q.status},
            now=now,
        )
        recorded = api.ConsentRecorded(
            patient=q.patient,
            event=api.ConsentEventOut(
                id=row.id,
                purpose=row.purpose,
                status=row.status,
                channel=row.channel,
                legal_basis=row.legal_basis,
                method=row.method,
                notice_version=row.notice_version,
                occurred_at=at,
                recorded_at=row.recorded_at,
                recorded_by=row.recorded_by,
            ),
            consent=consents_out(states),
        )
    return answer(recorded, status=201)
