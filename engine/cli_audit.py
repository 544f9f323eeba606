"""`engage audit verify`: check the audit log's hash chain end to end."""

from __future__ import annotations

import click

from engine import audit
from engine.runtime import Runtime


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log."""


@audit_group.command("verify")
@click.pass_obj
def verify(rt: Runtime) -> None:
    """Recompute every entry's hash; name the first entry that does not check out (exit 1)."""
    rt.require_schema()
    with rt.session_factory() as session:
        result = audit.verify(session=session)
    if result.ok:
        click.echo(f"audit log: {result.entries} entries checked, chain OK")
        return
    if result.first_bad is not None:
        at = result.at.isoformat() if result.at else "?"
        where = f"entry {result.first_bad} ({at}, {result.action})"
    else:
        where = "the end of the log"
    click.echo(f"audit log: BROKEN at {where}: {result.problem} ({result.entries} entries checked)")
    raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(audit_group)
