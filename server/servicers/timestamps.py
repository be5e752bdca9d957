"""Timestamp conversions shared by the servicers."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp_pb(moment: datetime) -> Timestamp:
    """``moment`` (naive = UTC) as a protobuf Timestamp."""
    ts = Timestamp()
    ts.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return ts


def datetime_us(moment: datetime) -> int:
    """Exact microseconds since the epoch of an aware ``moment``."""
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def micros_pb(us: int) -> Timestamp:
    """Microseconds since the epoch as a protobuf Timestamp."""
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts
