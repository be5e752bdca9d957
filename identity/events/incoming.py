"""An event as it arrives, before mapping and validation: the one shape every input path
(gRPC ``Event`` messages, PostHog, Segment/RudderStack and Heap payloads) is turned into,
so that mapping, validation, dedup, identity and traits are written once.

Nothing here does I/O. Values are JSON-like: numbers from source payloads are parsed as
:class:`decimal.Decimal` (never ``float``), so money stays exact from the wire to storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stitchgraph.errors import FieldViolation

#: Message kinds. ``track`` carries a business event; ``identify`` asserts identity and
#: traits (stored as an event only if a mapping names one); ``alias`` only links identifiers;
#: ``page``/``screen`` are page views; ``traits`` sets traits only (Heap add_user_properties).
KINDS = ("track", "identify", "alias", "page", "screen", "traits")

#: ``mapped_event`` of a replayed identity-only message: it stays identity-only.
IDENTITY_ONLY = "~identity-only"

#: Kinds that never need a mapping: without an approved one they still count as identity and
#: trait evidence (they are "identity-only"); with one they are also stored as that event.
IDENTITY_KINDS = frozenset({"identify", "alias", "traits"})


@dataclass
class IncomingEvent:
    """One message of one input, as parsed. Parsers fill what their format carries and
    leave the rest empty; the capture pipeline maps, validates and stores it."""

    #: Message kind, one of :data:`KINDS`.
    kind: str
    #: The event name as the source sent it ("Order Completed", "$pageview"); for message types
    #: without a name, the type ("page", "screen", "identify", "alias", "add_user_properties").
    source_event: str
    #: Source label ("posthog", "segment", "rudderstack", "heap", "grpc", ...).
    source: str
    #: Identifiers as (type, value); raw ``email``/``phone`` allowed (hashed at the edge).
    identifiers: list[tuple[str, str]] = field(default_factory=list)
    #: When the action happened; ``None`` = unknown (the pipeline decides whether that is an error).
    occurred_at: datetime | None = None
    #: An explicit event ID (canonical ``event_id``, a source ``properties.event_id``); "" = none.
    event_id: str = ""
    #: The source's own message ID (PostHog ``uuid``/``$insert_id``, Segment ``messageId``,
    #: Heap ``idempotency_key``); "" = none.
    message_id: str = ""
    #: Typed properties, when the input has typed fields (canonical events). Source parsers leave
    #: them empty: the pipeline reads them from ``properties`` through the mapping.
    value: str = ""
    currency: str = ""
    order_id: str = ""
    items: list[dict[str, Any]] = field(default_factory=list)
    #: Free properties (JSON-like, numbers as int/Decimal).
    properties: dict[str, Any] = field(default_factory=dict)
    #: EventContext fields by their proto names (``ip``, ``user_agent``, ``page_url``, ``fbp`` ...).
    context: dict[str, Any] = field(default_factory=dict)
    #: ConsentSignals by their proto field names (``google_consent_mode`` {..}, ``segment``
    #: {"category_preferences": {..}}, ``rudderstack`` {..}, ``gpc``, ``us_privacy``, ``tcf_string``,
    #: ``gpp_string``, ``gpp_section_ids``); only the signals present.
    consent: dict[str, Any] = field(default_factory=dict)
    #: EventMetadata fields (``posthog_session_id``, ``replay_url``, ``library``, ``sent_at``).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Trait evidence the message asserts for its person.
    trait_set: dict[str, Any] = field(default_factory=dict)
    trait_set_once: dict[str, Any] = field(default_factory=dict)
    trait_unset: list[str] = field(default_factory=list)
    #: ActionSource enum suffix ("WEBSITE", "APP", ...) or "".
    action_source: str = ""
    #: Problems found while parsing; a message with violations is rejected.
    violations: list[FieldViolation] = field(default_factory=list)
    #: Values of identifiers whose type the parser guessed (a PostHog ``distinct_id`` without a
    #: sign of being anonymous or identified): the pipeline re-types them to ``user_id`` when the
    #: graph already knows them as one.
    inferred_anonymous: frozenset[str] = frozenset()
    #: Values typed ``user_id`` by an identify whose same value the graph may know as
    #: ``anonymous_id`` from before it was identified: the pipeline adds that identifier too.
    identified: frozenset[str] = frozenset()
    #: The message must not change identity (PostHog ``$process_person_profile: false``).
    personless: bool = False
    #: The canonical event it was already mapped to (a replayed event): the registry is not
    #: consulted again. "" = map through the registry.
    mapped_event: str = ""


@dataclass
class ParsedPayload:
    """The messages of one source payload (a single message or a batch)."""

    #: Payload-level problems (invalid JSON, unknown message type, missing batch array): when
    #: set, nothing of the payload is stored.
    violations: list[FieldViolation] = field(default_factory=list)
    messages: list[IncomingEvent] = field(default_factory=list)
