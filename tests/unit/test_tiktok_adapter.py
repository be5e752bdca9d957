"""The TikTok adapters against the TikTok sandbox: what TikTok would accept and record, how
its replies are classified, and the sandbox's own validation."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

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
    sha256_hex,
)
from audiences.destinations.tiktok import (
    OFFLINE_MAX_AGE_SECONDS,
    TikTokAudienceAdapter,
    TikTokEventsAdapter,
    classify_code,
)
from tests.sandboxes.base import running
from tests.sandboxes.tiktok import TikTokSandbox

TOKEN = "tt-access-token-5c1d9e"
PIXEL = "CPIXEL0123456789AB"
ADVERTISER = "7012345678901234567"
AUDIENCE = "audience-1"
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1"
EMAIL = sha256_hex("ada@example.com")
EMAIL_2 = sha256_hex("ada.lovelace@example.org")
PHONE = sha256_hex("+447700900123")
PHONE_META = sha256_hex("447700900123")
HASH_RE = re.compile(r"[0-9a-fA-F]{64}")

EVENTS = TikTokEventsAdapter()
AUDIENCES = TikTokAudienceAdapter()


class Clock:
    """A movable clock for the sandbox's dedup window."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def shared_clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def server(shared_clock: Clock) -> Iterator[TikTokSandbox]:
    # One server for the module: stopping one waits out its 0.5 s poll interval.
    with running(TikTokSandbox(tokens={TOKEN}, clock=shared_clock)) as started:
        assert isinstance(started, TikTokSandbox)
        yield started


@pytest.fixture
def clock(shared_clock: Clock) -> Iterator[Clock]:
    yield shared_clock
    shared_clock.offset = 0.0


@pytest.fixture
def sandbox(server: TikTokSandbox, clock: Clock) -> TikTokSandbox:
    server.reset()
    return server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


def events_destination(sandbox: TikTokSandbox, token: str = TOKEN, timeout: float = 5.0,
                       **settings: Any) -> DestinationContext:
    return DestinationContext("tiktok-pixel", "TIKTOK_EVENTS",
                              {"base_url": sandbox.url, "event_source_id": PIXEL, **settings}, {"token": token},
                              timeout_seconds=timeout)


def audience_destination(sandbox: TikTokSandbox, token: str = TOKEN, **settings: Any) -> DestinationContext:
    return DestinationContext("tiktok-list", "TIKTOK_AUDIENCE",
                              {"base_url": sandbox.url, "advertiser_id": ADVERTISER, "audience_id": AUDIENCE,
                               **settings}, {"access_token": token}, timeout_seconds=5.0)


def conversion(delivery_id: int, event: str = "purchase", *, age_seconds: float = 60.0,
               keys: PersonKeys | None = None, **fields: Any) -> Conversion:
    occurred = int((time.time() - age_seconds) * 1_000_000)
    return Conversion(delivery_id=delivery_id, event_id=f"evt-{delivery_id}", event=event, occurred_us=occurred,
                      keys=keys if keys is not None else PersonKeys(emails=(EMAIL,)), **fields)


def reasons(result: BatchResult) -> dict[int, tuple[str, str]]:
    return {d: (o.classification, o.status_reason) for d, o in result.outcomes.items()}


def post_events(sandbox: TikTokSandbox, data: list[dict[str, Any]], token: str | None = TOKEN,
                **body: Any) -> httpx.Response:
    headers = {"Access-Token": token} if token is not None else {}
    payload = {"event_source": "web", "event_source_id": PIXEL, "data": data, **body}
    return httpx.post(f"{sandbox.url}/open_api/v1.3/event/track/", json=payload, headers=headers)


def good_event(n: int = 0, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event": "Purchase", "event_time": int(time.time()) - 60, "event_id": f"raw-{n}",
                             "user": {"email": [EMAIL]}, "properties": {"value": 10.5, "currency": "EUR"}}
    event.update(overrides)
    return event


# -- field mapping ------------------------------------------------------------------------------

