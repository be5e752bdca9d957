"""request_id idempotency against the real stores."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stitchgraph.db import Database
from stitchgraph.errors import InvalidArgument
from stitchgraph.idempotency import IdempotencyRecord, run_idempotent
from stitchgraph.v1 import system_service_pb2


def _request(request_id: str, name: str) -> system_service_pb2.RunJobRequest:
    return system_service_pb2.RunJobRequest(request_id=request_id, name=name)


def test_a_repeat_returns_the_first_response_without_running_again(db: Database) -> None:
    runs: list[int] = []

    def op(_session: Session) -> system_service_pb2.RunJobResponse:
        runs.append(1)
        return system_service_pb2.RunJobResponse()

    first = run_idempotent(db, "m", _request("r-1", "jobs/a"), system_service_pb2.RunJobResponse, op)
    second = run_idempotent(db, "m", _request("r-1", "jobs/a"), system_service_pb2.RunJobResponse, op)
    assert first == second
    assert len(runs) == 1


def test_reusing_a_request_id_with_a_different_body_is_invalid(db: Database) -> None:
    def op(_session: Session) -> system_service_pb2.RunJobResponse:
        return system_service_pb2.RunJobResponse()

    run_idempotent(db, "m", _request("r-2", "jobs/a"), system_service_pb2.RunJobResponse, op)
    with pytest.raises(InvalidArgument) as caught:
        run_idempotent(db, "m", _request("r-2", "jobs/b"), system_service_pb2.RunJobResponse, op)
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert caught.value.violations[0].field == "request_id"


def test_a_failed_mutation_stores_nothing_so_it_can_be_retried(db: Database) -> None:
    def failing(_session: Session) -> system_service_pb2.RunJobResponse:
        raise InvalidArgument.for_field("name", "bad")

    with pytest.raises(InvalidArgument):
        run_idempotent(db, "m", _request("r-3", "jobs/a"), system_service_pb2.RunJobResponse, failing)
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(IdempotencyRecord)).scalar() == 0


def test_a_malformed_request_id_is_invalid(db: Database) -> None:
    with pytest.raises(InvalidArgument) as caught:
        run_idempotent(db, "m", _request("has space", "x"), system_service_pb2.RunJobResponse,
                       lambda s: system_service_pb2.RunJobResponse())
    assert caught.value.violations[0].field == "request_id"
