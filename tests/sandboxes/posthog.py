"""A local PostHog: the public capture endpoints and the private cohort API, validated the
way PostHog does (``specs/sources-and-consent.md`` §1, §2).

**Capture** (``POST /batch/``, ``/i/v0/e/``, ``/capture/``, ``/e/``; the v0 protocol). The
body is a JSON batch ``{"api_key", "batch": [...], "historical_migration"?, "sent_at"?}``, a
single event or a list of events. The project token travels as the batch-level ``api_key``
or per event (``api_key``, ``token`` or ``properties.token``):

* no token, or one that is not the project token: 401; events carrying different tokens:
  401 ``inconsistent api_key values``; a personal API key (``phx_``): 401. The real capture
  service cannot tell a wrong project token from a right one and drops those events later;
  the sandbox refuses them so a misconfigured destination fails where a test can see it;
* a body that is not JSON, an empty batch, a ``timestamp`` that is not ISO 8601 or a
  ``uuid`` that is not a UUID: 400, and nothing of the request is kept;
* a body over ``max_body_bytes`` (20 MB) or one event over ``max_event_bytes`` (1 MB): 413;
* an event without a name or ``distinct_id`` (top level or ``properties.distinct_id``) is
  answered 200 like the rest but not ingested: it lands in :attr:`PostHogSandbox.dropped`.
  A ``distinct_id`` is cut to 200 characters, as capture does.

Accepted events are deduplicated on ``uuid`` (a repeat is counted in
:attr:`PostHogSandbox.duplicate_count` and changes nothing) and kept in ingestion order. Each
one updates its person, the properties of its ``distinct_id``, in ingestion order (not
timestamp order, like PostHog): top-level ``$set``/``$set_once`` are merged under
``properties`` first (the ``properties`` values win), then ``$set`` overwrites,
``$set_once`` fills absent keys and ``$unset`` (a list of keys) removes. An event with
``properties.$process_person_profile`` = ``false`` updates no person. The sandbox keeps one
person per distinct ID: identify and alias merging are not modelled.

**Private API** (``Authorization: Bearer <personal API key>``; 401 without one or with an
unknown key, 403 when a scope is missing; ``{project_id}`` may be ``@current``):

* ``GET /api/projects/{project_id}/cohorts/`` (``cohort:read``): ``limit``/``offset``,
  ``{count, next, previous, results}``; deleted cohorts are left out.
* ``GET .../cohorts/{id}/`` (``cohort:read``): one cohort, 404 when unknown or deleted.
* ``GET .../cohorts/{id}/persons/`` (``cohort:read`` and ``person:read``): offset pagination
  (``limit`` default 100), ``{results, next, previous}`` with ``next`` a full URL built from
  the ``Host`` header and set only when the page came back full, so a cohort of exactly
  ``k * limit`` persons ends with an empty page. Each person lists at most 10 distinct IDs.
* ``POST .../query/`` (``query:read``): a ``HogQLQuery`` of exactly one shape, the keyset
  export of a cohort's distinct IDs::

      select distinct_id, person_id from person_distinct_ids where person_id in cohort <id>
      [and (person_id, distinct_id) > ('<person_id>', '<distinct_id>')]
      order by person_id, distinct_id limit <n>

  answered ``{"results": [[distinct_id, person_id], ...], "columns", "types", "hasMore",
  "limit", "offset"}``, ordered as strings; ``limit`` is capped at 50,000 like HogQL and
  ``hasMore`` says whether rows beyond the returned ones exist. Any other query is 400.

The persons and query endpoints each have a per-minute budget (``rate_limit_per_minute``,
240 like PostHog's analytics tier), counted over a sliding minute the way Django REST
framework throttles; over it, 429 with ``Retry-After`` and PostHog's throttled body.
Errors use PostHog's shape ``{"type", "code", "detail", "attr"}``.

Test controls: :meth:`PostHogSandbox.set_cohort`, :meth:`~PostHogSandbox.remove_members`,
:meth:`~PostHogSandbox.set_calculating`, :meth:`~PostHogSandbox.delete_cohort`,
:meth:`~PostHogSandbox.fail_page` and :meth:`~PostHogSandbox.inject_reply` (a canned
answer). Faults and canned answers match against the path *and* the query string
(``path?limit=100&offset=600&``), so ``fail(1, 503, path="offset=600&")`` fails exactly that
page. Over HTTP, ``POST /__sandbox/cohorts`` with ``{"cohort_id", "name",
"members", "is_static"?, "is_calculating"?}`` sets a cohort.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.sandboxes.base import Fault, Reply, Request, Sandbox, SandboxError, json_reply

__all__ = ["CohortPerson", "PostHogSandbox", "posthog_error"]

MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
MAX_DISTINCT_ID_LENGTH = 200
#: The persons endpoint lists at most this many distinct IDs per person.
DISTINCT_ID_LIMIT = 10
DEFAULT_PERSONS_LIMIT = 100
#: HogQL's MAX_SELECT_RETURNED_ROWS.
MAX_QUERY_ROWS = 50_000
DEFAULT_RATE_LIMIT_PER_MINUTE = 240
#: Namespace of the sandbox's person UUIDs (fixed so a person keeps its UUID across runs).
PERSON_NAMESPACE = uuid.UUID("0b7c6d2e-9f3a-4c1e-8d5b-2a6f4e8c1b90")

_CAPTURE_PATH = r"/(?:batch|i/v0/e|capture|e)/?"
_PROJECT = r"/api/projects/(@current|\d+)"
_QUERY_RE = re.compile(
    r"\s*select\s+distinct_id\s*,\s*person_id\s+from\s+person_distinct_ids\s+"
    r"where\s+person_id\s+in\s+cohort\s+(?P<cohort>\d+)"
    r"(?:\s+and\s+\(\s*person_id\s*,\s*distinct_id\s*\)\s*>\s*\(\s*'(?P<person>(?:[^'\\]|\\.)*)'\s*,\s*"
    r"'(?P<distinct>(?:[^'\\]|\\.)*)'\s*\))?"
    r"\s+order\s+by\s+person_id\s*,\s*distinct_id\s+limit\s+(?P<limit>\d+)\s*;?\s*",
    re.IGNORECASE)


def posthog_error(status: int, type_: str, code: str, detail: str, attr: str | None = None,
                  **headers: str) -> Reply:
    """A reply in PostHog's error shape."""
    return json_reply(status, {"type": type_, "code": code, "detail": detail, "attr": attr}, **headers)


