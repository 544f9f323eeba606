"""The `engage` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine import audit
from engine.checking import check_definitions
from engine.crypto import ensure_key_files
from engine.definitions import load_definitions
from engine.runtime import Runtime, UsageProblem, utcnow
from engine.settings import Settings
from engine.store import db
from engine.store.defqueries import record_review, sync_definitions
from engine.yamlsource import SourceErrors

pass_runtime = click.make_pass_decorator(Runtime)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """engage: compliance-aware patient engagement campaigns.

    Configuration comes from the environment: DATABASE_URL (default: SQLite under var/),
    ENGAGE_MASTER_KEY(_FILE), ENGAGE_INDEX_KEY(_FILE), ENGAGE_DEFINITIONS_DIR,
    ENGAGE_PUBLIC_URL.
    """
    ctx.obj = Runtime(Settings.from_env())


def definitions_option(f):  # type: ignore[no-untyped-def]
    return click.option(
        "--path",
        "path",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder holding campaigns/, templates/ and policies/ (default: "
        "ENGAGE_DEFINITIONS_DIR or the current folder).",
    )(f)


@main.command()
@pass_runtime
def init(rt: Runtime) -> None:
    """Create the database schema and, when absent, the key files (mode 0600)."""
    for path in ensure_key_files(rt.settings):
        click.echo(f"created key file {path} (mode 0600): keep it out of backups of the data")
    before = db.current_revision(rt.engine)
    db.upgrade(rt.engine)
    after = db.current_revision(rt.engine)
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    click.echo(f"database {rt.engine.url.render_as_string(hide_password=True)}: {state} {after}")
    rt.keyring  # noqa: B018 - refuse loose key files now rather than at first use


@main.command()
@definitions_option
@pass_runtime
def sync(rt: Runtime, path: Path | None) -> None:
    """Load the definition folders into the database as the active set (all or nothing)."""
    root = path or rt.settings.definitions_dir
    try:
        defs = load_definitions(root)
    except SourceErrors as exc:
        for error in exc.errors:
            click.echo(str(error), err=True)
        raise click.ClickException(
            f"{len(exc.errors)} problem(s); nothing was loaded and the active set is unchanged"
        ) from exc
    rt.require_schema()
    with rt.session_factory.begin() as session:
        now = utcnow()
        result = sync_definitions(session=session, defs=defs, now=now)
        if not result.unchanged:
            audit.record(
                session=session,
                actor=audit.cli_actor(),
                action="definitions_loaded",
                subject=f"definitions:{result.version}",
                details={
                    "version": result.version,
                    "previous": result.previous,
                    "added": list(result.added),
                    "changed": list(result.changed),
                    "removed": list(result.removed),
                },
                now=now,
            )
    if result.unchanged:
        click.echo(f"definitions {result.version} already active; nothing changed")
        return
    click.echo(f"definitions {result.version} active (was {result.previous or 'none'})")
    for label, paths in (
        ("added", result.added),
        ("changed", result.changed),
        ("removed", result.removed),
    ):
        for p in paths:
            click.echo(f"  {label}: {p}")
    click.echo(
        f"{len(defs.campaigns)} campaigns, {len(defs.templates)} template variants, "
        f"{len(defs.policies)} policies ({len(defs.policy_set.rules)} rules)"
    )


@main.command()
@definitions_option
@click.option("--quiet", "-q", is_flag=True, help="Print problems only.")
@pass_runtime
def check(rt: Runtime, path: Path | None, quiet: bool) -> None:
    """Validate definitions, lint every template, run every policy's tests."""
    report = check_definitions(path or rt.settings.definitions_dir)
    for line in report.errors:
        click.echo(f"error: {line}", err=True)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    if not quiet:
        for line in report.notes:
            click.echo(line)
    defs = report.definitions
    if defs is not None:
        click.echo(
            f"definitions {defs.version}: {len(defs.campaigns)} campaigns, "
            f"{len(defs.templates)} template variants, {len(defs.policy_set.rules)} rules; "
            f"policy tests: {report.tests_run - report.tests_failed} passed, "
            f"{report.tests_failed} failed"
        )
    if not report.ok:
        raise click.ClickException(f"{len(report.errors)} problem(s) found")


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any row is rejected.")
@pass_runtime
def import_(rt: Runtime, paths: tuple[str, ...], progress: bool | None, strict: bool) -> None:
    """Import patients, prescriptions, appointments, consents, slots (CSV) and FHIR R4 bundles.

    Bad rows are reported as file:row: reason; good rows are kept.
    """
    from engine.importer import import_files

    with rt.session_factory() as session:
        defs = rt.definitions(session)
    report = import_files(
        paths,
        session_factory=rt.session_factory,
        keyring=rt.keyring,
        progress=sys.stderr.isatty() if progress is None else progress,
        purposes=set(defs.purposes),
        declared_attributes=set(defs.patient_attributes),
    )
    for line in report.lines():
        click.echo(line)
    if strict and not report.ok:
        raise click.ClickException("some rows were rejected (the others were imported)")
    if any(f.error for f in report.files):
        raise click.ClickException("some files could not be read (the others were imported)")


@main.command()
@click.argument("template_id")
@click.option("--by", "by", required=True, help="The compliance reviewer's user name.")
@click.option("--locale", help="Only this locale variant (default: every variant).")
@click.option("--reject", is_flag=True, help="Record a rejection instead of an approval.")
@click.option("--comment", help="The reviewer's comment.")
@pass_runtime
def approve(
    rt: Runtime, template_id: str, by: str, locale: str | None, reject: bool, comment: str | None
) -> None:
    """Approve (or reject) the active version of a template's variants."""
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        variants = [
            t
            for (tid, loc), t in sorted(defs.templates.items())
            if tid == template_id and (locale is None or loc == locale)
        ]
        if not variants:
            known = ", ".join(sorted({tid for tid, _ in defs.templates}))
            raise UsageProblem(
                f"unknown template {template_id!r}"
                f"{f' in locale {locale}' if locale else ''}; known: {known}"
            )
        for t in variants:
            record_review(
                session=session,
                template_id=t.id,
                locale=t.locale,
                version=t.version,
                decision="reject" if reject else "approve",
                by=by,
                now=utcnow(),
                comment=comment,
            )
            audit.record(
                session=session,
                actor=audit.cli_actor(by),
                action="template_rejected" if reject else "template_approved",
                subject=f"template:{t.id}.{t.locale}",
                details={"version": t.version, "source": "cli"},
                now=utcnow(),
            )
            verb = "rejected" if reject else "approved"
            click.echo(f"{verb} {t.file} version {t.version} by {by}")


def _register() -> None:
    from engine import (
        cli_audit,
        cli_consent,
        cli_decide,
        cli_demo,
        cli_keys,
        cli_ops,
        cli_rights,
        cli_sandbox,
        cli_serve,
        cli_users,
        cli_worker,
    )

    for module in (
        cli_decide,
        cli_consent,
        cli_ops,
        cli_worker,
        cli_sandbox,
        cli_serve,
        cli_users,
        cli_demo,
        cli_audit,
        cli_rights,
        cli_keys,
    ):
        module.register(main)


_register()
