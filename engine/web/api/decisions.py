"""`GET /api/v1/decisions` and `GET /api/v1/messages` (view): outbox rows, oldest first.

Decisions carry their reasons; who they concern (patient external id, anchor record) only
for tokens that may view patients. Messages never carry their text.
"""

from __future__ import annotations

from flask import Response, request

from engine.store import api_queries
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
from engine.web.api.patients import find_patient
from engine.web.auth import api_requires

blueprint = api_blueprint("api_decisions", __name__)
ORDER = 83


@blueprint.get("/decisions")
@documented(
    summary="Decisions (outbox rows) with their reasons",
    description=(
        "Filter by campaign, outcome, the rule a row is blocked or held by, and patient "
        "(which, like the patient and anchor fields, needs patients.view)."
    ),
    answer=api.DecisionPage,
    query=api.DecisionQuery,
    errors=(404,),
    tag="decisions",
)
@api_requires("view")
def list_decisions() -> Response:
    q = query(api.DecisionQuery)
    sees_patients = ui.can("patients.view")
    if q.patient is not None and not sees_patients:
        ui.record("forbidden", request.path, permission="patients.view", method=request.method)
        raise BadRequest("patient", "this token may not patients.view", status=403)
    with ui.reading() as db:
        patient_id = find_patient(db, q.patient, field="patient").id if q.patient else None
        rows = api_queries.decision_rows(
            session=db,
            campaign=q.campaign,
            outcome=q.outcome,
            rule=q.rule,
            patient_id=patient_id,
            after=decode_cursor(q.cursor),
            limit=q.limit,
        )
    items = [
        api.DecisionOut(
            id=r.id,
            campaign=r.campaign_id,
            campaign_version=r.campaign_version,
            purpose=r.purpose,
            occurrence=r.occurrence,
            patient=r.external_id if sees_patients else None,
            anchor=r.anchor if sees_patients else None,
            outcome=r.outcome,
            status=r.status,
            deciding_rule=api_queries.row_rule(r.status, r.reasons),
            due_at=r.due_at,
            send_at=r.send_at,
            decided_at=r.decided_at,
            policy_set=r.policy_set,
            template=r.template_id,
            template_version=r.template_version,
            locale=r.locale,
            reasons=api.reasons_of(r.reasons),
        )
        for r in rows[: q.limit]
    ]
    cursor = next_cursor([r.id for r in rows], q.limit)
    return answer(api.DecisionPage(items=items, next_cursor=cursor))


@blueprint.get("/messages")
@documented(
    summary="Messages: status, provider status, segments, send time and error, never text",
    answer=api.MessagePage,
    query=api.MessageQuery,
    tag="messages",
)
@api_requires("view")
def list_messages() -> Response:
    q = query(api.MessageQuery)
    with ui.reading() as db:
        rows = api_queries.message_rows(
            session=db,
            status=q.status,
            campaign=q.campaign,
            after=decode_cursor(q.cursor),
            limit=q.limit,
        )
    items = [
        api.MessageOut(
            id=r.id,
            campaign=r.campaign_id,
            status=r.status,
            provider_status=r.provider_status,
            segments=r.segments,
            encoding=r.encoding,
            send_at=r.send_at,
            sent_at=r.sent_at,
            error_code=r.error_code,
            attempts=r.attempts,
        )
        for r in rows[: q.limit]
    ]
    cursor = next_cursor([r.id for r in rows], q.limit)
    return answer(api.MessagePage(items=items, next_cursor=cursor))
