"""AudienceService and ConsentService end to end over gRPC, on SQLite and PostgreSQL: the
reference cohort case (consent withdrawal, a purchase, an expiring window), conflicting
consent across identifiers, rule errors, etags, preview and eligibility explanations."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from server.grpc_server import StitchgraphServer
from stitchgraph.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    audiences_pb2,
    common_pb2,
    consent_pb2,
    consent_service_pb2,
    consent_service_pb2_grpc,
    destination_service_pb2,
    destination_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.support.audiences import create_meta_audience_destination
from tests.support.grpc_client import rich_error

apb = audience_service_pb2
GRANTED = consent_pb2.CONSENT_STATUS_GRANTED
DENIED = consent_pb2.CONSENT_STATUS_DENIED
ADD = audiences_pb2.AUDIENCE_DELTA_KIND_ADD
REMOVE = audiences_pb2.AUDIENCE_DELTA_KIND_REMOVE
EU_RULE = ('cohort("posthog", "checkout_abandoners")\n'
           'and trait("country") in ["DE", "FR", "NL"]\n'
           'and count(purchase, within=7d) == 0\n'
           'and consent(ad_personalization)')


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


class Clock:
    """The audience engine's clock, moved by the test (the scheduled pass reads it)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.audiences = audience_service_pb2_grpc.AudienceServiceStub(channel)
        self.consent = consent_service_pb2_grpc.ConsentServiceStub(channel)
        self.destinations = destination_service_pb2_grpc.DestinationServiceStub(channel)
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)

    def identify(self, user_id: str, *, email: str = "", traits: dict[str, Any] | None = None,
                 anonymous_id: str = "") -> str:
        identifiers = [common_pb2.Identifier(type="user_id", value=user_id)] if user_id else []
        if email:
            identifiers.append(common_pb2.Identifier(type="email", value=email))
        if anonymous_id:
            identifiers.append(common_pb2.Identifier(type="anonymous_id", value=anonymous_id))
        request = identity_service_pb2.IdentifyRequest(identifiers=identifiers, source="test")
        if traits:
            request.traits.update(traits)
        return self.identity.Identify(request).person.name

    def set_consent(self, identifier: tuple[str, str], purpose: str, state: int, at: datetime | None = None,
                    **kwargs: Any) -> consent_service_pb2.SetConsentResponse:
        decision = consent_pb2.ConsentDecision(purpose=purpose, state=state, source="preference_center", **kwargs)
        if at is not None:
            decision.time.CopyFrom(ts(at))
        return self.consent.SetConsent(consent_service_pb2.SetConsentRequest(
            identifier=common_pb2.Identifier(type=identifier[0], value=identifier[1]), decisions=[decision]))

    def purchase(self, user_id: str, order_id: str, at: datetime) -> None:
        event = events_pb2.Event(event="purchase", source="test", occurred_at=ts(at), value="19.99", currency="EUR",
                                 order_id=order_id, identifiers=[common_pb2.Identifier(type="user_id", value=user_id)])
        self.events.Capture(event_service_pb2.CaptureRequest(event=event))

    def meta_destination(self, destination_id: str = "meta-ca") -> str:
        return create_meta_audience_destination(self.destinations, destination_id)

    def create(self, audience_id: str, rule: str, destinations: list[str]) -> audiences_pb2.Audience:
        return self.audiences.CreateAudience(apb.CreateAudienceRequest(audience_id=audience_id, audience=(
            audiences_pb2.Audience(display_name=audience_id, rule=rule, destinations=destinations)))).audience

    def deltas(self, audience: str, **kwargs: Any) -> list[audiences_pb2.AudienceDelta]:
        return list(reversed(self.audiences.ListAudienceDeltas(apb.ListAudienceDeltasRequest(
            parent=audience, page_size=1000, **kwargs)).deltas))

    def members(self, audience: str, **kwargs: Any) -> list[str]:
        return [m.person for m in self.audiences.ListAudienceMembers(apb.ListAudienceMembersRequest(
            parent=audience, page_size=1000, **kwargs)).members]


@pytest.fixture
def clock(server: StitchgraphServer) -> Iterator[Clock]:
    c = Clock()
    original = server.app.audiences.clock
    server.app.audiences.clock = c
    yield c
    server.app.audiences.clock = original


