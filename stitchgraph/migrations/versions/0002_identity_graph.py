"""Identity graph: identifiers, persons, clusters, links, pins, history, tombstones,
erasures, the stored identity policy and the identifier key counter; the subjects of
stored idempotent responses (so an erasure can forget them).

Revision ID: 0002_identity_graph
Revises: 0001_foundation
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_identity_graph'
down_revision = '0001_foundation'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('forgotten', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table('identity_counters',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_identity_counters'))
    )
    op.create_table('idempotency_subjects',
    sa.Column('method', sa.String(length=200), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('subject', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('method', 'request_id', 'subject', name=op.f('pk_idempotency_subjects'))
    )
    with op.batch_alter_table('idempotency_subjects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idempotency_subjects_subject'), ['subject'], unique=False)
    op.create_table('identifiers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=256), nullable=False),
    sa.Column('person_pk', sa.BigInteger(), nullable=False),
    sa.Column('first_seen_us', sa.BigInteger(), nullable=False),
    sa.Column('person_ref', sa.String(length=40), nullable=False),
    sa.Column('reborn', sa.Boolean(), nullable=False),
    sa.Column('match_keys', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identifiers')),
    sa.UniqueConstraint('type', 'value', name=op.f('uq_identifiers_type_value'))
    )
    with op.batch_alter_table('identifiers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identifiers_person_pk'), ['person_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_identifiers_person_ref'), ['person_ref'], unique=False)

    op.create_table('identity_clusters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('max_us', sa.BigInteger(), nullable=False),
    sa.Column('max_event', sa.String(length=256), nullable=False),
    sa.Column('max_rank', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_clusters'))
    )
    op.create_table('identity_erasures',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('identifier_hashes', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('operator', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_erasures'))
    )
    with op.batch_alter_table('identity_erasures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_erasures_person_id'), ['person_id'], unique=False)

    op.create_table('identity_history',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('a_pk', sa.BigInteger(), nullable=True),
    sa.Column('b_pk', sa.BigInteger(), nullable=True),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('related_person_ids', sa.JSON(), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('operator', sa.String(length=128), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('subject', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_history'))
    )
    with op.batch_alter_table('identity_history', schema=None) as batch_op:
        batch_op.create_index('ix_identity_history_a_pk', ['a_pk'], unique=False)
        batch_op.create_index('ix_identity_history_b_pk', ['b_pk'], unique=False)

    op.create_table('identity_links',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('a_pk', sa.BigInteger(), nullable=False),
    sa.Column('b_pk', sa.BigInteger(), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('operator', sa.String(length=128), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('times_seen', sa.Integer(), nullable=False),
    sa.Column('last_seen_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_links')),
    sa.UniqueConstraint('a_pk', 'b_pk', name=op.f('uq_identity_links_a_pk_b_pk'))
    )
    with op.batch_alter_table('identity_links', schema=None) as batch_op:
        batch_op.create_index('ix_identity_links_b_pk', ['b_pk'], unique=False)

    op.create_table('identity_pins',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('a_pk', sa.BigInteger(), nullable=False),
    sa.Column('b_pk', sa.BigInteger(), nullable=False),
    sa.Column('operator', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_pins')),
    sa.UniqueConstraint('a_pk', 'b_pk', name=op.f('uq_identity_pins_a_pk_b_pk'))
    )
    with op.batch_alter_table('identity_pins', schema=None) as batch_op:
        batch_op.create_index('ix_identity_pins_b_pk', ['b_pk'], unique=False)

    op.create_table('identity_policy',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('policy', sa.JSON(), nullable=False),
    sa.Column('etag', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_identity_policy'))
    )
    op.create_table('identity_tombstones',
    sa.Column('identifier_hash', sa.String(length=64), nullable=False),
    sa.Column('erased_us', sa.BigInteger(), nullable=False),
    sa.Column('erasure_id', sa.String(length=40), nullable=False),
    sa.PrimaryKeyConstraint('identifier_hash', name=op.f('pk_identity_tombstones'))
    )
    op.create_table('persons',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('anchor_pk', sa.BigInteger(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('merges', sa.Integer(), nullable=False),
    sa.Column('type_counts', sa.JSON(), nullable=False),
    sa.Column('pinned', sa.Integer(), nullable=False),
    sa.Column('cluster_pk', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_persons')),
    sa.UniqueConstraint('person_id', name=op.f('uq_persons_person_id'))
    )
    with op.batch_alter_table('persons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_persons_cluster_pk'), ['cluster_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('idempotency_subjects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotency_subjects_subject'))
    op.drop_table('idempotency_subjects')
    op.drop_table('identity_counters')
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.drop_column('forgotten')
    with op.batch_alter_table('persons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_persons_cluster_pk'))

    op.drop_table('persons')
    op.drop_table('identity_tombstones')
    op.drop_table('identity_policy')
    with op.batch_alter_table('identity_pins', schema=None) as batch_op:
        batch_op.drop_index('ix_identity_pins_b_pk')

    op.drop_table('identity_pins')
    with op.batch_alter_table('identity_links', schema=None) as batch_op:
        batch_op.drop_index('ix_identity_links_b_pk')

    op.drop_table('identity_links')
    with op.batch_alter_table('identity_history', schema=None) as batch_op:
        batch_op.drop_index('ix_identity_history_b_pk')
        batch_op.drop_index('ix_identity_history_a_pk')

    op.drop_table('identity_history')
    with op.batch_alter_table('identity_erasures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_erasures_person_id'))

    op.drop_table('identity_erasures')
    op.drop_table('identity_clusters')
    with op.batch_alter_table('identifiers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identifiers_person_ref'))
        batch_op.drop_index(batch_op.f('ix_identifiers_person_pk'))

    op.drop_table('identifiers')
