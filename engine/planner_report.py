"""What a planner tick reports: rows inserted by campaign and status, decisions by rule,
and the audit entry's counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from engine.dryrun import DryRunSummary
from engine.planner_rows import PlannedRow


@dataclass
class CampaignPlan:
    """One campaign's share of a tick; `summary` counts the rows this tick inserted."""

    summary: DryRunSummary = field(default_factory=DryRunSummary)
    statuses: Counter[str] = field(default_factory=Counter)
    inserted: int = 0
    already_present: int = 0  # including `raced`
    raced: int = 0  # decided, but another planner inserted the row first
    links: int = 0

    def merge(self, other: CampaignPlan) -> None:
        """Add another process's share of the same tick."""
        self.summary.merge(other.summary)
        self.statuses.update(other.statuses)
        self.inserted += other.inserted
        self.already_present += other.already_present
        self.raced += other.raced
        self.links += other.links


@dataclass
class PlanReport:
    now: datetime
    horizon: timedelta
    campaigns: dict[str, CampaignPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    patients_seen: int = 0
    expired: int = 0
    duration: float = 0.0
    processes: int = 1
    stopped: bool = False  # asked to stop: the patients not reached are planned next tick

    @property
    def inserted(self) -> int:
        return sum(c.inserted for c in self.campaigns.values())

    @property
    def already_present(self) -> int:
        return sum(c.already_present for c in self.campaigns.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "horizon_seconds": int(self.horizon.total_seconds()),
            "patients": self.patients_seen,
            "inserted": self.inserted,
            "already_present": self.already_present,
            "expired": self.expired,
            "duration_seconds": round(self.duration, 3),
            "processes": self.processes,
            "stopped": self.stopped,
            "skipped": dict(self.skipped),
            "campaigns": {cid: _campaign_json(c) for cid, c in sorted(self.campaigns.items())},
        }


def _campaign_json(c: CampaignPlan) -> dict[str, Any]:
    return {
        "allow": c.summary.outcomes["allow"],
        "defer": c.summary.outcomes["defer"],
        "deny": c.summary.outcomes["deny"],
        "by_status": dict(c.statuses),
        "by_rule": dict(c.summary.deciding_rules.most_common()),
        "inserted": c.inserted,
        "already_present": c.already_present,
        "raced": c.raced,
        "links": c.links,
        "in_audience": c.summary.in_audience,
        "audience_errors": c.summary.audience_errors,
        "unapproved_templates": sorted(c.summary.unapproved_templates),
    }


def summary(report: PlanReport) -> dict[str, Any]:
    """Counts only (no patient): rows inserted by campaign and status, rows expired."""
    return {
        "inserted": report.inserted,
        "expired": report.expired,
        "already_present": report.already_present,
        "patients": report.patients_seen,
        "horizon_seconds": int(report.horizon.total_seconds()),
        "campaigns": {
            cid: {"inserted": c.inserted, "by_status": dict(sorted(c.statuses.items()))}
            for cid, c in sorted(report.campaigns.items())
            if c.inserted
        },
    }


def tally(report: PlanReport, rows: list[PlannedRow], ids: Mapping[str, int]) -> None:
    """Count the rows written (`ids`: the inserted ones' by key) into their campaigns.
    Rows of one campaign with one status, link or not and one decision (the policy memo
    shares decisions) are counted together."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        values, evaluation = row.values, row.evaluation
        if values["idempotency_key"] not in ids:  # another planner inserted it first
            plan = report.campaigns[values["campaign_id"]]
            plan.already_present += 1
            plan.raced += 1
            continue
        key = (values["campaign_id"], values["status"], row.link is not None)
        key += (id(evaluation.decision), id(evaluation.template), evaluation.approved)
        group = groups.get(key)
        if group is None:
            groups[key] = [evaluation, 1]
        else:
            group[1] += 1
    for (campaign_id, status, link, *_), (evaluation, count) in groups.items():
        plan = report.campaigns[campaign_id]
        plan.inserted += count
        plan.statuses[status] += count
        plan.links += count if link else 0
        plan.summary.add(evaluation, count)