def test_a_purchase_carries_the_email_hash_learnt_elsewhere_with_its_event_id_value_and_currency(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    # The purchase itself carried only a user ID; the graph knows the email from an identify.
    record = conversion(1, keys=PersonKeys(person_id="p1", emails=(EMAIL,), user_ids=("u-1",)), value="129.90",
                        currency="eur", order_id="order-77")
    result = EVENTS.send_conversions(client, events_destination(sandbox), [record])

    assert reasons(result) == {1: (SUCCEEDED, "")}
    assert result.http_status == 200 and result.requests == 1
    [event] = sandbox.accepted_events
    assert event["event"] == "Purchase"
    assert event["event_id"] == "evt-1"
    assert event["event_time"] == record.occurred_us // 1_000_000
    assert event["user"]["email"] == [EMAIL]
    assert event["properties"] == {"value": 129.9, "currency": "EUR", "order_id": "order-77"}
    assert (event["event_source"], event["event_source_id"]) == ("web", PIXEL)
    assert event["limited_data_use"] is False


def test_the_phone_goes_as_the_e164_hash_with_plus_never_the_meta_form(sandbox: TikTokSandbox,
                                                                       client: httpx.Client) -> None:
    keys = PersonKeys(phones_e164=(PHONE,), phones_meta=(PHONE_META,))
    EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1, "sign_up", keys=keys)])

    [event] = sandbox.accepted_events
    assert event["event"] == "CompleteRegistration"
    assert event["user"] == {"phone": [PHONE]}


def test_user_ids_go_as_sha256_of_the_trimmed_lower_cased_id(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    keys = PersonKeys(user_ids=("  User-42 ", "user-42", "B7"))
    EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1, "lead", keys=keys)])

    [event] = sandbox.accepted_events
    assert event["event"] == "Lead"
    assert event["user"]["external_id"] == [sha256_hex("user-42"), sha256_hex("b7")]
    assert "User-42" not in str(event)


def test_limited_data_use_is_flagged_per_event_and_the_test_event_code_routes_the_request(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    destination = events_destination(sandbox, test_event_code="TEST42118")
    EVENTS.send_conversions(client, destination, [conversion(1, limited_data_use=True), conversion(2)])

    flags = {e["event_id"]: e["limited_data_use"] for e in sandbox.accepted_events}
    assert flags == {"evt-1": True, "evt-2": False}
    assert {e["test_event_code"] for e in sandbox.accepted_events} == {"TEST42118"}


def test_context_items_and_page_reach_the_user_properties_and_page_objects(sandbox: TikTokSandbox,
                                                                           client: httpx.Client) -> None:
    context = {"ip": "203.0.113.9", "user_agent": UA, "ttclid": "E.C.P.abc123", "ttp": "2Yx-ttp-cookie",
               "locale": "en-GB", "page_url": "https://shop.example/cart", "referrer": "https://www.tiktok.com/"}
    items = ({"item_id": "SKU-1", "name": "Lamp", "category": "Home", "brand": "Acme", "quantity": 2,
              "price": "24.5"},)
    EVENTS.send_conversions(client, events_destination(sandbox, event_source="web"),
                            [conversion(1, "add_to_cart", context=context, items=items)])

    [event] = sandbox.accepted_events
    assert event["event"] == "AddToCart"
    assert event["user"] == {"email": [EMAIL], "ip": "203.0.113.9", "user_agent": UA, "ttclid": "E.C.P.abc123",
                             "ttp": "2Yx-ttp-cookie", "locale": "en-GB"}
    assert event["properties"] == {"content_type": "product", "contents": [
        {"content_id": "SKU-1", "content_name": "Lamp", "content_category": "Home", "brand": "Acme", "price": 24.5,
         "quantity": 2}]}
    assert event["page"] == {"url": "https://shop.example/cart", "referrer": "https://www.tiktok.com/"}


@pytest.mark.parametrize(("canonical", "overrides", "expected"), [
    ("sign_up", {}, "CompleteRegistration"),
    ("lead", {}, "Lead"),
    ("start_trial", {}, "StartTrial"),
    ("view_content", {}, "ViewContent"),
    ("add_to_cart", {}, "AddToCart"),
    ("begin_checkout", {}, "InitiateCheckout"),
    ("add_payment_info", {}, "AddPaymentInfo"),
    ("purchase", {}, "Purchase"),
    ("page_view", {}, None),
    ("refund", {}, None),
    ("qualify_lead", {}, None),
    ("webinar_joined", {}, None),
    ("page_view", {"page_view": "Pageview"}, "Pageview"),
    ("purchase", {"purchase": "CompletePayment"}, "CompletePayment"),
    ("purchase", {"purchase": ""}, None),
    ("webinar_joined", {"webinar_joined": "Webinar"}, "Webinar"),
])
def test_canonical_events_map_to_tiktok_standard_events_unless_overridden(
        canonical: str, overrides: dict[str, str], expected: str | None) -> None:
    assert EVENTS.platform_event(canonical, {"event_names": overrides}) == expected


# -- pre-validation ------------------------------------------------------------------------------

def test_an_unmapped_event_is_left_out_and_nothing_is_sent(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    result = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1, "refund")])

    assert reasons(result) == {1: (PERMANENT, "EVENT_NOT_MAPPED")}
    assert result.requests == 0
    assert sandbox.requests == []


