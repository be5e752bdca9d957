"""The Google adapters against the Google sandbox: what Google Ads and the Data Manager API
accept from them (field mapping, hashed keys in the right slot, consent, order IDs), how
every kind of failure is classified, OAuth refresh and re-refresh, and the sandbox's own
validation of hand-made requests."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import pytest

from audiences.destinations import KINDS
from audiences.destinations.base import (
    PERMANENT,
    RETRYABLE,
    SUCCEEDED,
    THROTTLED,
    AudienceChange,
    BatchResult,
    Conversion,
    DestinationContext,
    PersonKeys,
    ReplaceSession,
)
from audiences.destinations.google import (
    CLICK_CONVERSION_MAX_AGE_SECONDS,
    ENHANCEMENT_MAX_AGE_SECONDS,
    GoogleAdsConversionsAdapter,
    GoogleDataManagerAudienceAdapter,
    classify_row_error,
    clear_token_cache,
)
from tests.sandboxes.base import running
from tests.sandboxes.google import GoogleSandbox

CUSTOMER = "1234567890"
PURCHASE_ACTION = "987654321"
LEAD_ACTION = "555"
LIST_ID = "7001"
DEVELOPER_TOKEN = "dev-token-XYZ123"
REFRESH_CREDENTIALS = {"client_id": "sandbox-client-id", "client_secret": "sandbox-client-secret",
                       "refresh_token": "sandbox-refresh-token", "developer_token": DEVELOPER_TOKEN}
HEX64 = re.compile(r"[0-9a-fA-F]{64}")

ADS = GoogleAdsConversionsAdapter()
AUDIENCE = GoogleDataManagerAudienceAdapter()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def now_us(seconds_ago: float = 0) -> int:
    return int((time.time() - seconds_ago) * 1_000_000)


@pytest.fixture(autouse=True)
def fresh_token_cache() -> Iterator[None]:
    clear_token_cache()
    yield
    clear_token_cache()


@pytest.fixture
def sandbox() -> Iterator[GoogleSandbox]:
    with running(GoogleSandbox(conversion_actions={PURCHASE_ACTION, LEAD_ACTION},
                               unapproved_developer_tokens={"test-only-token"})) as served:
        yield cast(GoogleSandbox, served)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


def ads_destination(sandbox: GoogleSandbox, credentials: dict[str, str] | None = None, timeout: float = 5.0,
                    **settings: Any) -> DestinationContext:
    return DestinationContext("google-ads", "GOOGLE_ADS_CONVERSIONS", settings={
        "customer_id": "123-456-7890", "conversion_actions": {"purchase": PURCHASE_ACTION, "lead": LEAD_ACTION},
        "base_url": sandbox.url, "token_url": f"{sandbox.url}/token", **settings},
        credentials=REFRESH_CREDENTIALS if credentials is None else credentials, timeout_seconds=timeout)


def audience_destination(sandbox: GoogleSandbox, credentials: dict[str, str] | None = None,
                         **settings: Any) -> DestinationContext:
    return DestinationContext("google-list", "GOOGLE_DATA_MANAGER_AUDIENCE", settings={
        "operating_account_id": "123-456-7890", "product_destination_id": LIST_ID, "base_url": sandbox.url,
        "token_url": f"{sandbox.url}/token", **settings},
        credentials=REFRESH_CREDENTIALS if credentials is None else credentials)


def purchase(delivery_id: int, *, keys: PersonKeys | None = None, **changes: Any) -> Conversion:
    values: dict[str, Any] = {
        "delivery_id": delivery_id, "event_id": f"evt-{delivery_id}", "event": "purchase",
        "occurred_us": now_us(3600), "keys": keys if keys is not None else PersonKeys(
            google_emails=(sha(f"buyer{delivery_id}@example.com"),)),
        "value": "49.90", "currency": "eur", "order_id": f"order-{delivery_id}",
        "consent": {"ad_user_data": True, "ad_personalization": True}, **changes}
    return Conversion(**values)


def outcome_of(result: BatchResult, delivery_id: int) -> tuple[str, str, str]:
    outcome = result.outcomes[delivery_id]
    return outcome.classification, outcome.status_reason, outcome.platform_error_code


# -- the catalogue ---------------------------------------------------------------------------------

def test_kinds_and_batch_limits_match_the_catalogue() -> None:
    assert ADS.kind == "GOOGLE_ADS_CONVERSIONS" and ADS.batch_limit == KINDS[ADS.kind].batch_limit == 2000
    assert AUDIENCE.kind == "GOOGLE_DATA_MANAGER_AUDIENCE"
    assert AUDIENCE.batch_limit == KINDS[AUDIENCE.kind].batch_limit == 10_000


def test_platform_event_is_the_conversion_action_resource_name() -> None:
    settings = {"customer_id": "123-456-7890", "conversion_actions": {
        "purchase": "42", "lead": "customers/999/conversionActions/7", "sign_up": "not an id"}}
    assert ADS.platform_event("purchase", settings) == f"customers/{CUSTOMER}/conversionActions/42"
    assert ADS.platform_event("lead", settings) == "customers/999/conversionActions/7"
    assert ADS.platform_event("sign_up", settings) is None
    assert ADS.platform_event("page_view", settings) is None
    assert ADS.platform_event("purchase", {"customer_id": CUSTOMER}) is None
    assert AUDIENCE.platform_event("purchase", settings) is None


def test_max_age_is_90_days_for_click_conversions_and_a_day_for_enhancements() -> None:
    assert ADS.max_age_seconds({}, "website") == CLICK_CONVERSION_MAX_AGE_SECONDS == 90 * 86_400
    assert ADS.max_age_seconds({"upload": "enhancements"}, "website") == ENHANCEMENT_MAX_AGE_SECONDS == 86_400
    assert AUDIENCE.max_age_seconds({}, "") is None


# -- click conversions: mapping ----------------------------------------------------------------------

def test_a_purchase_known_only_by_its_google_email_hash_arrives_as_a_click_conversion(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    google_email = sha("janedoe@gmail.com")
    keys = PersonKeys(person_id="p1", emails=(sha("jane.doe@gmail.com"),), google_emails=(google_email,),
                      phones_meta=(sha("16505551212"),))
    occurred = now_us(7200)
    record = purchase(1, keys=keys, occurred_us=occurred, value="49.90", currency="eur", order_id="A-1001")

    result = ADS.send_conversions(client, ads_destination(sandbox, login_customer_id="111-222-3333"), [record])

    assert outcome_of(result, 1) == (SUCCEEDED, "", "")
    [accepted] = sandbox.accepted_conversions
    assert accepted.customer_id == CUSTOMER and accepted.login_customer_id == "1112223333"
    assert accepted.conversion_action == f"customers/{CUSTOMER}/conversionActions/{PURCHASE_ACTION}"
    assert accepted.identifiers == (("hashedEmail", google_email),)
    assert accepted.identifier_sources == ("FIRST_PARTY",)
    assert accepted.order_id == "A-1001"
    assert (accepted.value, accepted.currency) == (49.9, "EUR")
    assert accepted.ad_user_data == "GRANTED"
    expected_time = datetime.fromtimestamp(occurred // 1_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")
    assert accepted.conversion_date_time == expected_time
    assert (accepted.gclid, accepted.gbraid, accepted.wbraid) == ("", "", "")


def test_click_ids_map_to_gclid_first_and_never_both_braids(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    no_keys = PersonKeys()
    records = [
        purchase(1, keys=no_keys, context={"gclid": "Cj0KCQ-click", "gbraid": "gb-1", "wbraid": "wb-1"}),
        purchase(2, keys=no_keys, context={"gbraid": "gb-2", "wbraid": "wb-2"}, action_source="website"),
        purchase(3, keys=no_keys, context={"gbraid": "gb-3", "wbraid": "wb-3"}, action_source="app"),
        purchase(4, keys=no_keys, context={"wbraid": "wb-4"}),
    ]
    result = ADS.send_conversions(client, ads_destination(sandbox), records)

    assert {outcome_of(result, i)[0] for i in range(1, 5)} == {SUCCEEDED}
    clicks = {c.order_id: (c.gclid, c.gbraid, c.wbraid, c.identifiers) for c in sandbox.accepted_conversions}
    assert clicks == {"order-1": ("Cj0KCQ-click", "", "", ()), "order-2": ("", "", "wb-2", ()),
                      "order-3": ("", "gb-3", "", ()), "order-4": ("", "", "wb-4", ())}


def test_phones_go_as_hashed_phone_numbers_and_at_most_five_identifiers_are_sent(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    emails = tuple(sha(f"e{i}@example.com") for i in range(4))
    phones = tuple(sha(f"+1650555000{i}") for i in range(3))
    keys = PersonKeys(google_emails=emails, phones_e164=phones, phones_meta=(sha("16505550000"),),
                      user_ids=("u-1",))
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1, keys=keys)])

    assert outcome_of(result, 1)[0] == SUCCEEDED
    [accepted] = sandbox.accepted_conversions
    assert len(accepted.identifiers) == 5
    assert {kind for kind, _ in accepted.identifiers} == {"hashedEmail", "hashedPhoneNumber"}
    assert all(value in emails for kind, value in accepted.identifiers if kind == "hashedEmail")
    assert all(value in phones for kind, value in accepted.identifiers if kind == "hashedPhoneNumber")


def test_order_id_falls_back_to_the_event_id_and_consent_follows_the_record(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    records = [purchase(1, order_id=None, value=None, currency=None, consent={}),
               purchase(2, consent={"ad_user_data": False})]
    result = ADS.send_conversions(client, ads_destination(sandbox), records)

    assert {outcome_of(result, 1)[0], outcome_of(result, 2)[0]} == {SUCCEEDED}
    by_order = {c.order_id: c for c in sandbox.accepted_conversions}
    assert by_order["evt-1"].ad_user_data == "UNSPECIFIED"
    assert (by_order["evt-1"].value, by_order["evt-1"].currency) == (None, None)
    assert by_order["order-2"].ad_user_data == "DENIED"


# -- click conversions: pre-validation -----------------------------------------------------------------

def test_invalid_records_are_left_out_without_rejecting_the_others(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    records = [
        purchase(1),
        purchase(2, occurred_us=now_us(CLICK_CONVERSION_MAX_AGE_SECONDS + 3600)),
        purchase(3, keys=PersonKeys(emails=(sha("meta-only@example.com"),), user_ids=("u-3",))),
        purchase(4, event="page_view"),
        purchase(5, value="forty"),
        purchase(6, keys=PersonKeys(google_emails=("not-a-hash",))),
    ]
    result = ADS.send_conversions(client, ads_destination(sandbox), records)

    assert outcome_of(result, 1) == (SUCCEEDED, "", "")
    assert outcome_of(result, 2)[:2] == (PERMANENT, "EVENT_TOO_OLD")
    assert outcome_of(result, 3)[:2] == (PERMANENT, "NO_MATCH_KEYS")
    assert outcome_of(result, 4)[:2] == (PERMANENT, "NO_CONVERSION_ACTION")
    assert outcome_of(result, 5)[:2] == (PERMANENT, "INVALID_VALUE")
    assert outcome_of(result, 6)[:2] == (PERMANENT, "NO_MATCH_KEYS")
    assert [c.order_id for c in sandbox.accepted_conversions] == ["order-1"]
    assert sandbox.rows_received == 1 and result.requests == 2  # the token, then one upload


def test_nothing_to_send_makes_no_request(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1, event="refund")])

    assert result.requests == 0 and outcome_of(result, 1)[:2] == (PERMANENT, "NO_CONVERSION_ACTION")
    assert sandbox.requests == []


def test_missing_developer_token_or_settings_fail_without_a_request(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    no_developer_token = {k: v for k, v in REFRESH_CREDENTIALS.items() if k != "developer_token"}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=no_developer_token), [purchase(1)])
    assert outcome_of(result, 1)[:2] == (PERMANENT, "MISSING_CREDENTIALS") and result.requests == 0

    result = ADS.send_conversions(client, ads_destination(sandbox, customer_id="abc"), [purchase(2)])
    assert outcome_of(result, 2)[:2] == (PERMANENT, "INVALID_SETTINGS") and result.requests == 0
    assert sandbox.requests == []


# -- click conversions: row errors and dedup ----------------------------------------------------------

def test_one_bad_row_fails_alone_in_a_partial_failure(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    destination = ads_destination(sandbox, conversion_actions={"purchase": PURCHASE_ACTION, "lead": "31337"})
    records = [purchase(1), purchase(2, event="lead"), purchase(3)]

    result = ADS.send_conversions(client, destination, records)

    assert outcome_of(result, 1) == (SUCCEEDED, "", "")
    assert outcome_of(result, 3) == (SUCCEEDED, "", "")
    classification, _, code = outcome_of(result, 2)
    assert (classification, code) == (PERMANENT, "conversionUploadError.NO_CONVERSION_ACTION_FOUND")
    assert result.http_status == 200
    assert sorted(c.order_id for c in sandbox.accepted_conversions) == ["order-1", "order-3"]


def test_a_resent_batch_succeeds_without_counting_anything_twice(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    records = [purchase(i) for i in range(1, 6)]
    first = ADS.send_conversions(client, ads_destination(sandbox), records)
    again = ADS.send_conversions(client, ads_destination(sandbox), records)

    assert {o.classification for o in first.outcomes.values()} == {SUCCEEDED}
    assert {outcome_of(again, i) for i in range(1, 6)} == {
        (SUCCEEDED, "ALREADY_RECORDED", "conversionUploadError.ORDER_ID_ALREADY_IN_USE")}
    assert len(sandbox.accepted_conversions) == 5
    assert sandbox.duplicate_count == 5


@pytest.mark.parametrize(("code", "classification", "reason"), [
    ("conversionUploadError.ORDER_ID_ALREADY_IN_USE", SUCCEEDED, "ALREADY_RECORDED"),
    ("conversionUploadError.DUPLICATE_ORDER_ID", SUCCEEDED, "ALREADY_RECORDED"),
    ("conversionUploadError.CLICK_CONVERSION_ALREADY_EXISTS", SUCCEEDED, "ALREADY_RECORDED"),
    ("conversionUploadError.TOO_RECENT_EVENT", RETRYABLE, "TOO_RECENT_EVENT"),
    ("databaseError.CONCURRENT_MODIFICATION", RETRYABLE, "CONCURRENT_MODIFICATION"),
    ("internalError.TRANSIENT_ERROR", RETRYABLE, "TRANSIENT_ERROR"),
    ("quotaError.RESOURCE_TEMPORARILY_EXHAUSTED", THROTTLED, "RATE_LIMITED"),
    ("conversionUploadError.EXPIRED_EVENT", PERMANENT, "EVENT_TOO_OLD"),
    ("conversionUploadError.CLICK_NOT_FOUND", PERMANENT, "CLICK_NOT_FOUND"),
    ("conversionUploadError.CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS", PERMANENT,
     "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"),
])
def test_row_errors_are_classified(code: str, classification: str, reason: str) -> None:
    outcome = classify_row_error(code, "message")
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == (
        classification, reason, code)


def test_a_transient_row_error_is_retried_alone(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.fail_row("order-2", "conversionUploadError.TOO_RECENT_EVENT")
    sandbox.fail_row("order-3", "conversionUploadError.CLICK_NOT_FOUND")
    records = [purchase(1), purchase(2), purchase(3)]

    result = ADS.send_conversions(client, ads_destination(sandbox), records)
    retry = ADS.send_conversions(client, ads_destination(sandbox), [records[1]])

    assert outcome_of(result, 1) == (SUCCEEDED, "", "")
    assert outcome_of(result, 2) == (RETRYABLE, "TOO_RECENT_EVENT", "conversionUploadError.TOO_RECENT_EVENT")
    assert outcome_of(result, 3) == (PERMANENT, "CLICK_NOT_FOUND", "conversionUploadError.CLICK_NOT_FOUND")
    assert outcome_of(retry, 2) == (SUCCEEDED, "", "")
    assert sorted(c.order_id for c in sandbox.accepted_conversions) == ["order-1", "order-2"]


def test_records_of_one_batch_with_the_same_order_are_sent_once(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    records = [purchase(1, order_id="same"), purchase(2, order_id="same"), purchase(3, order_id="other")]
    result = ADS.send_conversions(client, ads_destination(sandbox), records)

    assert {o.classification for o in result.outcomes.values()} == {SUCCEEDED}
    assert sandbox.rows_received == 2 and sandbox.duplicate_count == 0
    assert sorted(c.order_id for c in sandbox.accepted_conversions) == ["other", "same"]


def test_excerpts_and_errors_hold_no_hash_and_no_secret(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    destination = ads_destination(sandbox, conversion_actions={"purchase": PURCHASE_ACTION, "lead": "31337"})
    result = ADS.send_conversions(client, destination, [purchase(1), purchase(2, event="lead")])

    assert "userIdentifiers" in result.response_excerpt  # the results echo the hashes ...
    assert not HEX64.search(result.response_excerpt)  # ... which are redacted
    issued = [t for t in sandbox._issued]
    for secret in [*REFRESH_CREDENTIALS.values(), *issued]:
        assert secret not in result.response_excerpt
        assert all(secret not in o.error for o in result.outcomes.values())
    assert DEVELOPER_TOKEN not in repr(destination)


# -- enhanced conversions for web --------------------------------------------------------------------

def test_enhancements_are_uploaded_as_adjustments_by_order_id(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    destination = ads_destination(sandbox, upload="enhancements")
    email, phone = sha("pat@example.com"), sha("+14155550100")
    records = [purchase(1, keys=PersonKeys(google_emails=(email,), phones_e164=(phone,)), order_id="T-77",
                        context={"user_agent": "Mozilla/5.0", "gclid": "ignored"}),
               purchase(2, order_id=None),
               purchase(3, occurred_us=now_us(ENHANCEMENT_MAX_AGE_SECONDS + 60))]

    result = ADS.send_conversions(client, destination, records)
    again = ADS.send_conversions(client, destination, records[:1])

    assert outcome_of(result, 1) == (SUCCEEDED, "", "")
    assert outcome_of(result, 2)[:2] == (PERMANENT, "MISSING_ORDER_ID")
    assert outcome_of(result, 3)[:2] == (PERMANENT, "EVENT_TOO_OLD")
    assert outcome_of(again, 1) == (SUCCEEDED, "ALREADY_RECORDED",
                                    "conversionAdjustmentUploadError.CONVERSION_ALREADY_ENHANCED")
    [adjustment] = sandbox.accepted_adjustments
    assert adjustment.adjustment_type == "ENHANCEMENT" and adjustment.order_id == "T-77"
    assert adjustment.identifiers == (("hashedEmail", email), ("hashedPhoneNumber", phone))
    assert adjustment.user_agent == "Mozilla/5.0" and adjustment.conversion_date_time
    assert sandbox.accepted_conversions == []


# -- OAuth -------------------------------------------------------------------------------------------

def test_the_access_token_is_refreshed_once_and_reused(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    first = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])
    second = ADS.send_conversions(client, ads_destination(sandbox), [purchase(2)])

    assert first.requests == 2 and second.requests == 1
    assert sandbox.token_requests == 1
    assert {outcome_of(first, 1)[0], outcome_of(second, 2)[0]} == {SUCCEEDED}


def test_concurrent_sends_share_one_refresh(sandbox: GoogleSandbox) -> None:
    results: list[BatchResult] = []

    def send(i: int) -> None:
        with httpx.Client() as http:
            results.append(ADS.send_conversions(http, ads_destination(sandbox), [purchase(i)]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sandbox.token_requests == 1
    assert len(sandbox.accepted_conversions) == 8
    assert all(o.classification == SUCCEEDED for r in results for o in r.outcomes.values())


def test_a_401_on_a_cached_token_refreshes_once_and_repeats_the_request(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])
    sandbox.expire_issued_tokens()

    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(2)])

    assert outcome_of(result, 2) == (SUCCEEDED, "", "")
    assert result.requests == 3  # the refused upload, the refresh, the upload again
    assert sandbox.token_requests == 2
    assert [status for _, path, status in sandbox.requests if "upload" in path] == [200, 401, 200]


def test_a_bad_refresh_token_is_a_permanent_invalid_token(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    revoked = {**REFRESH_CREDENTIALS, "refresh_token": "revoked-refresh-token"}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=revoked), [purchase(1)])

    assert outcome_of(result, 1) == (PERMANENT, "INVALID_TOKEN", "invalid_grant")
    assert result.requests == 1 and sandbox.upload_requests == 0
    assert "revoked-refresh-token" not in result.response_excerpt + result.outcomes[1].error

    wrong_client = {**REFRESH_CREDENTIALS, "client_secret": "not-the-secret"}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=wrong_client), [purchase(2)])
    assert outcome_of(result, 2) == (PERMANENT, "INVALID_TOKEN", "invalid_client")


def test_token_endpoint_trouble_is_retryable(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.fail(1, status=503, path="/token")
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])

    assert outcome_of(result, 1)[:2] == (RETRYABLE, "SERVER_ERROR")
    assert sandbox.upload_requests == 0


def test_a_refused_direct_access_token_is_a_permanent_invalid_token(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    credentials = {"access_token": "ya29.stale-token", "developer_token": DEVELOPER_TOKEN}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=credentials), [purchase(1)])

    assert outcome_of(result, 1) == (PERMANENT, "INVALID_TOKEN", "authenticationError.OAUTH_TOKEN_INVALID")
    assert result.requests == 1 and result.http_status == 401 and sandbox.token_requests == 0


def test_a_direct_access_token_is_used_as_is(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    credentials = {"access_token": "sandbox-token", "developer_token": DEVELOPER_TOKEN}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=credentials), [purchase(1)])

    assert outcome_of(result, 1)[0] == SUCCEEDED and sandbox.token_requests == 0


# -- whole-request failures --------------------------------------------------------------------------

def test_an_unapproved_developer_token_is_permission_denied(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    credentials = {**REFRESH_CREDENTIALS, "developer_token": "test-only-token"}
    result = ADS.send_conversions(client, ads_destination(sandbox, credentials=credentials), [purchase(1)])

    assert outcome_of(result, 1) == (PERMANENT, "PERMISSION_DENIED", "authorizationError.DEVELOPER_TOKEN_NOT_APPROVED")
    assert sandbox.accepted_conversions == []


def test_429_is_throttled_with_the_retry_after_header(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.throttle(1, retry_after=7, path=":uploadClickConversions")
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])

    assert outcome_of(result, 1) == (THROTTLED, "RATE_LIMITED", "quotaError.RESOURCE_EXHAUSTED")
    assert result.retry_after_seconds == 7


def test_429_without_a_header_waits_for_the_quota_retry_delay(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.exhaust_quota(1, retry_delay=30)
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])

    assert outcome_of(result, 1)[:2] == (THROTTLED, "RATE_LIMITED")
    assert result.retry_after_seconds == 30 and sandbox.accepted_conversions == []


@pytest.mark.parametrize("status", [500, 503, 504])
def test_server_errors_are_retryable(sandbox: GoogleSandbox, client: httpx.Client, status: int) -> None:
    sandbox.fail(1, status=status, path=":uploadClickConversions")
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])

    assert outcome_of(result, 1)[:2] == (RETRYABLE, "SERVER_ERROR")
    assert result.http_status == status and sandbox.accepted_conversions == []


def test_a_timeout_is_retryable_and_the_retry_is_deduplicated(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.stall(1, seconds=0.6, path=":uploadClickConversions")
    result = ADS.send_conversions(client, ads_destination(sandbox, timeout=0.2), [purchase(1)])

    assert outcome_of(result, 1)[:2] == (RETRYABLE, "TRANSPORT_ERROR")
    deadline = time.monotonic() + 3
    while not sandbox.accepted_conversions and time.monotonic() < deadline:  # Google got it after all
        time.sleep(0.02)
    retry = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])
    assert outcome_of(retry, 1)[:2] == (SUCCEEDED, "ALREADY_RECORDED")
    assert len(sandbox.accepted_conversions) == 1


def test_a_dropped_request_is_retryable(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.drop(1, seconds=0.05, path=":uploadClickConversions")
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1)])

    assert outcome_of(result, 1)[:2] == (RETRYABLE, "SERVER_ERROR") and sandbox.accepted_conversions == []


def test_an_invalid_request_is_permanent(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    sandbox.fail(1, status=400, path=":uploadClickConversions")
    result = ADS.send_conversions(client, ads_destination(sandbox), [purchase(1), purchase(2)])

    assert {outcome_of(result, i)[:2] for i in (1, 2)} == {(PERMANENT, "INVALID_REQUEST")}


def _refusing(body: dict[str, Any]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"access_token": "ya29.mock", "expires_in": 3600})
        return httpx.Response(400, json=body)
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_a_refused_request_that_names_rows_fails_only_those_rows() -> None:
    ads_body = {"error": {"code": 400, "message": "Invalid value", "status": "INVALID_ARGUMENT", "details": [
        {"@type": "type.googleapis.com/google.rpc.BadRequest",
         "fieldViolations": [{"field": "conversions[1].consent.ad_user_data", "description": "Invalid value"}]}]}}
    destination = DestinationContext("g", "GOOGLE_ADS_CONVERSIONS", settings={
        "customer_id": CUSTOMER, "conversion_actions": {"purchase": "1"}, "base_url": "http://mock",
        "token_url": "http://mock/token"}, credentials=REFRESH_CREDENTIALS)
    with _refusing(ads_body) as mock:
        result = ADS.send_conversions(mock, destination, [purchase(1), purchase(2), purchase(3)])
    assert outcome_of(result, 2)[:2] == (PERMANENT, "INVALID_REQUEST")
    assert {outcome_of(result, i)[:2] for i in (1, 3)} == {(RETRYABLE, "BATCH_REJECTED")}

    dm_body = {"error": {"code": 400, "message": "There was a problem with the request.",
                         "status": "INVALID_ARGUMENT", "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT"},
        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
            {"field": "audience_members.audience_members[0]", "reason": "INVALID_SHA256_FORMAT"}]}]}}
    destination = DestinationContext("l", "GOOGLE_DATA_MANAGER_AUDIENCE", settings={
        "operating_account_id": CUSTOMER, "product_destination_id": LIST_ID, "base_url": "http://mock",
        "token_url": "http://mock/token"}, credentials=REFRESH_CREDENTIALS)
    people = [AudienceChange(i, PersonKeys(google_emails=(sha(f"m{i}@example.com"),))) for i in (1, 2)]
    with _refusing(dm_body) as mock:
        result = AUDIENCE.send_audience(mock, destination, "add", people)
    assert outcome_of(result, 1) == (PERMANENT, "INVALID_REQUEST", "INVALID_SHA256_FORMAT")
    assert outcome_of(result, 2)[:2] == (RETRYABLE, "BATCH_REJECTED")


# -- Data Manager audiences -------------------------------------------------------------------------

def test_members_are_ingested_with_their_google_hashes_and_consent(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    ann = PersonKeys(emails=(sha("ann.lee@gmail.com"),), google_emails=(sha("annlee@gmail.com"),))
    bob = PersonKeys(phones_e164=(sha("+14155550123"),), phones_meta=(sha("14155550123"),))
    nobody = PersonKeys(user_ids=("u-9",), phones_meta=(sha("14155550999"),))
    records = [AudienceChange(1, ann), AudienceChange(2, bob), AudienceChange(3, nobody)]

    result = AUDIENCE.send_audience(client, audience_destination(sandbox, login_account_id="999-000-1111"),
                                    "add", records)

    assert outcome_of(result, 1) == outcome_of(result, 2) == (SUCCEEDED, "", "")
    assert outcome_of(result, 3)[:2] == (PERMANENT, "NO_MATCH_KEYS")
    assert sandbox.audience_members(LIST_ID) == {sha("annlee@gmail.com"), sha("+14155550123")}
    [request] = sandbox.audience_requests
    assert request.action == "ingest" and request.encoding == "HEX" and request.members == 2
    assert request.destinations == (("GOOGLE_ADS", CUSTOMER, LIST_ID, "9990001111"),)
    assert request.consent == {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"}
    assert "requestId" in result.response_excerpt


def test_members_are_removed(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    people = [AudienceChange(i, PersonKeys(google_emails=(sha(f"p{i}@example.com"),))) for i in (1, 2, 3)]
    AUDIENCE.send_audience(client, audience_destination(sandbox), "add", people)

    result = AUDIENCE.send_audience(client, audience_destination(sandbox), "remove", people[:2])

    assert {o.classification for o in result.outcomes.values()} == {SUCCEEDED}
    assert sandbox.audience_members(LIST_ID) == {sha("p3@example.com")}
    assert sandbox.audience_requests[-1].action == "remove" and sandbox.audience_requests[-1].consent == {}


def test_a_replacement_batch_is_ingested_and_identifiers_are_capped_at_ten(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    keys = PersonKeys(google_emails=tuple(sha(f"x{i}@example.com") for i in range(8)),
                      phones_e164=tuple(sha(f"+4420700000{i}") for i in range(8)))
    session = ReplaceSession(session_id=1, batch_seq=1, last_batch=True, estimated_total=1)

    result = AUDIENCE.send_audience(client, audience_destination(sandbox), "add", [AudienceChange(1, keys)], session)

    assert outcome_of(result, 1)[0] == SUCCEEDED
    assert len(sandbox.audience_members(LIST_ID)) == 10
    assert sandbox.audience_requests[0].action == "ingest"


def test_data_manager_failures_are_classified(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    people = [AudienceChange(1, PersonKeys(google_emails=(sha("q@example.com"),)))]
    sandbox.exhaust_quota(1, retry_delay=12)
    throttled = AUDIENCE.send_audience(client, audience_destination(sandbox), "add", people)
    assert outcome_of(throttled, 1) == (THROTTLED, "RATE_LIMITED", "RESOURCE_EXHAUSTED")
    assert throttled.retry_after_seconds == 12

    sandbox.fail(1, status=503, path="audienceMembers")
    assert outcome_of(AUDIENCE.send_audience(client, audience_destination(sandbox), "add", people), 1)[0] == RETRYABLE

    stale = AUDIENCE.send_audience(client, audience_destination(sandbox, credentials={"token": "ya29.old"}),
                                   "add", people)
    assert outcome_of(stale, 1) == (PERMANENT, "INVALID_TOKEN", "ACCESS_TOKEN_EXPIRED")
    assert sandbox.audience_members(LIST_ID) == set()


def test_a_data_manager_refusal_naming_no_member_fails_the_batch_with_its_reason(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    people = [AudienceChange(1, PersonKeys(google_emails=(sha("r@example.com"),)))]
    result = AUDIENCE.send_audience(client, audience_destination(sandbox, operating_account_type="DATA_PARTNER",
                                                                 product_destination_id=""), "add", people)
    assert outcome_of(result, 1)[:2] == (PERMANENT, "INVALID_SETTINGS") and result.requests == 0

    result = AUDIENCE.send_audience(client, audience_destination(sandbox, operating_account_type="BOGUS"), "add",
                                    people)
    assert outcome_of(result, 1)[:2] == (PERMANENT, "INVALID_SETTINGS")

    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT"},
               {"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "destinations", "reason": "TOO_MANY_DESTINATIONS"}]}]
    refusal = {"error": {"code": 400, "message": "There was a problem with the request.",
                         "status": "INVALID_ARGUMENT", "details": details}}
    destination = DestinationContext("l", "GOOGLE_DATA_MANAGER_AUDIENCE", settings={
        "operating_account_id": CUSTOMER, "product_destination_id": LIST_ID, "base_url": "http://mock",
        "token_url": "http://mock/token"}, credentials=REFRESH_CREDENTIALS)
    with _refusing(refusal) as mock:
        result = AUDIENCE.send_audience(mock, destination, "add", people)
    assert outcome_of(result, 1) == (PERMANENT, "INVALID_REQUEST", "TOO_MANY_DESTINATIONS")


# -- the sandbox validates like Google ------------------------------------------------------------

def _conversion(**changes: Any) -> dict[str, Any]:
    row = {"conversionAction": f"customers/{CUSTOMER}/conversionActions/{PURCHASE_ACTION}",
           "conversionDateTime": "2026-01-15 14:30:00+00:00", "orderId": "o-1",
           "userIdentifiers": [{"hashedEmail": sha("a@example.com")}]}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def _upload(client: httpx.Client, sandbox: GoogleSandbox, body: Any, *, developer_token: str | None = "dev",
            token: str = "sandbox-token") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if developer_token:
        headers["developer-token"] = developer_token
    return client.post(f"{sandbox.url}/v25/customers/{CUSTOMER}:uploadClickConversions", json=body, headers=headers)


def _ads_error_code(response: httpx.Response) -> str:
    [failure] = response.json()["error"]["details"]
    [code] = failure["errors"][0]["errorCode"].items()
    return f"{code[0]}.{code[1]}"


@pytest.mark.parametrize(("kwargs", "body", "status", "code"), [
    ({"developer_token": None}, {"conversions": [_conversion()], "partialFailure": True}, 400,
     "requestError.DEVELOPER_TOKEN_PARAMETER_MISSING"),
    ({"token": "wrong"}, {"conversions": [_conversion()], "partialFailure": True}, 401,
     "authenticationError.OAUTH_TOKEN_INVALID"),
    ({}, {"conversions": [_conversion()]}, 400, "partialFailureError.PARTIAL_FAILURE_MODE_REQUIRED"),
    ({}, {"conversions": [_conversion(orderId=f"o-{i}") for i in range(2001)], "partialFailure": True}, 400,
     "conversionUploadError.TOO_MANY_CONVERSIONS_IN_REQUEST"),
])
def test_sandbox_refuses_whole_requests_in_googles_envelope(
        sandbox: GoogleSandbox, client: httpx.Client, kwargs: dict[str, Any], body: Any, status: int,
        code: str) -> None:
    response = _upload(client, sandbox, body, **kwargs)

    assert response.status_code == status
    assert response.json()["error"]["code"] == status and response.json()["error"]["status"]
    assert _ads_error_code(response) == code
    assert sandbox.accepted_conversions == [] and sandbox.rows_received == 0


def test_sandbox_refuses_unknown_fields_and_enum_values_for_the_whole_request(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    for row in (_conversion(debugEnabled=True), _conversion(consent={"adUserData": "YES"})):
        response = _upload(client, sandbox, {"conversions": [_conversion(orderId="ok"), row], "partialFailure": True})
        assert response.status_code == 400
        [violation] = response.json()["error"]["details"][0]["fieldViolations"]
        assert violation["field"].startswith("conversions[1]")
    assert sandbox.accepted_conversions == []


@pytest.mark.parametrize(("row", "code"), [
    (_conversion(conversionDateTime="2026-01-15T14:30:00Z"), "dateError.INVALID_FIELD_VALUES_IN_DATE_TIME"),
    (_conversion(conversionDateTime="2026-01-15 14:30:00"), "dateError.INVALID_FIELD_VALUES_IN_DATE_TIME"),
    (_conversion(userIdentifiers=[{"hashedEmail": sha(f"{i}@x.com")} for i in range(6)]),
     "collectionSizeError.TOO_MANY"),
    (_conversion(userIdentifiers=[{"hashedEmail": sha("a@x.com"), "hashedPhoneNumber": sha("+15550000000")}]),
     "conversionUploadError.INVALID_USER_IDENTIFIER"),
    (_conversion(userIdentifiers=[{"hashedEmail": sha("a@x.com").upper()}]),
     "conversionUploadError.INVALID_USER_IDENTIFIER"),
    (_conversion(userIdentifiers=[{"hashedEmail": "a@x.com"}]), "conversionUploadError.INVALID_USER_IDENTIFIER"),
    (_conversion(userIdentifiers=[{"addressInfo": {"hashedFirstName": sha("ann")}}]),
     "conversionUploadError.UNSUPPORTED_USER_IDENTIFIER"),
    (_conversion(gbraid="g", wbraid="w"), "conversionUploadError.GBRAID_WBRAID_BOTH_SET"),
    (_conversion(userIdentifiers=[]), "fieldError.REQUIRED"),
    (_conversion(conversionAction=f"customers/{CUSTOMER}/conversionActions/404"),
     "conversionUploadError.NO_CONVERSION_ACTION_FOUND"),
    (_conversion(orderId="o-0"), "conversionUploadError.DUPLICATE_ORDER_ID"),
])
def test_sandbox_reports_row_errors_in_partial_failure(
        sandbox: GoogleSandbox, client: httpx.Client, row: dict[str, Any], code: str) -> None:
    response = _upload(client, sandbox, {"conversions": [_conversion(orderId="o-0"), row], "partialFailure": True})

    assert response.status_code == 200
    partial = response.json()["partialFailureError"]
    [error] = partial["details"][0]["errors"]
    assert f"{next(iter(error['errorCode']))}.{next(iter(error['errorCode'].values()))}" == code
    assert error["location"]["fieldPathElements"][0] == {"fieldName": "conversions", "index": 1}
    assert response.json()["results"][1] == {}
    assert [c.order_id for c in sandbox.accepted_conversions] == ["o-0"]


def test_sandbox_refuses_a_click_conversion_it_already_has_without_order_id(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    body = {"conversions": [_conversion(orderId=None, gclid="click-1")], "partialFailure": True}
    assert "partialFailureError" not in _upload(client, sandbox, body).json()

    again = _upload(client, sandbox, body).json()

    [error] = again["partialFailureError"]["details"][0]["errors"]
    assert error["errorCode"] == {"conversionUploadError": "CLICK_CONVERSION_ALREADY_EXISTS"}
    assert len(sandbox.accepted_conversions) == 1 and sandbox.duplicate_count == 1


def test_sandbox_issues_tokens_only_for_its_client(sandbox: GoogleSandbox, client: httpx.Client) -> None:
    form = {"grant_type": "refresh_token", "client_id": "sandbox-client-id",
            "client_secret": "sandbox-client-secret", "refresh_token": "sandbox-refresh-token"}
    granted = client.post(f"{sandbox.url}/token", data=form)
    assert granted.status_code == 200 and granted.json()["expires_in"] > 0
    token = granted.json()["access_token"]
    assert _upload(client, sandbox, {"conversions": [_conversion()], "partialFailure": True},
                   token=token).status_code == 200

    assert client.post(f"{sandbox.url}/token", data={**form, "grant_type": "password"}).json()["error"] == \
        "unsupported_grant_type"
    refused = client.post(f"{sandbox.url}/token", data={**form, "refresh_token": "other"})
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


def _members(client: httpx.Client, sandbox: GoogleSandbox, body: dict[str, Any],
             method: str = "ingest") -> httpx.Response:
    return client.post(f"{sandbox.url}/v1/audienceMembers:{method}", json=body,
                       headers={"Authorization": "Bearer sandbox-token"})


def _member_body(*members: Any, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "destinations": [{"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": CUSTOMER},
                          "productDestinationId": LIST_ID}],
        "audienceMembers": list(members) or [{"userData": {"userIdentifiers": [{"emailAddress": sha("a@b.c")}]}}],
        "encoding": "HEX"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("body", "method", "field", "reason"), [
    (_member_body({"userData": {"userIdentifiers": [{"emailAddress": "someone@example.com"}]}}), "ingest",
     "audience_members.audience_members[0].user_data.user_identifiers", "INVALID_HEX_ENCODING"),
    (_member_body({"userData": {"userIdentifiers": [{"emailAddress": "ab" * 16}]}}), "ingest",
     "audience_members.audience_members[0]", "INVALID_SHA256_FORMAT"),
    (_member_body({"userData": {"userIdentifiers": [{"emailAddress": sha(str(i))} for i in range(11)]}}), "ingest",
     "audience_members.audience_members[0].user_data.user_identifiers", "TOO_MANY_USER_IDENTIFIERS"),
    (_member_body(*[{"userData": {"userIdentifiers": [{"emailAddress": sha("x")}]}}] * 10_001), "ingest",
     "audience_members", "TOO_MANY_AUDIENCE_MEMBERS"),
    (_member_body(destinations=[]), "ingest", "destinations", "REQUIRED_FIELD_MISSING"),
    (_member_body(encoding=None), "remove", "encoding", "REQUIRED_FIELD_MISSING"),
])
def test_sandbox_refuses_bad_audience_requests_as_a_whole(
        sandbox: GoogleSandbox, client: httpx.Client, body: dict[str, Any], method: str, field: str,
        reason: str) -> None:
    response = _members(client, sandbox, body, method)

    assert response.status_code == 400 and response.json()["error"]["status"] == "INVALID_ARGUMENT"
    details = response.json()["error"]["details"]
    assert details[0]["reason"] == "INVALID_ARGUMENT"
    assert {"field": field, "reason": reason} == {k: details[1]["fieldViolations"][0][k] for k in ("field", "reason")}
    assert sandbox.audience_requests == [] and sandbox.audience_members(LIST_ID) == set()


def test_sandbox_refuses_consent_on_removal_and_answers_a_request_id(
        sandbox: GoogleSandbox, client: httpx.Client) -> None:
    consent = {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"}
    assert _members(client, sandbox, _member_body(consent=consent), "remove").status_code == 400
    accepted = _members(client, sandbox, _member_body(consent=consent), "ingest")
    assert accepted.status_code == 200 and accepted.json()["requestId"]
    assert sandbox.audience_members(LIST_ID) == {sha("a@b.c")}
