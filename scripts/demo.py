"""See Stitchgraph work end to end: ``make demo`` (or ``.venv/bin/python scripts/demo.py``).

The demo starts the Meta and PostHog sandboxes in this process and the Stitchgraph server as
a real subprocess (``python -m server serve``) on the embedded SQLite store in a temporary
directory, everything on loopback. It then talks to the server only through the generated
gRPC stubs, the way an application would, and prints a numbered trace of the reference path
(anonymous browsing, identify, consent, a purchase and its retry, the conversion at Meta)
and the cohort path (a PostHog cohort imported as a trait, an audience built on it delivered
to a Meta Custom Audience, the membership written back to PostHog as a person property).

Every step checks what it claims at the server or at the sandbox (which validates requests
the way the platform does) and prints ✔ with a short detail, or ✘ with the reason and the
tail of the server log; the exit code is 0 only when every step passed. Everything started is
stopped and the temporary directory removed on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, TypeVar

ROOT = Path(__file__).resolve().parents[1]
# The sandboxes live in the test tree, which is not an installed package: make the project
# root importable whether this file is run as a script or imported by the test suite.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from stitchgraph.v1 import (  # noqa: E402
    audience_service_pb2,
    audience_service_pb2_grpc,
    audiences_pb2,
    cohort_service_pb2,
    cohort_service_pb2_grpc,
    cohorts_pb2,
    common_pb2,
    consent_pb2,
    consent_service_pb2,
    consent_service_pb2_grpc,
    destination_service_pb2,
    destination_service_pb2_grpc,
    destinations_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
)
from tests.sandboxes.meta import MetaSandbox  # noqa: E402
from tests.sandboxes.posthog import PostHogSandbox  # noqa: E402

__all__ = ["DemoFailed", "main", "run"]

T = TypeVar("T")

GRANTED = consent_pb2.CONSENT_STATUS_GRANTED
DELIVERY = destinations_pb2.DeliveryStatus
SNAPSHOT = cohorts_pb2.CohortSnapshotStatus
CAPTURE = events_pb2.CaptureStatus

#: Delivery settings for a demo: the workers poll often and retry quickly, so each platform
#: call happens within a fraction of a second of the change that caused it.
SERVER_CONFIG = """\
[delivery]
workers = 2
poll_interval_seconds = 0.05
lease_seconds = 5.0
request_timeout_seconds = 2.0
max_attempts = 5
backoff_base_seconds = 0.05
backoff_max_seconds = 0.5
throttle_seconds = 0.5
"""

META_PIXEL = "1234567890"
META_AUDIENCE = "2385"
POSTHOG_COHORT_ID = 42
POSTHOG_COHORT_NAME = "Power Users"
POSTHOG_PROJECT_TOKEN = "phc_demo_project_token"
POSTHOG_PERSONAL_KEY = "phx_demo_personal_key"
AUDIENCE_ID = "power-users"
#: The property the trait write-back sets for the audience (``stitchgraph_audience_<id>``, ``-`` as ``_``).
AUDIENCE_PROPERTY = "stitchgraph_audience_" + AUDIENCE_ID.replace("-", "_")
#: How long to wait for anything asynchronous (a delivery, the server starting) before failing.
WAIT_SECONDS = 20.0


class DemoFailed(Exception):
    """A step did not see what it should have; the message says what."""


def _symbols(stream: TextIO) -> tuple[str, str]:
    """✔/✘ where the terminal can print them, plain words where it cannot (a C locale)."""
    encoding = getattr(stream, "encoding", None)
    if encoding is None:  # an in-memory text buffer takes any character
        return "✔", "✘"
    try:
        "✔✘…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "OK  ", "FAIL"
    return "✔", "✘"


@dataclass
class Trace:
    """The numbered trace: one line per step, ✔ with a detail or ✘ with the reason."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    number: int = 0

    def __post_init__(self) -> None:
        self.ok, self.fail = _symbols(self.out)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        """Run one step; what the block appends to the yielded list becomes its detail lines."""
        self.number += 1
        details: list[str] = []
        try:
            yield details
        except DemoFailed as exc:
            self.say(f"{self.number:>2}. {self.fail} {title}: {exc}")
            raise
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            message = exc.details() if hasattr(exc, "details") else str(exc)
            self.say(f"{self.number:>2}. {self.fail} {title}: the server answered {code}: {message}")
            raise DemoFailed(f"{title}: {code}: {message}") from exc
        except Exception as exc:
            self.say(f"{self.number:>2}. {self.fail} {title}: unexpected {type(exc).__name__}: {exc}")
            traceback.print_exc(file=self.out)
            raise DemoFailed(f"{title}: {type(exc).__name__}: {exc}") from exc
        head, *rest = details or [""]
        self.say(f"{self.number:>2}. {self.ok} {head}" if head else f"{self.number:>2}. {self.ok} {title}")
        for line in rest:
            self.say(f"       {line}")


