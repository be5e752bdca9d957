"""The delivery outbox and its log (deliveries, one row per platform request, one per
attempt), the keys sent to each audience destination, destination delivery bookkeeping, and
erasure progress (state updates, the erase deliveries).

Revision ID: 0006_delivery
Revises: 0005_consent_audiences
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_delivery'
down_revision = '0005_consent_audiences'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('destination_pk', sa.BigInteger(), nullable=False),
    sa.Column('destination_id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=24), nullable=False),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('status_reason', sa.String(length=64), nullable=False),
    sa.Column('batch_key', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('platform_event', sa.String(length=256), nullable=False),
    sa.Column('person_pk', sa.BigInteger(), nullable=True),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('audience_pk', sa.BigInteger(), nullable=True),
    sa.Column('audience_id', sa.String(length=63), nullable=False),
    sa.Column('erasure_id', sa.String(length=40), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_us', sa.BigInteger(), nullable=False),
    sa.Column('claim_token', sa.String(length=32), nullable=False),
    sa.Column('lease_until_us', sa.BigInteger(), nullable=True),
    sa.Column('expire_us', sa.BigInteger(), nullable=True),
    sa.Column('created_us', sa.BigInteger(), nullable=False),
    sa.Column('updated_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_audience', ['audience_pk'], unique=False)
        batch_op.create_index('ix_deliveries_batch_due', ['destination_pk', 'status', 'batch_key', 'next_attempt_us'],
                              unique=False)
        batch_op.create_index('ix_deliveries_due', ['destination_pk', 'status', 'next_attempt_us'], unique=False)
        batch_op.create_index('ix_deliveries_erasure', ['erasure_id'], unique=False)
        batch_op.create_index('ix_deliveries_event', ['event_id'], unique=False)
        batch_op.create_index('ix_deliveries_lease', ['status', 'lease_until_us'], unique=False)
        batch_op.create_index('ix_deliveries_person', ['person_id'], unique=False)
        batch_op.create_index('ix_deliveries_person_pk', ['person_pk'], unique=False)

    op.create_table('delivery_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_pk', sa.BigInteger(), nullable=False),
    sa.Column('batch_pk', sa.BigInteger(), nullable=False),
    sa.Column('classification', sa.String(length=16), nullable=False),
    sa.Column('platform_error_code', sa.String(length=128), nullable=False),
    sa.Column('error', sa.String(length=1024), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_attempts'))
    )
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.create_index('ix_delivery_attempts_delivery', ['delivery_pk', 'id'], unique=False)

    op.create_table('delivery_batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('destination_pk', sa.BigInteger(), nullable=False),
    sa.Column('time_us', sa.BigInteger(), nullable=False),
    sa.Column('http_status', sa.Integer(), nullable=False),
    sa.Column('latency_us', sa.BigInteger(), nullable=False),
    sa.Column('excerpt', sa.Text(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_batches'))
    )
    with op.batch_alter_table('audience_destination_members', schema=None) as batch_op:
        batch_op.add_column(sa.Column('keys', sa.JSON(), nullable=True))

    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('send_after_us', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('last_success_us', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('last_failure_us', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('identity_erasures', schema=None) as batch_op:
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deliveries', sa.JSON(), nullable=True))
    # Erasures recorded before delivery existed were finished locally and told nobody.
    op.execute("UPDATE identity_erasures SET state = 'COMPLETED' WHERE state = 'PENDING'")



def downgrade() -> None:
    with op.batch_alter_table('identity_erasures', schema=None) as batch_op:
        batch_op.drop_column('deliveries')
        batch_op.drop_column('updated_at')

    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.drop_column('last_failure_us')
        batch_op.drop_column('last_success_us')
        batch_op.drop_column('send_after_us')

    with op.batch_alter_table('audience_destination_members', schema=None) as batch_op:
        batch_op.drop_column('keys')

    op.drop_table('delivery_batches')
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_attempts_delivery')

    op.drop_table('delivery_attempts')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_person_pk')
        batch_op.drop_index('ix_deliveries_person')
        batch_op.drop_index('ix_deliveries_lease')
        batch_op.drop_index('ix_deliveries_event')
        batch_op.drop_index('ix_deliveries_erasure')
        batch_op.drop_index('ix_deliveries_due')
        batch_op.drop_index('ix_deliveries_batch_due')
        batch_op.drop_index('ix_deliveries_audience')

    op.drop_table('deliveries')
