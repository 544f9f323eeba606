"""The register of data subjects' requests (GDPR Art. 15 access, Art. 17 erasure): each
with its due date, one calendar month after receipt (Art. 12(3)); overdue ones stand out."""

from __future__ import annotations

from flask import Blueprint, Response, request

from engine import rights
from engine.web import ui
from engine.web.auth import requires

blueprint = Blueprint("requests", __name__, url_prefix="/admin/requests")
ORDER = 45
MENU = [("requests.index", "Requests", "patients.view")]


@blueprint.get("")
@requires("patients.view")
def index() -> Response:
    wanted = request.args.get("status") or None
    if wanted is not None and wanted not in rights.STATUSES:
        return ui.page("admin/error.html", status=400, code=400, message="Unknown status.")
    with ui.reading() as db:
        rows = rights.list_requests(session=db, status_=wanted)
        for row in rows:
            db.expunge(row)
    now = ui.now()
    overdue = {r.id for r in rows if r.status == "open" and r.due_at < now}
    return ui.page(
        "admin/requests/index.html",
        rows=rows,
        overdue=overdue,
        wanted=wanted,
        statuses=rights.STATUSES,
        now=now,
    )
