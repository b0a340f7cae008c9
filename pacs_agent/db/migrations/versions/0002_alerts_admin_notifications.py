"""Notifications of flagged studies (pacs_agent/notify/) and each attempt to send one.

Revision ID: 0002_alerts_admin_notifications
Revises: 0001_initial
Create Date: 2026-12-05 07:58:49.279994
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_alerts_admin_notifications"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("notifications",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("dedup_key", sa.String(length=255), nullable=False),
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=True),
    sa.Column("flag", sa.Enum("CRITICAL", "HIGH", "REVIEW", "ERROR", "ROUTINE", name="flag", native_enum=False, length=16), nullable=False),
    sa.Column("target", sa.String(length=64), nullable=False),
    sa.Column("kind", sa.String(length=16), nullable=False),
    sa.Column("escalation_level", sa.Integer(), nullable=False),
    sa.Column("escalated_from_id", sa.Integer(), nullable=True),
    sa.Column("status", sa.Enum("PENDING", "SENDING", "SENT", "FAILED", "CANCELLED", name="notificationstatus", native_enum=False, length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=False),
    sa.Column("lease_owner", sa.String(length=128), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("acknowledged_by", sa.String(length=128), nullable=False),
    sa.Column("acknowledged_via", sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(["escalated_from_id"], ["notifications.id"], ondelete="SET NULL"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("dedup_key")
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index("ix_notifications_claim", ["status", "next_attempt_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_notifications_study_instance_uid"), ["study_instance_uid"], unique=False)

    op.create_table("notification_attempts",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("notification_id", sa.Integer(), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ok", sa.Boolean(), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("retryable", sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(["notification_id"], ["notifications.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("notification_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notification_attempts_notification_id"), ["notification_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("notification_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notification_attempts_notification_id"))

    op.drop_table("notification_attempts")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notifications_study_instance_uid"))
        batch_op.drop_index("ix_notifications_claim")

    op.drop_table("notifications")
