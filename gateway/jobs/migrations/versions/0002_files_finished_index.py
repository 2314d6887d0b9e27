"""An index of files by when they finished: expiring old jobs reads only those past the cutoff.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tritonasr_job_files_finished", "tritonasr_job_files", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_tritonasr_job_files_finished", "tritonasr_job_files")
