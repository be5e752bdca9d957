"""Serve platform sandboxes from the command line for demos and manual testing.

    python -m tests.sandboxes [--host 127.0.0.1] [--port 9100] [--token T] meta google tiktok

Each sandbox gets its own port, counting up from ``--port``; their URLs are printed. Stop with Ctrl-C.
The accepted data is at ``GET <url>/__sandbox/state``; faults are injected with
``POST <url>/__sandbox/faults``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from tests.sandboxes.base import Sandbox


def _build(name: str, tokens: list[str]) -> Sandbox:
    if name == "meta":
        from tests.sandboxes.meta import MetaSandbox
        return MetaSandbox(tokens=set(tokens))
    if name == "google":
        from tests.sandboxes.google import GoogleSandbox
        return GoogleSandbox(tokens=set(tokens))
    if name == "tiktok":
        from tests.sandboxes.tiktok import TikTokSandbox
        return TikTokSandbox(tokens=set(tokens))
    raise SystemExit(f"unknown sandbox {name!r}: meta, google or tiktok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sandboxes", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["meta", "google", "tiktok"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--token", action="append", default=[], help="access token to accept (repeatable); "
                        "default: sandbox-token")
    args = parser.parse_args(argv)
    tokens = args.token or ["sandbox-token"]
    running = []
    for offset, name in enumerate(args.names):
        sandbox = _build(name, tokens).start(args.host, args.port + offset)
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
