"""results.skipped_images: the images of a series the analysis left out, each with its reason.

Revision ID: 0003_hostile_skipped_images
Revises: 0002_alerts_admin_notifications
Create Date: 2026-12-05 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_hostile_skipped_images"
down_revision: str | Sequence[str] | None = "0002_alerts_admin_notifications"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("skipped_images", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("skipped_images")