@pytest.fixture
def client(channel: grpc.Channel) -> Client:
    return Client(channel)


def _changes(deltas: list[audiences_pb2.AudienceDelta]) -> list[tuple[str, int, str]]:
    return [(d.person, d.kind, d.reason) for d in deltas]


def test_reference_cohort_case(server: StitchgraphServer, client: Client, clock: Clock) -> None:
    meta = client.meta_destination()
    cohort = {"posthog_cohort_checkout_abandoners": True}
    anna = client.identify("anna", email="anna@example.com", traits={**cohort, "country": "DE"})
    client.set_consent(("user_id", "anna"), "ad_personalization", GRANTED)
    client.set_consent(("user_id", "anna"), "ad_user_data", GRANTED)
    # Not in: no consent (DE is an opt-in region), not in the EU, not in the cohort, bought recently.
    client.identify("bert", email="bert@example.com", traits={**cohort, "country": "FR"})
    client.identify("cleo", email="cleo@example.com", traits={**cohort, "country": "US"})
    client.set_consent(("user_id", "cleo"), "ad_personalization", GRANTED)
    client.identify("dora", email="dora@example.com", traits={"country": "DE"})
    client.set_consent(("user_id", "dora"), "ad_personalization", GRANTED)
    erik = client.identify("erik", email="erik@example.com", traits={**cohort, "country": "NL"})
    client.set_consent(("user_id", "erik"), "ad_personalization", GRANTED)
    client.set_consent(("user_id", "erik"), "ad_user_data", GRANTED)
    client.purchase("erik", "o-erik-1", clock.now - timedelta(days=2))

    audience = client.create("eu-abandoners", EU_RULE, [meta])
    assert audience.state == audiences_pb2.AUDIENCE_STATE_ACTIVE
    assert audience.member_count == 1
    assert client.members(audience.name) == [anna]
    assert _changes(client.deltas(audience.name)) == [(anna, ADD, "RULE_MATCHED")]
    assert all(d.destination == meta for d in client.deltas(audience.name))

    # Withdrawing consent yields a removal delta.
    client.set_consent(("user_id", "anna"), "ad_personalization", DENIED)
    assert _changes(client.deltas(audience.name))[-1] == (anna, REMOVE, "CONSENT_WITHDRAWN")
    assert client.members(audience.name) == []
    client.set_consent(("user_id", "anna"), "ad_personalization", GRANTED)
    assert _changes(client.deltas(audience.name))[-1] == (anna, ADD, "CONSENT_GRANTED")

    # A purchase yields a removal delta.
    client.purchase("anna", "o-anna-1", clock.now - timedelta(minutes=1))
    assert _changes(client.deltas(audience.name))[-1] == (anna, REMOVE, "RULE_UNMATCHED")
    before = len(client.deltas(audience.name))

    # Eight days later, without events, the scheduled pass adds anna (and erik) again.
    clock.now += timedelta(days=8)
    server.app.audiences.expire_windows()
    new = _changes(client.deltas(audience.name))[before:]
    assert sorted(new) == sorted([(anna, ADD, "WINDOW_EXPIRED"), (erik, ADD, "WINDOW_EXPIRED")])
    assert sorted(client.members(audience.name)) == sorted([anna, erik])
    # A second pass at the same time changes nothing.
    server.app.audiences.expire_windows()
    assert len(client.deltas(audience.name)) == before + 2

    explained = client.audiences.CheckEligibility(apb.CheckEligibilityRequest(person=anna, audience=audience.name))
    assert explained.rule_matched and explained.member
    assert [c.matched for c in explained.clauses] == [True, True, True, True]
    assert explained.clauses[1].text == 'trait("country") in ["DE", "FR", "NL"]'
    assert (explained.clauses[1].line, explained.clauses[1].column) == (2, 5)
    assert explained.clauses[1].observed == 'trait country = "DE"'
    assert explained.clauses[2].observed == "count(purchase) = 0"
    (at_meta,) = explained.destinations
    assert at_meta.eligible and at_meta.member_at_destination and at_meta.consent.allowed
    assert "email_sha256" in at_meta.available_match_keys


