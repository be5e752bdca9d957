"""Event ledger: events (deduplicated by event_id), trait evidence and per-identifier trait
state, per-identifier event totals (computed traits), the schema registry and parked events.

Revision ID: 0003_events
Revises: 0002_identity_graph
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_events'
down_revision = '0002_identity_graph'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('event_mappings',
    sa.Column('id', sa.String(length=63), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('source_event', sa.String(length=1024), nullable=False),
    sa.Column('canonical_event', sa.String(length=64), nullable=False),
    sa.Column('required_properties', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(length=1024), nullable=False),
    sa.Column('property_map', sa.JSON(), nullable=False),
    sa.Column('built_in', sa.Boolean(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('etag', sa.String(length=40), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event_mappings')),
    sa.UniqueConstraint('source', 'source_event', name=op.f('uq_event_mappings_source_source_event'))
    )
    op.create_table('event_totals',
    sa.Column('identifier_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('value_micros', sa.BigInteger(), nullable=False),
    sa.Column('first_us', sa.BigInteger(), nullable=False),
    sa.Column('last_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('identifier_pk', 'event', 'currency', name=op.f('pk_event_totals'))
    )
    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('source_event', sa.String(length=1024), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('receive_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('identifier_pk', sa.BigInteger(), nullable=True),
    sa.Column('value', sa.String(length=40), nullable=True),
    sa.Column('value_micros', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=True),
    sa.Column('order_id', sa.String(length=256), nullable=True),
    sa.Column('identity_only', sa.Boolean(), nullable=False),
    sa.Column('generated_event_id', sa.Boolean(), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_events_event_id'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_event_time', ['event', 'occurred_us'], unique=False)
        batch_op.create_index('ix_events_person_order', ['identifier_pk', 'occurred_us', 'event_id'], unique=False)

    op.create_table('parked_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('source_event', sa.String(length=1024), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.String(length=1024), nullable=False),
    sa.Column('receive_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_parked_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_parked_events_event_id'))
    )
    with op.batch_alter_table('parked_events', schema=None) as batch_op:
        batch_op.create_index('ix_parked_events_receive', ['receive_time', 'id'], unique=False)

    op.create_table('trait_evidence',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('identifier_pk', sa.BigInteger(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('op', sa.String(length=8), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trait_evidence')),
    sa.UniqueConstraint('event_id', 'key', 'op', name=op.f('uq_trait_evidence_event_id_key_op'))
    )
    with op.batch_alter_table('trait_evidence', schema=None) as batch_op:
        batch_op.create_index('ix_trait_evidence_identifier_key', ['identifier_pk', 'key'], unique=False)

    op.create_table('trait_state',
    sa.Column('identifier_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('lw_us', sa.BigInteger(), nullable=True),
    sa.Column('lw_event', sa.String(length=256), nullable=True),
    sa.Column('lw_unset', sa.Boolean(), nullable=False),
    sa.Column('lw_value', sa.JSON(), nullable=True),
    sa.Column('lw_source', sa.String(length=64), nullable=True),
    sa.Column('so_us', sa.BigInteger(), nullable=True),
    sa.Column('so_event', sa.String(length=256), nullable=True),
    sa.Column('so_value', sa.JSON(), nullable=True),
    sa.Column('so_source', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('identifier_pk', 'key', name=op.f('pk_trait_state'))
    )


def downgrade() -> None:
    op.drop_table('trait_state')
    with op.batch_alter_table('trait_evidence', schema=None) as batch_op:
        batch_op.drop_index('ix_trait_evidence_identifier_key')

    op.drop_table('trait_evidence')
    with op.batch_alter_table('parked_events', schema=None) as batch_op:
        batch_op.drop_index('ix_parked_events_receive')

    op.drop_table('parked_events')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_person_order')
        batch_op.drop_index('ix_events_event_time')

    op.drop_table('events')
    op.drop_table('event_totals')
    op.drop_table('event_mappings')
