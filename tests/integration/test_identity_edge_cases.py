"""Edge cases of the identity graph found in review: pins in the fast path, erasure and replays,
idempotency after erasure, batching, concurrency and snapshots on PostgreSQL, input validation."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from identity.blocklist import BlocklistEntry
from identity.identifiers import Identifier
from identity.models import IdentifierRow, LinkRow
from identity.operations import IdentityOperations, RawSighting
from identity.policy import IdentityPolicy
from identity.queries import list_history, person_pk_by_identifier, person_view
from stitchgraph.db import Database
from tests.support.grpc_client import rich_error
from tests.support.identity import A, Ident, U, at, held, identify, person_of, rebuild


def _pinned_split_where_pin_partner_is_not_a_person_label(ops: IdentityOperations, db: Database) -> None:
    """alice (pk 1); d2 (pk 2), d1 (pk 3) linked d1-d2; then alice-d1 joins them (label 2).
    Splitting the link alice-d1 pins (1, 3): afterwards {d1, d2} has label 2, so the
    pinned node d1 (pk 3) is not its person's label."""
    identify(ops, db, [U("alice")], 0)
    identify(ops, db, [A("d2"), A("d1")], 1)
    identify(ops, db, [U("alice"), A("d1")], 2)
    person = person_of(db, U("alice"))
    with db.transaction() as session:
        ops.split(session, person.person_id, detach=[],
                  remove_links=[(Identifier(*U("alice")), Identifier(*A("d1")))], allow_remerge=False,
                  operator="op", reason="wrong link")
    assert held(person_of(db, A("d2"))) == {A("d1"), A("d2")}
    assert held(person_of(db, U("alice"))) == {U("alice")}


def test_a_pinned_split_holds_when_the_pinned_partner_is_not_in_the_batch(
        ops: IdentityOperations, db: Database) -> None:
    _pinned_split_where_pin_partner_is_not_a_person_label(ops, db)
    # New evidence alice-d2: the pinned split must refuse it (as a replay does), not crash.
    outcome = identify(ops, db, [U("alice"), A("d2")], 3)
    assert [d.decision for d in outcome.decisions] == ["refused"]
    assert held(person_of(db, U("alice"))) == {U("alice")}


def test_a_pinned_split_holds_when_the_pinned_partner_is_in_the_batch(
        ops: IdentityOperations, db: Database) -> None:
    _pinned_split_where_pin_partner_is_not_a_person_label(ops, db)
    # d1 appears in the batch (alone), so the pin check finds a phantom singleton for d1
    # instead of d1's person and the link alice-d2 is accepted across the pinned split.
    with db.transaction() as session:
        ops.observe(session, [RawSighting([A("d1")], at(3)), RawSighting([U("alice"), A("d2")], at(3))])
    assert held(person_of(db, U("alice"))) == {U("alice")}, "a pinned split was re-merged by new evidence"
    stats = rebuild(ops, db)
    assert (stats.relabelled, stats.decisions_changed) == (0, 0)


def test_a_retroactive_blocklist_leaves_no_history_for_a_new_identifier_to_inherit(
        ops: IdentityOperations, db: Database) -> None:
    identify(ops, db, [U("alice")], 0)
    # "zzz" is the primary of a call with an ignored junk value: history row with a_pk = pk(zzz).
    identify(ops, db, [A("zzz"), U("undefined")], 1)
    with db.transaction() as session:
        current = ops.policy(session).policy
        policy = IdentityPolicy(blocklist=(BlocklistEntry("anonymous_id", "zzz", None, False, None),),
                                type_limits=current.type_limits)
        ops.update_policy(session, policy, etag="", operator="op")
    identify(ops, db, [U("carol")], 2)  # gets pk max(id)+1: the pk "zzz" had
    with db.read() as session:
        pk = person_pk_by_identifier(session, Identifier(*U("carol")))
        assert pk is not None
        entries = list_history(session, pk, kind=None, after=None, limit=50)
    assert entries == [], f"carol inherited history of a deleted identifier: {[e.kind for e in entries]}"


def test_times_seen_does_not_depend_on_batching(ops: IdentityOperations, db: Database) -> None:
    pair = [U("alice"), A("d1")]
    with db.transaction() as session:
        ops.observe(session, [RawSighting(pair, at(0), event_id="e1"), RawSighting(pair, at(5), event_id="e2"),
                              RawSighting(pair, at(9), event_id="e3")])
    with db.read() as session:
        link = session.execute(select(LinkRow)).scalar_one()
        times_seen, last_seen = link.times_seen, link.last_seen_us
    # One call at a time gives times_seen 3 and last_seen at minute 9.
    assert (times_seen, last_seen) == (3, int(at(9).timestamp() * 1_000_000))


