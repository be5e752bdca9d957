"""Webhook authentication: pure checks of what a sender presents, with no I/O.

Three schemes, each compared in constant time:

* **Shared secret** (RudderStack Webhook destination, Segment webhooks, anything that can send a
  static header): the secret in ``X-Stitchgraph-Secret``, as ``Authorization: Bearer <secret>``,
  or as the user name of HTTP Basic auth (the way Segment and RudderStack present write keys;
  the password is ignored).
* **Segment signature**: Segment's Webhooks destinations sign with ``X-Signature`` = hex
  HMAC-SHA1 of the raw body keyed with the shared secret.
* **Heap-Hash** (Heap Segments Sync): ``Heap-Hash: ts:<epoch-ms>,hmac:<digest>`` where the digest
  is HMAC-SHA256 keyed with the webhook secret over ``str(ts) + raw body``, base64-encoded (Heap's
  reference implementation has also shipped a hex-encoded variant, accepted too: both encode the
  same MAC). The timestamp must lie in a window around now, which bounds replays.

Every failure raises :class:`WebhookAuthError` with a machine-readable ``reason``; its message
never contains the secret, the expected digest or the presented one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

#: Reasons carried by :class:`WebhookAuthError`.
MISSING_CREDENTIALS = "MISSING_CREDENTIALS"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
MISSING_SIGNATURE = "MISSING_SIGNATURE"
MALFORMED_SIGNATURE = "MALFORMED_SIGNATURE"
INVALID_SIGNATURE = "INVALID_SIGNATURE"
STALE_SIGNATURE = "STALE_SIGNATURE"
FUTURE_SIGNATURE = "FUTURE_SIGNATURE"

_HEX_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class WebhookAuthError(Exception):
    """The request does not prove knowledge of the secret; ``reason`` says how it fell short."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _same_secret(presented: str, secret: str) -> bool:
    # Compare digests, not the strings, so the time taken does not reveal the secret's length.
    return _same(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(secret.encode()).digest())


# -- shared secret and Segment signature ---------------------------------------------------------

def segment_signature(secret: str, body: bytes) -> str:
    """The ``X-Signature`` Segment sends for ``body``: hex HMAC-SHA1 keyed with ``secret``."""
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def verify_segment_signature(header: str | None, body: bytes, secret: str) -> None:
    """Check an ``X-Signature`` header against ``body``; raise :class:`WebhookAuthError` unless it matches."""
    if not header or not header.strip():
        raise WebhookAuthError(MISSING_SIGNATURE, "no X-Signature header")
    presented = header.strip().lower().removeprefix("sha1=")
    if not _same(presented.encode(), segment_signature(secret, body).encode()):
        raise WebhookAuthError(INVALID_SIGNATURE, "X-Signature does not match the body")


def presented_secrets(*, header_secret: str | None = None, authorization: str | None = None) -> list[str]:
    """The secrets a request presents: ``X-Stitchgraph-Secret``, a Bearer token, the Basic user name."""
    found = []
    if header_secret and header_secret.strip():
        found.append(header_secret.strip())
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and credentials:
            found.append(credentials)
        elif scheme.lower() == "basic" and credentials:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            user = decoded.partition(":")[0]
            if user:
                found.append(user)
    return found


def verify_shared_secret(secret: str, body: bytes, *, header_secret: str | None = None,
                         authorization: str | None = None, signature: str | None = None) -> str:
    """Check what a RudderStack or Segment webhook request presents against the environment's ``secret``.

    Passes when any presented credential matches: the secret itself (see :func:`presented_secrets`)
    or a Segment ``X-Signature`` of ``body``. Returns how the sender proved itself (``secret`` or
    ``signature``). Raises :class:`WebhookAuthError`: ``MISSING_CREDENTIALS`` when none of the
    headers was sent, ``INVALID_CREDENTIALS`` when what was sent does not match (or is unreadable).
    """
    candidates = presented_secrets(header_secret=header_secret, authorization=authorization)
    # Check every candidate so the time taken does not say which one came close.
    matched = False
    for candidate in candidates:
        matched |= _same_secret(candidate, secret)
    if matched:
        return "secret"
    if signature and signature.strip():
        try:
            verify_segment_signature(signature, body, secret)
        except WebhookAuthError:
            pass
        else:
            return "signature"
    if not any(value and value.strip() for value in (header_secret, authorization, signature)):
        raise WebhookAuthError(MISSING_CREDENTIALS, "no webhook credentials presented")
    raise WebhookAuthError(INVALID_CREDENTIALS, "the webhook credentials are not valid for this environment")