def test_destination_gating_consent_and_erase(server: StitchgraphServer, client: Client, clock: Clock) -> None:
    meta = client.meta_destination()
    fay = client.identify("fay", email="fay@example.com", traits={"plan": "pro", "country": "US"})
    gus = client.identify("", anonymous_id="gus-dev", traits={"plan": "pro", "country": "US"})  # no match key
    audience = client.create("pros", 'trait("plan") == "pro"', [meta])
    assert sorted(client.members(audience.name)) == sorted([fay, gus])
    # US is an opt-out region: fay is eligible by default; gus has nothing Meta can match on.
    assert _changes(client.deltas(audience.name)) == [(fay, ADD, "RULE_MATCHED")]
    assert client.members(audience.name, destination=meta) == [fay]
    stats = client.audiences.GetAudience(apb.GetAudienceRequest(name=audience.name)).audience.destination_stats
    assert (stats[0].eligible_count, stats[0].excluded_no_consent_count, stats[0].excluded_no_match_keys_count) \
        == (1, 0, 1)
    # A GPC opt-out is a sale/sharing opt-out: fay leaves the Meta audience but stays a member of the rule.
    client.consent.SetConsent(consent_service_pb2.SetConsentRequest(
        identifier=common_pb2.Identifier(type="user_id", value="fay"), signals=consent_pb2.ConsentSignals(gpc=True)))
    assert _changes(client.deltas(audience.name))[-1] == (fay, REMOVE, "CONSENT_WITHDRAWN")
    assert sorted(client.members(audience.name)) == sorted([fay, gus])
    state = client.consent.GetConsentState(consent_service_pb2.GetConsentStateRequest(person=fay)).consent_state
    (meta_consent,) = state.destinations
    assert not meta_consent.allowed
    # Gus gains an email and joins at Meta; erasing him removes him.
    client.identify("", email="gus@example.com", anonymous_id="gus-dev")
    assert _changes(client.deltas(audience.name))[-1] == (gus, ADD, "MATCH_KEY_ADDED")
    client.identity.ErasePerson(identity_service_pb2.ErasePersonRequest(name=gus, operator="dpo", reason="request"))
    assert _changes(client.deltas(audience.name))[-1] == (gus, REMOVE, "ERASED")
    assert client.members(audience.name) == [fay]


def test_conflicting_consent_follows_the_policy_and_explains_it(client: Client) -> None:
    t1 = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
    t2 = t1 + timedelta(days=30)
    client.set_consent(("anonymous_id", "dev-1"), "ad_personalization", GRANTED, at=t2, jurisdiction="DE")
    client.set_consent(("email", "hana@example.com"), "ad_personalization", DENIED, at=t1)
    client.set_consent(("anonymous_id", "dev-1"), "analytics", GRANTED, at=t1)
    client.set_consent(("email", "hana@example.com"), "analytics", DENIED, at=t1)
    person = client.identify("", email="hana@example.com", anonymous_id="dev-1")
    state = client.consent.GetConsentState(consent_service_pb2.GetConsentStateRequest(person=person)).consent_state
    verdicts = {v.purpose: v for v in state.verdicts}
    # The later grant (on the device) beats the earlier denial (on the email).
    ad = verdicts["ad_personalization"]
    assert ad.state == GRANTED and ad.resolved_by == consent_pb2.CONSENT_RESOLUTION_EXPLICIT
    assert ad.decision.identifier.type == "anonymous_id" and ad.decision_count == 2
    assert "anonymous_id" in ad.explanation and "2026-02-09" in ad.explanation
    # Equal times: deny wins, and the explanation says so.
    analytics = verdicts["analytics"]
    assert analytics.state == DENIED and analytics.decision.identifier.type == "email_sha256"
    assert "deny wins" in analytics.explanation
    # No decision: the jurisdiction (DE, from a decision) is opt-in, so denied by default.
    storage = verdicts["ad_storage"]
    assert storage.state == DENIED and storage.resolved_by == consent_pb2.CONSENT_RESOLUTION_JURISDICTION_DEFAULT
    assert state.jurisdiction == "DE" and state.jurisdiction_source == "decision"
    listed = client.consent.ListConsentDecisions(consent_service_pb2.ListConsentDecisionsRequest(
        parent=person, page_size=2))
    assert [d.time.ToDatetime(tzinfo=UTC) for d in listed.decisions] == [t2, t1] and listed.next_page_token

    # A split re-folds: the device alone keeps its grant, the email alone its denial.
    client.identity.SplitPerson(identity_service_pb2.SplitPersonRequest(
        name=person, operator="ops", detach_identifiers=[common_pb2.Identifier(type="email",
                                                                               value="hana@example.com")]))
    email_person = client.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
        identifier=common_pb2.Identifier(type="email", value="hana@example.com"))).person.name
    alone = client.consent.GetConsentState(consent_service_pb2.GetConsentStateRequest(
        person=email_person)).consent_state
    assert {v.purpose: v.state for v in alone.verdicts}["ad_personalization"] == DENIED