def _order(ops: IdentityOperations, db: Database, erase_first: bool) -> dict[Ident, str]:
    # bob's person holds d1; c2's person holds d2; alice's person holds crm c1.
    identify(ops, db, [U("bob"), A("d1")], 0)
    identify(ops, db, [("crm_id", "c2"), A("d2")], 0)
    identify(ops, db, [U("alice"), ("crm_id", "c1")], 0)
    old = RawSighting([U("alice"), A("d1"), A("d2")], at(1), event_id="old")
    # alice-d1 refused (two user_ids), alice-d2 refused (two crm_ids): nothing links d1 to d2.

    def erase() -> None:
        with db.transaction() as session:
            ops.erase(session, person_id=None, identifier=Identifier(*U("alice")), operator="op", reason="gdpr")

    if erase_first:
        erase()
        with db.transaction() as session:
            ops.observe(session, [old])
    else:
        with db.transaction() as session:
            ops.observe(session, [old])
        erase()
    return {i: person_of(db, i).person_id for i in (U("bob"), A("d1"), ("crm_id", "c2"), A("d2"))}


def test_old_evidence_replayed_after_erasure_does_not_create_links_the_evidence_never_made(
        db: Database, db_url: str) -> None:
    after_erasure = _order(IdentityOperations(db), db, erase_first=True)
    # In the other order d1 and d2 stay apart: the evidence linked each of them only to alice.
    assert after_erasure[U("bob")] != after_erasure[("crm_id", "c2")], \
        "the erased identifier's evidence, replayed, merged two persons it never linked"


def test_operator_merge_overriding_a_pin_leaves_nothing_for_a_rebuild_to_change(
        ops: IdentityOperations, db: Database) -> None:
    identify(ops, db, [U("alice"), A("d1")], 0)
    identify(ops, db, [A("d1"), A("d2")], 1)
    person = person_of(db, U("alice"))
    with db.transaction() as session:  # pin (d2, alice): d1-d2 is refused PINNED_SPLIT
        ops.split(session, person.person_id, detach=[Identifier(*A("d2"))], remove_links=[], allow_remerge=False,
                  operator="op", reason="")
    with db.transaction() as session:  # deletes the pin, adds a forced link alice-d2 only
        ops.merge(session, [person_of(db, U("alice")).person_id, person_of(db, A("d2")).person_id],
                  operator="op", reason="", override_pins=True)
    with db.read() as session:
        stale = session.execute(select(LinkRow.decision, LinkRow.reason).where(
            LinkRow.reason == "PINNED_SPLIT")).all()
    assert stale == [], "links refused only because of the deleted pin keep their stale decision"
    stats = rebuild(ops, db)
    assert (stats.relabelled, stats.decisions_changed) == (0, 0)


