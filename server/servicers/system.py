"""SystemService: what this server is and can do."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from server.app import Application
from server.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from stitchgraph import API_VERSION, __version__
from stitchgraph.v1 import system_pb2, system_service_pb2, system_service_pb2_grpc

FEATURE_DESCRIPTIONS = {
    "system": "server information",
    "identity-graph": "guarded identity graph: identify, alias, merge, split, erase, explain",
    "canonical-events": "canonical events, source mappings, schema registry, traits",
    "consent": "consent decisions and verdicts per purpose",
    "audiences": "audience rules, eligibility and membership",
    "delivery": "outbox, destination adapters and delivery log",
    "cohorts": "cohort imports from PostHog and Heap",
    "scheduler": "scheduled jobs",
}


class SystemServicer(system_service_pb2_grpc.SystemServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._started = Timestamp()
        self._started.FromDatetime(datetime.now(UTC))
        self._info: Any = None

    def GetSystemInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._info is None:
            # Feature status is a property of the code, so it is computed once.
            from server.registry import feature_status

            settings = self._app.settings
            self._info = system_service_pb2.GetSystemInfoResponse(
                version=__version__,
                api_version=API_VERSION,
                store_dialect=self._app.db.dialect,
                features=[
                    system_pb2.Feature(name=name, implemented=implemented,
                                       description=FEATURE_DESCRIPTIONS.get(name, ""))
                    for name, implemented in feature_status()
                ],
                limits=system_pb2.ServerLimits(
                    max_receive_message_bytes=settings.max_receive_message_bytes,
                    max_page_size=MAX_PAGE_SIZE,
                    default_page_size=DEFAULT_PAGE_SIZE,
                    max_identifiers_per_request=50,
                ),
                start_time=self._started,
                auth_enabled=settings.auth_enabled,
            )
        return self._info
