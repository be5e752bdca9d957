"""Serve platform sandboxes from the command line for demos and manual testing.

    python -m tests.sandboxes [--host 127.0.0.1] [--port 9100] [--token T] meta google tiktok posthog heap

Each sandbox gets its own port, counting up from ``--port``; their URLs are printed. Stop with Ctrl-C.
``--token`` is the access token of the ad platforms (meta, google, tiktok). PostHog takes
``--posthog-project-token`` (capture; default ``phc_sandbox``), ``--posthog-personal-key``
(private API, every scope; default ``phx_sandbox``) and ``--posthog-project-id`` (default 1);
its cohorts are set with ``POST <url>/__sandbox/cohorts``. Heap takes ``--heap-app-id``
(repeatable; default ``11111``) and ignores ``--token``.
The accepted data is at ``GET <url>/__sandbox/state``; faults are injected with
``POST <url>/__sandbox/faults``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from tests.sandboxes.base import Sandbox


def _build(name: str, tokens: list[str], options: argparse.Namespace | None = None) -> Sandbox:
    if name == "meta":
        from tests.sandboxes.meta import MetaSandbox
        return MetaSandbox(tokens=set(tokens))
    if name == "google":
        from tests.sandboxes.google import GoogleSandbox
        return GoogleSandbox(tokens=set(tokens))
    if name == "tiktok":
        from tests.sandboxes.tiktok import TikTokSandbox
        return TikTokSandbox(tokens=set(tokens))
    if name == "posthog":
        from tests.sandboxes.posthog import PostHogSandbox
        return PostHogSandbox(getattr(options, "posthog_project_token", "phc_sandbox"),
                              {getattr(options, "posthog_personal_key", "phx_sandbox"):
                               {"cohort:read", "person:read", "query:read"}},
                              getattr(options, "posthog_project_id", 1))
    if name == "heap":
        from tests.sandboxes.heap import HeapSandbox
        return HeapSandbox(getattr(options, "heap_app_id", None) or ["11111"])
    raise SystemExit(f"unknown sandbox {name!r}: meta, google, tiktok, posthog or heap")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sandboxes", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["meta", "google", "tiktok"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--token", action="append", default=[], help="access token to accept (repeatable); "
                        "default: sandbox-token")
    parser.add_argument("--posthog-project-token", default="phc_sandbox", help="PostHog project token for capture")
    parser.add_argument("--posthog-personal-key", default="phx_sandbox", help="PostHog personal API key (all scopes)")
    parser.add_argument("--posthog-project-id", type=int, default=1)
    parser.add_argument("--heap-app-id", action="append", default=[], help="Heap app_id to accept (repeatable); "
                        "default: 11111")
    args = parser.parse_args(argv)
    tokens = args.token or ["sandbox-token"]
    running = []
    for offset, name in enumerate(args.names):
        sandbox = _build(name, tokens, args).start(args.host, args.port + offset)
        running.append(sandbox)
        print(f"{name}: {sandbox.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    for sandbox in running:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
