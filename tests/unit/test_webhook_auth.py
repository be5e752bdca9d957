"""Webhook authentication checks, with known answers computed outside Python (openssl dgst -hmac)
and the RFC 2202 HMAC-SHA1 vector."""

from __future__ import annotations

import base64

import pytest

from server import webhook_auth as auth
from server.webhook_auth import WebhookAuthError, heap_hash, segment_signature, verify_heap_hash, verify_shared_secret

HEAP_SECRET = "heap-secret"
HEAP_BODY = b'{"action_type":"segment.users.sync"}'
HEAP_TS = 1_700_000_000_000
# printf '%s' '1700000000000{"action_type":"segment.users.sync"}' \
#     | openssl dgst -sha256 -hmac heap-secret -binary | base64
HEAP_MAC_BASE64 = "Nl2V+q15DopfNv+C0gaU0jx454gHofieHsO4hTm64wY="
HEAP_MAC_HEX = "365d95faad790e8a5f36ff82d20694d23c78e78807a1f89e1ec3b88539bae306"
SEGMENT_SECRET = "segment-secret"
SEGMENT_BODY = b'{"type":"track","event":"Signed Up"}'
# printf '%s' '{"type":"track","event":"Signed Up"}' | openssl dgst -sha1 -hmac segment-secret
SEGMENT_SIGNATURE = "911d796cb5bb640d53bd0908007678c8eea04e22"
WINDOW = {"max_age_ms": 60_000, "max_future_ms": 5_000}


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def reason_of(call: object) -> str:
    with pytest.raises(WebhookAuthError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


# -- Segment signature ----------------------------------------------------------------------------

def test_segment_signature_is_hex_hmac_sha1_of_the_body() -> None:
    assert segment_signature(SEGMENT_SECRET, SEGMENT_BODY) == SEGMENT_SIGNATURE
    assert segment_signature("Jefe", b"what do ya want for nothing?") == "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"


def test_a_matching_segment_signature_passes_in_either_case() -> None:
    auth.verify_segment_signature(SEGMENT_SIGNATURE, SEGMENT_BODY, SEGMENT_SECRET)
    auth.verify_segment_signature(SEGMENT_SIGNATURE.upper(), SEGMENT_BODY, SEGMENT_SECRET)


def test_a_signature_of_another_body_or_secret_is_refused() -> None:
    assert reason_of(lambda: auth.verify_segment_signature(SEGMENT_SIGNATURE, SEGMENT_BODY + b" ",
                                                           SEGMENT_SECRET)) == auth.INVALID_SIGNATURE
    assert reason_of(lambda: auth.verify_segment_signature(SEGMENT_SIGNATURE, SEGMENT_BODY,
                                                           "other")) == auth.INVALID_SIGNATURE
    assert reason_of(lambda: auth.verify_segment_signature("", SEGMENT_BODY, SEGMENT_SECRET)) == \
        auth.MISSING_SIGNATURE


# -- shared secret ----------------------------------------------------------------------------------

@pytest.mark.parametrize("presented", [
    {"header_secret": "s3cret"},
    {"authorization": "Bearer s3cret"},
    {"authorization": "bearer  s3cret "},
    {"authorization": basic("s3cret")},
    {"authorization": basic("s3cret", "ignored-password")},
])
def test_the_secret_passes_in_any_supported_header(presented: dict[str, str]) -> None:
    assert verify_shared_secret("s3cret", b"{}", **presented) == "secret"


def test_a_segment_signature_alone_authenticates() -> None:
    assert verify_shared_secret(SEGMENT_SECRET, SEGMENT_BODY, signature=SEGMENT_SIGNATURE) == "signature"


def test_nothing_presented_is_missing_credentials() -> None:
    assert reason_of(lambda: verify_shared_secret("s3cret", b"{}")) == auth.MISSING_CREDENTIALS
    assert reason_of(lambda: verify_shared_secret("s3cret", b"{}", header_secret=" ", authorization="")) == \
        auth.MISSING_CREDENTIALS


@pytest.mark.parametrize("presented", [
    {"header_secret": "s3cre"},
    {"header_secret": "s3cret-and-more"},
    {"authorization": "Bearer S3CRET"},
    {"authorization": basic("wrong", "s3cret")},  # the secret is the user name, never the password
    {"authorization": "Token s3cret"},
    {"authorization": "Basic !!!"},
    {"signature": SEGMENT_SIGNATURE},  # signed with another secret
])
def test_wrong_credentials_are_refused(presented: dict[str, str]) -> None:
    assert reason_of(lambda: verify_shared_secret("s3cret", SEGMENT_BODY, **presented)) == auth.INVALID_CREDENTIALS


def test_one_right_credential_among_wrong_ones_passes() -> None:
    assert verify_shared_secret("s3cret", b"{}", header_secret="wrong", authorization="Bearer s3cret",
                                signature="00") == "secret"


def test_refusals_never_mention_the_secret_or_the_digest() -> None:
    with pytest.raises(WebhookAuthError) as caught:
        verify_shared_secret(SEGMENT_SECRET, SEGMENT_BODY, signature="0" * 40, header_secret="guess")
    text = str(caught.value)
    assert SEGMENT_SECRET not in text and SEGMENT_SIGNATURE not in text and "guess" not in text


# -- Heap-Hash ------------------------------------------------------------------------------------

def test_heap_hash_is_base64_hmac_sha256_of_timestamp_then_body() -> None:
    assert heap_hash(HEAP_SECRET, HEAP_TS, HEAP_BODY) == f"ts:{HEAP_TS},hmac:{HEAP_MAC_BASE64}"


@pytest.mark.parametrize("header", [
    f"ts:{HEAP_TS},hmac:{HEAP_MAC_BASE64}",
    f"hmac:{HEAP_MAC_BASE64},ts:{HEAP_TS}",
    f" ts:{HEAP_TS} , hmac:{HEAP_MAC_BASE64} ",
    f"ts:{HEAP_TS},hmac:{HEAP_MAC_HEX}",  # the hex variant of Heap's reference implementation
])
def test_a_valid_heap_hash_returns_its_timestamp(header: str) -> None:
    assert verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS + 1_000, **WINDOW) == HEAP_TS


