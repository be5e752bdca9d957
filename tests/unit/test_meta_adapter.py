"""The Meta adapters against the Meta sandbox: what Meta would have accepted, and how its
answers are classified (specs/destinations.md §1, §5)."""

from __future__ import annotations

import json
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
from audiences.destinations.meta import MetaConversionsAdapter, MetaCustomAudienceAdapter
from tests.sandboxes.base import running
from tests.sandboxes.meta import MetaSandbox

TOKEN = "sandbox-token"
PIXEL = "1234567890"
AUDIENCE = "23850000000000001"
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1"
PAGE = "https://shop.example/checkout/thanks"
EMAIL = sha256_hex("buyer@example.com")
PHONE_META = sha256_hex("16505551212")
PHONE_E164 = sha256_hex("+16505551212")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
DAY = 86_400

CONVERSIONS = MetaConversionsAdapter()
AUDIENCES = MetaCustomAudienceAdapter()


@pytest.fixture(scope="module")
def served() -> Iterator[MetaSandbox]:
    # One server per module: stopping one waits out serve_forever's half-second poll.
    meta = MetaSandbox()
    with running(meta):
        yield meta


@pytest.fixture
def sandbox(served: MetaSandbox) -> MetaSandbox:
    served.reset()
    served.tokens, served.app_secret, served.clock = {TOKEN}, None, time.time
    return served


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


def pixel(sandbox: MetaSandbox, credentials: dict[str, str] | None = None, timeout: float = 5.0,
          **settings: Any) -> DestinationContext:
    return DestinationContext("meta-pixel", "META_CONVERSIONS",
                              {"pixel_id": PIXEL, "base_url": sandbox.url, **settings},
                              credentials or {"token": TOKEN}, timeout_seconds=timeout)


def audience(sandbox: MetaSandbox, credentials: dict[str, str] | None = None) -> DestinationContext:
    return DestinationContext("meta-list", "META_CUSTOM_AUDIENCE", {"audience_id": AUDIENCE, "base_url": sandbox.url},
                              credentials or {"token": TOKEN})


def web_context(**extra: str) -> dict[str, str]:
    return {"ip": "198.51.100.23", "user_agent": UA, "page_url": PAGE, **extra}


def conversion(delivery_id: int = 1, *, event: str = "purchase", age_seconds: float = 3600,
               keys: PersonKeys | None = None, action_source: str = "website", context: dict[str, str] | None = None,
               value: str | None = "129.90", currency: str | None = "EUR", **fields: Any) -> Conversion:
    return Conversion(delivery_id=delivery_id, event_id=f"evt-{delivery_id}", event=event,
                      occurred_us=int((time.time() - age_seconds) * 1_000_000),
                      keys=keys if keys is not None else PersonKeys(person_id="p1", emails=(EMAIL,)),
                      value=value, currency=currency, action_source=action_source,
                      context=web_context() if context is None else context, **fields)


def person(n: int, *, email: bool = True, phone: bool = False, user_id: bool = False) -> PersonKeys:
    return PersonKeys(person_id=f"p{n}", emails=(sha256_hex(f"user{n}@example.com"),) if email else (),
                      phones_meta=(sha256_hex(f"1650555{n:04d}"),) if phone else (),
                      user_ids=(f"user-{n}",) if user_id else ())


def classifications(result: BatchResult) -> dict[int, tuple[str, str]]:
    return {d: (o.classification, o.status_reason) for d, o in result.outcomes.items()}


def only_event(sandbox: MetaSandbox) -> dict[str, Any]:
    assert len(sandbox.accepted_events) == 1
    return sandbox.accepted_events[0].event


def graph_url(sandbox: MetaSandbox, path: str) -> str:
    return f"{sandbox.url}/v25.0/{path}"


def assert_redacted(result: BatchResult, *secrets: str) -> None:
    texts = [result.response_excerpt, *(o.error for o in result.outcomes.values())]
    for text in texts:
        assert not HEX64.search(text), text
        for secret in secrets:
            assert secret not in text


# -- catalogue and pure mapping ---------------------------------------------------------------------

def test_kinds_and_batch_limits_match_the_catalogue() -> None:
    for adapter in (CONVERSIONS, AUDIENCES):
        assert adapter.batch_limit == KINDS[adapter.kind].batch_limit
    assert (CONVERSIONS.kind, AUDIENCES.kind) == ("META_CONVERSIONS", "META_CUSTOM_AUDIENCE")