def test_a_person_tiktok_cannot_match_is_excluded_while_the_rest_are_accepted(sandbox: TikTokSandbox,
                                                                              client: httpx.Client) -> None:
    records = [
        conversion(1, keys=PersonKeys(person_id="nobody")),
        conversion(2, keys=PersonKeys(), context={"ip": "203.0.113.9"}),  # IP without a user agent
        conversion(3, keys=PersonKeys(), context={"ttclid": "E.C.P.xyz"}),
        conversion(4, keys=PersonKeys(), context={"ip": "203.0.113.9", "user_agent": UA}),
        conversion(5),
    ]
    result = EVENTS.send_conversions(client, events_destination(sandbox), records)

    assert reasons(result) == {1: (PERMANENT, "NO_MATCH_KEYS"), 2: (PERMANENT, "NO_MATCH_KEYS"),
                               3: (SUCCEEDED, ""), 4: (SUCCEEDED, ""), 5: (SUCCEEDED, "")}
    assert [e["event_id"] for e in sandbox.accepted_events] == ["evt-3", "evt-4", "evt-5"]


def test_a_too_old_offline_event_is_excluded_without_rejecting_the_others(sandbox: TikTokSandbox,
                                                                          client: httpx.Client) -> None:
    destination = events_destination(sandbox, event_source="offline")
    records = [conversion(1, age_seconds=30 * 86400), conversion(2, age_seconds=86400)]
    result = EVENTS.send_conversions(client, destination, records)

    assert reasons(result) == {1: (PERMANENT, "EVENT_TOO_OLD"), 2: (SUCCEEDED, "")}
    assert [(e["event_id"], e["event_source"]) for e in sandbox.accepted_events] == [("evt-2", "offline")]


def test_only_offline_events_have_an_age_limit() -> None:
    assert EVENTS.max_age_seconds({"event_source": "offline"}, "physical_store") == OFFLINE_MAX_AGE_SECONDS
    assert EVENTS.max_age_seconds({}, "website") is None
    assert EVENTS.max_age_seconds({"event_source": "app"}, "app") is None


def test_bad_values_and_currencies_and_future_times_are_excluded(sandbox: TikTokSandbox,
                                                                 client: httpx.Client) -> None:
    records = [conversion(1, value="12,50", currency="EUR"), conversion(2, value="9.99", currency="EURO"),
               conversion(3, age_seconds=-3600), conversion(4, value="5", currency="gbp")]
    result = EVENTS.send_conversions(client, events_destination(sandbox), records)

    assert reasons(result) == {1: (PERMANENT, "INVALID_VALUE"), 2: (PERMANENT, "INVALID_CURRENCY"),
                               3: (PERMANENT, "EVENT_TIME_IN_FUTURE"), 4: (SUCCEEDED, "")}
    assert [e["properties"] for e in sandbox.accepted_events] == [{"value": 5.0, "currency": "GBP"}]


