"""`engage demo`: set up a demo installation and run it (sandbox, worker, web) until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from engine.accounts import ROLE_NAMES
from engine.runtime import Runtime, UsageProblem, utcnow

if TYPE_CHECKING:
    from engine.demo import DemoSetup
    from engine.demo_services import DemoServices

MONITOR_SECONDS = 0.5


@click.command()
@click.option(
    "--var-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
    help="Where the demo keeps its SQLite database, keys and generated data.",
)
@click.option("--reset", is_flag=True, help="Start over: remove the demo's database first.")
@click.option("--seed", type=int, default=7, show_default=True, help="Synthetic data seed.")
@click.option("--patients", type=click.IntRange(20, 1000), default=300, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--sandbox-port",
    type=click.IntRange(0, 65535),
    default=8099,
    show_default=True,
    help="The sandbox provider's port (0: any free port).",
)
@click.option("--verbose", is_flag=True, help="Log worker ticks and requests (JSON lines).")
@click.pass_obj
def demo(
    rt: Runtime,
    var_dir: Path,
    reset: bool,
    seed: int,
    patients: int,
    host: str,
    port: int,
    sandbox_port: int,
    verbose: bool,
) -> None:
    """Run a demo: synthetic patients, the sandbox provider, the worker and the admin app.

    Run it from the repository root (definitions from ENGAGE_DEFINITIONS_DIR, default the
    current folder). Texts start arriving in the phone simulator within a minute.
    """
    from engine import demo as d
    from engine.demo_services import DemoServices

    try:
        d.check_folders(rt.settings.definitions_dir)
    except d.DemoError as exc:
        raise UsageProblem(str(exc)) from exc
    if reset:
        for path in d.reset(var_dir):
            click.echo(f"removed {path}")
    try:
        services = DemoServices.bind(
            rt.settings, var_dir, host=host, port=port, sandbox_port=sandbox_port
        )
    except OSError as exc:
        raise UsageProblem(
            f"cannot listen on {host}:{port} or the sandbox port {sandbox_port} ({exc}): "
            "pass --port / --sandbox-port (0 picks a free one)"
        ) from exc
    try:
        click.echo(f"setting up the demo in {var_dir} ...")
        started = time.monotonic()
        result = d.setup(services.settings, now=utcnow(), seed=seed, patients=patients)
        _quiet_logs(verbose)
        services.start()
    except d.DemoError as exc:
        services.stop()
        raise UsageProblem(str(exc)) from exc
    except BaseException:
        services.stop()
        raise
    _guide(services, result, time.monotonic() - started)
    _run_until_stopped(services, started)


def _quiet_logs(verbose: bool) -> None:
    from engine.worker import configure_logging

    configure_logging(logging.INFO if verbose else logging.WARNING)
    # werkzeug logs each request at INFO; the simulator polls every few seconds.
    logging.getLogger("werkzeug").setLevel(logging.INFO if verbose else logging.WARNING)


def _guide(services: DemoServices, result: DemoSetup, seconds: float) -> None:
    url = services.public_url
    rejected = len(result.imported.rejections)
    click.echo(
        f"ready in {seconds:.1f} s: {result.patients} patients"
        + (f" ({rejected} rows rejected: see {services.settings.var_dir}/data)" if rejected else "")
        + f", definitions {result.definitions}, "
        + f"{len(result.approved)} template versions approved by compliance-demo"
    )
    if result.reused:
        click.echo(
            f"reusing the database in {services.settings.var_dir}: reminders it sent already "
            "are not sent again (--reset starts over)"
        )
    click.echo("")
    click.echo(f"  Admin            {url}/admin")
    click.echo(f"  Phone simulator  {url}/admin/sandbox")
    click.echo(f"  Sandbox provider {services.sandbox.url}/sandbox/messages.json")
    click.echo("")
    click.echo("  Sign in as (new passwords on every run):")
    for user in result.users:
        click.echo(f"    {user.username:<16} {user.password:<18} {ROLE_NAMES[user.role]}")
    click.echo("")
    click.echo("  What to try:")
    for line in (
        "1. Phone simulator (as demo-marketer): reminders arrive within a minute.",
        "2. Reply STOP as a patient: one confirmation comes back and their pending",
        "   texts are cancelled. START re-subscribes, HELP answers with the help text.",
        "3. Tap the link in an appointment reminder to book a visit on the patient page.",
        "4. Decisions and Audit log (as demo-compliance): why each text went, waited or",
        "   was blocked, rule by rule.",
        "5. Approvals and Templates: edit a template as demo-marketer, approve it as",
        "   demo-compliance.",
    ):
        click.echo(f"    {line}")
    click.echo("")
    click.echo("Ctrl-C stops the demo.")


def _run_until_stopped(services: DemoServices, started: float) -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM, saying when the first texts reach the phones.

    Both signals are handled here, not left to KeyboardInterrupt: a shell starts background
    jobs with SIGINT ignored, and Python then never raises it."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = 0
    try:
        while not stop.wait(MONITOR_SECONDS):
            if seen:
                continue
            seen = services.texts_on_phones()
            if seen:
                click.echo(
                    f"first texts on the phones {time.monotonic() - started:.1f} s after the start "
                    f"({seen} so far): {services.public_url}/admin/sandbox"
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        click.echo("stopping: worker, web app, sandbox ...")
        services.stop()
        click.echo("demo stopped")


def register(group: click.Group) -> None:
    group.add_command(demo)
