"""Alembic environment for engage, configured from Python (see engine.store.db.upgrade).

When the caller passes a connection in `config.attributes["connection"]` the migrations
run on it, inside the caller's transaction. Otherwise (the `alembic` command line, with
`-c engine/store/migrations/alembic.ini`) the URL comes from `sqlalchemy.url` or from
DATABASE_URL via Settings.from_env().
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from engine.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url() -> str:
    from engine.settings import Settings

    return config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from engine.store.db import make_engine, migrating

    engine = make_engine(_url())
    try:
        with migrating(engine) as own_connection:  # as engine.store.db.upgrade migrates
            _configure(own_connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