def test_hashed_looking_never_hash_fields_are_dropped_instead_of_poisoning_the_batch(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    record = conversion(1, context={"ip": sha256_hex("203.0.113.9"), "user_agent": UA})
    result = EVENTS.send_conversions(client, events_destination(sandbox), [record])

    assert reasons(result) == {1: (SUCCEEDED, "")}
    assert sandbox.accepted_events[0]["user"] == {"email": [EMAIL], "user_agent": UA}


def test_a_destination_without_event_source_id_or_token_sends_nothing(sandbox: TikTokSandbox,
                                                                      client: httpx.Client) -> None:
    missing = DestinationContext("t", "TIKTOK_EVENTS", {"base_url": sandbox.url}, {"token": TOKEN})
    no_token = events_destination(sandbox, token="")

    assert reasons(EVENTS.send_conversions(client, missing, [conversion(1)])) == {1: (PERMANENT, "MISSING_SETTING")}
    assert reasons(EVENTS.send_conversions(client, no_token, [conversion(1)])) == {1: (PERMANENT, "INVALID_TOKEN")}
    assert sandbox.requests == []


# -- dedup and refusal -----------------------------------------------------------------------------

def test_a_resent_batch_is_deduplicated_by_event_and_event_id_within_48_hours(
        sandbox: TikTokSandbox, client: httpx.Client, clock: Clock) -> None:
    records = [conversion(n) for n in range(1, 4)]
    first = EVENTS.send_conversions(client, events_destination(sandbox), records)
    again = EVENTS.send_conversions(client, events_destination(sandbox), records)

    assert set(reasons(first).values()) == set(reasons(again).values()) == {(SUCCEEDED, "")}
    assert len(sandbox.accepted_events) == 3
    assert sandbox.duplicate_count == 3

    clock.offset = 49 * 3600
    EVENTS.send_conversions(client, events_destination(sandbox), records[:1])
    assert len(sandbox.accepted_events) == 4


def test_a_batch_tiktok_refuses_for_one_named_row_fails_only_that_record(sandbox: TikTokSandbox,
                                                                         client: httpx.Client) -> None:
    sandbox.reject(1, 40002, "data[1].user.email[0]: must be a lower-case SHA-256 hex digest.")
    records = [conversion(1), conversion(2), conversion(3)]
    result = EVENTS.send_conversions(client, events_destination(sandbox), records)

    assert reasons(result) == {1: (RETRYABLE, "BATCH_REJECTED"), 2: (PERMANENT, "INVALID_REQUEST"),
                               3: (RETRYABLE, "BATCH_REJECTED")}
    assert result.outcomes[2].platform_error_code == "40002"
    assert sandbox.accepted_events == []

    retried = EVENTS.send_conversions(client, events_destination(sandbox), [records[0], records[2]])
    assert set(reasons(retried).values()) == {(SUCCEEDED, "")}


# -- classification --------------------------------------------------------------------------------

def test_a_bad_token_is_permanent_invalid_token_although_tiktok_answers_http_200(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    result = EVENTS.send_conversions(client, events_destination(sandbox, token="expired-token-123"),
                                     [conversion(1)])

    outcome = result.outcomes[1]
    assert result.http_status == 200
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == (
        PERMANENT, "INVALID_TOKEN", "40105")
    assert "expired-token-123" not in result.response_excerpt + outcome.error
    assert sandbox.accepted_events == []


def test_the_rate_limit_code_is_throttled(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.reject(1, 40100, "Too many requests. Please retry in some time.")
    result = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])

    outcome = result.outcomes[1]
    assert (result.http_status, outcome.classification, outcome.platform_error_code) == (200, THROTTLED, "40100")


def test_http_429_is_throttled_with_its_retry_after(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.throttle(1, retry_after=7)
    result = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])

    assert result.outcomes[1].classification == THROTTLED
    assert result.retry_after_seconds == 7
    assert sandbox.accepted_events == []


@pytest.mark.parametrize("status", [500, 503])
def test_a_server_error_is_retryable(sandbox: TikTokSandbox, client: httpx.Client, status: int) -> None:
    sandbox.fail(1, status=status)
    result = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])

    assert (result.outcomes[1].classification, result.outcomes[1].platform_error_code) == (RETRYABLE, str(status))


def test_tiktok_internal_error_codes_are_retryable_and_permission_codes_permanent(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.reject(1, 50002, "Service busy")
    busy = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])
    sandbox.reject(1, 40001, "No permission to operate pixel")
    denied = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])

    assert reasons(busy) == {1: (RETRYABLE, "PLATFORM_ERROR")}
    assert reasons(denied) == {1: (PERMANENT, "PERMISSION_DENIED")}


def test_a_timeout_is_retryable_and_the_resend_of_a_stalled_batch_is_deduplicated(
        sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.stall(1, 0.6)
    slow = events_destination(sandbox, timeout=0.2)
    first = EVENTS.send_conversions(client, slow, [conversion(1)])
    assert reasons(first) == {1: (RETRYABLE, "TRANSPORT_ERROR")}

    time.sleep(0.7)  # TikTok processed the stalled request after the client gave up
    again = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])
    assert reasons(again) == {1: (SUCCEEDED, "")}
    assert len(sandbox.accepted_events) == 1 and sandbox.duplicate_count == 1


