"""Cohort imports (sources, the cohorts each imports, current members, snapshots, held
snapshots' members, Heap sync pages seen) and the trait write-back state (values last queued
per trait destination and person).

Revision ID: 0008_cohorts
Revises: 0007_scheduler
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_cohorts'
down_revision = '0007_scheduler'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cohort_heap_sync_pages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source_pk', sa.BigInteger(), nullable=False),
    sa.Column('segment_id', sa.String(length=128), nullable=False),
    sa.Column('sync_task_id', sa.String(length=128), nullable=False),
    sa.Column('page_number', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('snapshot_pk', sa.BigInteger(), nullable=False),
    sa.Column('received_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohort_heap_sync_pages')),
    sa.UniqueConstraint('source_pk', 'segment_id', 'sync_task_id', 'page_number', 'action',
                        name='uq_cohort_heap_sync_pages_page')
    )
    op.create_table('cohort_held_members',
    sa.Column('snapshot_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('member_key', sa.String(length=320), nullable=False),
    sa.Column('candidates', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('snapshot_pk', 'member_key', name=op.f('pk_cohort_held_members'))
    )
    op.create_table('cohort_imports',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source_pk', sa.BigInteger(), nullable=False),
    sa.Column('cohort_key', sa.String(length=128), nullable=False),
    sa.Column('trait_name', sa.String(length=128), nullable=False),
    sa.Column('schedule', sa.String(length=128), nullable=False),
    sa.Column('display_name', sa.String(length=256), nullable=False),
    sa.Column('member_identifier_type', sa.String(length=64), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('last_snapshot_pk', sa.BigInteger(), nullable=True),
    sa.Column('last_snapshot_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohort_imports')),
    sa.UniqueConstraint('source_pk', 'cohort_key', name=op.f('uq_cohort_imports_source_pk_cohort_key')),
    sa.UniqueConstraint('trait_name', name=op.f('uq_cohort_imports_trait_name'))
    )
    with op.batch_alter_table('cohort_imports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cohort_imports_source_pk'), ['source_pk'], unique=False)

    op.create_table('cohort_members',
    sa.Column('cohort_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('member_key', sa.String(length=320), nullable=False),
    sa.Column('identifier_pk', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('cohort_pk', 'member_key', name=op.f('pk_cohort_members'))
    )
    with op.batch_alter_table('cohort_members', schema=None) as batch_op:
        batch_op.create_index('ix_cohort_members_identifier_pk', ['identifier_pk'], unique=False)

    op.create_table('cohort_snapshots',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source_pk', sa.BigInteger(), nullable=False),
    sa.Column('cohort_pk', sa.BigInteger(), nullable=False),
    sa.Column('snapshot_id', sa.String(length=63), nullable=False),
    sa.Column('cohort_key', sa.String(length=128), nullable=False),
    sa.Column('trait_name', sa.String(length=128), nullable=False),
    sa.Column('mode', sa.String(length=8), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('added_count', sa.BigInteger(), nullable=False),
    sa.Column('removed_count', sa.BigInteger(), nullable=False),
    sa.Column('new_identifier_count', sa.BigInteger(), nullable=False),
    sa.Column('ignored_count', sa.BigInteger(), nullable=False),
    sa.Column('snapshot_us', sa.BigInteger(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('apply_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('operator', sa.String(length=256), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohort_snapshots')),
    sa.UniqueConstraint('source_pk', 'snapshot_id', name=op.f('uq_cohort_snapshots_source_pk_snapshot_id'))
    )
    with op.batch_alter_table('cohort_snapshots', schema=None) as batch_op:
        batch_op.create_index('ix_cohort_snapshots_cohort', ['cohort_pk', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_cohort_snapshots_source_pk'), ['source_pk'], unique=False)

    op.create_table('cohort_sources',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source_id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('display_name', sa.String(length=256), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('credentials_ref', sa.String(length=1024), nullable=False),
    sa.Column('max_removed_percent', sa.Integer(), nullable=False),
    sa.Column('empty_hold_min_members', sa.BigInteger(), nullable=False),
    sa.Column('etag', sa.String(length=40), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohort_sources')),
    sa.UniqueConstraint('source_id', name=op.f('uq_cohort_sources_source_id'))
    )
    op.create_table('trait_writeback_values',
    sa.Column('destination_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('key', sa.String(length=160), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('destination_pk', 'person_pk', 'key', name=op.f('pk_trait_writeback_values'))
    )


def downgrade() -> None:
    op.drop_table('trait_writeback_values')
    op.drop_table('cohort_sources')
    with op.batch_alter_table('cohort_snapshots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cohort_snapshots_source_pk'))
        batch_op.drop_index('ix_cohort_snapshots_cohort')

    op.drop_table('cohort_snapshots')
    with op.batch_alter_table('cohort_members', schema=None) as batch_op:
        batch_op.drop_index('ix_cohort_members_identifier_pk')

    op.drop_table('cohort_members')
    with op.batch_alter_table('cohort_imports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cohort_imports_source_pk'))

    op.drop_table('cohort_imports')
    op.drop_table('cohort_held_members')
    op.drop_table('cohort_heap_sync_pages')
