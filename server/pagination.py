"""The one pagination helper: opaque page tokens and page-size rules (AIP-158).

A token encodes the position after the last item returned and a fingerprint of the
request's other parameters, so a token reused with a different filter is refused
rather than silently returning a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stitchgraph.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class PageRequest:
    """A validated page request: how many items and where to start."""

    size: int
    after: Any  # the cursor value decoded from the token, or None for the first page

    def next_token(self, last_cursor: Any, query: str) -> str:
        return encode_token(last_cursor, query)


def _fingerprint(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def encode_token(cursor: Any, query: str) -> str:
    raw = json.dumps({"c": cursor, "q": _fingerprint(query)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_request(page_size: int, page_token: str, query: str = "") -> PageRequest:
    """Validate ``page_size`` (0 = default, capped at the maximum) and decode ``page_token``.

    ``query`` identifies the other request parameters. Raises :class:`InvalidArgument`
    for a negative size, a malformed token, or a token from a different query.
    """
    if page_size < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return PageRequest(size, None)
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor, fingerprint = data["c"], data["q"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument.for_field("page_token", "is not a token this server issued") from exc
    if fingerprint != _fingerprint(query):
        raise InvalidArgument.for_field("page_token", "belongs to a request with different parameters")
    return PageRequest(size, cursor)
