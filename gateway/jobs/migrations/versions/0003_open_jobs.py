"""Open jobs: a job that takes more files (POST /v1/jobs/{id}/files) until it is closed or cancelled.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The jobs made before this revision are all closed.
    op.add_column("tritonasr_jobs", sa.Column("open", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("tritonasr_jobs") as batch:
        batch.drop_column("open")
