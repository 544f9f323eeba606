"""`engage keys` (rotation, status) and `engage retention run`."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import click

from engine.crypto import (
    KeyConfigError,
    check_private,
    generate_key,
    key_id,
    read_key_file,
    write_key_chain,
    write_key_file,
)
from engine.runtime import Runtime, UsageProblem, utcnow


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@click.group()
def keys() -> None:
    """Rotate the master key and the blind-index key (docs/operations.md)."""


@keys.command()
@click.pass_obj
def status(rt: Runtime) -> None:
    """Data keys by wrapping master key and blind indexes by version, as JSON."""
    from engine.keys import data_key_counts, index_version_counts

    rt.require_schema()
    ring = rt.keyring
    with rt.session_factory() as session:
        data_keys = data_key_counts(session=session)
        indexes = index_version_counts(session=session)
    loaded = {ring.master_key_id: "current", **dict.fromkeys(ring.previous_master_keys, "previous")}
    report = {
        "master_key": ring.master_key_id,
        "data_keys": {
            kid: {"count": n, "key": loaded.get(kid, "NOT LOADED")} for kid, n in data_keys.items()
        },
        "retirable": sorted(set(ring.previous_master_keys) - set(data_keys)),
        "index_version": ring.index_version,
        "indexes": indexes,
    }
    click.echo(json.dumps(report, indent=2, sort_keys=True))


@keys.command()
@click.option(
    "--new-master-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The new master key (created, mode 0600, when the file does not exist). "
    "Default: a new key in ENGAGE_VAR_DIR/master-<id>.key.",
)
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True)
@click.pass_obj
def rotate(rt: Runtime, new_master_key_file: Path | None, batch_size: int) -> None:
    """Re-wrap every patient data key with a new master key, batch by batch.

    The configured master key and ENGAGE_PREVIOUS_MASTER_KEY(_FILE)S must open every data
    key; otherwise nothing is changed. Running again resumes (keys already wrapped by the
    new key are skipped).
    """
    from engine.keys import KeyRotationError, check_master_keys, rewrap_data_keys

    rt.require_schema()
    new = _existing_key(new_master_key_file)
    target = rt.keyring.with_master_key(new or generate_key())
    try:
        with rt.session_factory() as session:
            check_master_keys(session=session, keyring=target)
    except KeyRotationError as exc:
        raise UsageProblem(f"{exc}; nothing was changed") from exc
    path = new_master_key_file or rt.settings.var_dir / f"master-{target.master_key_id}.key"
    if new is None:
        write_key_file(path, target.master_key)
        click.echo(f"created {path} (mode 0600)")
    try:
        report = rewrap_data_keys(
            session_factory=rt.session_factory,
            keyring=target,
            now=utcnow,
            actor=_actor(),
            batch_size=batch_size,
        )
    except KeyRotationError as exc:  # a row that no loaded key opens: earlier batches stay
        raise click.ClickException(f"{exc}; run again once the key is loaded") from exc
    old = ", ".join(f"{n} from {kid}" for kid, n in sorted(report.rewrapped.items())) or "none"
    click.echo(
        f"re-wrapped {report.total} data key(s) with master key {target.master_key_id} "
        f"({old}) in {report.batches} batch(es)"
    )
    click.echo(
        f"next: ENGAGE_MASTER_KEY_FILE={path}, the old key in ENGAGE_PREVIOUS_MASTER_KEY_FILES;"
        " restart web and worker, run `engage keys rotate` again with the same file, then "
        "remove the old key once `engage keys status` lists it as retirable"
    )


def _existing_key(path: Path | None) -> bytes | None:
    if path is None or not path.exists():
        return None
    try:
        return read_key_file(path)
    except KeyConfigError as exc:
        raise UsageProblem(str(exc)) from exc


@keys.command("rotate-index")
@click.option(
    "--resume",
    is_flag=True,
    help="Add no key: bring indexes written by processes still on the old chain up to date.",
)
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True)
@click.pass_obj
def rotate_index(rt: Runtime, resume: bool, batch_size: int) -> None:
    """Add a key to the blind-index chain (index file) and upgrade every stored index."""
    from engine.keys import KeyRotationError, check_index_versions, upgrade_indexes

    rt.require_schema()
    ring = rt.keyring
    try:
        with rt.session_factory() as session:
            check_index_versions(session=session, keyring=ring)
    except KeyRotationError as exc:
        raise UsageProblem(f"{exc}; nothing was changed") from exc
    if not resume:
        if rt.settings.index_key:
            raise UsageProblem(
                "the index key comes from ENGAGE_INDEX_KEY: rotate with it in a file "
                "(ENGAGE_INDEX_KEY_FILE), then move the file's lines back into the variable"
            )
        path = rt.settings.index_key_file
        check_private(path)
        ring = ring.with_index_key(generate_key())
        write_key_chain(path, ring.index_chain)
        click.echo(f"{path}: index key v{ring.index_version} ({key_id(ring.index_key)}) added")
    try:
        report = upgrade_indexes(
            session_factory=rt.session_factory,
            keyring=ring,
            now=utcnow,
            actor=_actor(),
            batch_size=batch_size,
        )
    except (KeyRotationError, KeyConfigError) as exc:
        raise click.ClickException(f"{exc}; run `engage keys rotate-index --resume`") from exc
    upgraded = ", ".join(f"{n} {t}" for t, n in sorted(report.upgraded.items())) or "nothing"
    click.echo(
        f"phone indexes now v{ring.index_version}: upgraded {upgraded}; "
        f"{report.merged} duplicate suppression(s) merged"
    )
    if not resume:
        click.echo("next: restart web and worker, then run `engage keys rotate-index --resume`")


@click.group()
def retention() -> None:
    """Purge what policies/retention.yaml says is past its period."""


@retention.command("run")
@click.option("--at", "at_text", help="Purge as of this time (ISO 8601; default: now).")
@click.option("--dry-run", is_flag=True, help="Count what is due; change nothing.")
@click.pass_obj
def retention_run(rt: Runtime, at_text: str | None, dry_run: bool) -> None:
    """Purge message bodies, inbound texts, links and decisions past their period."""
    from engine.cli_decide import parse_at
    from engine.retention import purge_due

    at = parse_at(at_text)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        counts = purge_due(session=session, defs=defs, now=at, dry_run=dry_run, actor=_actor())
    if not counts.policy:
        raise UsageProblem("the active definitions have no policies/retention.yaml")
    click.echo(json.dumps({"at": at.isoformat(), "dry_run": dry_run, **counts.fields()}))


def register(group: click.Group) -> None:
    group.add_command(keys)
    group.add_command(retention)