def test_identify_retried_after_erasure_is_refused_without_the_erased_identifiers(db_url: str) -> None:
    """A stored Identify response names the person's identifiers; after an erasure a retry
    with the same request_id must neither return them nor run again as new evidence."""
    import grpc

    from stitchgraph.v1 import common_pb2, identity_service_pb2_grpc
    from stitchgraph.v1 import identity_service_pb2 as pb
    from tests.support.grpc_client import running_server, server_settings

    with running_server(server_settings(db_url)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        request = pb.IdentifyRequest(request_id="req-erase-1", identifiers=[
            common_pb2.Identifier(type="user_id", value="alice"),
            common_pb2.Identifier(type="email", value="Alice.Smith@gmail.com")])
        first = stub.Identify(request)
        stub.ErasePerson(pb.ErasePersonRequest(name=first.person.name, operator="dpo", reason="gdpr"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Identify(request)
        lookup = pb.LookupPersonRequest(identifier=common_pb2.Identifier(type="user_id", value="alice"))
        with pytest.raises(grpc.RpcError) as not_found:
            stub.LookupPerson(lookup)
    # The retry neither returns the erased identifiers nor runs again as new evidence.
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REQUEST_SUBJECT_ERASED"
    assert "alice" not in error.message
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND


def test_ingest_reads_the_policy_under_the_graph_lock(db: Database) -> None:
    """While a writer blocklisting a value holds the graph lock, a concurrent Identify must
    wait for it and then apply the new policy, as some serial order would."""
    if not db.is_postgres:
        pytest.skip("SQLite writers begin IMMEDIATE, so the policy is read under the lock")
    import threading
    import time

    from sqlalchemy import text

    admin, ingest = IdentityOperations(db), IdentityOperations(db)
    identify(ingest, db, [U("alice")], 0)  # seeds the policy row
    errors: list[BaseException] = []

    def late_identify() -> None:
        try:
            identify(ingest, db, [A("zzz"), U("bob")], 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with db.transaction() as session:
        current = admin.policy(session).policy
        admin.update_policy(session, IdentityPolicy(
            blocklist=(BlocklistEntry("anonymous_id", "zzz", None, False, None),),
            type_limits=current.type_limits), etag="", operator="op")
        worker = threading.Thread(target=late_identify)
        worker.start()
        with db.engine.connect() as probe:
            for _ in range(200):
                if probe.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                      "AND NOT granted")).scalar():
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the concurrent Identify never waited for the graph lock")
    worker.join(30)
    assert not errors
    with db.read() as session:
        stored = session.execute(select(IdentifierRow.value).where(IdentifierRow.type == "anonymous_id")).all()
    assert stored == [], "a value blocklisted by a committed policy change became an identifier"


def test_a_read_session_is_one_snapshot(db: Database) -> None:
    """``Database.read()`` is one consistent snapshot on PostgreSQL too: a write committed
    between person_view's queries must not make GetPerson fail."""
    if not db.is_postgres:
        pytest.skip("SQLite read transactions are snapshots")
    import threading

    from sqlalchemy import event

    ops = IdentityOperations(db)
    identify(ops, db, [U("alice"), A("d1")], 0)
    person_id = person_of(db, U("alice")).person_id
    fired = threading.Event()

    def erase_now() -> None:
        with db.transaction() as session:
            ops.erase(session, person_id=person_id, identifier=None, operator="op", reason="gdpr")

    def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if not fired.is_set() and statement.lstrip().startswith("SELECT identifiers.id, identifiers.type"):
            fired.set()
            worker = threading.Thread(target=erase_now)
            worker.start()
            worker.join(30)

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        with db.read() as session:
            pk = person_pk_by_identifier(session, Identifier(*U("alice")))
            assert pk is not None
            view = person_view(session, pk)  # raises StopIteration at READ COMMITTED
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
    assert fired.is_set()
    assert held(view) == {U("alice"), A("d1")}


def test_event_id_with_a_nul_is_invalid_argument_on_both_backends(db: Database) -> None:
    """A NUL in event_id is INVALID_ARGUMENT on both backends (PostgreSQL cannot store it)."""
    from stitchgraph.errors import InvalidArgument

    ops = IdentityOperations(db)
    with pytest.raises(InvalidArgument), db.transaction() as session:
        ops.identify(session, RawSighting([U("a"), A("b")], at(0), event_id="ev\x00x"))


def test_an_erased_identifier_is_reported_at_its_position_in_the_request(ops: IdentityOperations,
                                                                         db: Database) -> None:
    identify(ops, db, [U("alice"), A("phone")], 0)
    with db.transaction() as session:
        ops.erase(session, person_id=None, identifier=Identifier(*U("alice")), operator="dpo", reason="gdpr")
    outcome = identify(ops, db, [A("laptop"), U("alice")], 1)  # old evidence, dated before the erasure
    assert [(i.index, i.reason) for i in outcome.ignored] == [(1, "ERASED")]


def test_a_refusal_decided_on_late_evidence_is_in_history_as_in_order_arrival(ops: IdentityOperations,
                                                                               db: Database) -> None:
    identify(ops, db, [U("alice"), A("kiosk")], 10)
    identify(ops, db, [U("bob"), A("kiosk")], 5)  # late: bob was at the kiosk first, so alice is refused
    with db.read() as session:
        pk = person_pk_by_identifier(session, Identifier(*U("alice")))
        assert pk is not None
        refusals = [e for e in list_history(session, pk, kind="REFUSED", after=None, limit=50)]
    assert [(e.reason, {e.pair[0], e.pair[1]}) for e in refusals] == [
        ("TYPE_LIMIT", {Identifier(*U("alice")), Identifier(*A("kiosk"))})]
