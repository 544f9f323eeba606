"""Fixtures for integration tests: every test using them runs on SQLite AND PostgreSQL.

    db_url           a fresh, empty database URL ("sqlite" or "postgresql" in the test id)
    engine           an Engine on it, migrated to head (engine.store.db.upgrade)
    session_factory  sessionmaker bound to `engine`
    settings         engine.settings.Settings with var_dir, key files and database_url
    keyring          engine.crypto.Keyring from freshly created key files (mode 0600)

Provider sandbox (no database; not parametrised):

    sandbox          a running sandbox server (engine.sandbox) on a free 127.0.0.1 port, for
                     this test: .url, .account_sid, .auth_token, .messages(to=, status=)
                     (accepted messages in Twilio's JSON, oldest first), .accepted_per_to()
                     (above 1 for a number = a duplicate text), .create_requests_per_to(),
                     .callbacks(), .set_faults(**FaultConfig fields) (replaces all faults),
                     .reset(), .sandbox (the in-process engine.sandbox.service.Sandbox) and
                     .settings_for(settings) -> those settings pointed at it (transport
                     "twilio", its URL and credentials). Timeout faults hang 2 s.
    sandbox_factory  start_sandbox(**SandboxConfig fields) -> another handle like `sandbox`,
                     for a test that needs other timings (hang_seconds, delivered_delay_ms,
                     date_sent_day_granular...); stopped after the test
    twilio_settings  Settings without a database, pointed at `sandbox`

PostgreSQL: a database named engage_test_<random> is created for each test on the server
named by ENGAGE_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test)
and dropped afterwards. If the server cannot be reached the test FAILS; set
ENGAGE_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL half explicitly instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from engine.cli import main
from engine.crypto import Keyring, ensure_key_files, load_keys
from engine.sandbox.client import SandboxClient
from engine.sandbox.config import SANDBOX_FROM_NUMBER, SandboxConfig
from engine.sandbox.server import SandboxServer
from engine.sandbox.service import Sandbox
from engine.settings import Settings
from engine.store.db import make_engine, make_session_factory, normalize_url, upgrade

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def postgres_admin_url() -> str:
    return normalize_url(os.environ.get("ENGAGE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the test server, to create and drop databases."""
    if os.environ.get("ENGAGE_TEST_SKIP_POSTGRES") == "1":
        pytest.skip("PostgreSQL skipped: ENGAGE_TEST_SKIP_POSTGRES=1")
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    problem = None
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        problem = str(exc.orig).strip()
    if problem is not None:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL at {make_url(postgres_admin_url()).render_as_string()} is unreachable "
            f"({problem}). Start it, point ENGAGE_TEST_POSTGRES_URL at a server, or set "
            "ENGAGE_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL tests explicitly.",
            pytrace=False,
        )
    yield admin
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh empty database for this test; dropped afterwards on PostgreSQL."""
    if db_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'engage.db'}"
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    name = f"engage_test_{secrets.token_hex(6)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url()).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on `db_url`, migrated to the head revision."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    var = tmp_path / "var"
    return Settings(
        var_dir=var,
        database_url=db_url,
        master_key_file=var / "master.key",
        index_key_file=var / "index.key",
    )


@pytest.fixture
def keyring(settings: Settings) -> Keyring:
    ensure_key_files(settings)
    return load_keys(settings)


@dataclass
class SandboxHandle:
    """A running sandbox server and a client for its control endpoints."""

    server: SandboxServer
    client: SandboxClient

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def account_sid(self) -> str:
        return self.server.config.account_sid

    @property
    def auth_token(self) -> str:
        return self.server.config.auth_token

    @property
    def sandbox(self) -> Sandbox:
        return self.server.sandbox

    def messages(self, *, to: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        return self.client.messages(to=to, status=status)

    def accepted_per_to(self) -> dict[str, int]:
        return self.client.accepted_per_to()

    def create_requests_per_to(self) -> dict[str, int]:
        return self.client.create_requests_per_to()

    def callbacks(self) -> dict[str, int]:
        return self.client.callbacks()

    def set_faults(self, faults: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
        return self.client.set_faults(faults, **settings)

    def reset(self) -> None:
        self.client.reset()

    def settings_for(self, settings: Settings) -> Settings:
        return settings.with_(
            transport="twilio",
            twilio_api_base_url=self.url,
            twilio_account_sid=self.account_sid,
            twilio_auth_token=self.auth_token,
            twilio_from_number=SANDBOX_FROM_NUMBER,
        )


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxHandle]]:
    handles: list[SandboxHandle] = []

    def start_sandbox(**config: Any) -> SandboxHandle:
        server = SandboxServer(SandboxConfig(**{"port": 0, "hang_seconds": 2.0, **config}))
        handle = SandboxHandle(server, SandboxClient(server.start()))
        handles.append(handle)
        return handle

    yield start_sandbox
    for handle in handles:
        handle.client.close()
        handle.server.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxHandle]) -> SandboxHandle:
    return sandbox_factory()


@pytest.fixture
def twilio_settings(tmp_path: Path, sandbox: SandboxHandle) -> Settings:
    var = tmp_path / "var"
    return sandbox.settings_for(
        Settings(
            var_dir=var,
            database_url=f"sqlite:///{var / 'engage.db'}",
            master_key_file=var / "master.key",
            index_key_file=var / "index.key",
        )
    )


# --- the engage command, run in-process against the test database ---------------------------

REPO = Path(__file__).resolve().parents[2]


class Engage:
    """Runs `engage` in-process with an environment of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(main, list(args), env=self.env, catch_exceptions=False)
        assert result.exit_code == code, (args, result.output, result.stderr)
        return result


@pytest.fixture
def definitions(tmp_path: Path) -> Path:
    root = tmp_path / "defs"
    for folder in ("campaigns", "templates", "policies"):
        shutil.copytree(REPO / folder, root / folder)
    return root


@pytest.fixture
def engage(db_url: str, tmp_path: Path, definitions: Path) -> Engage:
    run = Engage(
        {
            "DATABASE_URL": db_url,
            "ENGAGE_VAR_DIR": str(tmp_path / "var"),
            "ENGAGE_DEFINITIONS_DIR": str(definitions),
            "ENGAGE_PUBLIC_URL": "https://rh.example",
            "ENGAGE_WORKER_NICE": "0",  # in-process: would lower the test run's priority
        }
    )
    run("init")
    run("sync")
    return run