@pytest.mark.parametrize(("event", "settings", "expected"), [
    ("sign_up", {}, "CompleteRegistration"),
    ("begin_checkout", {}, "InitiateCheckout"),
    ("purchase", {}, "Purchase"),
    ("page_view", {}, "PageView"),
    ("refund", {}, None),
    ("qualify_lead", {}, None),
    ("webinar_joined", {}, None),
    ("qualify_lead", {"event_names": {"qualify_lead": "QualifiedLead"}}, "QualifiedLead"),
    ("page_view", {"event_names": {"page_view": ""}}, None),
])
def test_platform_event_maps_canonical_names_and_honours_overrides(event: str, settings: dict[str, Any],
                                                                   expected: str | None) -> None:
    assert CONVERSIONS.platform_event(event, settings) == expected


def test_max_age_is_seven_days_and_sixty_two_for_physical_store() -> None:
    assert CONVERSIONS.max_age_seconds({}, "website") == 7 * DAY
    assert CONVERSIONS.max_age_seconds({}, "") == 7 * DAY
    assert CONVERSIONS.max_age_seconds({}, "physical_store") == 62 * DAY
    assert AUDIENCES.max_age_seconds({}, "") is None


# -- Conversions API: what Meta receives -----------------------------------------------------------------

def test_purchase_arrives_with_the_email_hash_learnt_elsewhere(sandbox: MetaSandbox, client: httpx.Client) -> None:
    # The purchase itself carried only a user ID; the graph knows the email hash from an earlier identify.
    keys = PersonKeys(person_id="p1", emails=(EMAIL,), user_ids=("user-42",))
    record = conversion(7, keys=keys, order_id="ord-991")

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [record])

    assert classifications(result) == {7: (SUCCEEDED, "")}
    assert (result.http_status, result.requests) == (200, 1)
    sent = sandbox.accepted_events[0]
    assert (sent.pixel_id, sent.api_version, sent.test_event_code) == (PIXEL, "v25.0", None)
    event = sent.event
    assert event["event_name"] == "Purchase"
    assert event["event_id"] == "evt-7"
    assert event["event_time"] == record.occurred_us // 1_000_000
    assert event["user_data"]["em"] == [EMAIL]
    assert event["user_data"]["external_id"] == ["user-42"]
    assert event["custom_data"]["value"] == 129.9
    assert event["custom_data"]["currency"] == "EUR"
    assert event["custom_data"]["order_id"] == "ord-991"
    assert event["opt_out"] is False
    assert event["data_processing_options"] == []


def test_every_match_key_and_the_event_context_reach_user_data_unhashed_where_meta_says(
        sandbox: MetaSandbox, client: httpx.Client) -> None:
    keys = PersonKeys(person_id="p1", emails=(EMAIL, sha256_hex("b@example.com")), phones_e164=(PHONE_E164,),
                      phones_meta=(PHONE_META,), user_ids=("user-42", "crm-7"))
    context = web_context(fbp="fb.1.1714560000000.1234567890", fbc="fb.1.1714560000000.IwAR0abc")
    items = ({"item_id": "sku-1", "quantity": 2, "price": "40.00"}, {"item_id": "sku-2", "price": "49.90"})

    CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(keys=keys, context=context, items=items)])

    event = only_event(sandbox)
    assert event["action_source"] == "website"
    assert event["event_source_url"] == PAGE
    assert event["user_data"] == {
        "em": [EMAIL, sha256_hex("b@example.com")], "ph": [PHONE_META], "external_id": ["user-42", "crm-7"],
        "client_ip_address": "198.51.100.23", "client_user_agent": UA,
        "fbp": "fb.1.1714560000000.1234567890", "fbc": "fb.1.1714560000000.IwAR0abc",
    }
    assert event["custom_data"]["contents"] == [{"id": "sku-1", "quantity": 2, "item_price": 40.0},
                                                {"id": "sku-2", "quantity": 1, "item_price": 49.9}]
    assert event["custom_data"]["content_ids"] == ["sku-1", "sku-2"]
    assert event["custom_data"]["num_items"] == 3


def test_limited_data_use_records_ask_meta_to_geolocate(sandbox: MetaSandbox, client: httpx.Client) -> None:
    records = [conversion(1, limited_data_use=True), conversion(2)]

    CONVERSIONS.send_conversions(client, pixel(sandbox, limited_data_use=True), records)

    by_id = {e.event["event_id"]: e.event for e in sandbox.accepted_events}
    assert by_id["evt-1"]["data_processing_options"] == ["LDU"]
    assert by_id["evt-1"]["data_processing_options_country"] == 0
    assert by_id["evt-1"]["data_processing_options_state"] == 0
    assert by_id["evt-2"]["data_processing_options"] == []
    assert "data_processing_options_country" not in by_id["evt-2"]