def wait_for(condition: Callable[[], T], what: str, timeout: float = WAIT_SECONDS,
             explain: Callable[[], str] | None = None, give_up: Callable[[], str] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; :class:`DemoFailed` naming
    ``what`` (and what ``explain`` says about why) when it has not after ``timeout`` seconds,
    or at once when ``give_up`` (asked every quarter second) names a reason it never will."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.25
    while True:
        value = condition()
        if value:
            return value
        if give_up is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + 0.25
            reason = give_up()
            if reason:
                raise DemoFailed(f"no {what}: {reason}")
        if time.monotonic() > deadline:
            why = ""
            if explain is not None:
                try:
                    why = explain()
                except grpc.RpcError as exc:
                    why = f"(the delivery log could not be read: {exc.code().name})"
            raise DemoFailed(f"no {what} after {timeout:g} s" + (f"; {why}" if why else ""))
        time.sleep(0.05)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def short(person_name: str) -> str:
    """``persons/p_abc`` as ``p_abc``."""
    return person_name.rpartition("/")[2]


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the server process ---------------------------------------------------------------------------

class ServerProcess:
    """``python -m server serve`` on a free loopback port, configured through a TOML file in
    ``STITCHGRAPH_CONFIG``, its output in a log file the trace shows when something fails."""

    def __init__(self, workdir: Path, credentials: dict[str, str]) -> None:
        self.workdir = workdir
        self.database = workdir / "stitchgraph.db"
        self.log_path = workdir / "server.log"
        self.address = f"127.0.0.1:{_free_port()}"
        config = workdir / "stitchgraph.toml"
        config.write_text(SERVER_CONFIG)
        # The caller's STITCHGRAPH_* settings (auth tokens, another store) are left out: the demo
        # server must be the embedded default on loopback, whatever the shell has configured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STITCHGRAPH_")}
        env.update({"STITCHGRAPH_CONFIG": str(config), "STITCHGRAPH_DATABASE_URL": f"sqlite:///{self.database}",
                    "STITCHGRAPH_METRICS_ADDRESS": "", "STITCHGRAPH_LOG_LEVEL": "WARNING",
                    "STITCHGRAPH_LOG_FORMAT": "text", **credentials})
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--listen", self.address],
            cwd=ROOT, env=self._env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self.process.poll() is not None:
                    raise DemoFailed(f"the server exited with code {self.process.returncode} while starting")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise DemoFailed(f"the server did not answer on {self.address} within 60 s") from None

    def stop(self) -> int | None:
        """SIGTERM and wait for the graceful shutdown (SIGKILL after 20 s); the exit code."""
        code: int | None = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 25) -> list[str]:
        """The last lines the server wrote after its start-up banner (warnings, errors)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        banner_end = next((i for i, line in enumerate(text) if line.startswith("Stop with Ctrl-C.")), -1)
        return text[banner_end + 1:][-lines:]


# -- the client -----------------------------------------------------------------------------------

class Client:
    """The generated stubs on one channel, as an application would hold them."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.audiences = audience_service_pb2_grpc.AudienceServiceStub(channel)
        self.cohorts = cohort_service_pb2_grpc.CohortServiceStub(channel)
        self.consent = consent_service_pb2_grpc.ConsentServiceStub(channel)
        self.destinations = destination_service_pb2_grpc.DestinationServiceStub(channel)
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        self.system = system_service_pb2_grpc.SystemServiceStub(channel)

    def create_destination(self, destination_id: str, kind: Any,
                           display_name: str, settings: dict[str, Any], credentials_ref: str) -> str:
        struct = struct_pb2.Struct()
        struct.update(settings)
        created = self.destinations.CreateDestination(destination_service_pb2.CreateDestinationRequest(
            destination_id=destination_id, destination=destinations_pb2.Destination(
                kind=kind, display_name=display_name, credentials_ref=credentials_ref, settings=struct)))
        return str(created.destination.name)

    def person_of(self, type_: str, value: str) -> str:
        found = self.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
            identifier=common_pb2.Identifier(type=type_, value=value)))
        return str(found.person.name)

    def deliveries(self, parent: str, **filters: Any) -> list[destinations_pb2.Delivery]:
        return list(self.destinations.ListDeliveries(destination_service_pb2.ListDeliveriesRequest(
            parent=parent, page_size=100, **filters)).deliveries)


