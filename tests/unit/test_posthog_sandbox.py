"""The PostHog sandbox answers like PostHog: capture validation and person properties
(specs/sources-and-consent.md §1), the private cohort API with its pagination, scopes and
rate limits (§2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.sandboxes.base import running
from tests.sandboxes.posthog import PostHogSandbox, person_uuid

TOKEN = "phc_sandbox"
KEY = "phx_sandbox"
COHORT = 42
EXPORT = ("select distinct_id, person_id from person_distinct_ids where person_id in cohort {cohort}{after} "
          "order by person_id, distinct_id limit {limit}")


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def served() -> Iterator[PostHogSandbox]:
    posthog = PostHogSandbox(personal_keys={KEY: {"cohort:read", "person:read", "query:read"},
                                            "phx_cohorts_only": {"cohort:read"},
                                            "phx_no_query": {"cohort:read", "person:read"}})
    with running(posthog):
        yield posthog


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(served: PostHogSandbox, clock: Clock) -> PostHogSandbox:
    served.reset()
    served.clock = clock
    served.rate_limit_per_minute = 240
    served.max_body_bytes, served.max_event_bytes = 20 * 1024 * 1024, 1024 * 1024
    return served


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def capture(http: httpx.Client, sandbox: PostHogSandbox, body: Any, path: str = "/batch/") -> httpx.Response:
    return http.post(f"{sandbox.url}{path}", json=body)


def batch(*events: dict[str, Any], api_key: str | None = TOKEN, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"batch": list(events), **fields}
    if api_key is not None:
        body["api_key"] = api_key
    return body


def set_event(distinct_id: str = "u1", /, **properties: Any) -> dict[str, Any]:
    return {"event": "$set", "distinct_id": distinct_id, "properties": properties}


def api(http: httpx.Client, sandbox: PostHogSandbox, path: str, key: str | None = KEY,
        **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.get(f"{sandbox.url}/api/projects/1/{path}", params=params, headers=headers)


def query(http: httpx.Client, sandbox: PostHogSandbox, text: str, key: str = KEY) -> httpx.Response:
    return http.post(f"{sandbox.url}/api/projects/1/query/", headers={"Authorization": f"Bearer {key}"},
                     json={"query": {"kind": "HogQLQuery", "query": text}})


def people(count: int, ids_each: int = 1) -> list[list[str]]:
    return [[f"p{n}-d{i}" for i in range(ids_each)] for n in range(count)]


# -- capture --------------------------------------------------------------------------------------

def test_set_set_once_and_unset_apply_in_ingestion_order(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = capture(http, sandbox, batch(
        set_event(**{"$set": {"a": 1, "b": 1}, "$set_once": {"first": "x"}}),
        set_event(**{"$set": {"a": 2}, "$set_once": {"first": "y", "c": 3}, "$unset": ["b"]}),
    ))

    assert (response.status_code, response.json()) == (200, {"status": "Ok"})
    assert sandbox.person_properties("u1") == {"a": 2, "first": "x", "c": 3}
    assert sandbox.set_calls("u1") == 2


def test_top_level_set_is_merged_under_properties_which_win(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    event = {"event": "$identify", "distinct_id": "u1", "$set": {"a": "top", "b": "top"},
             "properties": {"$set": {"a": "inner"}}}

    capture(http, sandbox, batch(event))

    assert sandbox.person_properties("u1") == {"a": "inner", "b": "top"}


@pytest.mark.parametrize("path", ["/i/v0/e/", "/capture/", "/e/", "/batch"])
def test_single_event_endpoints_take_an_event_with_its_own_token(sandbox: PostHogSandbox, http: httpx.Client,
                                                                 path: str) -> None:
    response = capture(http, sandbox, {"api_key": TOKEN, **set_event(**{"$set": {"plan": "pro"}})}, path)

    assert response.status_code == 200
    assert sandbox.person_properties("u1") == {"plan": "pro"}


def test_the_token_may_ride_on_each_event_or_in_properties(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = capture(http, sandbox, batch({"api_key": TOKEN, **set_event("a")},
                                            {"event": "x", "distinct_id": "b", "properties": {"token": TOKEN}},
                                            api_key=None))

    assert response.status_code == 200
    assert [e["distinct_id"] for e in sandbox.events()] == ["a", "b"]


@pytest.mark.parametrize(("body", "detail"), [
    (batch(set_event(), api_key=None), "API key not provided"),
    (batch(set_event(), api_key="phc_wrong"), "Project API key invalid"),
    (batch(set_event(), api_key=KEY), "personal API key"),
    (batch({"api_key": "phc_other", **set_event()}, set_event("u2")), "inconsistent api_key values"),
])
def test_token_problems_are_401_and_nothing_is_kept(sandbox: PostHogSandbox, http: httpx.Client,
                                                    body: dict[str, Any], detail: str) -> None:
    response = capture(http, sandbox, body)

    assert response.status_code == 401
    assert response.json()["type"] == "authentication_error"
    assert detail in response.json()["detail"]
    assert sandbox.events() == []


@pytest.mark.parametrize("body", [
    batch(),
    batch(set_event(), {**set_event("u2"), "timestamp": "yesterday"}),
    batch({**set_event(), "uuid": "not-a-uuid"}),
    [],
    "just a string",
])
def test_malformed_requests_are_400_and_nothing_of_them_is_kept(sandbox: PostHogSandbox, http: httpx.Client,
                                                                body: Any) -> None:
    response = capture(http, sandbox, body)

    assert response.status_code == 400
    assert response.json()["type"] == "validation_error"
    assert sandbox.events() == [] and sandbox.persons == {}


def test_a_body_that_is_not_json_is_400(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = http.post(f"{sandbox.url}/batch/", content=b"{not json", headers={"Content-Type": "application/json"})

    assert response.status_code == 400


def test_iso_timestamps_are_taken(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = capture(http, sandbox, batch({**set_event(), "timestamp": "2026-03-01T12:30:45.123Z"},
                                            {**set_event("u2"), "timestamp": "2026-03-01T12:30:45+02:00"}))

    assert response.status_code == 200
    assert len(sandbox.events()) == 2


def test_events_without_a_name_or_distinct_id_are_answered_200_but_dropped(sandbox: PostHogSandbox,
                                                                           http: httpx.Client) -> None:
    response = capture(http, sandbox, batch({"distinct_id": "u1", "properties": {"$set": {"a": 1}}},
                                            {"event": "$set", "properties": {"$set": {"a": 1}}},
                                            {"event": "$set", "distinct_id": "", "properties": {}},
                                            set_event("u2", **{"$set": {"ok": True}})))

    assert response.status_code == 200
    assert [reason for reason, _ in sandbox.dropped] == ["missing event name", "missing distinct_id",
                                                         "missing distinct_id"]
    assert sandbox.persons == {"u2": {"ok": True}}


def test_a_distinct_id_in_properties_counts(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    capture(http, sandbox, batch({"event": "$set", "properties": {"distinct_id": "u9", "$set": {"a": 1}}}))

    assert sandbox.person_properties("u9") == {"a": 1}


def test_a_long_distinct_id_is_cut_to_200_characters(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    capture(http, sandbox, batch(set_event("x" * 250, **{"$set": {"a": 1}})))

    assert sandbox.person_properties("x" * 200) == {"a": 1}


def test_a_repeated_uuid_is_ingested_once(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    event = {**set_event(**{"$set": {"n": 1}}), "uuid": "0190f2a4-5b6c-7d8e-9f00-112233445566"}

    capture(http, sandbox, batch(event))
    capture(http, sandbox, batch({**event, "properties": {"$set": {"n": 2}}}))

    assert sandbox.person_properties("u1") == {"n": 1}
    assert (sandbox.set_calls("u1"), sandbox.duplicate_count) == (1, 1)


def test_personless_events_update_no_person(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    capture(http, sandbox, batch(set_event(**{"$set": {"a": 1}, "$process_person_profile": False})))

    assert len(sandbox.events()) == 1
    assert sandbox.persons == {}


def test_oversized_bodies_and_events_are_413(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.max_event_bytes = 500
    big_event = capture(http, sandbox, batch(set_event(**{"$set": {"notes": "x" * 600}})))
    sandbox.max_event_bytes, sandbox.max_body_bytes = 1024 * 1024, 1000
    big_body = capture(http, sandbox, batch(*(set_event(f"u{i}", **{"$set": {"n": i}}) for i in range(30))))

    assert big_event.status_code == big_body.status_code == 413
    assert sandbox.events() == []


# -- private API: auth ---------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "status", "code"), [
    (None, 401, "not_authenticated"),
    ("phx_unknown", 401, "authentication_failed"),
    (TOKEN, 401, "authentication_failed"),
    ("phx_cohorts_only", 403, "permission_denied"),
])
def test_cohort_persons_need_a_known_key_with_cohort_and_person_scopes(sandbox: PostHogSandbox, http: httpx.Client,
                                                                       key: str | None, status: int,
                                                                       code: str) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))

    response = api(http, sandbox, f"cohorts/{COHORT}/persons/", key)

    assert response.status_code == status
    assert response.json()["code"] == code


def test_a_missing_scope_is_named(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))

    persons = api(http, sandbox, f"cohorts/{COHORT}/persons/", "phx_cohorts_only")
    export = query(http, sandbox, EXPORT.format(cohort=COHORT, after="", limit=10), "phx_no_query")
    cohort = api(http, sandbox, f"cohorts/{COHORT}/", "phx_cohorts_only")

    assert persons.json()["detail"] == "API key missing required scope 'person:read'"
    assert export.json()["detail"] == "API key missing required scope 'query:read'"
    assert cohort.status_code == 200


def test_another_project_is_forbidden_and_current_is_this_one(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(1))
    headers = {"Authorization": f"Bearer {KEY}"}

    other = http.get(f"{sandbox.url}/api/projects/2/cohorts/{COHORT}/", headers=headers)
    current = http.get(f"{sandbox.url}/api/projects/@current/cohorts/{COHORT}/", headers=headers)

    assert (other.status_code, current.status_code) == (403, 200)


# -- private API: cohorts ------------------------------------------------------------------------

def test_cohorts_are_listed_with_offset_pagination_without_deleted_ones(sandbox: PostHogSandbox,
                                                                        http: httpx.Client) -> None:
    for cohort_id in (1, 2, 3):
        sandbox.set_cohort(cohort_id, f"Cohort {cohort_id}", people(cohort_id))
    sandbox.delete_cohort(2)

    first = api(http, sandbox, "cohorts/", limit=1).json()
    second = http.get(first["next"], headers={"Authorization": f"Bearer {KEY}"}).json()

    assert (first["count"], [c["id"] for c in first["results"]], first["previous"]) == (2, [1], None)
    assert ([c["id"] for c in second["results"]], second["next"]) == ([3], None)
    assert second["previous"] is not None


def test_a_cohort_is_retrieved_with_its_calculation_state(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(5), is_static=True)
    sandbox.set_calculating(COHORT)

    cohort = api(http, sandbox, f"cohorts/{COHORT}/").json()

    assert {k: cohort[k] for k in ("id", "name", "is_static", "is_calculating", "count", "deleted")} == \
        {"id": COHORT, "name": "Power users", "is_static": True, "is_calculating": True, "count": 5, "deleted": False}
    assert cohort["last_calculation"].endswith("Z")


def test_unknown_and_deleted_cohorts_are_404(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Gone", people(1))
    sandbox.delete_cohort(COHORT)

    assert api(http, sandbox, "cohorts/999/").status_code == 404
    assert api(http, sandbox, f"cohorts/{COHORT}/").status_code == 404
    assert api(http, sandbox, f"cohorts/{COHORT}/persons/").json()["code"] == "not_found"


# -- private API: cohort persons ---------------------------------------------------------------

def follow(http: httpx.Client, sandbox: PostHogSandbox, **params: Any) -> list[dict[str, Any]]:
    """Every page of the cohort's persons, following ``next`` to the end."""
    pages = [api(http, sandbox, f"cohorts/{COHORT}/persons/", **params).json()]
    while pages[-1]["next"]:
        pages.append(http.get(pages[-1]["next"], headers={"Authorization": f"Bearer {KEY}"}).json())
    return pages


