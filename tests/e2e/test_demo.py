"""``make demo`` end to end: the demo script, run as ``make demo`` runs it, starts its own
server process and sandboxes, passes every step and says so in its trace; when the
platform refuses something, it stops at that step with the platform's reason, exits
non-zero and still stops everything it started."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The lines that tell a reader Stitchgraph worked, one per part of the story.
KEY_LINES = [
    r"sandboxes started: Meta Graph API http://127\.0\.0\.1:\d+, PostHog http://127\.0\.0\.1:\d+",
    r"server started: python -m server serve on 127\.0\.0\.1:\d+ .*store sqlite",
    r"destinations created: Meta Conversions .*Meta Custom Audience .*PostHog trait write-back "
    r"\(traits \[\"audiences\"\]\)",
    r"person stitched: anon-\w+ and user u-\w+ are one person p_\w+",
    r"consent granted for u-\w+: ad_user_data, ad_personalization, analytics",
    r"event deduplicated: DUPLICATE, original receipt events/evt-purchase-\w+",
    r"consent checked: destinations/meta-capi allowed",
    r"conversion accepted by Meta: Purchase event_id evt-purchase-\w+, value 49\.90 EUR",
    r"user_data\.em = [0-9a-f]{16}… \(SHA-256",
    r"cohort trait imported: posthog_cohort_power_users on 3 persons \(snapshot APPLIED, \+3 -0\)",
    r"audience delta delivered: ADD for p_\w+ accepted by Meta \(rows in audience 2385: 1,",
    r"trait written back: the PostHog sandbox shows \$set stitchgraph_audience_power_users=true on "
    r"distinct_id (u|anon)-\w+",
    r"stopped: server exited 0 on SIGTERM, sandboxes stopped, .* removed",
    r"all 15 steps passed",
]


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STITCHGRAPH_")}
    env.update(PYTHONIOENCODING="utf-8", **extra)
    return env


def test_make_demo_passes_every_step_and_prints_the_trace() -> None:
    result = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=_environment(),
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for pattern in KEY_LINES:
        assert re.search(pattern, output), f"missing {pattern!r} in:\n{output}"
    assert "✘" not in output and "Traceback" not in output, output
    numbered = re.findall(r"^\s*(\d+)\. ✔ ", result.stdout, re.MULTILINE)
    assert [int(n) for n in numbered] == list(range(1, 16)), output
    assert "ada.lovelace" not in output.lower()  # the raw email is not even in the trace


def _load_demo(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/demo.py as a module (``scripts`` is not a package); registered while the test
    runs because dataclasses look their module up by name."""
    spec = importlib.util.spec_from_file_location("stitchgraph_demo", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_step_the_platform_refuses_fails_with_its_reason_and_everything_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = _load_demo(monkeypatch)
    started: list[Any] = []

    class RevokedTokenMeta(demo.MetaSandbox):  # type: ignore[name-defined,misc]
        """Meta as it answers once the access token has been revoked (Graph error 190)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.inject_error(190, message="Error validating access token: the session has been invalidated",
                              count=100, path="/events")
            started.append(self)

    monkeypatch.setattr(demo, "MetaSandbox", RevokedTokenMeta)
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    out = io.StringIO()
    assert demo.run(out) == 1
    trace = out.getvalue()
    assert re.search(r"10\. ✘ conversion accepted by Meta: .*DEAD_LETTERED \(INVALID_TOKEN\)", trace), trace
    assert "the demo failed at step 10" in trace
    assert "Traceback" not in trace
    assert list(tmp_path.iterdir()) == []  # the store and the server log went with the temp dir
    assert started and started[0]._server is None  # the sandbox is stopped
    server_pid = int(re.search(r"\(pid (\d+)\)", trace).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
