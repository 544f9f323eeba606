"""The policy set as IT sees it: the active definitions and their files, earlier sets, every
policy pack with its rules and test results, the purposes and data classification, and a
reload from the folders that changes nothing unless the whole new set loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app
from flask_wtf import FlaskForm
from wtforms import SubmitField

from engine import audit
from engine.core import domain, policy, policy_tests
from engine.definitions import DefinitionSet, PolicyDef, load_definitions
from engine.store import admin_queries as q
from engine.store.defqueries import SyncResult, sync_definitions
from engine.web import runtime_of, ui
from engine.web.auth import requires
from engine.yamlsource import SourceErrors

blueprint = Blueprint("policies", __name__, url_prefix="/admin/policies")
ORDER = 50
MENU = [
    ("policies.overview", "Policies", "view"),
    ("policies.data", "Purposes & data", "view"),
]


class ReloadForm(FlaskForm):  # type: ignore[misc]
    reload = SubmitField("Reload from folders")


@dataclass(frozen=True)
class Pack:
    """A policy pack with its rules and the results of its own tests."""

    policy: PolicyDef
    results: Sequence[policy_tests.PolicyTestResult]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)


def rule_terms(rule: domain.Rule) -> str:
    """What a rule checks, in a line (the parameters of its kind)."""
    if rule.kind == "consent":
        return "active consent" + (f" on {', '.join(rule.legal_bases)}" if rule.legal_bases else "")
    if rule.kind == "quiet_hours":
        return f"send between {rule.window_start:%H:%M} and {rule.window_end:%H:%M} local time"
    if rule.kind == "frequency_cap":
        counted = ", ".join(rule.count_purposes) if rule.count_purposes else "its purposes"
        return f"at most {rule.limit} per {_duration(rule.window)} ({counted})"
    return f"when {rule.when}"


def _duration(value: Any) -> str:
    seconds = int(value.total_seconds()) if value is not None else 0
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def packs(defs: DefinitionSet) -> list[Pack]:
    """Each pack's tests run against its own rules only, as `engage check` runs them (a few
    milliseconds for the shipped packs, so on every view)."""
    purposes = list(defs.purposes)
    return [
        Pack(
            p,
            policy_tests.run_policy_tests(
                policy.compile_policy_set(p.rules, purposes=purposes), p.tests
            ),
        )
        for p in defs.policies
    ]


@blueprint.get("")
@requires("view")
def overview() -> Response:
    return _overview(ReloadForm())


def _overview(
    form: ReloadForm,
    *,
    errors: Sequence[str] = (),
    result: SyncResult | None = None,
    status: int = 200,
) -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        files = q.active_files(session=db)
        sets = q.definition_sets(session=db)
    return ui.page(
        "admin/policies/overview.html",
        defs=defs,
        files=files,
        sets=sets,
        packs=packs(defs),
        rule_terms=rule_terms,
        form=form,
        errors=errors,
        result=result,
        root=str(runtime_of(current_app).settings.definitions_dir),
        status=status,
    )


@blueprint.post("/reload")
@requires("policies.reload")
def reload() -> Response:
    """Load the folders; activate them only if every file loads (else nothing changes)."""
    form = ReloadForm()
    if not form.validate_on_submit():
        return _overview(form, status=400)
    root = runtime_of(current_app).settings.definitions_dir
    try:
        defs = load_definitions(root)
    except SourceErrors as exc:
        files = sorted({e.file for e in exc.errors})
        ui.record("definitions_reload_failed", "definitions", errors=len(exc.errors), files=files)
        return _overview(form, errors=[str(e) for e in exc.errors], status=400)
    with ui.transaction() as db:
        result = sync_definitions(session=db, defs=defs, now=ui.now())
        audit.record(
            session=db,
            actor=ui.actor(),
            action="definitions_reloaded",
            subject="definitions",
            details={
                "version": result.version,
                "previous": result.previous,
                "added": list(result.added),
                "changed": list(result.changed),
                "removed": list(result.removed),
            },
            now=ui.now(),
        )
    return _overview(ReloadForm(formdata=None), result=result)


@blueprint.get("/data")
@requires("view")
def data() -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
    return ui.page("admin/policies/data.html", defs=defs)