def _invalid(detail: str, code: str = "invalid_input", attr: str | None = None) -> SandboxError:
    return SandboxError(posthog_error(400, "validation_error", code, detail, attr))


@dataclass
class CohortPerson:
    """A person in a cohort: its UUID, distinct IDs (all of them; the persons endpoint shows
    the first 10), properties and when it was created."""

    uuid: str
    distinct_ids: list[str]
    properties: dict[str, Any] = field(default_factory=dict)
    created_at: str = "2024-01-01T00:00:00Z"


@dataclass
class _Cohort:
    id: int
    name: str
    persons: list[CohortPerson]
    is_static: bool = False
    is_calculating: bool = False
    deleted: bool = False
    last_calculation: str = ""
    version: int = 1


class _Budget:
    """A sliding-minute request budget (Django REST framework's SimpleRateThrottle)."""

    def __init__(self) -> None:
        self.history: deque[float] = deque()

    def wait(self, now: float, limit: int) -> float | None:
        """Seconds to wait when the budget is spent (the request is not counted), else ``None``
        (and the request is counted)."""
        while self.history and self.history[0] <= now - 60:
            self.history.popleft()
        if len(self.history) >= limit:
            return max(0.0, 60 - (now - self.history[0]))
        self.history.append(now)
        return None


def person_uuid(first_distinct_id: str) -> str:
    """The UUID the sandbox gives a person first known by ``first_distinct_id``."""
    return str(uuid.uuid5(PERSON_NAMESPACE, first_distinct_id))