def test_test_event_code_goes_with_the_request(sandbox: MetaSandbox, client: httpx.Client) -> None:
    CONVERSIONS.send_conversions(client, pixel(sandbox, test_event_code="TEST4242"), [conversion()])

    assert sandbox.accepted_events[0].test_event_code == "TEST4242"


@pytest.mark.parametrize(("ours", "context", "settings", "expected"), [
    ("crm", {}, {}, "system_generated"),
    ("app", {}, {}, "app"),
    ("physical_store", {}, {}, "physical_store"),
    ("", web_context(), {}, "website"),
    ("", {"ip": "198.51.100.23"}, {}, "system_generated"),
    ("", {}, {"default_action_source": "phone_call"}, "phone_call"),
])
def test_action_source_maps_ours_or_is_inferred(sandbox: MetaSandbox, client: httpx.Client, ours: str,
                                                context: dict[str, str], settings: dict[str, str],
                                                expected: str) -> None:
    result = CONVERSIONS.send_conversions(client, pixel(sandbox, **settings),
                                          [conversion(action_source=ours, context=context)])

    assert classifications(result) == {1: (SUCCEEDED, "")}
    assert only_event(sandbox)["action_source"] == expected


# -- Conversions API: records Meta would refuse stay out of the request ---------------------------------

def test_a_record_older_than_seven_days_is_left_out_and_the_rest_accepted(sandbox: MetaSandbox,
                                                                           client: httpx.Client) -> None:
    records = [conversion(1), conversion(2, age_seconds=8 * DAY), conversion(3)]

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), records)

    assert classifications(result) == {1: (SUCCEEDED, ""), 2: (PERMANENT, "EVENT_TOO_OLD"), 3: (SUCCEEDED, "")}
    assert sorted(e.event["event_id"] for e in sandbox.accepted_events) == ["evt-1", "evt-3"]


def test_a_physical_store_event_may_be_ten_days_old(sandbox: MetaSandbox, client: httpx.Client) -> None:
    record = conversion(action_source="physical_store", context={}, age_seconds=10 * DAY)

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [record])

    assert classifications(result) == {1: (SUCCEEDED, "")}
    assert only_event(sandbox)["action_source"] == "physical_store"


@pytest.mark.parametrize(("bad", "reason"), [
    (conversion(9, context={"ip": "198.51.100.23", "page_url": PAGE}), "MISSING_WEBSITE_FIELDS"),
    (conversion(9, context={"user_agent": UA}), "MISSING_WEBSITE_FIELDS"),
    (conversion(9, context=web_context(page_url="android-app://com.shop/checkout")), "MISSING_WEBSITE_FIELDS"),
    (conversion(9, value=None), "MISSING_VALUE"),
    (conversion(9, value="12,50"), "INVALID_VALUE"),
    (conversion(9, currency="EURO"), "INVALID_CURRENCY"),
    (conversion(9, keys=PersonKeys(phones_e164=(PHONE_E164,)), action_source="app", context={}), "NO_MATCH_KEYS"),
    (conversion(9, keys=PersonKeys(emails=("Buyer@Example.com",)), action_source="app", context={}),
     "NO_MATCH_KEYS"),
    (conversion(9, event="refund"), "EVENT_NOT_MAPPED"),
])
def test_an_invalid_record_is_refused_alone(sandbox: MetaSandbox, client: httpx.Client, bad: Conversion,
                                            reason: str) -> None:
    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(1), bad])

    assert classifications(result) == {1: (SUCCEEDED, ""), 9: (PERMANENT, reason)}
    assert result.outcomes[9].error
    assert [e.event["event_id"] for e in sandbox.accepted_events] == ["evt-1"]


def test_an_event_in_the_future_waits_instead_of_poisoning_the_batch(sandbox: MetaSandbox,
                                                                     client: httpx.Client) -> None:
    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(1), conversion(2, age_seconds=-3600)])

    assert classifications(result) == {1: (SUCCEEDED, ""), 2: (RETRYABLE, "EVENT_TIME_IN_FUTURE")}


def test_nothing_valid_means_no_request(sandbox: MetaSandbox, client: httpx.Client) -> None:
    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(1, age_seconds=30 * DAY)])

    assert result.requests == 0
    assert classifications(result) == {1: (PERMANENT, "EVENT_TOO_OLD")}
    assert sandbox.requests == []


def test_more_than_a_thousand_records_is_a_caller_error(sandbox: MetaSandbox, client: httpx.Client) -> None:
    with pytest.raises(ValueError, match="1000"):
        CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(n) for n in range(1001)])


# -- Conversions API: dedup and Meta's answers ---------------------------------------------------------

