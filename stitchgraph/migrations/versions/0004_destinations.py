"""Destinations as configuration: one row per configured platform account, pixel or list
(kind, credentials reference, settings, consent purposes, events, state, etag).

Revision ID: 0004_destinations
Revises: 0003_events
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_destinations'
down_revision = '0003_events'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('destinations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('destination_id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('display_name', sa.String(length=256), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('credentials_ref', sa.String(length=1024), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('purposes', sa.JSON(), nullable=False),
    sa.Column('events', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('pause_reason', sa.String(length=1024), nullable=False),
    sa.Column('etag', sa.String(length=40), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_destinations')),
    sa.UniqueConstraint('destination_id', name=op.f('uq_destinations_destination_id'))
    )


def downgrade() -> None:
    op.drop_table('destinations')
