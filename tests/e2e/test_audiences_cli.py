"""``stitchgraph audiences validate|preview|apply`` run in-process against a real server, on SQLite and
PostgreSQL: diagnostics mapped into the TOML files, preview counts, and apply's plan (create, no changes, a rule
diff, prune, dry runs, confirmation and a concurrent change caught by the etag)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import pytest

import server.audiences_cli as audiences_cli
from server.cli import main
from server.grpc_server import StitchgraphServer
from stitchgraph.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    audiences_pb2,
    common_pb2,
    destination_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.e2e.conftest import READ_TOKEN
from tests.support.audiences import create_meta_audience_destination

apb = audience_service_pb2

EU_FILE = '''\
# Reviewed by growth; see docs/audiences.md.
name = "EU pros without a purchase"
description = "Pro plan in the EU, nothing bought this week."
destinations = ["meta-ca"]
rule = """
trait("plan") == "pro"
  and trait("country") in ["DE", "FR"]
  and count(purchase, within=7d) == 0
"""
'''
PROS_FILE = '''\
id = "pros"
name = "Pros"
rule = 'trait("plan") == "pro"'
destinations = ["destinations/meta-ca"]
labels = { team = "growth" }
'''


class Api:
    """Direct API access for setting up data and checking what the CLI did."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.audiences = audience_service_pb2_grpc.AudienceServiceStub(channel)  # type: ignore[no-untyped-call]
        self.destinations = destination_service_pb2_grpc.DestinationServiceStub(  # type: ignore[no-untyped-call]
            channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)  # type: ignore[no-untyped-call]

    def meta_destination(self, destination_id: str = "meta-ca") -> None:
        create_meta_audience_destination(self.destinations, destination_id)

    def identify(self, anonymous_id: str, email: str, traits: dict[str, str]) -> None:
        identifiers = [common_pb2.Identifier(type="anonymous_id", value=anonymous_id)]
        if email:
            identifiers.append(common_pb2.Identifier(type="email", value=email))
        request = identity_service_pb2.IdentifyRequest(identifiers=identifiers, source="test")
        request.traits.update(traits)
        self.identity.Identify(request)

    def audience_map(self) -> dict[str, audiences_pb2.Audience]:
        listed = self.audiences.ListAudiences(apb.ListAudiencesRequest(page_size=1000)).audiences
        return {a.name.removeprefix("audiences/"): a for a in listed}


@pytest.fixture
def api(channel: grpc.Channel) -> Api:
    client = Api(channel)
    client.meta_destination()
    return client