def test_a_resent_batch_is_deduplicated_by_event_id(sandbox: MetaSandbox, client: httpx.Client) -> None:
    records = [conversion(1), conversion(2)]

    first = CONVERSIONS.send_conversions(client, pixel(sandbox), records)
    second = CONVERSIONS.send_conversions(client, pixel(sandbox), records)

    assert set(classifications(first).values()) == set(classifications(second).values()) == {(SUCCEEDED, "")}
    assert len(sandbox.accepted_events) == 2
    assert sandbox.duplicate_count == 2
    assert sandbox.events_received == 4


def test_a_timeout_is_retryable_and_the_retry_is_deduplicated(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.stall(1, seconds=0.6)

    timed_out = CONVERSIONS.send_conversions(client, pixel(sandbox, timeout=0.2), [conversion()])
    time.sleep(0.6)  # the stalled request is still processed: Meta got the event after all
    retried = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion()])

    assert timed_out.http_status == 0
    assert classifications(timed_out) == {1: (RETRYABLE, "TRANSPORT_ERROR")}
    assert classifications(retried) == {1: (SUCCEEDED, "")}
    assert (len(sandbox.accepted_events), sandbox.duplicate_count) == (1, 1)


def test_a_bad_token_is_permanent_and_never_shown(sandbox: MetaSandbox, client: httpx.Client) -> None:
    secret = "EAAGm0PX4ZCpsBAbadtoken"

    result = CONVERSIONS.send_conversions(client, pixel(sandbox, {"token": secret}), [conversion()])

    outcome = result.outcomes[1]
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == \
        (PERMANENT, "INVALID_TOKEN", "190")
    assert result.http_status == 400
    assert sandbox.accepted_events == []
    assert_redacted(result, secret)


def test_credentials_without_a_token_send_nothing(sandbox: MetaSandbox, client: httpx.Client) -> None:
    result = CONVERSIONS.send_conversions(client, pixel(sandbox, {"other": "x"}), [conversion()])

    assert (result.requests, classifications(result)) == (0, {1: (PERMANENT, "INVALID_TOKEN")})
    assert sandbox.requests == []


def test_http_429_is_throttled_with_retry_after(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.throttle(1, retry_after=7)

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion()])

    assert classifications(result) == {1: (THROTTLED, "RATE_LIMITED")}
    assert result.retry_after_seconds == 7
    assert sandbox.accepted_events == []


def test_http_503_is_retryable(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.fail(1, status=503)

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion()])

    assert result.http_status == 503
    assert result.outcomes[1].classification == RETRYABLE


BUC_USAGE = json.dumps({"1234": [{"type": "ads_management", "call_count": 100, "total_cputime": 40,
                                  "total_time": 45, "estimated_time_to_regain_access": 2}]})


@pytest.mark.parametrize(("code", "extra", "classification", "reason", "wait"), [
    (1, {"status": 500}, RETRYABLE, "PLATFORM_TRANSIENT", None),
    (2, {"is_transient": True, "status": 503}, RETRYABLE, "PLATFORM_TRANSIENT", None),
    (17, {"headers": {"X-Business-Use-Case-Usage": BUC_USAGE}}, THROTTLED, "RATE_LIMITED", 120.0),
    (613, {}, THROTTLED, "RATE_LIMITED", None),
    (80004, {}, THROTTLED, "RATE_LIMITED", None),
    (190, {"subcode": 463}, PERMANENT, "INVALID_TOKEN", None),
    (10, {"status": 403}, PERMANENT, "PERMISSION_DENIED", None),
    (200, {"status": 403}, PERMANENT, "PERMISSION_DENIED", None),
    (100, {}, PERMANENT, "INVALID_REQUEST", None),
])
def test_graph_error_codes_are_classified(sandbox: MetaSandbox, client: httpx.Client, code: int,
                                          extra: dict[str, Any], classification: str, reason: str,
                                          wait: float | None) -> None:
    sandbox.inject_error(code, **extra)

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion()])

    outcome = result.outcomes[1]
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == \
        (classification, reason, str(code))
    assert result.retry_after_seconds == wait


