"""`GET /api/v1/patients/<external_id>/export` (patients.export): the access export (GDPR
Art. 15), and `POST /api/v1/patients/<external_id>/erase` (patients.erase): erasure (Art.
17). Both are audited and close (or register) a request in the rights register."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from pydantic import Field

from engine import rights
from engine.web import runtime_of, ui
from engine.web.api import models as api
from engine.web.api.common import BadRequest, answer, api_blueprint, body, documented
from engine.web.api.patients import find_patient
from engine.web.auth import api_requires

blueprint = api_blueprint("api_rights", __name__)
ORDER = 82

Items = list[dict[str, Any]]


class ErasureRequest(api.Request):
    confirm: api.ExternalId = Field(
        description="The patient's external id again: erasure cannot be undone."
    )


class ErasureDone(api.Answer):
    patient: str
    erased_at: api.IsoTime
    request: int = Field(description="The rights register entry this erasure closed.")
    suppressed: bool = Field(description="The number stays on the suppression list.")
    erased: list[str] = Field(description="What was deleted or nulled (policies/data.yaml).")
    counts: dict[str, int] = Field(description="Rows cancelled, deleted or nulled, by kind.")


class PatientExport(api.Answer):
    format: str
    patient: str
    exported_at: api.IsoTime
    profile: dict[str, Any] = Field(description="Names, phone, birth date, zones, attributes.")
    suppressed: bool
    prescriptions: Items
    appointments: Items
    consent_events: Items = Field(description="The consent ledger, evidence included.")
    messages: Items = Field(description="Every decision with its reasons, status and text.")
    inbound_messages: Items
    scheduling_links: Items = Field(description="Links sent: clicks, first opened, used.")
    bookings: Items = Field(description="Slots the patient booked.")
    rights_requests: Items


@blueprint.get("/patients/<external_id>/export")
@documented(
    summary="Everything held on a patient (GDPR Art. 15 access export)",
    description=(
        "One JSON document: profile (decrypted), prescriptions, appointments, consent events "
        "with evidence, messages with their decisions and texts, inbound texts, scheduling "
        "links and bookings. Audited as `patient_exported`; closes the patient's open access "
        "request in the register, or registers one. 404: unknown patient; 409: erased."
    ),
    answer=PatientExport,
    errors=(404, 409),
    path_params={"external_id": api.EXTERNAL_ID_PATTERN},
    tag="patients",
)
@api_requires("patients.export")
def export_patient(external_id: str) -> Response:
    with ui.transaction() as db:
        find_patient(db, external_id, field="external_id")
        try:
            document = rights.export_patient(
                session=db,
                keyring=runtime_of(current_app).keyring,
                external_id=external_id,
                actor=ui.actor(),
                now=ui.now(),
            )
        except rights.PatientErased:
            raise BadRequest("external_id", "this patient has been erased", status=409) from None
    response = answer(PatientExport.model_validate(document))
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.post("/patients/<external_id>/erase")
@documented(
    summary="Erase a patient (GDPR Art. 17)",
    description=(
        "Destroys the patient's data key (crypto-shredding), deletes or nulls what "
        "policies/data.yaml classifies as personal or health data, cancels pending messages, "
        "and keeps the consent ledger, decisions, audit log and, for a number that opted out, "
        "its suppression (blind index only). Cannot be undone: `confirm` must repeat the "
        "external id. Audited as `patient_erased`. 404: unknown patient; 409: already erased."
    ),
    answer=ErasureDone,
    body=ErasureRequest,
    errors=(404, 409),
    path_params={"external_id": api.EXTERNAL_ID_PATTERN},
    tag="patients",
)
@api_requires("patients.erase")
def erase_patient(external_id: str) -> Response:
    q = body(ErasureRequest)
    now = ui.now()
    with ui.transaction() as db:
        find_patient(db, external_id, field="external_id")
        if q.confirm != external_id:
            raise BadRequest("confirm", "repeat the patient's external id to confirm erasure")
        defs = ui.definitions(db)
        try:
            done = rights.erase_patient(
                session=db,
                keyring=runtime_of(current_app).keyring,
                defs=defs,
                external_id=external_id,
                actor=ui.actor(),
                now=now,
            )
        except rights.PatientErased:
            raise BadRequest("external_id", "this patient is already erased", status=409) from None
        erased = rights.erasable_scopes(defs)
    result = ErasureDone(
        patient=external_id,
        erased_at=now.isoformat(),
        request=done.request_id,
        suppressed=done.suppressed,
        erased=erased,
        counts=dict(done.counts),
    )
    return answer(result)
