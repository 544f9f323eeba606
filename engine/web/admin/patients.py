"""A patient's consent history (GDPR Art. 7(1): the controller shows that consent was given):
the ledger with its evidence, current consent per purpose, suppression, recent decisions.
Every view of a patient is audited."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, flash, redirect, request, url_for
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import DataRequired, Length

from engine import rights
from engine.core.consent import current_consents
from engine.store import admin_queries as q
from engine.store import models as m
from engine.store.consent_queries import suppressed_patients
from engine.store.queries import patient_by_external_id
from engine.web import runtime_of, ui
from engine.web.auth import requires

blueprint = Blueprint("patients", __name__, url_prefix="/admin/patients")
ORDER = 40
MENU = [("patients.search", "Patients", "patients.view")]


class EraseForm(FlaskForm):  # type: ignore[misc]
    confirm = StringField("Type the patient id to confirm", validators=[DataRequired()])


class ExportForm(FlaskForm):  # type: ignore[misc]
    pass


class PatientSearch(FlaskForm):  # type: ignore[misc]
    class Meta:
        csrf = False  # a GET form that changes nothing

    external_id = StringField("Patient id", validators=[DataRequired(), Length(max=64)])


@blueprint.get("")
@requires("patients.view")
def search() -> Response:
    form = PatientSearch(formdata=request.args if request.args else None)
    if not request.args:
        return ui.page("admin/patients/search.html", form=form)
    if not form.validate():
        return ui.page("admin/patients/search.html", form=form, status=400)
    external_id = form.external_id.data.strip()
    with ui.reading() as db:
        found = db.scalar(select(m.Patient.id).where(m.Patient.external_id == external_id))
    if found is None:
        form.external_id.errors = [f"no patient has the id {external_id!r}"]
        return ui.page("admin/patients/search.html", form=form, status=404)
    return redirect(url_for("patients.patient", external_id=external_id))


@blueprint.get("/<external_id>")
@requires("patients.view")
def patient(external_id: str) -> Response:
    keyring = runtime_of(current_app).keyring
    with ui.reading() as db:
        row = patient_by_external_id(session=db, external_id=external_id)
        if row is None:
            return ui.page(
                "admin/error.html", status=404, code=404, message="There is no such patient."
            )
        defs = ui.definitions(db)
        ledger = q.consent_ledger(session=db, keyring=keyring, patient_id=row.id)
        states = current_consents([e.event for e in ledger], purposes=list(defs.purposes))
        suppressed = row.id in suppressed_patients(session=db, patient_ids=[row.id])
        decisions = q.recent_decisions(session=db, patient_id=row.id)
        db.expunge(row)
    ui.record("patient_viewed", f"patient:{external_id}", events=len(ledger))
    return ui.page(
        "admin/patients/patient.html",
        patient=row,
        ledger=ledger,
        states=states,
        purposes=defs.purposes,
        suppressed=suppressed,
        decisions=decisions,
    )


@blueprint.post("/<external_id>/export")
@requires("patients.export")
def export(external_id: str) -> Response:
    """The access export (GDPR Art. 15) as a JSON download; audited and registered."""
    if not ExportForm().validate_on_submit():
        return ui.page("admin/error.html", status=400, code=400, message="The form expired.")
    with ui.transaction() as db:
        try:
            document = rights.export_patient(
                session=db,
                keyring=runtime_of(current_app).keyring,
                external_id=external_id,
                actor=ui.actor(),
                now=ui.now(),
            )
        except (rights.UnknownPatient, rights.PatientErased) as exc:
            return ui.page("admin/error.html", status=404, code=404, message=f"{exc}.")
    response = Response(
        json.dumps(document, indent=2, ensure_ascii=False), mimetype="application/json"
    )
    response.headers["Content-Disposition"] = (
        f'attachment; filename="patient-{external_id}-export.json"'
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.route("/<external_id>/erase", methods=["GET", "POST"])
@requires("patients.erase")
def erase(external_id: str) -> Response:
    """Erasure (GDPR Art. 17) after typing the patient's id: it cannot be undone."""
    form = EraseForm()
    with ui.reading() as db:
        row = patient_by_external_id(session=db, external_id=external_id)
    if row is None or row.erased_at is not None:
        message = "There is no such patient." if row is None else "This patient is erased."
        return ui.page("admin/error.html", status=404, code=404, message=message)
    if request.method == "GET" or not form.validate_on_submit():
        status = 200 if request.method == "GET" else 400
        return ui.page("admin/patients/erase.html", form=form, patient=row, status=status)
    if form.confirm.data.strip() != external_id:
        form.confirm.errors = [f"type {external_id} exactly to erase this patient"]
        return ui.page("admin/patients/erase.html", form=form, patient=row, status=400)
    with ui.transaction() as db:
        try:
            done = rights.erase_patient(
                session=db,
                keyring=runtime_of(current_app).keyring,
                defs=ui.definitions(db),
                external_id=external_id,
                actor=ui.actor(),
                now=ui.now(),
            )
        except (rights.UnknownPatient, rights.PatientErased) as exc:
            return ui.page("admin/error.html", status=409, code=409, message=f"{exc}.")
    flash(
        f"Patient {external_id} is erased: {done.counts['cancelled']} pending messages "
        f"cancelled{'; their number stays suppressed' if done.suppressed else ''}."
    )
    return redirect(url_for("patients.patient", external_id=external_id))