def test_fewer_events_received_than_sent_is_retryable(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.inject_reply(200, {"events_received": 1, "messages": [], "fbtrace_id": "Axyz"})

    result = CONVERSIONS.send_conversions(client, pixel(sandbox), [conversion(1), conversion(2)])

    assert classifications(result) == {1: (RETRYABLE, "EVENTS_RECEIVED_MISMATCH"),
                                       2: (RETRYABLE, "EVENTS_RECEIVED_MISMATCH")}


def test_errors_and_excerpts_hold_no_token_and_no_hash(sandbox: MetaSandbox, client: httpx.Client) -> None:
    secret = "EAAGm0PX4ZCpsBAsecret"
    sandbox.tokens = {secret}
    sandbox.inject_error(100, message=f"(#100) bad em {EMAIL} for token {secret}")

    result = CONVERSIONS.send_conversions(client, pixel(sandbox, {"token": secret}), [conversion()])

    assert result.outcomes[1].status_reason == "INVALID_REQUEST"
    assert "bad em" in result.outcomes[1].error
    assert_redacted(result, secret)


def test_appsecret_proof_is_sent_when_the_app_secret_is_known(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.app_secret = "app-secret-1"

    good = CONVERSIONS.send_conversions(client, pixel(sandbox, {"access_token": TOKEN, "app_secret": "app-secret-1"}),
                                        [conversion(1)])
    bad = CONVERSIONS.send_conversions(client, pixel(sandbox, {"access_token": TOKEN, "app_secret": "wrong-one"}),
                                       [conversion(2)])

    assert classifications(good) == {1: (SUCCEEDED, "")}
    assert classifications(bad) == {2: (PERMANENT, "INVALID_REQUEST")}
    assert [e.event["event_id"] for e in sandbox.accepted_events] == ["evt-1"]
    assert_redacted(bad, "app-secret-1", "wrong-one", TOKEN)


# -- the sandbox's own validation --------------------------------------------------------------------

def good_event(n: int = 0, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event_name": "Purchase", "event_time": int(time.time()) - 60, "event_id": f"e{n}",
                             "action_source": "website", "event_source_url": PAGE,
                             "user_data": {"em": [EMAIL], "client_user_agent": UA},
                             "custom_data": {"value": 10.0, "currency": "USD"}}
    event.update(overrides)
    return event


def post_events(client: httpx.Client, sandbox: MetaSandbox, data: Any, **extra: Any) -> httpx.Response:
    return client.post(graph_url(sandbox, f"{PIXEL}/events"), json={"data": data, "access_token": TOKEN, **extra})


def assert_graph_100(response: httpx.Response, sandbox: MetaSandbox, mentions: str = "") -> None:
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (100, "OAuthException")
    assert mentions in error["message"]
    assert error["fbtrace_id"]
    assert sandbox.accepted_events == []
    assert sandbox.events_received == 0


def test_sandbox_rejects_a_whole_batch_for_one_stale_event(sandbox: MetaSandbox, client: httpx.Client) -> None:
    data = [good_event(0), good_event(1), good_event(2, event_time=int(time.time()) - 8 * DAY), good_event(3)]

    response = post_events(client, sandbox, data)

    assert_graph_100(response, sandbox, "$['data'][2]")
    assert response.json()["error"]["error_user_title"] == "Event Timestamp Too Old"


@pytest.mark.parametrize(("event", "mentions"), [
    (good_event(event_name=""), "event_name"),
    (good_event(event_time=str(int(time.time()))), "event_time"),
    (good_event(event_time=int(time.time() * 1000)), "future"),
    (good_event(action_source="crm"), "action_source"),
    (good_event(user_data={}), "user_data"),
    (good_event(user_data={"client_user_agent": UA}), "customer information"),
    (good_event(event_source_url=None), "event_source_url"),
    (good_event(user_data={"em": [EMAIL]}), "client_user_agent"),
    (good_event(user_data={"em": ["buyer@example.com"], "client_user_agent": UA}), "['em']"),
    (good_event(user_data={"em": [EMAIL.upper()], "client_user_agent": UA}), "['em']"),
    (good_event(user_data={"em": [EMAIL], "client_user_agent": UA, "client_ip_address": sha256_hex("1.2.3.4")}),
     "client_ip_address"),
    (good_event(user_data={"em": [EMAIL], "client_user_agent": UA, "fbp": sha256_hex("fbp")}), "fbp"),
    (good_event(user_data={"em": [EMAIL], "client_user_agent": UA, "client_ip_address": "1.2.3"}),
     "client_ip_address"),
    (good_event(custom_data={"value": 10.0}), "currency"),
    (good_event(custom_data={"value": 10.0, "currency": "dollars"}), "currency"),
    (good_event(custom_data={"currency": "USD"}), "value"),
    (good_event(data_processing_options=["CCPA"]), "data_processing_options"),
])
def test_sandbox_rejects_what_meta_rejects(sandbox: MetaSandbox, client: httpx.Client, event: dict[str, Any],
                                           mentions: str) -> None:
    response = post_events(client, sandbox, [good_event(0), event])

    assert_graph_100(response, sandbox, mentions)
    assert "$['data'][1]" in response.json()["error"]["error_user_msg"]


@pytest.mark.parametrize("data", [[], None, "not a list"])
def test_sandbox_requires_data(sandbox: MetaSandbox, client: httpx.Client, data: Any) -> None:
    assert_graph_100(post_events(client, sandbox, data), sandbox, "data")


def test_sandbox_takes_a_thousand_events_and_refuses_more(sandbox: MetaSandbox, client: httpx.Client) -> None:
    events = [good_event(n) for n in range(1001)]

    refused = post_events(client, sandbox, events)
    assert_graph_100(refused, sandbox, "1000")

    accepted = post_events(client, sandbox, events[:1000])
    assert accepted.status_code == 200
    assert accepted.json()["events_received"] == 1000
    assert len(sandbox.accepted_events) == 1000


@pytest.mark.parametrize(("token", "code"), [(None, 104), ("not-a-token", 190)])
def test_sandbox_answers_token_problems_like_graph(sandbox: MetaSandbox, client: httpx.Client, token: str | None,
                                                   code: int) -> None:
    body: dict[str, Any] = {"data": [good_event()]}
    if token:
        body["access_token"] = token

    response = client.post(graph_url(sandbox, f"{PIXEL}/events"), json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "OAuthException")
    assert sandbox.accepted_events == []


def test_sandbox_accepts_form_encoded_requests_and_bearer_tokens(sandbox: MetaSandbox, client: httpx.Client) -> None:
    form = client.post(graph_url(sandbox, f"{PIXEL}/events"),
                       data={"data": json.dumps([good_event(1)]), "access_token": TOKEN, "test_event_code": "T1"})
    bearer = client.post(graph_url(sandbox, f"{PIXEL}/events"), json={"data": [good_event(2)]},
                         headers={"Authorization": f"Bearer {TOKEN}"})

    assert (form.status_code, bearer.status_code) == (200, 200)
    assert [(e.event["event_id"], e.test_event_code) for e in sandbox.accepted_events] == [("e1", "T1"), ("e2", None)]


def test_sandbox_dedup_window_is_forty_eight_hours(sandbox: MetaSandbox, client: httpx.Client) -> None:
    now = [time.time()]
    sandbox.clock = lambda: now[0]

    event = good_event(1, event_time=int(now[0]) - 60)
    post_events(client, sandbox, [event, event])
    now[0] += 47 * 3600
    post_events(client, sandbox, [good_event(1, event_time=int(now[0]) - 60)])
    now[0] += 2 * 3600
    post_events(client, sandbox, [good_event(1, event_time=int(now[0]) - 60)])

    assert (len(sandbox.accepted_events), sandbox.duplicate_count, sandbox.events_received) == (2, 2, 4)


def test_sandbox_state_endpoint_reports_accepted_events(sandbox: MetaSandbox, client: httpx.Client) -> None:
    post_events(client, sandbox, [good_event(1)])

    state = client.get(f"{sandbox.url}/__sandbox/state").json()

    assert [e["event"]["event_id"] for e in state["events"]] == ["e1"]
    client.post(f"{sandbox.url}/__sandbox/reset")
    assert sandbox.accepted_events == []


# -- Custom Audiences --------------------------------------------------------------------------------

def changes(*people: PersonKeys, start: int = 1) -> list[AudienceChange]:
    return [AudienceChange(start + n, keys) for n, keys in enumerate(people)]


def row(keys: PersonKeys) -> tuple[str, str, str]:
    return (keys.emails[0] if keys.emails else "", keys.phones_meta[0] if keys.phones_meta else "",
            keys.user_ids[0] if keys.user_ids else "")


def test_add_then_remove_members(sandbox: MetaSandbox, client: httpx.Client) -> None:
    alice, bob = person(1, phone=True, user_id=True), person(2)

    added = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(alice, bob))
    assert sandbox.audience_members(AUDIENCE) == {row(alice), row(bob)}
    removed = AUDIENCES.send_audience(client, audience(sandbox), "remove", changes(alice, start=3))

    assert classifications(added) == {1: (SUCCEEDED, ""), 2: (SUCCEEDED, "")}
    assert classifications(removed) == {3: (SUCCEEDED, "")}
    assert sandbox.audience_members(AUDIENCE) == {row(bob)}
    assert sandbox.requests[-1][:2] == ("DELETE", f"/v25.0/{AUDIENCE}/users")
    assert (sandbox.audience_requests(AUDIENCE), sandbox.audience_rows_received(AUDIENCE)) == (2, 3)


def test_rows_follow_the_email_phone_extern_id_schema(sandbox: MetaSandbox, client: httpx.Client) -> None:
    alice = PersonKeys(person_id="p1", phones_meta=(PHONE_META,), phones_e164=(PHONE_E164,), user_ids=("user-1",))

    AUDIENCES.send_audience(client, audience(sandbox), "add", changes(alice))

    assert sandbox.audience_members(AUDIENCE) == {("", PHONE_META, "user-1")}


def test_a_person_without_a_meta_key_is_refused_alone(sandbox: MetaSandbox, client: httpx.Client) -> None:
    only_e164 = PersonKeys(person_id="p9", phones_e164=(PHONE_E164,))

    result = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(1), only_e164))

    assert classifications(result) == {1: (SUCCEEDED, ""), 2: (PERMANENT, "NO_MATCH_KEYS")}
    assert sandbox.audience_members(AUDIENCE) == {row(person(1))}