def test_invalid_rules_and_stale_etags(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.create("bad", 'trait("plan") == "pro"\nand count(purchase, within=7d) == "3"', [])
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_RULE" and error.metadata["line"] == "2"
    assert "audience.rule" in error.field_violations
    assert client.audiences.ListAudiences(apb.ListAudiencesRequest()).audiences == []
    checked = client.audiences.ValidateAudienceRule(apb.ValidateAudienceRuleRequest(rule="count(purchase) >"))
    assert not checked.valid and checked.diagnostics[0].line == 1

    audience = client.create("pros", 'trait("plan") == "pro"', [])
    updated = client.audiences.UpdateAudience(apb.UpdateAudienceRequest(audience=audiences_pb2.Audience(
        name=audience.name, description="paying users", etag=audience.etag)))
    assert updated.audience.description == "paying users" and updated.audience.etag != audience.etag
    with pytest.raises(grpc.RpcError) as caught:
        client.audiences.UpdateAudience(apb.UpdateAudienceRequest(audience=audiences_pb2.Audience(
            name=audience.name, description="again", etag=audience.etag)))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as caught:
        client.audiences.DeleteAudience(apb.DeleteAudienceRequest(name=audience.name, etag=audience.etag))
    assert caught.value.code() == grpc.StatusCode.ABORTED


def test_preview_changes_nothing_and_counts_per_destination(client: Client) -> None:
    meta = client.meta_destination()
    for i in range(5):
        if i % 2 == 0:
            client.identify(f"u{i}", email=f"u{i}@example.com", traits={"score": i, "country": "US"})
        else:  # only a device ID: nothing Meta can match on
            client.identify("", anonymous_id=f"dev-{i}", traits={"score": i, "country": "US"})
    preview = client.audiences.PreviewAudience(apb.PreviewAudienceRequest(
        rule='trait("score") >= 2', destinations=[meta], sample_size=2))
    assert preview.member_count == 3 and len(preview.sample) == 2
    assert [p.name for p in preview.sample] == sorted(p.name for p in preview.sample)
    (stats,) = preview.destination_stats
    assert (stats.eligible_count, stats.excluded_no_match_keys_count) == (2, 1)
    assert client.audiences.ListAudienceDeltas(apb.ListAudienceDeltasRequest(parent="audiences/-")).deltas == []
    with pytest.raises(grpc.RpcError) as caught:
        client.audiences.PreviewAudience(apb.PreviewAudienceRequest(rule='trait("score") >= "2'))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def hashed(email: str) -> str:
    return hashlib.sha256(email.encode()).hexdigest()


def test_deleting_a_destination_in_use_needs_force_and_sends_removals(client: Client) -> None:
    meta = client.meta_destination()
    ivy = client.identify("ivy", email="ivy@example.com", traits={"plan": "pro", "country": "US"})
    audience = client.create("pros", 'trait("plan") == "pro"', [meta])
    with pytest.raises(grpc.RpcError) as caught:
        client.destinations.DeleteDestination(destination_service_pb2.DeleteDestinationRequest(name=meta))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.destinations.DeleteDestination(destination_service_pb2.DeleteDestinationRequest(name=meta, force=True))
    assert _changes(client.deltas(audience.name))[-1] == (ivy, REMOVE, "DESTINATION_DETACHED")
    got = client.audiences.GetAudience(apb.GetAudienceRequest(name=audience.name)).audience
    assert list(got.destinations) == [] and got.member_count == 1


def test_consent_signals_on_events_are_evidence(client: Client) -> None:
    at = ts(datetime.now(UTC) - timedelta(hours=1))
    signals = consent_pb2.ConsentSignals(
        google_consent_mode=consent_pb2.GoogleConsentMode(ad_user_data=GRANTED, ad_personalization=DENIED),
        segment=consent_pb2.SegmentConsent(category_preferences={"Analytics": False, "Advertising": True}))
    event = events_pb2.Event(event="page_view", source="web", occurred_at=at, event_id="ev-consent-1",
                             identifiers=[common_pb2.Identifier(type="anonymous_id", value="dev-77")],
                             context=events_pb2.EventContext(consent=signals, country_code="US", region_code="US-CA"))
    client.events.Capture(event_service_pb2.CaptureRequest(event=event))
    person = client.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
        identifier=common_pb2.Identifier(type="anonymous_id", value="dev-77"))).person.name
    state = client.consent.GetConsentState(consent_service_pb2.GetConsentStateRequest(person=person)).consent_state
    verdicts = {v.purpose: v for v in state.verdicts}
    assert state.jurisdiction == "US-CA" and state.jurisdiction_source == "decision"
    assert verdicts["ad_user_data"].state == GRANTED and verdicts["ad_user_data"].decision_count == 2
    assert verdicts["ad_user_data"].decision.event_id == "ev-consent-1"
    # Consent Mode denies, Segment's "Advertising" grants, in the same event: deny wins.
    assert verdicts["ad_personalization"].state == DENIED
    assert verdicts["ad_personalization"].decision.origin == consent_pb2.CONSENT_DECISION_ORIGIN_GOOGLE_CONSENT_MODE
    assert "deny wins" in verdicts["ad_personalization"].explanation
    assert verdicts["analytics"].state == DENIED
    assert verdicts["analytics"].decision.origin == consent_pb2.CONSENT_DECISION_ORIGIN_SEGMENT
    assert verdicts["ad_storage"].state == GRANTED
    # No decision on sale/sharing in an opt-out region: granted by default.
    assert verdicts["sale_or_sharing"].state == GRANTED
    assert verdicts["sale_or_sharing"].resolved_by == consent_pb2.CONSENT_RESOLUTION_JURISDICTION_DEFAULT