# -- the demo -------------------------------------------------------------------------------------

@dataclass
class Demo:
    """The state the steps share."""

    trace: Trace
    meta: MetaSandbox
    posthog: PostHogSandbox
    client: Client
    server: ServerProcess
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    destinations: dict[str, str] = field(default_factory=dict)
    purchase_time: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    person: str = ""
    receipt: events_pb2.EventReceipt = field(default_factory=events_pb2.EventReceipt)
    visitors: list[str] = field(default_factory=list)
    cohort_source: str = ""
    trait_name: str = ""

    @property
    def anonymous_id(self) -> str:
        return f"anon-{self.suffix}"

    @property
    def user_id(self) -> str:
        return f"u-{self.suffix}"

    @property
    def email(self) -> str:
        return f"Ada.Lovelace+{self.suffix}@Example.com"

    @property
    def normalised_email(self) -> str:
        return self.email.strip().lower()

    @property
    def purchase_id(self) -> str:
        return f"evt-purchase-{self.suffix}"

    def run(self) -> None:
        for step in (self.create_destinations, self.browse_anonymously, self.identify, self.grant_consent,
                     self.capture_purchase, self.capture_purchase_again, self.check_consent, self.conversion_at_meta,
                     self.set_posthog_cohort, self.import_posthog_cohort, self.create_audience, self.deliver_audience,
                     self.trait_written_back):
            step()

    def delivery_log(self, destination: str, **filters: Any) -> str:
        """What the server's delivery log says about ``destination`` (for a failure message)."""
        entries = []
        for delivery in self.client.deliveries(destination, **filters)[:5]:
            last = delivery.attempts_log[-1] if delivery.attempts_log else None
            entries.append(
                f"{destinations_pb2.DeliveryKind.Name(delivery.kind).removeprefix('DELIVERY_KIND_')} "
                f"{DELIVERY.Name(delivery.status).removeprefix('DELIVERY_STATUS_')}"
                + (f" ({delivery.status_reason})" if delivery.status_reason else "")
                + f", {delivery.attempts} attempt(s)"
                + (f", last attempt: HTTP {last.http_status}" if last else "")
                + (f" {last.platform_error_code}" if last and last.platform_error_code else "")
                + (f" {last.error}" if last and last.error else ""))
        return f"the delivery log of {destination} shows: " + ("; ".join(entries) if entries else "nothing queued")

    def ended_unsuccessfully(self, destination: str, **filters: Any) -> str:
        """The delivery log's words when a matching delivery has ended without succeeding
        (dead-lettered, expired, skipped for consent, cancelled): waiting longer cannot help."""
        final = {DELIVERY.Value(s) for s in ("DELIVERY_STATUS_DEAD_LETTERED", "DELIVERY_STATUS_EXPIRED",
                                             "DELIVERY_STATUS_SKIPPED_NO_CONSENT", "DELIVERY_STATUS_CANCELLED")}
        deliveries = self.client.deliveries(destination, **filters)
        if deliveries and all(d.status in final for d in deliveries):
            return self.delivery_log(destination, **filters)
        return ""

    def create_destinations(self) -> None:
        with self.trace.step("destinations created") as detail:
            kinds = destinations_pb2
            self.destinations["meta-capi"] = self.client.create_destination(
                "meta-capi", kinds.DESTINATION_KIND_META_CONVERSIONS, "Meta Conversions",
                {"pixel_id": META_PIXEL, "base_url": self.meta.url}, "env:DEMO_META_TOKEN")
            self.destinations["meta-audience"] = self.client.create_destination(
                "meta-audience", kinds.DESTINATION_KIND_META_CUSTOM_AUDIENCE, "Meta Custom Audience",
                {"audience_id": META_AUDIENCE, "base_url": self.meta.url}, "env:DEMO_META_TOKEN")
            self.destinations["posthog-traits"] = self.client.create_destination(
                "posthog-traits", kinds.DESTINATION_KIND_POSTHOG_TRAITS, "PostHog trait write-back",
                {"host": self.posthog.url, "traits": ["audiences"]}, "env:DEMO_POSTHOG_PROJECT_TOKEN")
            detail.append(f"destinations created: Meta Conversions (pixel {META_PIXEL}), Meta Custom Audience "
                          f"({META_AUDIENCE}), PostHog trait write-back (traits [\"audiences\"])")
            detail.append("credentials travel as references (env:DEMO_META_TOKEN, env:DEMO_POSTHOG_PROJECT_TOKEN), "
                          "never as the secrets")

    def browse_anonymously(self) -> None:
        with self.trace.step("anonymous page views") as detail:
            now = datetime.now(UTC).replace(microsecond=0)
            pages = ["/", "/pricing", "/checkout"]
            response = self.client.events.CaptureBatch(event_service_pb2.CaptureBatchRequest(events=[
                events_pb2.Event(
                    event="page_view", event_id=f"pv-{self.suffix}-{i}", source="web",
                    occurred_at=timestamp(now - timedelta(minutes=10 - i)),
                    identifiers=[common_pb2.Identifier(type="anonymous_id", value=self.anonymous_id)],
                    action_source=events_pb2.ACTION_SOURCE_WEBSITE,
                    context=events_pb2.EventContext(page_url=f"https://shop.example{page}", user_agent="Mozilla/5.0"))
                for i, page in enumerate(pages)]))
            check(response.summary.accepted_count == len(pages),
                  f"{response.summary.accepted_count} of {len(pages)} page views accepted")
            anonymous_person = {r.receipt.person for r in response.results}
            check(len(anonymous_person) == 1, f"the page views resolved to {sorted(anonymous_person)}")
            detail.append(f"{len(pages)} anonymous page views captured for {self.anonymous_id} "
                          f"({', '.join(pages)}) -> person {short(anonymous_person.pop())}")

    def identify(self) -> None:
        with self.trace.step("person stitched") as detail:
            identified = self.client.identity.Identify(identity_service_pb2.IdentifyRequest(
                request_id=f"identify-{self.suffix}", source="web", identifiers=[
                    common_pb2.Identifier(type="anonymous_id", value=self.anonymous_id),
                    common_pb2.Identifier(type="user_id", value=self.user_id),
                    common_pb2.Identifier(type="email", value=self.email)]))
            person = identified.person
            by_anonymous = self.client.person_of("anonymous_id", self.anonymous_id)
            by_user = self.client.person_of("user_id", self.user_id)
            by_email = self.client.person_of("email", self.email)
            check(by_anonymous == by_user == by_email == person.name,
                  f"anonymous ID -> {by_anonymous}, user ID -> {by_user}, email -> {by_email}")
            stored = {(i.type, i.value) for i in person.identifiers}
            check(("email_sha256", sha256(self.normalised_email)) in stored,
                  "the email is not stored as its SHA-256 hash")
            check(not any(self.normalised_email in value.lower() for _, value in stored),
                  "the raw email is stored on the person")
            self.person = person.name
            decisions = sorted({identity_pb2.LinkDecisionKind.Name(d.decision).removeprefix("LINK_DECISION_KIND_")
                                + (f" {d.reason}" if d.reason else "") for d in identified.decisions})
            detail.append(f"person stitched: {self.anonymous_id} and user {self.user_id} are one person "
                          f"{short(person.name)}")
            detail.append(f"Identify(anonymous_id, user_id, email): links {', '.join(decisions) or 'none'}; "
                          f"stored identifiers {', '.join(sorted(t for t, _ in stored))} (the email only as its "
                          "SHA-256 hash)")

    def grant_consent(self) -> None:
        purposes = ("ad_user_data", "ad_personalization", "analytics")
        with self.trace.step("consent granted") as detail:
            response = self.client.consent.SetConsent(consent_service_pb2.SetConsentRequest(
                request_id=f"consent-{self.suffix}",
                identifier=common_pb2.Identifier(type="user_id", value=self.user_id),
                decisions=[consent_pb2.ConsentDecision(purpose=p, state=GRANTED, source="preference_center")
                           for p in purposes]))
            verdicts = {v.purpose: v.state for v in response.consent_state.verdicts}
            missing = [p for p in purposes if verdicts.get(p) != GRANTED]
            check(not missing, f"not granted after SetConsent: {missing}")
            detail.append(f"consent granted for {self.user_id}: {', '.join(purposes)} (source preference_center)")

    def _purchase(self) -> events_pb2.Event:
        return events_pb2.Event(
            event="purchase", event_id=self.purchase_id, source="shop", occurred_at=timestamp(self.purchase_time),
            value="49.90", currency="EUR", order_id=f"order-{self.suffix}",
            identifiers=[common_pb2.Identifier(type="user_id", value=self.user_id)],
            action_source=events_pb2.ACTION_SOURCE_WEBSITE,
            # Meta needs the page and the browser of a website event.
            context=events_pb2.EventContext(page_url="https://shop.example/checkout/thanks", user_agent="Mozilla/5.0"))

    def capture_purchase(self) -> None:
        with self.trace.step("purchase captured") as detail:
            first = self.client.events.Capture(event_service_pb2.CaptureRequest(event=self._purchase()))
            check(first.status == CAPTURE.Value("CAPTURE_STATUS_ACCEPTED"),
                  f"the purchase was {CAPTURE.Name(first.status)}")
            check(first.receipt.person == self.person,
                  f"the purchase resolved to {first.receipt.person}, not {self.person}")
            self.receipt = first.receipt
            detail.append(f"purchase captured: {self.purchase_id} 49.90 EUR by user {self.user_id} -> ACCEPTED, "
                          f"person {short(first.receipt.person)}")

    def capture_purchase_again(self) -> None:
        with self.trace.step("event deduplicated") as detail:
            again = self.client.events.Capture(event_service_pb2.CaptureRequest(event=self._purchase()))
            check(again.status == CAPTURE.Value("CAPTURE_STATUS_DUPLICATE"),
                  f"the same event_id again was {CAPTURE.Name(again.status)}, not DUPLICATE")
            check(again.receipt.event == self.receipt.event
                  and again.receipt.receive_time == self.receipt.receive_time,
                  "the retry did not return the original receipt")
            received = again.receipt.receive_time.ToDatetime(UTC).isoformat(timespec="milliseconds")
            detail.append(f"event deduplicated: DUPLICATE, original receipt {again.receipt.event} "
                          f"(received {received})")

    def check_consent(self) -> None:
        with self.trace.step("consent checked") as detail:
            meta = self.destinations["meta-capi"]
            state = self.client.consent.GetConsentState(consent_service_pb2.GetConsentStateRequest(
                person=self.person, destinations=[meta])).consent_state
            verdict = next((d for d in state.destinations if d.destination == meta), None)
            if verdict is None:
                raise DemoFailed(f"GetConsentState gave no verdict for {meta}")
            check(verdict.allowed, f"{meta} is not allowed: {verdict.explanation}")
            detail.append(f"consent checked: {meta} allowed (needs {', '.join(verdict.required_purposes)})")
            if verdict.explanation:
                detail.append(f"explain: {verdict.explanation}")

    def conversion_at_meta(self) -> None:
        with self.trace.step("conversion accepted by Meta") as detail:
            def accepted() -> list[dict[str, Any]]:
                with self.meta.lock:
                    return [a.event for a in self.meta.accepted_events if a.event.get("event_id") == self.purchase_id]

            meta, event_id = self.destinations["meta-capi"], self.purchase_id
            events = wait_for(accepted, f"Purchase {self.purchase_id} at the Meta sandbox",
                              explain=lambda: self.delivery_log(meta, event_id=event_id),
                              give_up=lambda: self.ended_unsuccessfully(meta, event_id=event_id))
            check(len(events) == 1, f"Meta kept {len(events)} copies of {self.purchase_id}")
            event = events[0]
            check(event.get("event_name") == "Purchase", f"sent as {event.get('event_name')!r}, not Purchase")
            custom = event.get("custom_data") or {}
            check(abs(float(custom.get("value") or 0) - 49.90) < 0.005 and str(custom.get("currency")).upper() == "EUR",
                  f"Meta received value {custom.get('value')} {custom.get('currency')}, not 49.90 EUR")
            emails = (event.get("user_data") or {}).get("em") or []
            check(emails == [sha256(self.normalised_email)],
                  "user_data.em is not the SHA-256 of the normalised email")
            check(self.normalised_email not in json.dumps(event).lower(), "the raw email reached Meta")
            delivered = wait_for(lambda: [d for d in self.client.deliveries(
                self.destinations["meta-capi"], event_id=self.purchase_id)
                if d.status == DELIVERY.Value("DELIVERY_STATUS_SUCCEEDED")], "SUCCEEDED delivery in the log")
            detail.append(f"conversion accepted by Meta: Purchase event_id {event['event_id']}, value "
                          f"{float(custom['value']):.2f} {str(custom['currency']).upper()}")
            detail.append(f"user_data.em = {emails[0][:16]}… (SHA-256 of the normalised email, never the raw "
                          f"email); delivery log: SUCCEEDED after {delivered[0].attempts} attempt(s)")

    def set_posthog_cohort(self) -> None:
        with self.trace.step("PostHog cohort set") as detail:
            self.visitors = [f"ph-visitor-{self.suffix}-{n}" for n in (1, 2)]
            self.posthog.set_cohort(POSTHOG_COHORT_ID, POSTHOG_COHORT_NAME,
                                    [[self.user_id], *[[v] for v in self.visitors]])
            settings = struct_pb2.Struct()
            settings.update({"host": self.posthog.url, "project_id": "1"})
            # The cohort's name given up front: its trait name is fixed from it when the cohort is
            # configured, and cohort("posthog", "<name>") in a rule reads that trait (docs/cohorts.md).
            source = self.client.cohorts.CreateCohortSource(cohort_service_pb2.CreateCohortSourceRequest(
                cohort_source_id="posthog", cohort_source=cohorts_pb2.CohortSource(
                    kind=cohorts_pb2.COHORT_SOURCE_KIND_POSTHOG, display_name="PostHog (sandbox)",
                    settings=settings, credentials_ref="env:DEMO_POSTHOG_PERSONAL_KEY",
                    cohorts=[cohorts_pb2.CohortImport(cohort_key=str(POSTHOG_COHORT_ID),
                                                      display_name=POSTHOG_COHORT_NAME)]))).cohort_source
            self.cohort_source = source.name
            self.trait_name = source.cohorts[0].trait_name
            detail.append(f"PostHog cohort {POSTHOG_COHORT_ID} {POSTHOG_COHORT_NAME!r} set in the sandbox: "
                          f"{self.user_id} and {len(self.visitors)} visitors Stitchgraph has never seen")
            detail.append(f"cohort source {source.name} created (POSTHOG, project 1, credentials "
                          f"{source.credentials_ref}); cohort {POSTHOG_COHORT_ID} -> trait {self.trait_name}")

    def import_posthog_cohort(self) -> None:
        with self.trace.step("cohort trait imported") as detail:
            synced = self.client.cohorts.SyncCohortSource(
                cohort_service_pb2.SyncCohortSourceRequest(name=self.cohort_source), timeout=60)
            check(len(synced.snapshots) == 1, f"SyncCohortSource returned {len(synced.snapshots)} snapshots")
            snapshot = synced.snapshots[0]
            check(snapshot.status == SNAPSHOT.Value("COHORT_SNAPSHOT_STATUS_APPLIED"),
                  f"snapshot {SNAPSHOT.Name(snapshot.status)}: {snapshot.error}")
            expected_trait = "posthog_cohort_" + POSTHOG_COHORT_NAME.lower().replace(" ", "_")
            check(snapshot.trait_name == expected_trait,
                  f"the cohort was imported as trait {snapshot.trait_name!r}, not {expected_trait!r}, so "
                  f"cohort(\"posthog\", \"{POSTHOG_COHORT_NAME}\") cannot match it")
            members = 1 + len(self.visitors)
            check((snapshot.member_count, snapshot.added_count, snapshot.removed_count) == (members, members, 0),
                  f"snapshot counted {snapshot.member_count} members, +{snapshot.added_count} "
                  f"-{snapshot.removed_count}; expected {members}, +{members} -0")
            traits = self.client.events.ListPersonTraits(event_service_pb2.ListPersonTraitsRequest(
                parent=self.person, keys=[snapshot.trait_name])).traits
            check(any(t.key == snapshot.trait_name and t.value.bool_value for t in traits),
                  f"{short(self.person)} does not have {snapshot.trait_name} = true")
            status = SNAPSHOT.Name(snapshot.status).removeprefix("COHORT_SNAPSHOT_STATUS_")
            detail.append(f"cohort trait imported: {snapshot.trait_name} on {snapshot.member_count} persons "
                          f"(snapshot {status}, +{snapshot.added_count} -{snapshot.removed_count})")
            detail.append(f"{short(self.person)} has {snapshot.trait_name} = true; "
                          f"{snapshot.new_identifier_count} unknown distinct IDs became posthog_distinct_id "
                          "identifiers that merge nothing")

    def create_audience(self) -> None:
        with self.trace.step("audience created") as detail:
            destination = self.destinations["meta-audience"]
            rule = f'cohort("posthog", "{POSTHOG_COHORT_NAME}") and consent(ad_personalization)'
            audience = self.client.audiences.CreateAudience(audience_service_pb2.CreateAudienceRequest(
                audience_id=AUDIENCE_ID, audience=audiences_pb2.Audience(
                    display_name=POSTHOG_COHORT_NAME, rule=rule, destinations=[destination]))).audience
            eligibility = self.client.audiences.CheckEligibility(audience_service_pb2.CheckEligibilityRequest(
                person=self.person, audience=audience.name, destinations=[destination]))
            clauses = "; ".join(f"{c.text} -> {c.observed}" for c in eligibility.clauses)
            check(eligibility.rule_matched, f"the rule does not match {short(self.person)}: {clauses}")
            verdict = next((d for d in eligibility.destinations if d.destination == destination), None)
            if verdict is None:
                raise DemoFailed(f"CheckEligibility gave no verdict for {destination}")
            check(verdict.eligible, f"not eligible for {destination}: {verdict.reason} {verdict.explanation}")
            detail.append(f"audience {audience.name} created with {audience.member_count} member(s): {rule} "
                          f"-> {destination}")
            detail.append(f"CheckEligibility for {short(self.person)}: rule matched "
                          f"({'; '.join(c.text for c in eligibility.clauses if c.matched)}), eligible for "
                          f"{destination} via {', '.join(verdict.available_match_keys)}")

    def deliver_audience(self) -> None:
        with self.trace.step("audience delta delivered") as detail:
            destination = self.destinations["meta-audience"]

            def added() -> list[destinations_pb2.Delivery]:
                return [d for d in self.client.deliveries(destination, person=self.person,
                                                          kind=destinations_pb2.DELIVERY_KIND_AUDIENCE_ADD)
                        if d.status == DELIVERY.Value("DELIVERY_STATUS_SUCCEEDED")]

            kind = destinations_pb2.DELIVERY_KIND_AUDIENCE_ADD
            delivery = wait_for(added, f"SUCCEEDED AUDIENCE_ADD for {short(self.person)} to {destination}",
                                explain=lambda: self.delivery_log(destination, person=self.person),
                                give_up=lambda: self.ended_unsuccessfully(destination, person=self.person,
                                                                          kind=kind))[0]
            email_hash = sha256(self.normalised_email)
            wait_for(lambda: [r for r in self.meta.audience_members(META_AUDIENCE) if email_hash in r],
                     f"row with the demo person's hashed email in Meta audience {META_AUDIENCE}")
            rows = self.meta.audience_members(META_AUDIENCE)
            check(len(rows) == 1, f"Meta audience {META_AUDIENCE} holds {len(rows)} rows; only the demo person "
                                  "consented to ad_personalization")
            attempt = delivery.attempts_log[-1] if delivery.attempts_log else None
            detail.append(f"audience delta delivered: ADD for {short(self.person)} accepted by Meta (rows in audience "
                          f"{META_AUDIENCE}: {len(rows)}, matched on the hashed email"
                          + (f"; HTTP {attempt.http_status}" if attempt else "") + ")")
            detail.append(f"the {len(self.visitors)} PostHog visitors stay out: they gave no ad_personalization "
                          "consent")

    def trait_written_back(self) -> None:
        with self.trace.step("trait written back") as detail:
            own_ids = {self.user_id, self.anonymous_id}

            def written() -> list[dict[str, Any]]:
                return [e for e in self.posthog.events()
                        if e["distinct_id"] in own_ids and e["event"] == "$set"
                        and (e["properties"].get("$set") or {}).get(AUDIENCE_PROPERTY) is True]

            posthog = self.destinations["posthog-traits"]
            sets = wait_for(written, f"$set {AUDIENCE_PROPERTY}=true at the PostHog sandbox",
                            explain=lambda: self.delivery_log(posthog, person=self.person),
                            give_up=lambda: self.ended_unsuccessfully(posthog, person=self.person))
            distinct_id = sets[-1]["distinct_id"]
            check(self.posthog.person_properties(distinct_id).get(AUDIENCE_PROPERTY) is True,
                  f"the PostHog person {distinct_id} does not show {AUDIENCE_PROPERTY}=true")
            visitors_written = [v for v in self.visitors if self.posthog.person_properties(v)]
            check(not visitors_written, f"traits were written for {visitors_written} without analytics consent")
            detail.append(f"trait written back: the PostHog sandbox shows $set {AUDIENCE_PROPERTY}=true on "
                          f"distinct_id {distinct_id}")
            detail.append("sent to the capture endpoint with the public project token; nothing for the visitors "
                          "(no analytics consent)")


