"""Consent evidence (decisions, jurisdictions), the per-person views rules read (traits,
trait list elements, resolved consent), audiences with their destinations, materialised
membership per destination, membership deltas, and the person-change journal.

Revision ID: 0005_consent_audiences
Revises: 0004_destinations
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_consent_audiences'
down_revision = '0004_destinations'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audience_deltas',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('audience_pk', sa.BigInteger(), nullable=False),
    sa.Column('audience_id', sa.String(length=63), nullable=False),
    sa.Column('destination_pk', sa.BigInteger(), nullable=False),
    sa.Column('destination_id', sa.String(length=63), nullable=False),
    sa.Column('person_pk', sa.BigInteger(), nullable=False),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('created_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audience_deltas'))
    )
    with op.batch_alter_table('audience_deltas', schema=None) as batch_op:
        batch_op.create_index('ix_audience_deltas_audience', ['audience_pk', 'id'], unique=False)
        batch_op.create_index('ix_audience_deltas_destination', ['destination_pk', 'id'], unique=False)

    op.create_table('audience_destination_members',
    sa.Column('audience_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('destination_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('since_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('audience_pk', 'destination_pk', 'person_pk', name=op.f('pk_audience_destination_members'))
    )
    op.create_table('audience_destinations',
    sa.Column('audience_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('destination_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('audience_pk', 'destination_pk', name=op.f('pk_audience_destinations'))
    )
    op.create_table('audience_members',
    sa.Column('audience_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('person_id', sa.String(length=40), nullable=False),
    sa.Column('join_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('audience_pk', 'person_pk', name=op.f('pk_audience_members'))
    )
    op.create_table('audiences',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('audience_id', sa.String(length=63), nullable=False),
    sa.Column('display_name', sa.String(length=256), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('rule', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('etag', sa.String(length=40), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('evaluated_us', sa.BigInteger(), nullable=True),
    sa.Column('windows_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audiences')),
    sa.UniqueConstraint('audience_id', name=op.f('uq_audiences_audience_id'))
    )
    op.create_table('consent_decisions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('decision_id', sa.String(length=40), nullable=False),
    sa.Column('identifier_pk', sa.BigInteger(), nullable=False),
    sa.Column('purpose', sa.String(length=64), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('origin', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('jurisdiction', sa.String(length=8), nullable=False),
    sa.Column('opt_out', sa.Boolean(), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('detail', sa.String(length=512), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_consent_decisions')),
    sa.UniqueConstraint('decision_id', name=op.f('uq_consent_decisions_decision_id'))
    )
    with op.batch_alter_table('consent_decisions', schema=None) as batch_op:
        batch_op.create_index('ix_consent_decisions_identifier', ['identifier_pk', 'purpose'], unique=False)

    op.create_table('consent_jurisdictions',
    sa.Column('identifier_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('jurisdiction', sa.String(length=8), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('identifier_pk', name=op.f('pk_consent_jurisdictions'))
    )
    op.create_table('person_changes',
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('reason', sa.String(length=16), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('person_pk', 'reason', name=op.f('pk_person_changes'))
    )
    op.create_table('person_consent',
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('purpose', sa.String(length=64), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('resolved_by', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('person_pk', 'purpose', name=op.f('pk_person_consent'))
    )
    with op.batch_alter_table('person_consent', schema=None) as batch_op:
        batch_op.create_index('ix_person_consent_purpose', ['purpose', 'granted'], unique=False)

    op.create_table('person_trait_elements',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('person_pk', sa.BigInteger(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('num', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_person_trait_elements'))
    )
    with op.batch_alter_table('person_trait_elements', schema=None) as batch_op:
        batch_op.create_index('ix_person_trait_elements_num', ['key', 'num'], unique=False)
        batch_op.create_index('ix_person_trait_elements_person', ['person_pk'], unique=False)
        batch_op.create_index('ix_person_trait_elements_text', ['key', 'text'], unique=False)

    op.create_table('person_traits',
    sa.Column('person_pk', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('num', sa.Float(), nullable=True),
    sa.Column('flag', sa.Boolean(), nullable=True),
    sa.Column('ts_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('person_pk', 'key', name=op.f('pk_person_traits'))
    )
    with op.batch_alter_table('person_traits', schema=None) as batch_op:
        batch_op.create_index('ix_person_traits_num', ['key', 'num'], unique=False)
        batch_op.create_index('ix_person_traits_text', ['key', 'text'], unique=False)
        batch_op.create_index('ix_person_traits_ts', ['key', 'ts_us'], unique=False)
    # Persons stored before this revision get their views (traits, consent) built by the
    # first pass over the change journal.
    op.execute("INSERT INTO person_changes (person_pk, reason, event_id) SELECT id, 'IDENTITY', '' FROM persons")


def downgrade() -> None:
    with op.batch_alter_table('person_traits', schema=None) as batch_op:
        batch_op.drop_index('ix_person_traits_ts')
        batch_op.drop_index('ix_person_traits_text')
        batch_op.drop_index('ix_person_traits_num')

    op.drop_table('person_traits')
    with op.batch_alter_table('person_trait_elements', schema=None) as batch_op:
        batch_op.drop_index('ix_person_trait_elements_text')
        batch_op.drop_index('ix_person_trait_elements_person')
        batch_op.drop_index('ix_person_trait_elements_num')

    op.drop_table('person_trait_elements')
    with op.batch_alter_table('person_consent', schema=None) as batch_op:
        batch_op.drop_index('ix_person_consent_purpose')

    op.drop_table('person_consent')
    op.drop_table('person_changes')
    op.drop_table('consent_jurisdictions')
    with op.batch_alter_table('consent_decisions', schema=None) as batch_op:
        batch_op.drop_index('ix_consent_decisions_identifier')

    op.drop_table('consent_decisions')
    op.drop_table('audiences')
    op.drop_table('audience_members')
    op.drop_table('audience_destinations')
    op.drop_table('audience_destination_members')
    with op.batch_alter_table('audience_deltas', schema=None) as batch_op:
        batch_op.drop_index('ix_audience_deltas_destination')
        batch_op.drop_index('ix_audience_deltas_audience')

    op.drop_table('audience_deltas')
