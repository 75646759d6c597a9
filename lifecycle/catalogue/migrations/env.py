"""Alembic environment: migrates the engine handed over by lifecycle.catalogue.db.init_db."""

from alembic import context
from sqlmodel import SQLModel

import lifecycle.catalogue.models  # noqa: F401  (registers the tables)

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = config.attributes["engine"]
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        context.run_migrations()


run_migrations_online()