@pytest.fixture
def address(server: StitchgraphServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "audiences"
    path.mkdir()
    (path / "eu-pros.toml").write_text(EU_FILE)
    (path / "pros.toml").write_text(PROS_FILE)
    return path


def cli(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    code = main(["audiences", *args, "--server", address])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_passes_and_points_into_the_file(api: Api, address: str, folder: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, address, "validate", str(folder))
    assert (code, err) == (0, "")
    assert f"{folder / 'eu-pros.toml'}: ok, audience eu-pros" in out
    assert f"{folder / 'pros.toml'}: ok, audience pros" in out
    assert "2 files checked: 2 valid, 0 invalid." in out

    # An error on the third line of the rule is on line 8 of the file (the rule starts on line 6).
    bad = folder / "eu-pros.toml"
    bad.write_text(EU_FILE.replace("count(purchase, within=7d) == 0", 'count(purchase, within=7d) == "0"'))
    code, out, _ = cli(capsys, address, "validate", str(folder))
    assert code == 1
    lines = out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith(f"{bad}:8:")]
    assert lines[at] == (f"{bad}:8:7: error TYPE_MISMATCH: cannot compare count(purchase, within=7d) (a number) "
                         'with "0" (a string)')
    assert lines[at + 1] == ' 8 |   and count(purchase, within=7d) == "0"'
    assert lines[at + 2].startswith("   |       ^~~")  # under column 7
    assert lines[at + 3].startswith("   = hint: ")
    assert f"{bad}: invalid (1 error, 0 warnings)" in out
    assert "2 files checked: 1 valid, 1 invalid." in out

    # A rule starting on the line of its opening quotes, local shape errors and an unknown destination.
    odd = folder / "odd.toml"
    odd.write_text(textwrap.dedent('''\
        name = "Odd"
        rule = """trait("plan") == "pro" and
                  count(purchase) >"""
        colour = "red"
        destinations = ["meta-ca", "tiktok-nope"]
        '''))
    code, out, _ = cli(capsys, address, "validate", str(odd))
    assert code == 1
    assert f"{odd}:3:28: error UNEXPECTED_END:" in out
    assert f"{odd}:4:1: error UNKNOWN_KEY: unknown key 'colour'" in out
    assert f"{odd}:5:28: error DESTINATION_NOT_FOUND: destination 'tiktok-nope' does not exist" in out

    (folder / "broken.toml").write_text('name = "Broken"\nrule = "trait(\\"plan\\")\n')
    code, out, _ = cli(capsys, address, "validate", str(folder / "broken.toml"))
    assert code == 1
    assert f"{folder / 'broken.toml'}:2:" in out and "error TOML_SYNTAX:" in out


def test_preview_prints_counts_per_destination_and_a_sample(api: Api, address: str, folder: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        api.identify(f"dev-pro-{i}", f"pro-{i}@example.com" if i < 2 else "", {"plan": "pro", "country": "US"})
    api.identify("dev-free-1", "free-1@example.com", {"plan": "free", "country": "US"})
    code, out, err = cli(capsys, address, "preview", str(folder / "pros.toml"), "--sample-size", "2")
    assert (code, err) == (0, "")
    assert f"pros ({folder / 'pros.toml'}): 3 members" in out
    # US is opt-out, so consent allows Meta; the third pro has only a device ID, nothing Meta can match on.
    assert "  meta-ca: 2 eligible; excluded: 0 without consent, 1 without a match key" in out
    (sample,) = [line for line in out.splitlines() if line.startswith("  sample (2 of 3): ")]
    assert len(sample.removeprefix("  sample (2 of 3): ").split(", ")) == 2
    assert api.audience_map() == {}  # preview saves nothing


def test_apply_creates_then_reports_no_changes_then_diffs_and_prunes(
        api: Api, address: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, address, "apply", str(folder), "--yes")
    assert code == 0
    assert f"+ create audiences/eu-pros  ({folder / 'eu-pros.toml'})" in out
    assert "+ create audiences/pros" in out
    assert "Plan: 2 to create, 0 to update, 0 to delete, 0 unchanged." in out
    assert "Applied 2 changes." in out
    audiences = api.audience_map()
    assert sorted(audiences) == ["eu-pros", "pros"]
    eu = audiences["eu-pros"]
    assert eu.display_name == "EU pros without a purchase" and list(eu.destinations) == ["destinations/meta-ca"]
    assert eu.rule.startswith('trait("plan") == "pro"\n  and trait("country")')
    assert dict(audiences["pros"].labels) == {"team": "growth", "managed_by": "stitchgraph-cli"}

    code, out, _ = cli(capsys, address, "apply", str(folder), "--yes")
    assert code == 0
    assert "= unchanged audiences/eu-pros" in out and "= unchanged audiences/pros" in out
    assert "No changes." in out
    assert api.audience_map()["eu-pros"].etag == eu.etag

    (folder / "eu-pros.toml").write_text(EU_FILE.replace("within=7d", "within=30d").replace(
        'description = "Pro plan in the EU, nothing bought this week."\n', 'state = "paused"\n'))
    code, out, _ = cli(capsys, address, "apply", str(folder), "--yes")
    assert code == 0
    assert f"~ update audiences/eu-pros  ({folder / 'eu-pros.toml'})" in out
    assert '    description:  "Pro plan in the EU, nothing bought this week." -> ""' in out
    assert "    state:        active -> paused" in out
    assert "      --- audiences/eu-pros (server)" in out
    assert f"      +++ {folder / 'eu-pros.toml'}" in out
    assert "      -  and count(purchase, within=7d) == 0" in out
    assert "      +  and count(purchase, within=30d) == 0" in out
    assert "Plan: 0 to create, 1 to update, 0 to delete, 1 unchanged." in out
    updated = api.audience_map()["eu-pros"]
    assert "within=30d" in updated.rule and updated.description == ""
    assert updated.state == audiences_pb2.AUDIENCE_STATE_PAUSED

    # An audience made elsewhere is never pruned; a managed one without a file is, with --prune only.
    api.audiences.CreateAudience(apb.CreateAudienceRequest(audience_id="hand-made", audience=audiences_pb2.Audience(
        display_name="Hand made", rule='trait("plan") == "free"')))
    (folder / "pros.toml").unlink()
    code, out, _ = cli(capsys, address, "apply", str(folder), "--yes")
    assert code == 0 and "No changes." in out
    assert "Note: pros is labelled managed_by=stitchgraph-cli but has no file; --prune deletes it." in out
    code, out, _ = cli(capsys, address, "apply", str(folder), "--yes", "--prune")
    assert code == 0
    assert "- delete audiences/pros  (labelled managed_by=stitchgraph-cli, no file)" in out
    assert "hand-made" not in out
    assert sorted(api.audience_map()) == ["eu-pros", "hand-made"]
    code, _, err = cli(capsys, address, "apply", str(folder / "eu-pros.toml"), "--yes", "--prune")
    assert code == 1 and "--prune needs a folder" in err


def test_dry_run_and_no_terminal_change_nothing(api: Api, address: str, folder: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = cli(capsys, address, "apply", str(folder), "--dry-run")
    assert code == 0
    assert "Plan: 2 to create" in out and "Dry run: nothing changed." in out
    assert api.audience_map() == {}

    monkeypatch.setattr(audiences_cli, "_stdin_is_tty", lambda: False)
    code, out, _ = cli(capsys, address, "apply", str(folder))
    assert code == 2
    assert "Plan: 2 to create" in out and "Re-run with --yes to apply." in out
    assert api.audience_map() == {}

    # Declining at the prompt changes nothing either.
    monkeypatch.setattr(audiences_cli, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(audiences_cli, "_ask", lambda question: "n")
    code, out, _ = cli(capsys, address, "apply", str(folder))
    assert code == 2 and "Cancelled: nothing changed." in out
    assert api.audience_map() == {}


def test_a_concurrent_change_after_the_plan_is_reported(api: Api, address: str, folder: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli(capsys, address, "apply", str(folder), "--yes")[0] == 0
    (folder / "pros.toml").write_text(PROS_FILE.replace('name = "Pros"', 'name = "Pro plan"'))

    def someone_else_edits(question: str) -> str:
        assert question == f"Apply 1 change to {address}? [y/N] "
        current = api.audience_map()["pros"]
        api.audiences.UpdateAudience(apb.UpdateAudienceRequest(audience=audiences_pb2.Audience(
            name=current.name, description="edited meanwhile", etag=current.etag)))
        return "yes"

    monkeypatch.setattr(audiences_cli, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(audiences_cli, "_ask", someone_else_edits)
    code, out, err = cli(capsys, address, "apply", str(folder))
    assert code == 1
    assert '    name:         "Pros" -> "Pro plan"' in out
    assert "audiences/pros changed on the server after the plan was made (ABORTED:" in err
    assert "Stopped after 0 of 1 changes" in out
    current = api.audience_map()["pros"]
    assert (current.display_name, current.description) == ("Pros", "edited meanwhile")


def test_token_and_unreachable_server(authed_server: StitchgraphServer, folder: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{authed_server.port}"
    code, _, err = cli(capsys, address, "validate", str(folder / "pros.toml"))
    assert code == 1 and "refused the call (UNAUTHENTICATED" in err and "Traceback" not in err
    monkeypatch.setenv("STITCHGRAPH_TOKEN", READ_TOKEN)
    (folder / "pros.toml").write_text(PROS_FILE.replace('destinations = ["destinations/meta-ca"]\n', ""))
    code, out, err = cli(capsys, address, "validate", str(folder / "pros.toml"))
    assert (code, err) == (0, "") and "ok, audience pros" in out

    code, out, err = cli(capsys, "127.0.0.1:1", "validate", str(folder), "--timeout", "10")
    assert code == 1 and out == ""
    assert err.startswith("stitchgraph audiences: cannot reach the server at 127.0.0.1:1 (UNAVAILABLE")
