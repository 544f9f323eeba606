"""The demo, set up on a temporary var dir and, when asked, running (sandbox, web app and
optionally the worker in threads), for the demo's integration and browser tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from engine import demo, planner
from engine import outbox_status as status
from engine.demo_services import DemoServices
from engine.runtime import Runtime, utcnow
from engine.settings import Settings
from engine.store import models as m

PATIENTS = 120  # enough for every zone group to hold patients; quick to set up


def base_settings(definitions: Path) -> Settings:
    return Settings.from_env({"ENGAGE_DEFINITIONS_DIR": str(definitions)})


def demo_settings(tmp_path: Path, definitions: Path) -> Settings:
    """The demo's settings for a var dir under tmp_path (no servers)."""
    return demo.demo_settings(
        base_settings(definitions),
        tmp_path / "demo",
        public_url="http://127.0.0.1:8000",
        sandbox_url="http://127.0.0.1:8099",
    )


@dataclass
class RunningDemo:
    services: DemoServices
    result: demo.DemoSetup

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def url(self) -> str:
        return self.services.public_url

    def password(self, username: str) -> str:
        return next(u.password for u in self.result.users if u.username == username)


@contextmanager
def running_demo(
    tmp_path: Path, definitions: Path, *, worker: bool, now: datetime | None = None
) -> Iterator[RunningDemo]:
    """Set up the demo and start its servers on free ports; stop them all afterwards."""
    services = DemoServices.bind(
        base_settings(definitions), tmp_path / "demo", port=0, sandbox_port=0
    )
    try:
        result = demo.setup(services.settings, now=now or utcnow(), patients=PATIENTS)
        services.start(worker=worker, plan_interval=2.0)
        yield RunningDemo(services, result)
    finally:
        services.stop()


def waiting_rows(settings: Settings, external_id: str) -> list[str]:
    """The statuses of the patient's rows still waiting to be sent (queued, deferred)."""
    rt = Runtime(settings)
    try:
        with rt.session_factory() as session:
            return list(
                session.scalars(
                    select(m.Outbox.status)
                    .join(m.Patient, m.Patient.id == m.Outbox.patient_id)
                    .where(
                        m.Patient.external_id == external_id,
                        m.Outbox.status.in_(status.WAITING),
                        m.Outbox.campaign_id != "program",
                    )
                )
            )
    finally:
        rt.engine.dispose()


def patients_waiting(settings: Settings) -> set[str]:
    """External ids of patients with campaign rows waiting to be sent."""
    rt = Runtime(settings)
    try:
        with rt.session_factory() as session:
            return set(
                session.scalars(
                    select(m.Patient.external_id)
                    .join(m.Outbox, m.Patient.id == m.Outbox.patient_id)
                    .where(m.Outbox.status.in_(status.WAITING), m.Outbox.campaign_id != "program")
                )
            )
    finally:
        rt.engine.dispose()


def plan(settings: Settings, now: datetime, horizon: timedelta = timedelta(minutes=5)) -> None:
    """One planner tick at `now` (a long horizon queues later reminders too: rows a STOP
    must cancel)."""
    rt = Runtime(settings)
    try:
        with rt.session_factory() as session:
            defs = rt.definitions(session)
        planner.plan(
            defs,
            session_factory=rt.session_factory,
            keyring=rt.keyring,
            now=now,
            horizon=horizon,
            public_url=settings.public_url,
        )
    finally:
        rt.engine.dispose()


def stop_confirmation(settings: Settings, external_id: str) -> str:
    """The program's STOP confirmation in the patient's language (policies/program.yaml)."""
    rt = Runtime(settings)
    try:
        with rt.session_factory() as session:
            locale = session.scalars(
                select(m.Patient.locale).where(m.Patient.external_id == external_id)
            ).one()
            return rt.definitions(session).program.text("stop", locale)
    finally:
        rt.engine.dispose()
