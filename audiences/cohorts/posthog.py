"""Pulling a PostHog cohort's membership through the private API (``specs/sources-and-consent.md`` §2).

* ``GET /api/projects/{project_id}/cohorts/{id}/`` first: a cohort still calculating is not
  snapshotted (its membership is in flux), and its name fills the import's display name.
* ``GET .../cohorts/{id}/persons/?limit=&offset=``, following ``next`` to the end (``next``
  is a full URL, present only after a full page). Each row is a person with its
  ``distinct_ids`` — truncated by PostHog to the first 10.
* When some person came back with 10 distinct IDs (maybe truncated), every distinct ID of
  the cohort is read through the query API (HogQL over ``person_distinct_ids``, keyset
  pages) and replaces those persons' lists.
* Rate limits apply to the whole organisation (240/min, 1,200/h for these endpoints): a 429
  is retried after its ``Retry-After`` (bounded), 5xx and transport errors with backoff;
  anything else fails the pull. A pull either reads every page or raises
  :class:`PullError`, so a failure on page 7 of 25 applies nothing.

The personal API key goes in the ``Authorization`` header and only ever to the configured
host: a ``next`` URL on another host is rebuilt on ours. Error messages never include it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from audiences.cohorts.snapshots import Member
from audiences.destinations.base import parse_retry_after

__all__ = ["PostHogCohortClient", "PullError", "PulledCohort"]

#: PostHog returns at most this many distinct IDs per person from the persons endpoint.
DISTINCT_ID_LIMIT = 10


class PullError(Exception):
    """The pull failed; the message says where (page, status) and never carries credentials."""


@dataclass(frozen=True)
class PulledCohort:
    name: str
    members: list[Member]
    pages: int
    requests: int


class PostHogCohortClient:
    """Reads cohorts from one PostHog project."""

    def __init__(self, client: httpx.Client, *, host: str, project_id: str, api_key: str, page_size: int = 500,
                 query_page_size: int = 10_000, max_retries: int = 5, max_wait_seconds: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._host = host.rstrip("/")
        self._project = project_id
        self._key = api_key
        self._page_size = page_size
        self._query_page_size = query_page_size
        self._max_retries = max_retries
        self._max_wait = max_wait_seconds
        self._sleep = sleep
        self.requests = 0

    def pull(self, cohort_id: str) -> PulledCohort:
        """Every member of cohort ``cohort_id``; raises :class:`PullError`."""
        base = f"{self._host}/api/projects/{self._project}/cohorts/{cohort_id}"
        cohort = self._get_json(f"{base}/", what="the cohort")
        if cohort.get("deleted"):
            raise PullError(f"PostHog cohort {cohort_id} is deleted")
        if cohort.get("is_calculating"):
            raise PullError(f"PostHog cohort {cohort_id} is still calculating; pull again later")
        name = str(cohort.get("name") or "")
        url: str | None = f"{base}/persons/?limit={self._page_size}&offset=0"
        persons: dict[str, list[str]] = {}
        truncated = False
        page = 0
        while url:
            page += 1
            body = self._get_json(self._on_our_host(url), what=f"page {page} of the cohort's persons")
            results = body.get("results")
            if not isinstance(results, list):
                raise PullError(f"PostHog page {page} of the cohort's persons has no results list")
            for row in results:
                if not isinstance(row, Mapping):
                    continue
                ids = [str(d) for d in row.get("distinct_ids") or () if isinstance(d, (str, int)) and str(d)]
                if not ids:
                    continue
                person = str(row.get("uuid") or row.get("id") or ids[0])
                persons[person] = ids
                truncated = truncated or len(ids) >= DISTINCT_ID_LIMIT
            next_url = body.get("next")
            url = next_url if isinstance(next_url, str) and next_url else None
        if truncated:
            for person, ids in self._all_distinct_ids(cohort_id).items():
                if person in persons and len(persons[person]) >= DISTINCT_ID_LIMIT:
                    persons[person] = ids
        members = [Member(tuple((None, d) for d in ids)) for ids in persons.values()]
        return PulledCohort(name, members, page, self.requests)

    def _all_distinct_ids(self, cohort_id: str) -> dict[str, list[str]]:
        """Every (person, distinct ID) pair of the cohort through HogQL, keyset-paged."""
        if not cohort_id.isdigit():
            raise PullError("the query API needs a numeric PostHog cohort ID")
        url = f"{self._host}/api/projects/{self._project}/query/"
        out: dict[str, list[str]] = {}
        after: tuple[str, str] | None = None
        page = 0
        while True:
            page += 1
            keyset = ""
            if after is not None:
                keyset = f" and (person_id, distinct_id) > ({_hogql_string(after[0])}, {_hogql_string(after[1])})"
            query = (f"select distinct_id, person_id from person_distinct_ids where person_id in cohort {cohort_id}"
                     f"{keyset} order by person_id, distinct_id limit {self._query_page_size}")
            body = self._request("POST", url, what=f"query page {page}",
                                 json={"query": {"kind": "HogQLQuery", "query": query}})
            rows = body.get("results") or []
            for row in rows:
                if isinstance(row, list) and len(row) >= 2:
                    out.setdefault(str(row[1]), []).append(str(row[0]))
            if len(rows) < self._query_page_size:
                return out
            last = rows[-1]
            after = (str(last[1]), str(last[0]))

    # -- HTTP ----------------------------------------------------------------------------------

    def _on_our_host(self, url: str) -> str:
        ours, theirs = urlsplit(self._host), urlsplit(url)
        if (theirs.scheme, theirs.netloc) == (ours.scheme, ours.netloc):
            return url
        return urlunsplit((ours.scheme, ours.netloc, theirs.path, theirs.query, ""))

    def _get_json(self, url: str, *, what: str) -> dict[str, Any]:
        return self._request("GET", url, what=what)

    def _request(self, method: str, url: str, *, what: str, json: Any = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        delay = 1.0
        for attempt in range(self._max_retries + 1):
            self.requests += 1
            try:
                reply = self._client.request(method, url, headers=headers, json=json)
            except httpx.HTTPError as exc:
                if attempt == self._max_retries:
                    raise PullError(f"PostHog {what}: {type(exc).__name__} after {attempt + 1} attempts") from None
                self._sleep(min(delay, self._max_wait))
                delay *= 2
                continue
            status = reply.status_code
            if status == 200:
                try:
                    body = reply.json()
                except ValueError:
                    raise PullError(f"PostHog {what}: the reply is not JSON") from None
                if not isinstance(body, dict):
                    raise PullError(f"PostHog {what}: unexpected reply shape")
                return body
            retryable = status == 429 or status == 408 or status >= 500
            if not retryable or attempt == self._max_retries:
                raise PullError(f"PostHog {what}: HTTP {status}{_detail(reply)}"
                                + (f" after {attempt + 1} attempts" if retryable else ""))
            wait = parse_retry_after(reply.headers.get("Retry-After")) if status == 429 else None
            if wait is not None and wait > self._max_wait:
                raise PullError(f"PostHog {what}: rate limited for {wait:.0f} s, longer than the "
                                f"{self._max_wait:.0f} s this pull waits")
            self._sleep(wait if wait is not None else min(delay, self._max_wait))
            delay *= 2
        raise PullError(f"PostHog {what}: no reply")  # pragma: no cover - the loop always returns or raises


def _detail(reply: httpx.Response) -> str:
    """PostHog's ``detail`` message, short, for the snapshot's error."""
    try:
        body = reply.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return f" ({body['detail'][:200]})"
    return ""


def _hogql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
