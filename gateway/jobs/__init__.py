"""Batch jobs: files uploaded or named under `--jobs-root`, transcribed by a pool of workers in every
gateway process, kept with their results in a database that all replicas share (docs/jobs.md).

- store: the tables (SQLAlchemy Core), claiming work with a lease, results; migrations: Alembic's
- paths: server-side paths under the jobs root, nothing outside it
- workers: the pool that claims files and transcribes them through the gateway's OfflineRunner
- routes: the HTTP API (`/v1/jobs`)
"""