def test_persons_page_by_a_hundred_and_next_is_a_full_url(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(250))

    pages = follow(http, sandbox)

    assert [len(p["results"]) for p in pages] == [100, 100, 50]
    assert pages[0]["next"] == f"{sandbox.url}/api/projects/1/cohorts/{COHORT}/persons/?limit=100&offset=100"
    assert pages[0]["previous"] is None and pages[2]["next"] is None
    assert [r["distinct_ids"][0] for p in pages for r in p["results"]] == [f"p{n}-d0" for n in range(250)]


def test_an_exact_multiple_of_the_limit_ends_with_an_empty_page(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(200))

    pages = follow(http, sandbox, limit=100)

    assert [len(p["results"]) for p in pages] == [100, 100, 0]


def test_next_is_built_from_the_host_header(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))

    page = http.get(f"{sandbox.url}/api/projects/1/cohorts/{COHORT}/persons/?limit=2",
                    headers={"Authorization": f"Bearer {KEY}", "Host": "us.posthog.example"}).json()

    assert page["next"] == f"http://us.posthog.example/api/projects/1/cohorts/{COHORT}/persons/?limit=2&offset=2"


def test_a_person_row_shows_at_most_ten_distinct_ids(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    ids = [f"d{i:02d}" for i in range(12)]
    sandbox.set_cohort(COHORT, "Power users", [{"distinct_ids": ids, "properties": {"email": "a@example.com"}}])

    [row] = api(http, sandbox, f"cohorts/{COHORT}/persons/").json()["results"]

    assert row["distinct_ids"] == ids[:10]
    assert row["id"] == row["uuid"] == person_uuid("d00")
    assert (row["name"], row["properties"], row["is_identified"]) == ("a@example.com", {"email": "a@example.com"},
                                                                      True)


def test_persons_keep_their_uuid_and_removed_members_leave(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))
    before = {r["distinct_ids"][0]: r["uuid"] for r in api(http, sandbox, f"cohorts/{COHORT}/persons/").json()
              ["results"]}

    removed = sandbox.remove_members(COHORT, ["p1-d0"])
    after = {r["distinct_ids"][0]: r["uuid"] for r in api(http, sandbox, f"cohorts/{COHORT}/persons/").json()
             ["results"]}

    assert removed == 1
    assert after == {k: v for k, v in before.items() if k != "p1-d0"}


