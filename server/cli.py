"""The ``stitchgraph`` command line: ``serve``, ``migrate``, ``audiences``, ``jobs``, ``version``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from server.config import ConfigError, load_settings
from server.logs import configure_logging
from stitchgraph import API_VERSION, __version__

logger = logging.getLogger("stitchgraph.cli")


def _settings_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return load_settings(
        args.config,
        listen_address=getattr(args, "listen", None),
        database_url=getattr(args, "database_url", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from server.grpc_server import create_server

    settings = _settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    handle = create_server(settings)
    handle.start()
    stopping = threading.Event()

    def shutdown(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            logger.info("received %s, shutting down gracefully", signal.Signals(signum).name)
            threading.Thread(target=handle.stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    host = settings.listen_address.rpartition(":")[0]
    address = f"{host}:{handle.port}"
    print(
        f"Stitchgraph {__version__} ({API_VERSION}) serving on {address} "
        f"({'TLS' if settings.tls_enabled else 'plaintext'}, store: {handle.app.db.dialect})\n"
        f"  health:     grpcurl -plaintext {address} grpc.health.v1.Health/Check\n"
        f"  services:   grpcurl -plaintext {address} list\n"
        f"  a call:     grpcurl -plaintext {address} stitchgraph.v1.SystemService/GetSystemInfo\n"
        + (f"  metrics:    http://{settings.metrics_address.rpartition(':')[0]}:{handle.metrics_port}/metrics\n"
           if settings.metrics_address else "")
        + (f"  webhooks:   http://{handle.http.address}/webhooks/{{rudderstack,segment}}/<environment>, "
           f"/webhooks/heap/<cohort_source_id>\n" if handle.http is not None else "")
        + ("  auth:       send 'authorization: Bearer <token>' metadata\n" if settings.auth_enabled
           else "  auth:       off (no tokens configured; loopback only)\n")
        + "Stop with Ctrl-C.",
        flush=True,
    )
    handle.wait_for_termination()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from stitchgraph import migrations
    from stitchgraph.db import Database, DatabaseOptions

    settings = _settings_from(args)
    db = Database(DatabaseOptions(url=settings.database_url, sqlite_synchronous=settings.sqlite_synchronous))
    try:
        before = migrations.current_revision(db)
        migrations.upgrade(db)
        after = migrations.current_revision(db)
    finally:
        db.dispose()
    print(f"store migrated: {before or '(empty)'} -> {after}")
    return 0


def cmd_audiences(args: argparse.Namespace) -> int:
    from server.audiences_cli import run

    return run(args)


def cmd_jobs(args: argparse.Namespace) -> int:
    from server.jobs_cli import run

    return run(args)


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"stitchgraph {__version__} (API {API_VERSION})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stitchgraph", description="Identity resolution and audiences over gRPC.")
    parser.add_argument("--config", help="TOML configuration file (default: $STITCHGRAPH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="apply migrations and serve the gRPC API")
    serve.add_argument("--listen", help="host:port to listen on (default 127.0.0.1:50051)")
    serve.add_argument("--database-url", help="SQLAlchemy URL of the store")
    serve.set_defaults(func=cmd_serve)
    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--database-url", help="SQLAlchemy URL of the store")
    migrate.set_defaults(func=cmd_migrate)
    from server.audiences_cli import add_arguments as add_audiences_arguments

    audiences = commands.add_parser("audiences", help="validate, preview and apply a folder of audience files",
                                    description="Audience rules as code: one TOML file per audience.")
    add_audiences_arguments(audiences)
    audiences.set_defaults(func=cmd_audiences)
    from server.jobs_cli import add_arguments as add_jobs_arguments

    jobs = commands.add_parser("jobs", help="list the scheduled jobs of a running server, or run one now",
                               description="Scheduled jobs: cohort pulls, audience evaluation and reconciliation, "
                                           "maintenance.")
    add_jobs_arguments(jobs)
    jobs.set_defaults(func=cmd_jobs)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"stitchgraph: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