def test_a_heap_hash_for_another_body_secret_or_timestamp_is_forged() -> None:
    header = f"ts:{HEAP_TS},hmac:{HEAP_MAC_BASE64}"
    for call in (
        lambda: verify_heap_hash(header, HEAP_BODY + b" ", HEAP_SECRET, now_ms=HEAP_TS, **WINDOW),
        lambda: verify_heap_hash(header, HEAP_BODY, "other-secret", now_ms=HEAP_TS, **WINDOW),
        lambda: verify_heap_hash(f"ts:{HEAP_TS + 1},hmac:{HEAP_MAC_BASE64}", HEAP_BODY, HEAP_SECRET,
                                 now_ms=HEAP_TS, **WINDOW),
    ):
        assert reason_of(call) == auth.INVALID_SIGNATURE


def test_the_timestamp_window_is_inclusive_at_its_edges() -> None:
    header = heap_hash(HEAP_SECRET, HEAP_TS, HEAP_BODY)
    assert verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS + 60_000, **WINDOW) == HEAP_TS
    assert verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS - 5_000, **WINDOW) == HEAP_TS


def test_a_stale_heap_hash_is_refused_even_when_the_mac_is_right() -> None:
    header = heap_hash(HEAP_SECRET, HEAP_TS, HEAP_BODY)
    assert reason_of(lambda: verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS + 60_001,
                                              **WINDOW)) == auth.STALE_SIGNATURE


def test_a_heap_hash_from_the_future_is_refused() -> None:
    header = heap_hash(HEAP_SECRET, HEAP_TS, HEAP_BODY)
    assert reason_of(lambda: verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS - 5_001,
                                              **WINDOW)) == auth.FUTURE_SIGNATURE


@pytest.mark.parametrize(("header", "reason"), [
    (None, auth.MISSING_SIGNATURE),
    ("", auth.MISSING_SIGNATURE),
    (f"hmac:{HEAP_MAC_BASE64}", auth.MALFORMED_SIGNATURE),
    (f"ts:soon,hmac:{HEAP_MAC_BASE64}", auth.MALFORMED_SIGNATURE),
    (f"ts:-{HEAP_TS},hmac:{HEAP_MAC_BASE64}", auth.MALFORMED_SIGNATURE),
    (f"ts:{HEAP_TS}", auth.MALFORMED_SIGNATURE),
    (f"ts:{HEAP_TS},hmac:not base64!", auth.MALFORMED_SIGNATURE),
    (f"ts:{HEAP_TS},hmac:{base64.b64encode(b'short').decode()}", auth.INVALID_SIGNATURE),
])
def test_malformed_heap_hash_headers_are_refused(header: str | None, reason: str) -> None:
    assert reason_of(lambda: verify_heap_hash(header, HEAP_BODY, HEAP_SECRET, now_ms=HEAP_TS, **WINDOW)) == reason