def test_one_page_can_be_failed_by_its_offset(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(1200))
    sandbox.fail_page(100)

    statuses = [api(http, sandbox, f"cohorts/{COHORT}/persons/", offset=o).status_code
                for o in (0, 1000, 1100, 100, 100)]

    assert statuses == [200, 200, 200, 503, 200]


def test_a_query_string_fault_pattern_matches_that_page_only(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(700))
    sandbox.fail(1, status=502, path="offset=600&")

    pages = [api(http, sandbox, f"cohorts/{COHORT}/persons/", limit=100, offset=o).status_code
             for o in (500, 600, 600)]

    assert pages == [200, 502, 200]


# -- private API: query ----------------------------------------------------------------------------

def export(http: httpx.Client, sandbox: PostHogSandbox, limit: int) -> list[list[list[str]]]:
    """Every page of the keyset export of the cohort's distinct IDs."""
    pages: list[list[list[str]]] = []
    after = ""
    while True:
        response = query(http, sandbox, EXPORT.format(cohort=COHORT, after=after, limit=limit))
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["results"])
        if not body["hasMore"]:
            return pages
        distinct_id, person_id = body["results"][-1]
        after = f" and (person_id, distinct_id) > ('{person_id}', '{distinct_id}')"


def test_the_query_api_exports_every_distinct_id_by_keyset(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(30, ids_each=12))

    pages = export(http, sandbox, limit=100)

    rows = [row for page in pages for row in page]
    assert [len(p) for p in pages] == [100, 100, 100, 60]
    assert {d for d, _ in rows} == sandbox.cohort_distinct_ids(COHORT)
    assert len(rows) == len({tuple(r) for r in rows}) == 360
    assert rows == sorted(rows, key=lambda r: (r[1], r[0]))