def test_a_replace_session_of_three_batches_replaces_membership_at_the_end(sandbox: MetaSandbox,
                                                                           client: httpx.Client) -> None:
    AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(90), person(91)))
    batches = [[person(1), person(2)], [person(3)], [person(4), person(5)]]

    for seq, people in enumerate(batches, start=1):
        session = ReplaceSession(session_id=777, batch_seq=seq, last_batch=seq == 3, estimated_total=5)
        result = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(*people, start=seq * 10), session)
        assert {c for c, _ in classifications(result).values()} == {SUCCEEDED}
        if seq < 3:
            assert sandbox.audience_members(AUDIENCE) == {row(person(90)), row(person(91))}

    assert sandbox.audience_members(AUDIENCE) == {row(person(n)) for n in range(1, 6)}
    assert sandbox.session_completed(AUDIENCE, 777)
    assert [path for _, path, _ in sandbox.requests[1:]] == [f"/v25.0/{AUDIENCE}/usersreplace"] * 3


def test_a_replace_batch_sent_twice_counts_once_and_order_does_not_matter(sandbox: MetaSandbox,
                                                                          client: httpx.Client) -> None:
    AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(90)))

    def send(seq: int, people: list[PersonKeys], last: bool = False) -> BatchResult:
        return AUDIENCES.send_audience(client, audience(sandbox), "add", changes(*people, start=seq * 10),
                                       ReplaceSession(5, seq, last, 3))

    send(2, [person(2)])
    send(3, [person(3)], last=True)
    assert sandbox.audience_members(AUDIENCE) == {row(person(90))}  # batch 1 still missing
    send(2, [person(2)])
    send(1, [person(1)])
    late_copy = send(3, [person(3)], last=True)  # a retry of a batch that had arrived after all

    assert classifications(late_copy) == {30: (SUCCEEDED, "")}
    assert sandbox.audience_members(AUDIENCE) == {row(person(1)), row(person(2)), row(person(3))}
    assert sandbox.audience_rows_received(AUDIENCE) == 6


