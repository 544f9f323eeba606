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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        var_dir = Path(env.get("ENGAGE_VAR_DIR", "var"))
        return cls(
            var_dir=var_dir,
            database_url=env.get("DATABASE_URL") or f"sqlite:///{var_dir / 'engage.db'}",
            master_key_file=Path(env.get("ENGAGE_MASTER_KEY_FILE", var_dir / "master.key")),
            index_key_file=Path(env.get("ENGAGE_INDEX_KEY_FILE", var_dir / "index.key")),
            master_key=env.get("ENGAGE_MASTER_KEY") or None,
            index_key=env.get("ENGAGE_INDEX_KEY") or None,
            definitions_dir=Path(env.get("ENGAGE_DEFINITIONS_DIR", ".")),
            public_url=env.get("ENGAGE_PUBLIC_URL", "http://localhost:8000").rstrip("/"),
            transport=env.get("ENGAGE_TRANSPORT", "console"),
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
