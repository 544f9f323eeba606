"""Configuration from the environment, read only when asked (`Settings.from_env()`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Everything the edges need to build engines, keys and clients."""

    var_dir: Path
    database_url: str
    master_key_file: Path
    index_key_file: Path
    master_key: str | None = None
    index_key: str | None = None
    definitions_dir: Path = Path(".")
    public_url: str = "http://localhost:8000"
    transport: str = "console"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base_url: str | None = None  # a Twilio-compatible server instead of api.twilio.com
    twilio_from_number: str | None = None
    twilio_messaging_service_sid: str | None = None
    status_callback_url: str | None = None  # None or "": do not ask for status callbacks
    send_rate_per_second: float = 50.0
    trust_proxy: bool = False  # honour X-Forwarded-* (behind one reverse proxy) for webhooks
    # Signs web sessions and CSRF tokens; by value, else the file (default var/secret.key).
    secret_key: str | None = None
    secret_key_file: Path | None = None
    # Patient page requests per client address and minute (0: no limit).
    page_rate_per_minute: int = 30
    # Sign-in attempts per client address and minute.
    login_rate_per_minute: int = 10
    # Processes a planner tick may use for a large population (engine.planner_parallel).
    plan_processes: int = 1
    # Niceness added by `engage worker` and `engage dispatch` (the web server keeps its own).
    worker_nice: int = 10
    # Master keys that only unwrap (during and after a rotation, docs/operations.md): by
    # value (base64, comma-separated) and as files (mode 0600, os.pathsep-separated).
    previous_master_keys: str | None = None
    previous_master_key_files: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        var_dir = Path(env.get("ENGAGE_VAR_DIR", "var"))
        public_url = env.get("ENGAGE_PUBLIC_URL", "http://localhost:8000").rstrip("/")
        return cls(
            var_dir=var_dir,
            database_url=env.get("DATABASE_URL") or f"sqlite:///{var_dir / 'engage.db'}",
            master_key_file=Path(env.get("ENGAGE_MASTER_KEY_FILE", var_dir / "master.key")),
            index_key_file=Path(env.get("ENGAGE_INDEX_KEY_FILE", var_dir / "index.key")),
            master_key=env.get("ENGAGE_MASTER_KEY") or None,
            index_key=env.get("ENGAGE_INDEX_KEY") or None,
            definitions_dir=Path(env.get("ENGAGE_DEFINITIONS_DIR", ".")),
            public_url=public_url,
            transport=env.get("ENGAGE_TRANSPORT", "console"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=env.get("TWILIO_AUTH_TOKEN") or None,
            twilio_api_base_url=(env.get("TWILIO_API_BASE_URL") or "").rstrip("/") or None,
            twilio_from_number=env.get("TWILIO_FROM_NUMBER") or None,
            twilio_messaging_service_sid=env.get("TWILIO_MESSAGING_SERVICE_SID") or None,
            status_callback_url=env.get(
                "ENGAGE_STATUS_CALLBACK_URL", f"{public_url}/twilio/status"
            ),
            send_rate_per_second=float(env.get("ENGAGE_SEND_RATE", "50")),
            trust_proxy=env.get("ENGAGE_TRUST_PROXY", "") == "1",
            secret_key=env.get("ENGAGE_SECRET_KEY") or None,
            secret_key_file=Path(env.get("ENGAGE_SECRET_KEY_FILE", var_dir / "secret.key")),
            page_rate_per_minute=int(env.get("ENGAGE_PAGE_RATE", "30")),
            login_rate_per_minute=int(env.get("ENGAGE_LOGIN_RATE", "10")),
            plan_processes=max(1, int(env.get("ENGAGE_PLAN_PROCESSES", os.cpu_count() or 1))),
            worker_nice=max(0, int(env.get("ENGAGE_WORKER_NICE", "10"))),
            previous_master_keys=env.get("ENGAGE_PREVIOUS_MASTER_KEYS") or None,
            previous_master_key_files=tuple(
                Path(p)
                for p in env.get("ENGAGE_PREVIOUS_MASTER_KEY_FILES", "").split(os.pathsep)
                if p
            ),
        )

    @property
    def webhook_auth_token(self) -> str | None:
        """The token Twilio signs webhooks with; the sandbox's own when it is the transport
        and no Twilio token is configured (never for the real Twilio transport)."""
        if self.twilio_auth_token:
            return self.twilio_auth_token
        if self.transport == "sandbox":
            from engine.sandbox.config import SANDBOX_AUTH_TOKEN

            return SANDBOX_AUTH_TOKEN
        return None

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.var_dir / "secret.key"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