def test_a_dropped_request_is_retryable(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.drop(1, 0.5)
    result = EVENTS.send_conversions(client, events_destination(sandbox, timeout=0.2), [conversion(1)])

    assert reasons(result) == {1: (RETRYABLE, "TRANSPORT_ERROR")}
    assert sandbox.accepted_events == []


@pytest.mark.parametrize(("code", "classification", "reason"), [
    (40000, PERMANENT, "INVALID_REQUEST"),
    (40001, PERMANENT, "PERMISSION_DENIED"),
    (40002, PERMANENT, "INVALID_REQUEST"),
    (40007, PERMANENT, "PERMISSION_DENIED"),
    (40100, THROTTLED, "RATE_LIMITED"),
    (40102, PERMANENT, "PERMISSION_DENIED"),
    (40104, PERMANENT, "INVALID_TOKEN"),
    (40105, PERMANENT, "INVALID_TOKEN"),
    (50000, RETRYABLE, "PLATFORM_ERROR"),
    (50002, RETRYABLE, "PLATFORM_ERROR"),
])
def test_tiktok_codes_classify(code: int, classification: str, reason: str) -> None:
    outcome = classify_code(code, "message")
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == (
        classification, reason, str(code))


def test_excerpts_and_errors_carry_no_token_and_no_hash(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    sandbox.reject(1, 40002, f"data[0].user.email[0] {EMAIL} rejected for token {TOKEN}")
    refused = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1)])
    accepted = EVENTS.send_conversions(client, events_destination(sandbox), [conversion(2)])

    for result in (refused, accepted):
        texts = [result.response_excerpt, *(o.error for o in result.outcomes.values())]
        assert all(TOKEN not in t and not HASH_RE.search(t) for t in texts), texts
    assert "data[0]" in refused.outcomes[1].error


# -- the sandbox's own validation ------------------------------------------------------------------

def test_the_sandbox_refuses_the_whole_batch_for_one_bad_row_and_records_nothing(sandbox: TikTokSandbox) -> None:
    response = post_events(sandbox, [good_event(0), good_event(1, user={"email": ["ada@example.com"]}),
                                     good_event(2)])

    assert response.status_code == 200
    body = response.json()
    assert body["code"] == 40002 and body["data"] == {} and body["request_id"]
    assert body["message"].startswith("data[1].user.email[0]")
    assert sandbox.accepted_events == [] and sandbox.event_requests == 0


@pytest.mark.parametrize(("change", "field"), [
    ({"event_time": int(time.time() * 1000)}, "event_time"),
    ({"event_time": str(int(time.time()))}, "event_time"),
    ({"event_id": None}, "event_id"),
    ({"event": ""}, "event"),
    ({"user": {}}, "user"),
    ({"user": {"email": EMAIL.upper()}}, "user.email"),
    ({"user": {"external_id": ["user-42"]}}, "user.external_id"),
    ({"user": {"email": [EMAIL], "ip": sha256_hex("203.0.113.9")}}, "user.ip"),
    ({"user": {"email": [EMAIL], "ttp": sha256_hex("cookie")}}, "user.ttp"),
    ({"properties": {"value": "10.5", "currency": "EUR"}}, "properties.value"),
    ({"properties": {"value": 10.5, "currency": "euro"}}, "properties.currency"),
    ({"properties": {"contents": [{"content_id": "a", "quantity": 1.5}]}}, "properties.contents[0].quantity"),
    ({"limited_data_use": "yes"}, "limited_data_use"),
])
def test_the_sandbox_validates_each_event_like_tiktok(sandbox: TikTokSandbox, change: dict[str, Any],
                                                      field: str) -> None:
    body = post_events(sandbox, [good_event(0), good_event(1, **change)]).json()

    assert body["code"] == 40002
    assert body["message"].startswith(f"data[1].{field}")
    assert sandbox.accepted_events == []


