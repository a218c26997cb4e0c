"""The inspections table: one row per decision, with its review.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_bytes", sa.Integer(), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("image_name", sa.String(512), nullable=True),
        sa.Column("image_kept", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("is_anomalous", sa.Boolean(), nullable=False),
        sa.Column("backbone_model", sa.String(200), nullable=False),
        sa.Column("bank_model", sa.String(200), nullable=False),
        sa.Column("settings_hash", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("api_key_id", sa.String(64), nullable=True),
        sa.Column("review_label", sa.String(20), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.Column("reviewed_by", sa.String(128), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("added_to", sa.String(200), nullable=True),
    )
    op.create_index("ix_inspections_created_at", "inspections", ["created_at"])
    op.create_index("ix_inspections_image_sha256", "inspections", ["image_sha256"])
    op.create_index("ix_inspections_product_id", "inspections", ["product", "id"])
    op.create_index("ix_inspections_review", "inspections", ["review_label", "is_anomalous"])


def downgrade() -> None:
    op.drop_table("inspections")
