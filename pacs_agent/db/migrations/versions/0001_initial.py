"""Initial schema: exactly the tables of pacs_agent/db/models.py.

Revision ID: 0001_initial
Revises: (none)
Create Date: 2026-11-26 22:55:01.413174
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("associations",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
    sa.Column("peer_address", sa.String(length=64), nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("close_reason", sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_table("events",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("entity", sa.String(length=16), nullable=False),
    sa.Column("entity_id", sa.String(length=64), nullable=False),
    sa.Column("kind", sa.String(length=48), nullable=False),
    sa.Column("from_state", sa.String(length=16), nullable=False),
    sa.Column("to_state", sa.String(length=16), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=True),
    sa.Column("detail", sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_series_instance_uid"), ["series_instance_uid"], unique=False)

    op.create_table("series",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
    sa.Column("modality", sa.String(length=16), nullable=False),
    sa.Column("series_description", sa.String(length=128), nullable=False),
    sa.Column("accession_number", sa.String(length=16), nullable=False),
    sa.Column("instance_count", sa.Integer(), nullable=False),
    sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.Enum("RECEIVING", "COMPLETE", "IGNORED", "QUEUED", "ANALYSED", "FAILED", name="seriesstate", native_enum=False, length=16), nullable=False),
    sa.Column("ignore_reason", sa.Text(), nullable=False),
    sa.Column("input_priority", sa.Integer(), nullable=False),
    sa.Column("analysed_instance_count", sa.Integer(), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("series_instance_uid")
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_series_study_instance_uid"), ["study_instance_uid"], unique=False)

    op.create_table("workers",
    sa.Column("id", sa.String(length=128), nullable=False),
    sa.Column("hostname", sa.String(length=128), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("current_job_id", sa.Integer(), nullable=True),
    sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_table("instances",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("association_id", sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(["association_id"], ["associations.id"], ),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("sop_instance_uid")
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_association_id"), ["association_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_instances_series_id"), ["series_id"], unique=False)

    op.create_table("jobs",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("status", sa.Enum("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", name="jobstatus", native_enum=False, length=16), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("reason", sa.String(length=32), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lease_owner", sa.String(length=128), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text(), nullable=False),
    sa.Column("model_version", sa.String(length=64), nullable=False),
    sa.Column("supersedes_job_id", sa.Integer(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["supersedes_job_id"], ["jobs.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_claim", ["status", "priority", "not_before", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_series_id"), ["series_id"], unique=False)

    op.create_table("outputs",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=False),
    sa.Column("kind", sa.Enum("SR", "SC", "SEG", name="outputkind", native_enum=False, length=16), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("sop_instance_uid")
    )
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outputs_job_id"), ["job_id"], unique=False)

    op.create_table("results",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=False),
    sa.Column("pe_present", sa.Boolean(), nullable=False),
    sa.Column("pe_probability", sa.Float(), nullable=False),
    sa.Column("probabilities", sa.JSON(), nullable=False),
    sa.Column("labels", sa.JSON(), nullable=False),
    sa.Column("chunk_probabilities", sa.JSON(), nullable=False),
    sa.Column("key_images", sa.JSON(), nullable=False),
    sa.Column("flag", sa.Enum("CRITICAL", "HIGH", "REVIEW", "ERROR", "ROUTINE", name="flag", native_enum=False, length=16), nullable=False),
    sa.Column("timings_s", sa.JSON(), nullable=False),
    sa.Column("model_name", sa.String(length=128), nullable=False),
    sa.Column("model_version", sa.String(length=64), nullable=False),
    sa.Column("model_sha256", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("job_id")
    )
    op.create_table("studies",
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("accession_number", sa.String(length=16), nullable=False),
    sa.Column("flag", sa.Enum("CRITICAL", "HIGH", "REVIEW", "ERROR", "ROUTINE", name="flag", native_enum=False, length=16), nullable=False),
    sa.Column("flag_rank", sa.Integer(), nullable=False),
    sa.Column("pe_probability", sa.Float(), nullable=True),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=True),
    sa.Column("summary", sa.Text(), nullable=False),
    sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ),
    sa.PrimaryKeyConstraint("study_instance_uid")
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studies_flag_rank"), ["flag_rank"], unique=False)

    op.create_table("deliveries",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("output_id", sa.Integer(), nullable=False),
    sa.Column("destination", sa.String(length=64), nullable=False),
    sa.Column("status", sa.Enum("PENDING", "SENDING", "DELIVERED", "FAILED", "CANCELLED", name="deliverystatus", native_enum=False, length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_dicom_status", sa.Integer(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=False),
    sa.Column("lease_owner", sa.String(length=128), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["output_id"], ["outputs.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("output_id", "destination")
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_deliveries_claim", ["status", "next_attempt_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_deliveries_output_id"), ["output_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_output_id"))
        batch_op.drop_index("ix_deliveries_claim")

    op.drop_table("deliveries")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_flag_rank"))

    op.drop_table("studies")
    op.drop_table("results")
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outputs_job_id"))

    op.drop_table("outputs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_series_id"))
        batch_op.drop_index("ix_jobs_claim")

    op.drop_table("jobs")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_series_id"))
        batch_op.drop_index(batch_op.f("ix_instances_association_id"))

    op.drop_table("instances")
    op.drop_table("workers")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_series_state"))

    op.drop_table("series")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_series_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_events_job_id"))
        batch_op.drop_index(batch_op.f("ix_events_at"))

    op.drop_table("events")
    op.drop_table("associations")