def test_the_sandbox_refuses_offline_events_older_than_28_days(sandbox: TikTokSandbox) -> None:
    old = good_event(0, event_time=int(time.time()) - 29 * 86400)
    body = post_events(sandbox, [old], event_source="offline").json()

    assert body["code"] == 40002 and "28 days" in body["message"]
    assert post_events(sandbox, [old]).json()["code"] == 0  # web: no documented window


def test_the_sandbox_refuses_more_than_1000_events(sandbox: TikTokSandbox) -> None:
    body = post_events(sandbox, [good_event(n) for n in range(1001)]).json()

    assert body["code"] == 40002 and "1000" in body["message"]
    assert sandbox.accepted_events == []
    assert EVENTS.batch_limit == AUDIENCES.batch_limit == 1000
    assert KINDS[EVENTS.kind].batch_limit == EVENTS.batch_limit
    assert KINDS[AUDIENCES.kind].batch_limit == AUDIENCES.batch_limit


def test_the_sandbox_validates_a_full_batch_quickly(sandbox: TikTokSandbox) -> None:
    data = [good_event(n) for n in range(1000)]
    started = time.perf_counter()
    body = post_events(sandbox, data).json()
    elapsed = time.perf_counter() - started

    assert body["code"] == 0 and len(sandbox.accepted_events) == 1000
    assert elapsed < 0.5, f"1,000 events took {elapsed:.3f}s"


@pytest.mark.parametrize(("token", "code"), [(None, 40104), ("wrong-token", 40105)])
def test_the_sandbox_answers_token_problems_with_tiktok_codes(sandbox: TikTokSandbox, token: str | None,
                                                              code: int) -> None:
    response = post_events(sandbox, [good_event()], token=token)

    assert (response.status_code, response.json()["code"]) == (200, code)
    assert sandbox.accepted_events == []


def test_the_sandbox_requires_event_source_and_its_id(sandbox: TikTokSandbox) -> None:
    assert post_events(sandbox, [good_event()], event_source="email").json()["code"] == 40002
    assert post_events(sandbox, [good_event()], event_source_id="").json()["code"] == 40002
    assert sandbox.accepted_events == []


def test_injected_http_failures_use_tiktoks_envelope(sandbox: TikTokSandbox) -> None:
    sandbox.fail(1, status=503)
    response = post_events(sandbox, [good_event()])

    assert response.status_code == 503
    assert set(response.json()) == {"code", "message", "request_id", "data"}
    assert response.json()["code"] == 50000


# -- audiences ------------------------------------------------------------------------------------

