"""`GET /api/v1/patients` and `/api/v1/patients/<external_id>` (patients.view).

Only what the store holds in clear is returned: no name, phone number, birth date or
attributes, so nothing is decrypted. The caller's system of record (the EHR) knows who
an external id is; `engage export-patient` is the complete access export (GDPR Art. 15).
Every read is audited, as viewing a patient in the admin pages is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from flask import Response
from sqlalchemy.orm import Session

from engine.core import domain
from engine.definitions import DefinitionSet
from engine.store import api_queries, consent_queries, queries
from engine.store import models as m
from engine.web import ui
from engine.web.api import models as api
from engine.web.api.common import (
    BadRequest,
    answer,
    api_blueprint,
    decode_cursor,
    documented,
    next_cursor,
    query,
)
from engine.web.auth import api_requires

blueprint = api_blueprint("api_patients", __name__)
ORDER = 80


def consent_out(state: domain.ConsentState) -> api.ConsentState:
    return api.ConsentState(
        active=state.active,
        legal_basis=state.legal_basis,
        method=state.method,
        granted_at=state.granted_at,
        revoked_at=state.revoked_at,
    )


def consents_out(states: Mapping[str, domain.ConsentState]) -> dict[str, api.ConsentState]:
    return {purpose: consent_out(state) for purpose, state in sorted(states.items())}


def _summaries(
    db: Session, defs: DefinitionSet, rows: Sequence[m.Patient]
) -> list[api.PatientSummary]:
    ids = [row.id for row in rows]
    states = consent_queries.consent_states_for_many(
        session=db, patient_ids=ids, purposes=list(defs.purposes)
    )
    suppressed = consent_queries.suppressed_patients(session=db, patient_ids=ids)
    return [
        api.PatientSummary(
            external_id=row.external_id,
            locale=row.locale,
            timezone=row.timezone,
            country=row.country,
            region=row.region,
            suppressed=row.id in suppressed,
            erased=row.erased_at is not None,
            consent=consents_out(states[row.id]),
        )
        for row in rows
    ]


@blueprint.get("/patients")
@documented(
    summary="List patients with their current consent",
    answer=api.PatientPage,
    query=api.PatientQuery,
    tag="patients",
)
@api_requires("patients.view")
def list_patients() -> Response:
    q = query(api.PatientQuery)
    with ui.reading() as db:
        rows = api_queries.patient_rows(
            session=db, external_id=q.external_id, after=decode_cursor(q.cursor), limit=q.limit
        )
        items = _summaries(db, ui.definitions(db), rows[: q.limit])
    ui.record("patients_listed", None, count=len(items))
    page = api.PatientPage(items=items, next_cursor=next_cursor([r.id for r in rows], q.limit))
    return answer(page)


@blueprint.get("/patients/<external_id>")
@documented(
    summary="One patient: locale, zones, consent per purpose, suppression",
    answer=api.PatientDetail,
    errors=(404,),
    path_params={"external_id": api.EXTERNAL_ID_PATTERN},
    tag="patients",
)
@api_requires("patients.view")
def get_patient(external_id: str) -> Response:
    with ui.reading() as db:
        row = find_patient(db, external_id, field="external_id")
        summary = _summaries(db, ui.definitions(db), [row])[0]
        detail = api.PatientDetail(
            **summary.model_dump(),
            candidate_timezones=[z for z in row.candidate_timezones.split(",") if z],
            allow_phi_sms=row.allow_phi_sms,
            created_at=row.created_at,
            updated_at=row.updated_at,
            erased_at=row.erased_at,
        )
    ui.record("patient_viewed", f"patient:{external_id}")
    return answer(detail)


def find_patient(db: Session, external_id: str, *, field: str) -> m.Patient:
    """The patient with this external id, else a 404 naming `field`."""
    row = None
    if re.fullmatch(api.EXTERNAL_ID_PATTERN, external_id):
        row = queries.patient_by_external_id(session=db, external_id=external_id)
    if row is None:
        raise BadRequest(field, "no patient has this external id", status=404)
    return row
