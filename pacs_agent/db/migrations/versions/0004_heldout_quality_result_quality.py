"""Results keep the input-quality gate's report (pe_model.quality): a JSON column ``quality``.

Revision ID: 0004_hq_result_quality
Revises: 0003_hostile_skipped_images
Create Date: 2026-12-05 08:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_hq_result_quality"
down_revision: str | Sequence[str] | None = "0003_hostile_skipped_images"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows stored before the gate existed get an empty report (the model flag stands for them).
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quality", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("quality")