def test_query_answers_carry_columns_and_has_more(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(2))

    body = query(http, sandbox, EXPORT.format(cohort=COHORT, after="", limit=2)).json()

    assert body["columns"] == ["distinct_id", "person_id"]
    assert body["hasMore"] is False
    assert sorted(body["results"]) == sorted([["p0-d0", person_uuid("p0-d0")], ["p1-d0", person_uuid("p1-d0")]])


def test_keyset_literals_may_hold_escaped_quotes(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", [["o'brien", "back\\slash", "plain"]])
    person = person_uuid("o'brien")

    after = query(http, sandbox, EXPORT.format(cohort=COHORT, limit=10,
                                               after=f" and (person_id, distinct_id) > ('{person}', 'o\\'brien')"))

    assert after.status_code == 200
    assert after.json()["results"] == [["plain", person]]


@pytest.mark.parametrize("text", [
    "select * from persons",
    f"select distinct_id from person_distinct_ids where person_id in cohort {COHORT}",
    "select distinct_id, person_id from person_distinct_ids where person_id in cohort 999 "
    "order by person_id, distinct_id limit 10",
])
def test_other_queries_are_400_in_posthogs_shape(sandbox: PostHogSandbox, http: httpx.Client, text: str) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(2))

    response = query(http, sandbox, text)

    assert response.status_code == 400
    assert set(response.json()) == {"type", "code", "detail", "attr"}