def _is_iso(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        datetime.fromisoformat(value)  # 3.11 reads RFC 3339, "Z" included
    except ValueError:
        return False
    return True


def _distinct_id(event: Mapping[str, Any]) -> str:
    """The event's distinct ID as capture reads it ("" when missing or empty)."""
    raw = event.get("distinct_id")
    if raw is None and isinstance(event.get("properties"), Mapping):
        raw = event["properties"].get("distinct_id")
    if raw is None or isinstance(raw, (dict, list)):
        return ""
    text = raw if isinstance(raw, str) else json.dumps(raw)
    return text[:MAX_DISTINCT_ID_LENGTH]


class PostHogSandbox(Sandbox):
    """PostHog's capture endpoints and private cohort API on loopback.

    ``project_token`` is the one project token (``phc_...``) capture accepts;
    ``personal_keys`` maps each personal API key to its scopes; ``clock`` gives the current
    Unix time (tests move it to refill the rate budgets).
    """

    name = "posthog"

    def __init__(self, project_token: str = "phc_sandbox", personal_keys: Mapping[str, Iterable[str]] | None = None,
                 project_id: int = 1, *, rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
                 max_body_bytes: int = MAX_BODY_BYTES, max_event_bytes: int = MAX_EVENT_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.project_token = project_token
        keys = personal_keys if personal_keys is not None else \
            {"phx_sandbox": {"cohort:read", "person:read", "query:read"}}
        self.personal_keys: dict[str, set[str]] = {k: set(v) for k, v in keys.items()}
        self.project_id = project_id
        self.rate_limit_per_minute = rate_limit_per_minute
        self.max_body_bytes = max_body_bytes
        self.max_event_bytes = max_event_bytes
        self.clock = clock
        self._local = threading.local()
        self._canned: list[list[Any]] = []  # [remaining, target substring, Reply]
        self._clear()
        self.route("POST", _CAPTURE_PATH, self._capture)
        self.route("GET", _PROJECT + r"/cohorts/?", self._list_cohorts)
        self.route("GET", _PROJECT + r"/cohorts/(\d+)/?", self._get_cohort)
        self.route("GET", _PROJECT + r"/cohorts/(\d+)/persons/?", self._cohort_persons)
        self.route("POST", _PROJECT + r"/query/?", self._query)

    def _clear(self) -> None:
        #: Every event ingested (not the duplicates or the dropped), in ingestion order.
        self.accepted_events: list[dict[str, Any]] = []
        #: Events answered 200 but not ingested, as (reason, event).
        self.dropped: list[tuple[str, dict[str, Any]]] = []
        self.duplicate_count = 0
        #: Batches (requests) ingested, with their batch-level fields except the events.
        self.batches: list[dict[str, Any]] = []
        self.persons: dict[str, dict[str, Any]] = {}
        self._seen_uuids: set[str] = set()
        self._cohorts: dict[int, _Cohort] = {}
        self._budgets: dict[str, _Budget] = {"persons": _Budget(), "query": _Budget()}

    # -- accessors --------------------------------------------------------------------------

    def events(self, distinct_id: str | None = None) -> list[dict[str, Any]]:
        """The ingested events (of ``distinct_id`` when given), in ingestion order."""
        with self.lock:
            return [e for e in self.accepted_events if distinct_id is None or e["distinct_id"] == distinct_id]

    def person_properties(self, distinct_id: str) -> dict[str, Any]:
        """The person properties of ``distinct_id`` now (``{}`` for an unknown person)."""
        with self.lock:
            return dict(self.persons.get(distinct_id, {}))

    def set_calls(self, distinct_id: str) -> int:
        """How many ``$set`` events were ingested for ``distinct_id``."""
        with self.lock:
            return sum(1 for e in self.accepted_events if e["distinct_id"] == distinct_id and e["event"] == "$set")

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "events": self.accepted_events,
                "dropped": [{"reason": reason, "event": event} for reason, event in self.dropped],
                "duplicate_count": self.duplicate_count,
                "persons": self.persons,
                "cohorts": {str(c.id): {"name": c.name, "persons": len(c.persons), "deleted": c.deleted,
                                        "is_calculating": c.is_calculating} for c in self._cohorts.values()},
            }

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self._canned.clear()
            self._clear()

    def clear_faults(self) -> None:
        super().clear_faults()
        with self.lock:
            self._canned.clear()

    # -- cohort controls --------------------------------------------------------------------

    def set_cohort(self, cohort_id: int, name: str, members: Sequence[Sequence[str] | Mapping[str, Any]], *,
                   is_static: bool = False, is_calculating: bool = False) -> None:
        """Make cohort ``cohort_id`` hold exactly ``members``, in order. A member is a list of
        its distinct IDs, or a mapping with ``distinct_ids`` and optionally ``properties``,
        ``uuid`` and ``created_at``. A person's UUID defaults to :func:`person_uuid` of its
        first distinct ID, so the same person keeps its UUID from one call to the next."""
        persons = [self._person(member) for member in members]
        with self.lock:
            previous = self._cohorts.get(cohort_id)
            self._cohorts[cohort_id] = _Cohort(cohort_id, name, persons, is_static=is_static,
                                               is_calculating=is_calculating,
                                               last_calculation=_now_iso(self.clock()),
                                               version=previous.version + 1 if previous else 1)

    def remove_members(self, cohort_id: int, distinct_ids: Iterable[str]) -> int:
        """Remove every person holding one of ``distinct_ids`` from the cohort; how many went."""
        gone = set(distinct_ids)
        with self.lock:
            cohort = self._cohorts[cohort_id]
            before = len(cohort.persons)
            cohort.persons = [p for p in cohort.persons if not gone.intersection(p.distinct_ids)]
            cohort.version += 1
            cohort.last_calculation = _now_iso(self.clock())
            return before - len(cohort.persons)

    def set_calculating(self, cohort_id: int, calculating: bool = True) -> None:
        with self.lock:
            self._cohorts[cohort_id].is_calculating = calculating

    def delete_cohort(self, cohort_id: int) -> None:
        """Soft-delete the cohort, as PostHog's ``PATCH {"deleted": true}`` does."""
        with self.lock:
            self._cohorts[cohort_id].deleted = True

    def cohort_distinct_ids(self, cohort_id: int) -> set[str]:
        """Every distinct ID of every person in the cohort (what a complete export returns)."""
        with self.lock:
            return {d for p in self._cohorts[cohort_id].persons for d in p.distinct_ids}

    def inject_reply(self, status: int, body: Any, *, headers: Mapping[str, str] | None = None, count: int = 1,
                     path: str = "") -> None:
        """Answer the next ``count`` requests whose path and query contain ``path`` with
        ``status`` and ``body`` without processing them."""
        with self.lock:
            self._canned.append([count, path, Reply(status, body, dict(headers or {}))])

    def fail_page(self, offset: int, count: int = 1, status: int = 503) -> None:
        """Fail the next ``count`` requests for the persons page at ``offset``."""
        self.fail(count, status, path=f"offset={offset}&")

    def _person(self, member: Sequence[str] | Mapping[str, Any]) -> CohortPerson:
        if isinstance(member, Mapping):
            ids = [str(d) for d in member.get("distinct_ids", ())]
            if not ids:
                raise ValueError("a cohort member needs at least one distinct ID")
            return CohortPerson(str(member.get("uuid") or person_uuid(ids[0])), ids,
                                dict(member.get("properties") or {}),
                                str(member.get("created_at") or "2024-01-01T00:00:00Z"))
        if isinstance(member, str):
            raise ValueError("a cohort member is a list of distinct IDs (or a mapping with distinct_ids)")
        ids = [str(d) for d in member]
        if not ids:
            raise ValueError("a cohort member needs at least one distinct ID")
        return CohortPerson(person_uuid(ids[0]), ids)

    # -- faults and errors ------------------------------------------------------------------

    def dispatch(self, request: Request) -> Reply:
        # Faults match on the query string too (base matches the path only), so one page of a
        # paginated export can be failed; the trailing "&" lets "offset=600&" not match 6000.
        query = "".join(f"{k}={v}&" for k, v in request.query.items())
        self._local.target = f"{request.path}?{query}" if query else request.path
        if request.path == "/__sandbox/cohorts" and request.method == "POST":
            return self._control_cohort(request)
        if not request.path.startswith("/__sandbox/"):
            canned = _take_canned(self._canned, self._local.target, self.lock)
            if canned is not None:
                return canned
        return super().dispatch(request)

    def _take_fault(self, path: str) -> Fault | None:
        return super()._take_fault(getattr(self._local, "target", path))

    def error_reply(self, status: int, message: str) -> Reply:
        if status == 429:  # the base adds Retry-After for an injected throttle
            return posthog_error(429, "throttled_error", "throttled", "Request was throttled.")
        if status >= 500:
            return posthog_error(status, "server_error", "error", f"A server error occurred ({message}).")
        if status == 404:
            return posthog_error(404, "invalid_request", "not_found", "Not found.")
        if status == 401:
            return posthog_error(401, "authentication_error", "authentication_failed", message)
        return posthog_error(status, "validation_error", "invalid_input", message)

    def _control_cohort(self, request: Request) -> Reply:
        spec = request.json if isinstance(request.json, dict) else {}
        try:
            self.set_cohort(int(spec["cohort_id"]), str(spec.get("name") or f"Cohort {spec['cohort_id']}"),
                            list(spec.get("members") or []), is_static=bool(spec.get("is_static")),
                            is_calculating=bool(spec.get("is_calculating")))
        except (KeyError, TypeError, ValueError) as exc:
            return json_reply(400, {"error": f"bad cohort spec: {exc}"})
        return json_reply(200, {})

    # -- capture ----------------------------------------------------------------------------

    def _capture(self, request: Request, match: re.Match[str]) -> Reply:
        if len(request.raw) > self.max_body_bytes:
            return posthog_error(413, "validation_error", "payload_too_large", "Request body too large.")
        try:
            body = json.loads(request.raw) if request.raw else None
        except ValueError:
            raise _invalid("Malformed request data: the body is not JSON.", "invalid_payload") from None
        batch_level: dict[str, Any] = {}
        if isinstance(body, list):
            events = body
        elif isinstance(body, dict) and "batch" in body:
            events = body["batch"]
            batch_level = {k: v for k, v in body.items() if k != "batch"}
            if not isinstance(events, list):
                raise _invalid("Malformed request data: batch must be a list.", "invalid_payload")
        elif isinstance(body, dict):
            events = [body]
        else:
            raise _invalid("Malformed request data: no event in the body.", "invalid_payload")
        if not events:
            raise _invalid("Malformed request data: empty batch.", "invalid_payload")
        if not all(isinstance(e, dict) for e in events):
            raise _invalid("Malformed request data: every event must be an object.", "invalid_payload")
        self._check_token(batch_level, events)
        for index, event in enumerate(events):
            if "timestamp" in event and event["timestamp"] is not None and not _is_iso(event["timestamp"]):
                raise _invalid(f"Invalid timestamp in event {index}.", "invalid_payload", "timestamp")
            if event.get("uuid") is not None:
                try:
                    uuid.UUID(str(event["uuid"]))
                except ValueError:
                    raise _invalid(f"Invalid uuid in event {index}.", "invalid_payload", "uuid") from None
            if len(json.dumps(event)) > self.max_event_bytes:
                return posthog_error(413, "validation_error", "payload_too_large", f"Event {index} too large.")
        with self.lock:
            self.batches.append(batch_level)
            for event in events:
                self._ingest(event)
        return json_reply(200, {"status": "Ok"})

    def _check_token(self, batch_level: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> None:
        tokens: set[str] = set()
        for event in events:
            properties = event.get("properties")
            if not isinstance(properties, Mapping):
                properties = {}
            token = event.get("api_key") or event.get("token") or properties.get("token") or batch_level.get("api_key")
            if not token:
                raise SandboxError(posthog_error(401, "authentication_error", "missing_api_key",
                                                 "API key not provided. You can find your project API key in "
                                                 "PostHog project settings."))
            tokens.add(str(token))
        if len(tokens) > 1:
            raise SandboxError(posthog_error(401, "authentication_error", "invalid_api_key",
                                             "inconsistent api_key values"))
        token = tokens.pop()
        if token.startswith("phx_"):
            raise SandboxError(posthog_error(401, "authentication_error", "invalid_api_key",
                                             "a personal API key cannot be used for capture"))
        if token != self.project_token:
            raise SandboxError(posthog_error(401, "authentication_error", "invalid_api_key",
                                             "Project API key invalid. You can find your project API key in "
                                             "PostHog project settings."))

    def _ingest(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        distinct_id = _distinct_id(event)
        if not isinstance(name, str) or not name:
            self.dropped.append(("missing event name", event))
            return
        if not distinct_id.strip():
            self.dropped.append(("missing distinct_id", event))
            return
        event_uuid = str(event["uuid"]) if event.get("uuid") is not None else str(uuid.uuid4())
        if event_uuid in self._seen_uuids:
            self.duplicate_count += 1
            return
        self._seen_uuids.add(event_uuid)
        properties = dict(event["properties"]) if isinstance(event.get("properties"), Mapping) else {}
        for operator in ("$set", "$set_once"):
            top = event.get(operator)
            if isinstance(top, Mapping):
                inner = properties.get(operator)
                properties[operator] = {**top, **(inner if isinstance(inner, Mapping) else {})}
        stored = {"event": name, "distinct_id": distinct_id, "uuid": event_uuid,
                  "timestamp": event.get("timestamp"), "properties": properties}
        self.accepted_events.append(stored)
        if properties.get("$process_person_profile") is False:
            return
        person = self.persons.setdefault(distinct_id, {})
        to_set = properties.get("$set")
        if isinstance(to_set, Mapping):
            person.update(to_set)
        set_once = properties.get("$set_once")
        if isinstance(set_once, Mapping):
            for key, value in set_once.items():
                person.setdefault(key, value)
        unset = properties.get("$unset")
        if isinstance(unset, Mapping):
            unset = list(unset)
        if isinstance(unset, list):
            for key in unset:
                person.pop(str(key), None)

    # -- private API ------------------------------------------------------------------------

    def _authorise(self, request: Request, project: str, *scopes: str) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise SandboxError(posthog_error(401, "authentication_error", "not_authenticated",
                                             "Authentication credentials were not provided."))
        granted = self.personal_keys.get(key.strip())
        if granted is None:
            raise SandboxError(posthog_error(401, "authentication_error", "authentication_failed",
                                             "Personal API key found in request Authorization header is invalid."))
        for scope in scopes:
            if scope not in granted and "*" not in granted:
                raise SandboxError(posthog_error(403, "authentication_error", "permission_denied",
                                                 f"API key missing required scope '{scope}'"))
        if project != "@current" and int(project) != self.project_id:
            raise SandboxError(posthog_error(403, "authentication_error", "permission_denied",
                                             "You don't have access to the project."))

    def _throttle(self, budget: str) -> None:
        with self.lock:
            wait = self._budgets[budget].wait(self.clock(), self.rate_limit_per_minute)
        if wait is not None:
            raise SandboxError(_throttled(wait))

    def _live_cohort(self, cohort_id: int) -> _Cohort:
        cohort = self._cohorts.get(cohort_id)
        if cohort is None or cohort.deleted:
            raise SandboxError(posthog_error(404, "invalid_request", "not_found", "Not found."))
        return cohort

    def _list_cohorts(self, request: Request, match: re.Match[str]) -> Reply:
        self._authorise(request, match.group(1), "cohort:read")
        limit = _int_param(request, "limit", 100)
        offset = _int_param(request, "offset", 0)
        with self.lock:
            live = [self._cohort_json(c) for c in sorted(self._cohorts.values(), key=lambda c: c.id) if not c.deleted]
        page = live[offset:offset + limit]
        base = _base_url(request)
        more = offset + limit < len(live)
        return json_reply(200, {
            "count": len(live),
            "next": f"{base}?limit={limit}&offset={offset + limit}" if more else None,
            "previous": f"{base}?limit={limit}&offset={max(0, offset - limit)}" if offset > 0 else None,
            "results": page,
        })

    def _get_cohort(self, request: Request, match: re.Match[str]) -> Reply:
        self._authorise(request, match.group(1), "cohort:read")
        with self.lock:
            return json_reply(200, self._cohort_json(self._live_cohort(int(match.group(2)))))

    def _cohort_json(self, cohort: _Cohort) -> dict[str, Any]:
        return {
            "id": cohort.id, "name": cohort.name, "description": "", "filters": None, "query": None,
            "is_static": cohort.is_static, "cohort_type": "static" if cohort.is_static else "person_property",
            "is_calculating": cohort.is_calculating, "last_calculation": cohort.last_calculation,
            "errors_calculating": 0, "count": len(cohort.persons), "version": cohort.version,
            "deleted": cohort.deleted,
        }

    def _cohort_persons(self, request: Request, match: re.Match[str]) -> Reply:
        self._authorise(request, match.group(1), "cohort:read", "person:read")
        self._throttle("persons")
        limit = _int_param(request, "limit", DEFAULT_PERSONS_LIMIT)
        offset = _int_param(request, "offset", 0)
        if limit <= 0:
            raise _invalid("limit must be a positive integer", attr="limit")
        with self.lock:
            cohort = self._live_cohort(int(match.group(2)))
            page = [self._person_json(p) for p in cohort.persons[offset:offset + limit]]
        base = _base_url(request)
        return json_reply(200, {
            "results": page,
            "next": f"{base}?limit={limit}&offset={offset + limit}" if len(page) == limit else None,
            "previous": f"{base}?limit={limit}&offset={max(0, offset - limit)}" if offset > 0 else None,
        })

    @staticmethod
    def _person_json(person: CohortPerson) -> dict[str, Any]:
        name = person.properties.get("email") or person.distinct_ids[0]
        return {
            "id": person.uuid, "uuid": person.uuid, "name": str(name),
            "distinct_ids": person.distinct_ids[:DISTINCT_ID_LIMIT], "properties": dict(person.properties),
            "created_at": person.created_at, "is_identified": len(person.distinct_ids) > 1,
        }

    def _query(self, request: Request, match: re.Match[str]) -> Reply:
        self._authorise(request, match.group(1), "query:read")
        self._throttle("query")
        body = request.json if isinstance(request.json, dict) else None
        if body is None and request.raw:
            try:
                body = json.loads(request.raw)
            except ValueError:
                body = None
        query = body.get("query") if isinstance(body, dict) else None
        if not isinstance(query, dict) or query.get("kind") != "HogQLQuery" or not isinstance(query.get("query"), str):
            raise _invalid("query must be a HogQLQuery object: {\"kind\": \"HogQLQuery\", \"query\": \"...\"}",
                           attr="query")
        parsed = _QUERY_RE.fullmatch(query["query"])
        if parsed is None:
            raise _invalid("The sandbox answers only: select distinct_id, person_id from person_distinct_ids where "
                           "person_id in cohort <id> [and (person_id, distinct_id) > ('<p>', '<d>')] order by "
                           "person_id, distinct_id limit <n>", "query_error", "query")
        cohort_id = int(parsed.group("cohort"))
        limit = min(int(parsed.group("limit")), MAX_QUERY_ROWS)
        after: tuple[str, str] | None = None
        if parsed.group("person") is not None:
            after = (_unescape(parsed.group("person")), _unescape(parsed.group("distinct")))
        with self.lock:
            cohort = self._cohorts.get(cohort_id)
            if cohort is None or cohort.deleted:
                raise _invalid(f"Could not find cohort with ID {cohort_id}", "query_error", "query")
            rows = sorted((p.uuid, d) for p in cohort.persons for d in p.distinct_ids)
        if after is not None:
            rows = [r for r in rows if r > after]
        page = rows[:limit]
        return json_reply(200, {
            "results": [[d, p] for p, d in page],
            "columns": ["distinct_id", "person_id"],
            "types": [["distinct_id", "String"], ["person_id", "UUID"]],
            "hasMore": len(rows) > limit,
            "limit": limit,
            "offset": 0,
        })


def _take_canned(canned: list[list[Any]], target: str, lock: threading.RLock) -> Reply | None:
    with lock:
        for entry in canned:
            if entry[0] > 0 and entry[1] in target:
                entry[0] -= 1
                if entry[0] == 0:
                    canned.remove(entry)
                reply: Reply = entry[2]
                return Reply(reply.status, reply.body, dict(reply.headers))
    return None


def _throttled(wait: float) -> Reply:
    seconds = max(1, math.ceil(wait))
    return posthog_error(429, "throttled_error", "throttled",
                         f"Request was throttled. Expected available in {seconds} seconds.",
                         **{"Retry-After": str(seconds)})


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(f"{name} must be an integer", attr=name) from None
    if value < 0:
        raise _invalid(f"{name} must not be negative", attr=name)
    return value


def _base_url(request: Request) -> str:
    """This request's URL without the query, from the ``Host`` header (as Django builds it)."""
    return f"http://{request.headers.get('host', 'localhost')}{request.path}"


def _unescape(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal)


def _now_iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
