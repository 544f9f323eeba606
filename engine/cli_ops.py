"""`engage plan`, `engage status` and `engage campaign pause|resume`: running the outbox."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from engine import audit
from engine.cli_decide import campaign_or_exit, parse_at
from engine.core.policy import format_duration
from engine.defmodels import parse_duration
from engine.planner import DEFAULT_HORIZON, plan
from engine.planner_report import PlanReport
from engine.runtime import Runtime, UsageProblem, utcnow
from engine.store import outbox_queries
from engine.store.outbox_queries import OutboxStatus


def parse_horizon(value: str | None) -> timedelta:
    if value is None:
        return DEFAULT_HORIZON
    try:
        horizon = parse_duration(value)
    except ValueError as exc:
        raise UsageProblem(f"--horizon {value!r}: {exc}") from exc
    if horizon < timedelta(0):
        raise UsageProblem(f"--horizon {value!r} must not be negative")
    return horizon


@click.command("plan")
@click.option("--at", "at_text", help="Plan as of this ISO time (default: now).")
@click.option("--horizon", "horizon_text", help="Look ahead this far, e.g. 5m, 1h (default 5m).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Plan a large population with up to this many processes "
    "(default: ENGAGE_PLAN_PROCESSES, else one per CPU).",
)
@click.pass_obj
def plan_command(
    rt: Runtime,
    at_text: str | None,
    horizon_text: str | None,
    as_json: bool,
    processes: int | None,
) -> None:
    """Run one planner tick: decide due occurrences and write them to the outbox."""
    now, horizon = parse_at(at_text), parse_horizon(horizon_text)
    with rt.session_factory() as session:
        defs = rt.definitions(session)
    report = plan(
        defs,
        session_factory=rt.session_factory,
        keyring=rt.keyring,
        now=now,
        horizon=horizon,
        public_url=rt.settings.public_url,
        actor=audit.cli_actor(),
        processes=processes or rt.settings.plan_processes,
    )
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_plan(report)


def _print_plan(report: PlanReport) -> None:
    console = Console(highlight=False)
    console.print(
        f"planned at {report.now.isoformat()}, {format_duration(report.horizon)} ahead: "
        f"{report.patients_seen} patients, {report.inserted} new rows, "
        f"{report.already_present} already planned, {report.expired} expired, "
        f"{report.duration:.2f} s"
    )
    table = Table(
        "campaign", "allow", "defer", "deny", "new rows", "already planned", "links", title="Plan"
    )
    for campaign_id, c in sorted(report.campaigns.items()):
        o = c.summary.outcomes
        table.add_row(
            campaign_id,
            *(str(o[k]) for k in ("allow", "defer", "deny")),
            *(str(n) for n in (c.inserted, c.already_present, c.links)),
        )
    console.print(table)
    for campaign_id, why in sorted(report.skipped.items()):
        console.print(f"skipped {campaign_id}: {why}", markup=False)
    for campaign_id, c in sorted(report.campaigns.items()):
        for template in sorted(c.summary.unapproved_templates):
            console.print(
                f"[yellow]warning:[/] {campaign_id}: {template} is not approved; "
                "its occurrences were blocked"
            )


@click.command("status")
@click.argument("campaign_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def status_command(rt: Runtime, campaign_id: str | None, as_json: bool) -> None:
    """Outbox counts by status, by deciding rule and by provider error; unknown rows listed."""
    with rt.session_factory() as session:
        defs = rt.definitions(session)
        if campaign_id is not None and campaign_id not in outbox_queries.campaigns_with_rows(
            session=session
        ):
            campaign_or_exit(defs, campaign_id)
        status = outbox_queries.outbox_status(session=session, campaign_id=campaign_id)
        paused = outbox_queries.paused_campaigns(session=session)
    data = status_json(status, campaign_id, paused)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_status(data)


def status_json(status: OutboxStatus, campaign_id: str | None, paused: set[str]) -> dict[str, Any]:
    return {
        "campaign": campaign_id,
        "paused": sorted(paused if campaign_id is None else paused & {campaign_id}),
        "by_status": dict(sorted(status.by_status.items())),
        "by_rule": [
            {"status": s, "rule": r, "count": n}
            for (s, r), n in sorted(status.by_rule.items(), key=lambda x: (x[0][0], -x[1], x[0][1]))
        ],
        "failed_by_error_code": {
            str(code) if code is not None else "none": n
            for code, n in sorted(status.failed_by_error.items(), key=lambda x: x[0] or 0)
        },
        "unknown": [
            {
                "id": u.id,
                "campaign": u.campaign_id,
                "patient": u.patient,
                "claimed_at": u.claimed_at.isoformat() if u.claimed_at else None,
                "last_error": u.last_error,
            }
            for u in status.unknown
        ],
    }


def _print_status(data: dict[str, Any]) -> None:
    console = Console(highlight=False)
    scope = f"campaign {data['campaign']}" if data["campaign"] else "all campaigns"
    paused = f"; paused: {', '.join(data['paused'])}" if data["paused"] else ""
    console.print(f"outbox of {scope}{paused}", markup=False)
    table = Table("status", "rows", title="By status")
    for status, n in data["by_status"].items():
        table.add_row(status, str(n))
    console.print(table)
    if data["by_rule"]:
        rules = Table("status", "deciding rule", "rows", title="Not sent, by rule")
        for entry in data["by_rule"]:
            rules.add_row(entry["status"], entry["rule"], str(entry["count"]))
        console.print(rules)
    if data["failed_by_error_code"]:
        errors = Table("error code", "rows", title="Failed, by provider error")
        for code, n in data["failed_by_error_code"].items():
            errors.add_row(code, str(n))
        console.print(errors)
    if data["unknown"]:
        unknown = Table(
            "id",
            "campaign",
            "patient",
            "claimed at",
            "last error",
            title="[red]Unknown: sent or not? Check with the provider before any resend[/]",
        )
        for u in data["unknown"]:
            unknown.add_row(
                str(u["id"]),
                u["campaign"],
                u["patient"],
                u["claimed_at"] or "",
                u["last_error"] or "",
            )
        console.print(unknown)


@click.group("campaign")
def campaign_group() -> None:
    """Operate a campaign: pause or resume its planning and dispatch."""


def _set_paused(rt: Runtime, campaign_id: str, paused: bool, by: str) -> None:
    with rt.session_factory.begin() as session:
        campaign_or_exit(rt.definitions(session), campaign_id)
        now = utcnow()
        changed = outbox_queries.set_paused(
            session=session, campaign_id=campaign_id, paused=paused, by=by, now=now
        )
        audit.record(
            session=session,
            actor=audit.cli_actor(by),
            action="campaign_paused" if paused else "campaign_resumed",
            subject=f"campaign:{campaign_id}",
            details={"changed": changed},
            now=now,
        )
    verb = "paused" if paused else "resumed"
    click.echo(f"{campaign_id} {verb} by {by}" if changed else f"{campaign_id} was already {verb}")


@campaign_group.command("pause")
@click.argument("campaign_id")
@click.option("--by", "by", required=True, help="The operator's user name.")
@click.pass_obj
def pause(rt: Runtime, campaign_id: str, by: str) -> None:
    """Stop planning and dispatching a campaign at once; its rows are kept, not cancelled."""
    _set_paused(rt, campaign_id, True, by)


@campaign_group.command("resume")
@click.argument("campaign_id")
@click.option("--by", "by", required=True, help="The operator's user name.")
@click.pass_obj
def resume(rt: Runtime, campaign_id: str, by: str) -> None:
    """Plan and dispatch a paused campaign again."""
    _set_paused(rt, campaign_id, False, by)


def register(group: click.Group) -> None:
    group.add_command(plan_command)
    group.add_command(status_command)
    group.add_command(campaign_group)
