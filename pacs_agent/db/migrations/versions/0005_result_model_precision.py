"""Results record the arithmetic the model ran in (pe_model.precision): a column ``model_precision``.

Revision ID: 0005_result_model_precision
Revises: 0004_hq_result_quality
Create Date: 2026-12-05 13:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_result_model_precision"
down_revision: str | Sequence[str] | None = "0004_hq_result_quality"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows stored before it was recorded get "" (unknown).
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_precision", sa.String(length=8), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("model_precision")
