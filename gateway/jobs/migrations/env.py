"""Alembic's environment for the jobs database. The gateway runs it through `JobStore.migrate()`,
which hands over a connection already inside the transaction (and lock) the whole upgrade runs in;
`alembic` on the command line is not needed."""
from alembic import context

from tritonasr.gateway.jobs.store import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the jobs migrations run from the gateway (tritonasr.gateway.jobs.store.JobStore.migrate)")
# The version table has a name of its own: the database may be shared with other applications.
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
