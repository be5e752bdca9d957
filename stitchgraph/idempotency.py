"""Idempotent mutations keyed by ``request_id`` (AIP-155).

A mutation that carries a ``request_id`` runs at most once: its response is stored
in the same transaction as its effects, and a repeat with the same ``request_id``
and the same request body gets the stored response back without running again. A
repeat with a *different* body is refused with ``INVALID_ARGUMENT``, reason
``REQUEST_ID_REUSED``: the caller has a bug, and answering with the first response
would hide it.

Two identical requests racing each other are safe: the key row is inserted before
the work starts, so on PostgreSQL the second insert waits for the first transaction
and then fails on the primary key; the loser re-reads and returns the winner's
stored response. On SQLite writers are serialised anyway.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Boolean, DateTime, LargeBinary, String, delete, false, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from stitchgraph.db import Base, Database
from stitchgraph.errors import Aborted, FailedPrecondition, InvalidArgument

ResponseT = TypeVar("ResponseT", bound=Message)

MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


class IdempotencyRecord(Base):
    """The stored outcome of one mutation, keyed by the RPC and the caller's request ID."""

    __tablename__ = "idempotency_records"

    method: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID_LENGTH), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The response named an erased person and was dropped; the key stays so a retry
    # cannot run again as new evidence.
    forgotten: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class IdempotencySubject(Base):
    """Which stored responses mention which subject (for identity: the SHA-256 of an
    identifier's ``type:value``), so erasing a person can forget them."""

    __tablename__ = "idempotency_subjects"

    method: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID_LENGTH), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


def forget_subjects(session: Session, subjects: Iterable[str]) -> int:
    """Drop every stored response that mentions one of ``subjects``; return how many.

    The keys stay: a retry of such a request gets ``FAILED_PRECONDITION`` (reason
    ``REQUEST_SUBJECT_ERASED``) instead of running again, which would turn old evidence
    into new.
    """
    wanted = sorted(set(subjects))
    keys: set[tuple[str, str]] = set()
    for start in range(0, len(wanted), 400):
        chunk = wanted[start:start + 400]
        keys.update((row[0], row[1]) for row in session.execute(
            select(IdempotencySubject.method, IdempotencySubject.request_id)
            .where(IdempotencySubject.subject.in_(chunk))))
    for method, request_id in keys:
        session.execute(delete(IdempotencySubject).where(IdempotencySubject.method == method,
                                                         IdempotencySubject.request_id == request_id))
        session.execute(update(IdempotencyRecord).where(IdempotencyRecord.method == method,
                                                        IdempotencyRecord.request_id == request_id)
                        .values(response=None, forgotten=True))
    return len(keys)


def request_fingerprint(request: Message) -> str:
    """SHA-256 of the request's deterministic wire form with ``request_id`` cleared."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def validate_request_id(request_id: str) -> None:
    """Raise :class:`InvalidArgument` on ``request_id`` unless it is 1-128 printable ASCII characters."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument.for_field("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    if not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument.for_field("request_id", "must be printable ASCII without spaces (a UUID is ideal)")


def run_idempotent(
    db: Database,
    method: str,
    request: Message,
    response_type: type[ResponseT],
    operation: Callable[[Session], ResponseT],
    subjects: Callable[[ResponseT], Iterable[str]] | None = None,
) -> ResponseT:
    """Run ``operation`` in one write transaction, at most once per ``request.request_id``.

    Returns the operation's response, or the stored response of an earlier call with
    the same request ID and body. ``subjects`` names what the stored response mentions,
    so :func:`forget_subjects` can delete it later (personal data must not outlive an
    erasure in a stored response). Raises :class:`InvalidArgument` when the request ID
    is malformed or was used before with a different body; whatever ``operation``
    raises propagates and nothing of it (nor the key) is stored.
    """
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        with db.transaction() as session:
            return operation(session)
    validate_request_id(request_id)
    fingerprint = request_fingerprint(request)
    for _attempt in range(3):
        try:
            with db.transaction() as session:
                stored = session.get(IdempotencyRecord, (method, request_id))
                if stored is not None:
                    return _replay(stored, fingerprint, response_type)
                record = IdempotencyRecord(
                    method=method,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    response=None,
                    created_at=datetime.now(UTC),
                )
                session.add(record)
                session.flush()
                response = operation(session)
                record.response = response.SerializeToString(deterministic=True)
                for subject in sorted(set(subjects(response))) if subjects else ():
                    session.add(IdempotencySubject(method=method, request_id=request_id, subject=subject))
                return response
        except IntegrityError:
            # Another transaction committed the same key first: loop and replay it.
            continue
    raise Aborted("concurrent requests with the same request_id kept conflicting; retry", reason="REQUEST_ID_RACE")


def replay_or_none(db: Database, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT | None:
    """The stored response of an earlier call with ``request.request_id``, else ``None``
    (for operations that commit their own transactions and so cannot run inside
    :func:`run_idempotent`; pair with :func:`remember`). Raises like :func:`run_idempotent`
    for a malformed or reused request ID."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        return None
    validate_request_id(request_id)
    with db.read() as session:
        stored = session.get(IdempotencyRecord, (method, request_id))
        return None if stored is None else _replay(stored, request_fingerprint(request), response_type)


def remember(db: Database, method: str, request: Message, response: Message) -> None:
    """Record ``response`` for ``request.request_id`` after the operation committed (a
    concurrent first recording wins)."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        return
    try:
        with db.transaction() as session:
            if session.get(IdempotencyRecord, (method, request_id)) is None:
                session.add(IdempotencyRecord(method=method, request_id=request_id,
                                              fingerprint=request_fingerprint(request),
                                              response=response.SerializeToString(deterministic=True),
                                              created_at=datetime.now(UTC)))
    except IntegrityError:
        pass


def _replay(stored: IdempotencyRecord, fingerprint: str, response_type: type[ResponseT]) -> ResponseT:
    if stored.forgotten:
        raise FailedPrecondition("this request concerned a person who has since been erased; its result is gone",
                                 reason="REQUEST_SUBJECT_ERASED")
    if stored.fingerprint != fingerprint:
        raise InvalidArgument.for_field(
            "request_id",
            "was already used for a different request; use a new request_id for a new request",
            reason="REQUEST_ID_REUSED",
        )
    response = response_type()
    response.ParseFromString(stored.response or b"")
    return response
