"""Alembic's entry point, run by `posttrain.migrations.upgrade` on the connection it holds
(and locks): there is no alembic.ini and no URL of its own."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