# -- running it -----------------------------------------------------------------------------------

def run(out: TextIO | None = None) -> int:
    """Run the whole demo, printing the trace to ``out`` (stdout by default); 0 when every
    step passed, 1 otherwise."""
    trace = Trace(out or sys.stdout)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stitchgraph-demo-"))
    meta_token = "demo-meta-" + secrets.token_hex(8)
    meta = MetaSandbox(tokens={meta_token})
    posthog = PostHogSandbox(POSTHOG_PROJECT_TOKEN,
                             {POSTHOG_PERSONAL_KEY: {"cohort:read", "person:read", "query:read"}}, project_id=1)
    server = ServerProcess(workdir, {"DEMO_META_TOKEN": meta_token,
                                     "DEMO_POSTHOG_PROJECT_TOKEN": POSTHOG_PROJECT_TOKEN,
                                     "DEMO_POSTHOG_PERSONAL_KEY": POSTHOG_PERSONAL_KEY})
    trace.say("Stitchgraph demo: the server, a Meta sandbox and a PostHog sandbox, all on loopback")
    trace.say(f"store: embedded SQLite in {workdir}")
    trace.say("")
    failed = False
    try:
        with trace.step("sandboxes started") as detail:
            meta.start()
            posthog.start()
            detail.append(f"sandboxes started: Meta Graph API {meta.url}, PostHog {posthog.url}")
        with trace.step("server started") as detail:
            server.start()
            with grpc.insecure_channel(server.address) as channel:
                info = system_service_pb2_grpc.SystemServiceStub(channel).GetSystemInfo(
                    system_service_pb2.GetSystemInfoRequest(), timeout=10)
            detail.append(f"server started: python -m server serve on {server.address} (pid "
                          f"{server.process.pid if server.process else '?'}), Stitchgraph {info.version} "
                          f"{info.api_version}, store {info.store_dialect}")
        with grpc.insecure_channel(server.address) as channel:
            Demo(trace, meta, posthog, Client(channel), server).run()
    except DemoFailed:
        failed = True
        trace.say("")
        trace.say(f"{trace.fail} the demo failed at step {trace.number}; stopping everything it started")
        tail = server.log_tail()
        if tail:
            trace.say("the server logged:")
            for line in tail:
                trace.say(f"    {line}")
    except KeyboardInterrupt:
        failed = True
        trace.say(f"{trace.fail} interrupted")
    finally:
        code = server.stop()
        meta.stop()
        posthog.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1
    if code not in (0, None):
        trace.say(f"{trace.fail} the server exited with code {code} on SIGTERM")
        return 1
    trace.say("")
    trace.say(f"{trace.ok} stopped: server exited {code} on SIGTERM, sandboxes stopped, {workdir} removed")
    trace.say(f"{trace.ok} all {trace.number} steps passed in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: no arguments (``--help`` prints what the demo does)."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        print(f"usage: {Path(sys.argv[0]).name} [--help]  (the demo takes no arguments)", file=sys.stderr)
        return 2
    return run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
