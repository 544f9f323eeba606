"""Campaign dashboards: how far messages got (funnel), why the others did not go (deciding
rule), sends per day and opt-outs after a message. Charts are inline SVG drawn here, with
their numbers in tables; nothing needs script."""

from __future__ import annotations

from datetime import date, timedelta

from flask import Blueprint, Response

from engine.core.describe import MONTHS
from engine.store import dashboard_queries as dq
from engine.web import charts, ui
from engine.web.auth import requires

blueprint = Blueprint("dashboards", __name__, url_prefix="/admin")
ORDER = 20
MENU = [("dashboards.index", "Dashboards", "view")]

MAX_DAYS = 92  # the chart shows the last three months of sends


@blueprint.get("/dashboards")
@requires("view")
def index() -> Response:
    """Every campaign's funnel side by side."""
    with ui.reading() as db:
        defs = ui.definitions(db)
        found = dq.funnels(session=db, campaign_ids=list(defs.campaigns))
    rows = [
        (c, found.get(c.id, dq.Funnel()))
        for c in sorted(defs.campaigns.values(), key=lambda c: c.name.lower())
    ]
    return ui.page("admin/campaigns/dashboards.html", rows=rows)


@blueprint.get("/campaigns/<campaign_id>/dashboard")
@requires("view")
def dashboard(campaign_id: str) -> Response:
    with ui.reading() as db:
        campaign = ui.definitions(db).campaigns.get(campaign_id)
        if campaign is None:
            return ui.page(
                "admin/error.html",
                status=404,
                code=404,
                message=f"There is no campaign {campaign_id!r} in the active definitions.",
            )
        funnel = dq.funnel(session=db, campaign_id=campaign_id)
        rules = dq.rule_counts(session=db, campaign_id=campaign_id)
        days = every_day(dq.sends_per_day(session=db, campaign_id=campaign_id))
        opt_outs = dq.opt_outs(session=db, campaign_id=campaign_id)
    blocked = [(r.rule, r.count) for r in rules if r.status == "blocked"]
    return ui.page(
        "admin/campaigns/dashboard.html",
        campaign=campaign,
        funnel=funnel,
        rules=rules,
        days=days,
        opt_outs=opt_outs,
        funnel_svg=charts.funnel_chart(
            funnel.steps(),
            chart_id="funnel",
            title=f"Funnel of {campaign.name}",
            desc=", ".join(f"{label}: {n}" for label, n in funnel.steps()),
        ),
        blocked_svg=charts.bar_chart(
            blocked,
            chart_id="blocked",
            title="Messages blocked, by deciding rule",
            desc=", ".join(f"{rule}: {n}" for rule, n in blocked) or "None blocked.",
            empty="No message was blocked.",
        ),
        days_svg=charts.column_chart(
            [(f"{MONTHS[d.month - 1]} {d.day}", n) for d, n in days],
            chart_id="sends",
            title="Messages sent per day (UTC)",
            desc=", ".join(f"{d.isoformat()}: {n}" for d, n in days if n) or "None sent yet.",
            empty="No message of this campaign has been sent yet.",
        ),
    )


def every_day(found: list[tuple[date, int]]) -> list[tuple[date, int]]:
    """Each day from the first send to the last (at most MAX_DAYS), zero where none went."""
    if not found:
        return []
    counts = dict(found)
    last = found[-1][0]
    first = max(found[0][0], last - timedelta(days=MAX_DAYS - 1))
    span = (last - first).days + 1
    return [(day, counts.get(day, 0)) for day in (first + timedelta(days=i) for i in range(span))]
