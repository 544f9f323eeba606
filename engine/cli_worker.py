"""`engage worker` and `engage dispatch`: the sending side of the command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import click

from engine.runtime import Runtime, UsageProblem, utcnow
from engine.store import db
from engine.transports.base import Transport


def _build(rt: Runtime) -> tuple[Any, Transport]:
    """A session factory whose SQLite transactions take the write lock up front (the
    claim is one writer transaction), and the configured transport."""
    rt.require_schema()
    engine = db.make_engine(rt.settings.database_url, sqlite_immediate=True)
    from engine.transports.registry import make_transport

    return db.make_session_factory(engine), make_transport(rt.settings)


def _worker(rt: Runtime, clock: Callable[[], datetime], **options: Any) -> Any:
    from engine.gc_tuning import freeze_startup_heap
    from engine.worker import Worker, WorkerConfig, default_worker_id

    lower_priority(rt.settings.worker_nice)
    session_factory, transport = _build(rt)
    options["worker_id"] = options.get("worker_id") or default_worker_id()
    options["plan_interval"] = options.get("plan_interval") or None
    options["stale_after"] = timedelta(seconds=options["stale_after"])
    if options.get("rate_per_second") is None:
        options["rate_per_second"] = rt.settings.send_rate_per_second
    config = WorkerConfig(**options)
    built = Worker(
        config=config,
        settings=rt.settings,
        session_factory=session_factory,
        keyring=rt.keyring,
        transport=transport,
        clock=clock,
        plan_session_factory=rt.session_factory,
    )
    freeze_startup_heap()
    return built


def lower_priority(increment: int) -> None:
    """Planning and dispatching are batch work; answering Twilio's webhooks (STOP above
    all) is not. Where both share a host's cores, the worker yields the CPU to the web
    server (ENGAGE_WORKER_NICE, default 10; 0 leaves the priority alone)."""
    if increment > 0 and hasattr(os, "nice"):
        os.nice(increment)


def _stop_while_starting() -> threading.Event:
    """SIGTERM or SIGINT before the worker is built (imports, connections, the transport
    take a while on a loaded machine) is kept, not fatal: the worker stops once built."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stopping.set())
    return stopping


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--id", "worker_id", help="This worker's name (default: host-pid)."),
        click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True),
        click.option(
            "--concurrency", type=click.IntRange(1, 256), default=16, show_default=True,
            help="Provider calls in flight at once.",
        ),
        click.option(
            "--rate", "rate_per_second", type=click.FloatRange(min=0),
            help="Messages per second this process sends at most; 0: no limit (default: "
            "ENGAGE_SEND_RATE). With several workers, give each its share of the sender's.",
        ),
        click.option(
            "--stale-after", type=click.FloatRange(min=1), default=120.0, show_default=True,
            help="Seconds after which a row left `sending` is reconciled.",
        ),
        click.option("--max-attempts", type=click.IntRange(1), default=6, show_default=True),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


@click.command("worker")
@click.option("--dispatch-interval", type=click.FloatRange(min=0.05), default=2.0)
@click.option(
    "--plan-interval", type=click.FloatRange(min=0), default=60.0, help="0: do not plan here."
)
@click.option("--reconcile-interval", type=click.FloatRange(min=0.5), default=60.0)
@_common
@click.pass_obj
def worker(rt: Runtime, **options: Any) -> None:
    """Plan, dispatch and reconcile on a schedule until SIGTERM or Ctrl-C."""
    from engine.worker import configure_logging

    configure_logging()
    stopping = _stop_while_starting()
    w = _worker(rt, utcnow, **options)
    w.install_signal_handlers()
    if stopping.is_set():
        w.stop.set()
    raise SystemExit(w.run())


@click.command("dispatch")
@click.option("--once", is_flag=True, help="Send what is due now, then exit.")
@click.option("--at", "at_text", help="With --once: dispatch as of this time (ISO 8601).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True)
@_common
@click.pass_obj
def dispatch(rt: Runtime, once: bool, at_text: str | None, interval: float, **options: Any) -> None:
    """Reconcile stale rows, then send due rows: once (--once), or every --interval seconds."""
    from engine.cli_decide import parse_at
    from engine.worker import configure_logging

    configure_logging(logging.WARNING if once else logging.INFO)
    if at_text is not None and not once:
        raise UsageProblem("--at needs --once")
    at = parse_at(at_text) if at_text else None
    stopping = _stop_while_starting()
    w = _worker(
        rt, (lambda: at) if at else utcnow, plan_interval=None, dispatch_interval=interval,
        **options,
    )  # fmt: skip
    w.install_signal_handlers()
    if stopping.is_set():
        w.stop.set()
    if not once:
        raise SystemExit(w.run())
    reconciled = w.reconcile_tick()
    report = w.dispatch_tick()
    click.echo(json.dumps({"reconciled": reconciled.fields(), "dispatched": report.fields()}))


def register(group: click.Group) -> None:
    group.add_command(worker)
    group.add_command(dispatch)