def test_audience_members_are_added_then_removed(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    both = AudienceChange(1, PersonKeys(emails=(EMAIL,), phones_e164=(PHONE,), phones_meta=(PHONE_META,)))
    two_emails = AudienceChange(2, PersonKeys(emails=(EMAIL_2, sha256_hex("ada@work.example"))))
    nothing = AudienceChange(3, PersonKeys(user_ids=("u-3",)))
    destination = audience_destination(sandbox)

    added = AUDIENCES.send_audience(client, destination, "add", [both, two_emails, nothing])
    assert reasons(added) == {1: (SUCCEEDED, ""), 2: (SUCCEEDED, ""), 3: (PERMANENT, "NO_MATCH_KEYS")}
    assert sandbox.audience_members(AUDIENCE) == {
        ("EMAIL_SHA256", EMAIL), ("PHONE_SHA256", PHONE), ("EMAIL_SHA256", EMAIL_2),
        ("EMAIL_SHA256", sha256_hex("ada@work.example"))}
    assert (sandbox.mapping_requests, sandbox.mapping_rows) == (1, 3)

    removed = AUDIENCES.send_audience(client, destination, "remove", [both])
    assert reasons(removed) == {1: (SUCCEEDED, "")}
    assert sandbox.audience_members(AUDIENCE) == {("EMAIL_SHA256", EMAIL_2),
                                                  ("EMAIL_SHA256", sha256_hex("ada@work.example"))}


def test_a_replace_session_only_adds(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    session = ReplaceSession(session_id=9, batch_seq=1, last_batch=True, estimated_total=1)
    result = AUDIENCES.send_audience(client, audience_destination(sandbox), "add",
                                     [AudienceChange(1, PersonKeys(phones_e164=(PHONE,)))], session)

    assert reasons(result) == {1: (SUCCEEDED, "")}
    assert sandbox.audience_members(AUDIENCE) == {("PHONE_SHA256", PHONE)}


def test_audience_token_and_setting_problems(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    person = [AudienceChange(1, PersonKeys(emails=(EMAIL,)))]
    bad_token = AUDIENCES.send_audience(client, audience_destination(sandbox, token="nope-nope"), "add", person)
    no_audience = AUDIENCES.send_audience(client, audience_destination(sandbox, audience_id=""), "add", person)

    assert reasons(bad_token) == {1: (PERMANENT, "INVALID_TOKEN")}
    assert bad_token.outcomes[1].platform_error_code == "40105"
    assert reasons(no_audience) == {1: (PERMANENT, "MISSING_SETTING")} and no_audience.requests == 0
    assert sandbox.audience_members(AUDIENCE) == set()


def test_a_refused_mapping_row_fails_only_its_person(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    people = [AudienceChange(1, PersonKeys(emails=(EMAIL, EMAIL_2))),
              AudienceChange(2, PersonKeys(phones_e164=(PHONE,)))]
    sandbox.reject(1, 40002, "batch_data[2][1].id: must be a lower-case SHA256 hex digest.")
    result = AUDIENCES.send_audience(client, audience_destination(sandbox), "add", people)

    # Rows 0 and 1 belong to person 1; row 2 to person 2.
    assert reasons(result) == {1: (RETRYABLE, "BATCH_REJECTED"), 2: (PERMANENT, "INVALID_REQUEST")}


def post_mapping(sandbox: TikTokSandbox, **body: Any) -> dict[str, Any]:
    payload = {"advertiser_ids": [ADVERTISER], "action": "add", "id_schema": ["EMAIL_SHA256", "PHONE_SHA256"],
               "batch_data": [[{"id": EMAIL, "audience_ids": [AUDIENCE]}, {}]], **body}
    response = httpx.post(f"{sandbox.url}/open_api/v1.3/segment/mapping/", json=payload,
                          headers={"Access-Token": TOKEN})
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(("change", "where"), [
    ({"batch_data": [[{"id": EMAIL, "audience_ids": [AUDIENCE]}]]}, "batch_data[0]"),
    ({"batch_data": [[{"id": "ada@example.com", "audience_ids": [AUDIENCE]}, {}]]}, "batch_data[0][0].id"),
    ({"batch_data": [[{}, {}]]}, "batch_data[0]"),
    ({"batch_data": [[{"id": EMAIL, "audience_ids": []}, {}]]}, "batch_data[0][0].audience_ids"),
    ({"action": "replace"}, "action"),
    ({"id_schema": ["EMAIL"]}, "id_schema"),
    ({"advertiser_ids": []}, "advertiser_ids"),
])
def test_the_sandbox_validates_mapping_requests(sandbox: TikTokSandbox, change: dict[str, Any], where: str) -> None:
    body = post_mapping(sandbox, **change)

    assert body["code"] == 40002 and body["message"].startswith(where)
    assert sandbox.audience_members(AUDIENCE) == set() and sandbox.mapping_requests == 0


def test_the_sandbox_state_reports_what_was_accepted(sandbox: TikTokSandbox, client: httpx.Client) -> None:
    EVENTS.send_conversions(client, events_destination(sandbox), [conversion(1), conversion(1)])
    post_mapping(sandbox)
    state = httpx.get(f"{sandbox.url}/__sandbox/state").json()

    assert state["accepted_events"] == 1 and state["duplicates"] == 1
    assert state["events_by_name"] == {"Purchase": 1}
    assert state["audiences"] == {AUDIENCE: 1}
    sandbox.reset()
    assert sandbox.accepted_events == [] and sandbox.audience_members(AUDIENCE) == set()


def test_each_adapter_refuses_the_other_kinds_work_without_a_request(sandbox: TikTokSandbox,
                                                                     client: httpx.Client) -> None:
    person = AudienceChange(1, PersonKeys(emails=(EMAIL,)))
    wrong_audience = EVENTS.send_audience(client, events_destination(sandbox), "add", [person])
    wrong_events = AUDIENCES.send_conversions(client, audience_destination(sandbox), [conversion(2)])

    assert reasons(wrong_audience) == {1: (PERMANENT, "NOT_SUPPORTED")}
    assert reasons(wrong_events) == {2: (PERMANENT, "NOT_SUPPORTED")}
    assert sandbox.requests == []