# -- Heap-Hash ------------------------------------------------------------------------------------

def heap_hash(secret: str, ts_ms: int, body: bytes) -> str:
    """The ``Heap-Hash`` header value Heap sends for ``body`` at ``ts_ms``."""
    digest = hmac.new(secret.encode(), str(ts_ms).encode() + body, hashlib.sha256).digest()
    return f"ts:{ts_ms},hmac:{base64.b64encode(digest).decode()}"


def parse_heap_hash(header: str) -> tuple[int, bytes]:
    """The timestamp (epoch milliseconds) and the raw MAC of a ``Heap-Hash`` header value.

    Raises :class:`WebhookAuthError` (``MALFORMED_SIGNATURE``) when either part is missing or unreadable.
    """
    parts: dict[str, str] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition(":")
        if sep:
            parts[key.strip().lower()] = value.strip()
    ts_text, mac_text = parts.get("ts", ""), parts.get("hmac", "")
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 16:
        raise WebhookAuthError(MALFORMED_SIGNATURE, "Heap-Hash needs ts:<epoch milliseconds>")
    if not mac_text:
        raise WebhookAuthError(MALFORMED_SIGNATURE, "Heap-Hash needs hmac:<digest>")
    try:
        mac = bytes.fromhex(mac_text) if _HEX_SHA256.match(mac_text) else base64.b64decode(mac_text, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookAuthError(MALFORMED_SIGNATURE, "the Heap-Hash hmac is neither base64 nor hex") from None
    return int(ts_text), mac


def verify_heap_hash(header: str | None, body: bytes, secret: str, *, now_ms: int, max_age_ms: int,
                     max_future_ms: int) -> int:
    """Check a ``Heap-Hash`` header against ``body``; return its timestamp (epoch milliseconds).

    The timestamp must be at most ``max_age_ms`` old and at most ``max_future_ms`` ahead of
    ``now_ms``; the MAC must match. The MAC is checked before the window so that a forged
    header learns nothing about the clock. Raises :class:`WebhookAuthError`.
    """
    if not header or not header.strip():
        raise WebhookAuthError(MISSING_SIGNATURE, "no Heap-Hash header")
    ts_ms, presented = parse_heap_hash(header)
    expected = hmac.new(secret.encode(), str(ts_ms).encode() + body, hashlib.sha256).digest()
    if not _same(presented, expected):
        raise WebhookAuthError(INVALID_SIGNATURE, "Heap-Hash does not match the body")
    if now_ms - ts_ms > max_age_ms:
        raise WebhookAuthError(STALE_SIGNATURE, f"the Heap-Hash timestamp is more than {max_age_ms} ms old")
    if ts_ms - now_ms > max_future_ms:
        raise WebhookAuthError(FUTURE_SIGNATURE,
                               f"the Heap-Hash timestamp is more than {max_future_ms} ms in the future")
    return ts_ms


__all__ = [
    "FUTURE_SIGNATURE",
    "INVALID_CREDENTIALS",
    "INVALID_SIGNATURE",
    "MALFORMED_SIGNATURE",
    "MISSING_CREDENTIALS",
    "MISSING_SIGNATURE",
    "STALE_SIGNATURE",
    "WebhookAuthError",
    "heap_hash",
    "parse_heap_hash",
    "presented_secrets",
    "segment_signature",
    "verify_heap_hash",
    "verify_segment_signature",
    "verify_shared_secret",
]
