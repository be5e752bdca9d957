"""Pure parsers for source payloads (PostHog, Segment/RudderStack, Heap) into :class:`ParsedPayload`.

No I/O: a parser turns one request body into messages, types their identifiers and reports what is
wrong with them. Junk-value filtering, hashing, mapping and validation against the schema registry
happen later, in the capture pipeline.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from identity.events.incoming import ParsedPayload
from identity.events.sources import heap, posthog, segment


class SourceParser(Protocol):
    """A source parser: one request body → its messages."""

    def __call__(self, payload: str, *, source: str, received_at: datetime) -> ParsedPayload: ...


#: Source kind → parser. Segment and RudderStack share the Segment spec.
PARSERS: dict[str, SourceParser] = {
    "posthog": posthog.parse,
    "segment": segment.parse,
    "rudderstack": segment.parse,
    "heap": heap.parse,
}
SOURCE_KINDS = frozenset(PARSERS)


def parse(kind: str, payload: str, *, source: str, received_at: datetime) -> ParsedPayload:
    """Parse ``payload`` (a request body) sent by a source of ``kind``.

    ``source`` is the label put on every message; ``received_at`` is the server receive time
    (naive = UTC), used for clock-skew correction and as the default event time. Raises
    :class:`ValueError` for an unknown ``kind`` (a configuration error, not a sender error).
    """
    parser = PARSERS.get(kind)
    if parser is None:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(SOURCE_KINDS)}")
    return parser(payload, source=source, received_at=received_at)


__all__ = ["PARSERS", "SOURCE_KINDS", "SourceParser", "parse"]
