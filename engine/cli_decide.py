"""`engage preview` and `engage dry-run`: what would be sent, to whom, and why."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, time, timedelta

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from engine.core import schedule
from engine.core.domain import Campaign, ConsentState, History, Occurrence, Schedule
from engine.definitions import DefinitionSet
from engine.dryrun import (
    Candidate,
    DryRunSummary,
    anchors_of,
    decision_json,
    dry_run,
    preview_link,
)
from engine.evaluate import Evaluation, evaluate_occurrence
from engine.gc_tuning import bulk_collector
from engine.runtime import Runtime, UsageProblem, utcnow
from engine.store import consent_queries, queries
from engine.store import models as m
from engine.store.defqueries import approved_versions


def parse_at(value: str | None) -> datetime:
    if value is None:
        return utcnow()
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageProblem(f"--at {value!r} is not an ISO 8601 time") from exc
    if moment.tzinfo is None:
        raise UsageProblem(f"--at {value!r} needs a UTC offset, e.g. 2026-12-07T15:00:00Z")
    return moment.astimezone(UTC)


def candidates(rt: Runtime, session: Session, where: object = None) -> Iterator[Candidate]:
    for data in queries.iter_patients(session=session, keyring=rt.keyring, where=where):
        yield Candidate(data.id, data.patient, data.prescriptions, data.appointments)


def consent_lookup(session: Session, defs: DefinitionSet):  # type: ignore[no-untyped-def]
    def lookup(ids: list[int]) -> Mapping[int, Mapping[str, ConsentState]]:
        return consent_queries.consent_states_for_many(
            session=session, patient_ids=ids, purposes=list(defs.purposes)
        )

    return lookup


def dry_run_stored(
    rt: Runtime,
    session: Session,
    defs: DefinitionSet,
    *,
    campaign: Campaign,
    at: datetime,
    summary: DryRunSummary,
) -> Iterator[Evaluation]:
    """The dry-run over the stored population (CLI, admin page and API alike)."""
    return dry_run(
        defs,
        campaign=campaign,
        candidates=candidates(rt, session),
        consents_for=consent_lookup(session, defs),
        at=at,
        approved_versions=approved_versions(session=session),
        public_url=rt.settings.public_url,
        summary=summary,
    )


def campaign_or_exit(defs: DefinitionSet, campaign_id: str) -> Campaign:
    campaign = defs.campaigns.get(campaign_id)
    if campaign is None:
        raise UsageProblem(
            f"unknown campaign {campaign_id!r}; known: {', '.join(sorted(defs.campaigns))}"
        )
    return campaign


@click.command("dry-run")
@click.argument("campaign_id")
@click.option("--at", "at_text", help="ISO time to decide at (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sample", default=12, show_default=True, help="Decisions shown in the table.")
@click.pass_obj
def dry_run_command(
    rt: Runtime, campaign_id: str, at_text: str | None, as_json: bool, sample: int
) -> None:
    """Decide every occurrence the planner would handle at a time; send and write nothing."""
    at = parse_at(at_text)
    with bulk_collector(), rt.session_factory() as session:
        defs = rt.definitions(session)
        campaign = campaign_or_exit(defs, campaign_id)
        summary = DryRunSummary()
        evaluations = dry_run_stored(rt, session, defs, campaign=campaign, at=at, summary=summary)
        header = {
            "campaign": campaign.id,
            "campaign_version": campaign.version,
            "policy_set": defs.policy_version,
            "definitions": defs.version,
            "at": at.isoformat(),
        }
        if as_json:
            _print_json(header, evaluations, summary)
        else:
            _print_table(header, evaluations, summary, sample)


def _print_json(header: dict, evaluations: Iterator[Evaluation], summary: DryRunSummary) -> None:
    """Stream decisions as they are made; the summary follows them in the same object."""
    click.echo(json.dumps(header)[:-1] + ', "decisions": [', nl=False)
    for i, evaluation in enumerate(evaluations):
        click.echo(("," if i else "") + "\n  " + json.dumps(decision_json(evaluation)), nl=False)
    click.echo("\n], " + json.dumps({"summary": summary_json(summary)})[1:])


def summary_json(summary: DryRunSummary) -> dict:
    return {
        "allow": summary.outcomes["allow"],
        "defer": summary.outcomes["defer"],
        "deny": summary.outcomes["deny"],
        "by_rule": dict(summary.deciding_rules.most_common()),
        "patients": summary.patients_seen,
        "in_audience": summary.in_audience,
        "audience_errors": summary.audience_errors,
        "unapproved_templates": sorted(summary.unapproved_templates),
    }


def _print_table(
    header: dict, evaluations: Iterator[Evaluation], summary: DryRunSummary, sample: int
) -> None:
    shown: dict[str, list[Evaluation]] = {"allow": [], "defer": [], "deny": []}
    for evaluation in evaluations:
        bucket = shown[evaluation.decision.outcome]
        if len(bucket) < sample:
            bucket.append(evaluation)
    console = Console(highlight=False)
    console.print(
        f"dry-run of [bold]{header['campaign']}[/] (version {header['campaign_version']}) at "
        f"{header['at']}, policy set {header['policy_set']}: {summary.patients_seen} patients, "
        f"{summary.in_audience} in the audience"
    )
    outcomes = Table("outcome", "occurrences", title="Outcomes")
    for outcome in ("allow", "defer", "deny"):
        outcomes.add_row(outcome, str(summary.outcomes[outcome]))
    console.print(outcomes)
    if summary.deciding_rules:
        rules = Table("deciding rule", "occurrences", title="Deferred and denied, by rule")
        for rule, count in summary.deciding_rules.most_common():
            rules.add_row(rule, str(count))
        console.print(rules)
    for template in sorted(summary.unapproved_templates):
        console.print(f"[yellow]warning:[/] {template} is not approved: run `engage approve`")
    if summary.audience_errors:
        console.print(
            f"[yellow]warning:[/] the audience filter failed for "
            f"{summary.audience_errors} patient(s), who were left out"
        )
    picked = [e for bucket in shown.values() for e in bucket[: max(1, sample // 3)]][:sample]
    if picked:
        console.print("[bold]Sample decisions[/]")
    for e in picked:
        o, d = e.occurrence, e.decision
        when = f" at {d.send_at.isoformat()}" if d.send_at else ""
        console.print(f"{o.patient}  {o.anchor} {o.label}: [bold]{d.outcome}[/]{when}")
        for r in d.reasons:
            cite = f" [{r.cite}]" if r.cite else ""
            console.print(
                f"    {r.effect} by {r.rule} ({r.policy}): {r.message}{cite}", markup=False
            )
        if e.rendered:
            console.print(
                f"    {e.template.locale}, {e.rendered.encoding}, "
                f"{e.rendered.segments} segment(s): {e.rendered.text}",
                markup=False,
            )


@click.command()
@click.argument("template_id")
@click.option("--patient", "patient_id", required=True, help="The patient's external id.")
@click.option("--at", "at_text", help="Decide as of this ISO time (default: now).")
@click.pass_obj
def preview(rt: Runtime, template_id: str, patient_id: str, at_text: str | None) -> None:
    """Render a template for one patient and show what the policy would decide now."""
    at = parse_at(at_text)
    with rt.session_factory() as session:
        defs = rt.definitions(session)
        if not any(tid == template_id for tid, _ in defs.templates):
            known = ", ".join(sorted({tid for tid, _ in defs.templates}))
            raise UsageProblem(f"unknown template {template_id!r}; known: {known}")
        found = list(candidates(rt, session, m.Patient.external_id == patient_id))
        if not found:
            raise UsageProblem(f"unknown patient {patient_id!r}")
        candidate = found[0]
        campaign = campaign_for(defs, template_id)
        anchors = anchors_of(campaign, candidate)
        anchor = anchors[0] if anchors else None
        consents = consent_lookup(session, defs)([candidate.row_id])[candidate.row_id]
        key = schedule.idempotency_key(campaign.id, patient_id, "preview", "preview")
        occurrence = Occurrence(campaign.id, patient_id, "preview", "preview", at, at, key)
        e = evaluate_occurrence(
            defs,
            campaign=campaign,
            patient=candidate.patient,
            anchor=anchor,
            occurrence=occurrence,
            consents=consents,
            history=History(),
            now=at,
            approved_versions=approved_versions(session=session),
            link=preview_link(defs, rt.settings.public_url, campaign),
        )
    _print_preview(defs, e, anchor)


def campaign_for(defs: DefinitionSet, template_id: str) -> Campaign:
    """A campaign sending this template, else a stand-in without an anchor."""
    for campaign in defs.campaigns.values():
        if campaign.template == template_id:
            return campaign
    variant = next(t for (tid, _), t in defs.templates.items() if tid == template_id)
    return Campaign(
        id="(preview)",
        name="preview",
        purpose=variant.purpose,
        template=template_id,
        anchor="none",
        where=None,
        schedule=Schedule(kind="once", at=time(10)),
        expires_after=timedelta(days=1),
    )


def _print_preview(defs: DefinitionSet, e: Evaluation, anchor: object) -> None:
    t = e.template
    lint = defs.lint[(t.id, t.locale)]
    click.echo(
        f"template {t.file} version {t.version} ({'approved' if e.approved else 'NOT approved'})"
    )
    if anchor is None and defs.campaigns.get(e.occurrence.campaign, None) is not None:
        click.echo("note: the patient has no record this campaign is anchored to")
    if e.rendered:
        r = e.rendered
        click.echo(
            f"{r.encoding}, {r.length} units, {r.segments} segment(s); worst case "
            f"{lint.segments} segment(s)"
        )
        click.echo("")
        click.echo(r.text)
        click.echo("")
    for issue in lint.issues:
        if issue.severity != "info":
            click.echo(f"lint {issue.severity}: {issue.message}")
    d = e.decision
    click.echo(f"decision: {d.outcome}" + (f" at {d.send_at.isoformat()}" if d.send_at else ""))
    for r in d.trace:
        cite = f" [{r.cite}]" if r.cite else ""
        click.echo(f"  {r.effect:5} {r.rule}: {r.message}{cite}")


def register(group: click.Group) -> None:
    group.add_command(dry_run_command)
    group.add_command(preview)