def test_a_query_that_is_not_hogql_is_400(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = http.post(f"{sandbox.url}/api/projects/1/query/", headers={"Authorization": f"Bearer {KEY}"},
                         json={"query": {"kind": "EventsQuery", "select": ["*"]}})

    assert response.status_code == 400


# -- private API: rate limits ---------------------------------------------------------------------

def test_persons_over_the_minute_budget_are_throttled_until_it_refills(sandbox: PostHogSandbox,
                                                                       http: httpx.Client, clock: Clock) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))
    sandbox.rate_limit_per_minute = 3

    allowed = [api(http, sandbox, f"cohorts/{COHORT}/persons/").status_code for _ in range(3)]
    clock.now += 20
    throttled = api(http, sandbox, f"cohorts/{COHORT}/persons/")
    clock.now += 40
    refilled = api(http, sandbox, f"cohorts/{COHORT}/persons/")

    assert allowed == [200, 200, 200]
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "40"
    assert throttled.json() == {"type": "throttled_error", "code": "throttled", "attr": None,
                                "detail": "Request was throttled. Expected available in 40 seconds."}
    assert refilled.status_code == 200


def test_the_query_budget_is_separate_and_cohort_reads_are_not_counted(sandbox: PostHogSandbox,
                                                                        http: httpx.Client) -> None:
    sandbox.set_cohort(COHORT, "Power users", people(3))
    sandbox.rate_limit_per_minute = 1

    statuses = [api(http, sandbox, f"cohorts/{COHORT}/persons/").status_code,
                api(http, sandbox, f"cohorts/{COHORT}/persons/").status_code,
                query(http, sandbox, EXPORT.format(cohort=COHORT, after="", limit=5)).status_code,
                query(http, sandbox, EXPORT.format(cohort=COHORT, after="", limit=5)).status_code,
                api(http, sandbox, f"cohorts/{COHORT}/").status_code,
                api(http, sandbox, "cohorts/").status_code]

    assert statuses == [200, 429, 200, 429, 200, 200]


# -- controls --------------------------------------------------------------------------------------

def test_cohorts_can_be_set_over_http_and_state_reports_them(sandbox: PostHogSandbox, http: httpx.Client) -> None:
    response = http.post(f"{sandbox.url}/__sandbox/cohorts",
                         json={"cohort_id": 7, "name": "Trialists", "members": [["a", "b"], ["c"]]})
    capture(http, sandbox, batch(set_event("a", **{"$set": {"x": 1}})))

    state = http.get(f"{sandbox.url}/__sandbox/state").json()

    assert response.status_code == 200
    assert sandbox.cohort_distinct_ids(7) == {"a", "b", "c"}
    assert state["cohorts"]["7"] == {"name": "Trialists", "persons": 2, "deleted": False, "is_calculating": False}
    assert state["persons"] == {"a": {"x": 1}}


def test_a_member_needs_distinct_ids() -> None:
    sandbox = PostHogSandbox()

    with pytest.raises(ValueError):
        sandbox.set_cohort(1, "x", [[]])
    with pytest.raises(ValueError):
        sandbox.set_cohort(1, "x", ["not-a-list"])