def test_sandbox_keeps_the_first_copy_of_a_replace_batch(sandbox: MetaSandbox, client: httpx.Client) -> None:
    def batch(seq: int, value: str, last: bool) -> httpx.Response:
        return post_users(client, sandbox, {"schema": "EMAIL_SHA256", "data": [value]}, edge="usersreplace",
                          session={"session_id": 4, "batch_seq": seq, "last_batch_flag": last})

    batch(1, sha256_hex("first"), False)
    batch(1, sha256_hex("second"), False)
    batch(2, EMAIL, True)

    assert sandbox.audience_members(AUDIENCE) == {(sha256_hex("first"),), (EMAIL,)}


def test_a_replace_batch_with_nobody_to_send_still_closes_the_session(sandbox: MetaSandbox,
                                                                      client: httpx.Client) -> None:
    AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(1)), ReplaceSession(9, 1, False, 2))
    result = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(PersonKeys(), start=5),
                                     ReplaceSession(9, 2, True, 2))

    assert result.requests == 1
    assert classifications(result) == {5: (PERMANENT, "NO_MATCH_KEYS")}
    assert sandbox.audience_members(AUDIENCE) == {row(person(1))}


def test_an_upload_blocked_audience_is_permanent(sandbox: MetaSandbox, client: httpx.Client) -> None:
    sandbox.block_audience(AUDIENCE)

    result = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(1)))

    outcome = result.outcomes[1]
    assert (outcome.classification, outcome.status_reason, outcome.platform_error_code) == \
        (PERMANENT, "AUDIENCE_UPLOAD_BLOCKED", "100")
    assert sandbox.audience_members(AUDIENCE) == set()


def test_audience_token_and_throttling_are_classified(sandbox: MetaSandbox, client: httpx.Client) -> None:
    bad = AUDIENCES.send_audience(client, audience(sandbox, {"token": "nope-nope"}), "add", changes(person(1)))
    sandbox.throttle(1, retry_after=3)
    throttled = AUDIENCES.send_audience(client, audience(sandbox), "remove", changes(person(1)))

    assert classifications(bad) == {1: (PERMANENT, "INVALID_TOKEN")}
    assert (classifications(throttled), throttled.retry_after_seconds) == ({1: (THROTTLED, "RATE_LIMITED")}, 3)
    assert_redacted(bad, "nope-nope")