def test_incremental_membership_equals_a_full_evaluation(client: Client) -> None:
    meta = client.meta_destination()
    rule = 'count(page_view, within=30d) >= 2 or (trait("plan") == "pro" and has(email))'
    audience = client.create("engaged", rule, [meta])
    now = datetime.now(UTC)
    for i in range(8):
        client.identify(f"w{i}", email=f"w{i}@example.com" if i % 2 else "",
                        traits={"plan": "pro" if i % 3 else "free", "country": "US"})
        for n in range(i % 4):
            client.events.Capture(event_service_pb2.CaptureRequest(event=events_pb2.Event(
                event="page_view", source="web", occurred_at=ts(now - timedelta(hours=n + 1)),
                identifiers=[common_pb2.Identifier(type="user_id", value=f"w{i}")])))
    client.identify("w1", anonymous_id="merge-me")
    client.identify("w2", anonymous_id="merge-me-2")
    incremental = sorted(client.members(audience.name))
    full = client.audiences.EvaluateAudience(apb.EvaluateAudienceRequest(name=audience.name))
    assert (full.added_count, full.removed_count) == (0, 0)
    assert sorted(client.members(audience.name)) == incremental and full.member_count == len(incremental) > 0


def test_list_audiences_filters(client: Client) -> None:
    meta = client.meta_destination()
    client.create("with-meta", 'trait("plan") == "pro"', [meta])
    client.audiences.CreateAudience(apb.CreateAudienceRequest(audience_id="labelled", audience=audiences_pb2.Audience(
        display_name="labelled", rule="has(email)", labels={"team": "growth"})))

    def names(text: str) -> list[str]:
        return [a.name for a in client.audiences.ListAudiences(apb.ListAudiencesRequest(filter=text)).audiences]

    assert names(f'destinations = "{meta}"') == ["audiences/with-meta"]
    assert names('labels = "team:growth"') == ["audiences/labelled"]
    assert names('state = ACTIVE AND display_name = "labelled"') == ["audiences/labelled"]