def test_invalid_entries_reported_by_meta_keep_the_request_accepted(sandbox: MetaSandbox,
                                                                    client: httpx.Client) -> None:
    sandbox.inject_reply(200, {"audience_id": AUDIENCE, "session_id": 1, "num_received": 2, "num_invalid_entries": 1,
                               "invalid_entry_samples": {"1": "invalid"}})

    result = AUDIENCES.send_audience(client, audience(sandbox), "add", changes(person(1), person(2)))

    assert classifications(result) == {1: (SUCCEEDED, "INVALID_ENTRIES_REPORTED"),
                                       2: (SUCCEEDED, "INVALID_ENTRIES_REPORTED")}


def test_audience_adapter_refuses_unknown_actions_and_oversized_batches(sandbox: MetaSandbox,
                                                                        client: httpx.Client) -> None:
    with pytest.raises(ValueError, match="action"):
        AUDIENCES.send_audience(client, audience(sandbox), "replace", changes(person(1)))
    with pytest.raises(ValueError, match="10000"):
        AUDIENCES.send_audience(client, audience(sandbox), "add", changes(*[person(1)] * 10_001))


def post_users(client: httpx.Client, sandbox: MetaSandbox, payload: Any, *, edge: str = "users",
               session: Any = None) -> httpx.Response:
    body: dict[str, Any] = {"payload": payload, "access_token": TOKEN}
    if session is not None:
        body["session"] = session
    return client.post(graph_url(sandbox, f"{AUDIENCE}/{edge}"), json=body)


@pytest.mark.parametrize(("payload", "edge", "session", "mentions"), [
    ({"schema": ["EMAIL", "PHONE"], "data": [[EMAIL]]}, "users", None, "schema has 2 keys"),
    ({"schema": ["EMAIL", "SHOE_SIZE"], "data": [[EMAIL, "44"]]}, "users", None, "unknown keys"),
    ({"schema": "EMAIL_SHA256", "data": [EMAIL] * 10_001}, "users", None, "10000"),
    ({"schema": "EMAIL_SHA256", "data": []}, "users", None, "empty"),
    ({"schema": "EMAIL_SHA256", "data": [EMAIL]}, "usersreplace", None, "session"),
    ({"schema": "EMAIL_SHA256", "data": [EMAIL]}, "usersreplace",
     {"session_id": 1, "batch_seq": 0, "last_batch_flag": True}, "batch_seq"),
    ({"schema": "EMAIL_SHA256", "data": [EMAIL]}, "usersreplace",
     {"session_id": 1, "batch_seq": 1, "last_batch_flag": "yes"}, "last_batch_flag"),
])
def test_sandbox_rejects_malformed_audience_requests(sandbox: MetaSandbox, client: httpx.Client, payload: Any,
                                                     edge: str, session: Any, mentions: str) -> None:
    response = post_users(client, sandbox, payload, edge=edge, session=session)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 100
    assert mentions in error["message"]
    assert sandbox.audience_members(AUDIENCE) == set()
    assert sandbox.audience_requests(AUDIENCE) == 0


def test_sandbox_counts_badly_hashed_rows_as_invalid_entries(sandbox: MetaSandbox, client: httpx.Client) -> None:
    payload = {"schema": ["EMAIL", "EXTERN_ID"],
               "data": [[EMAIL, "user-1"], ["buyer@example.com", ""], ["", ""], ["", "user-2"]]}

    response = post_users(client, sandbox, payload)

    body = response.json()
    assert response.status_code == 200
    assert (body["num_received"], body["num_invalid_entries"]) == (4, 2)
    assert set(body["invalid_entry_samples"]) == {"1", "2"}
    assert "buyer@example.com" not in response.text
    assert sandbox.audience_members(AUDIENCE) == {(EMAIL, "user-1"), ("", "user-2")}


def test_sandbox_refuses_a_batch_after_the_last_one(sandbox: MetaSandbox, client: httpx.Client) -> None:
    payload = {"schema": "EMAIL_SHA256", "data": [EMAIL]}
    assert post_users(client, sandbox, payload, edge="usersreplace",
                      session={"session_id": 3, "batch_seq": 1, "last_batch_flag": True}).status_code == 200

    late = post_users(client, sandbox, payload, edge="usersreplace",
                      session={"session_id": 3, "batch_seq": 2, "last_batch_flag": False})

    assert late.status_code == 400
    assert late.json()["error"]["code"] == 100
    assert sandbox.audience_members(AUDIENCE) == {(EMAIL,)}
