"""The domain exception tree.

Every layer below the gRPC edge raises one of these; the error interceptor in
``server/interceptors/errors.py`` holds the single table that turns them into gRPC status codes
with a ``google.rpc.Status`` carrying an ``ErrorInfo`` (and ``BadRequest`` field
violations for :class:`InvalidArgument`).

::

    StitchgraphError
    ├── InvalidArgument        (INVALID_ARGUMENT, with field violations)
    ├── NotFound               (NOT_FOUND)
    ├── AlreadyExists          (ALREADY_EXISTS)
    ├── FailedPrecondition     (FAILED_PRECONDITION)
    ├── Aborted                (ABORTED: stale etag, lost race worth retrying)
    ├── Unauthenticated        (UNAUTHENTICATED)
    ├── PermissionDenied       (PERMISSION_DENIED)
    ├── ResourceExhausted      (RESOURCE_EXHAUSTED)
    ├── Unavailable            (UNAVAILABLE)
    └── NotImplementedYet      (UNIMPLEMENTED, naming the feature)

Messages are written for the caller: they never contain secrets, raw emails or
raw phone numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: a dotted/indexed path into the request and why it is invalid."""

    field: str
    description: str
    #: Machine-readable UPPER_SNAKE_CASE reason (``REQUIRED``, ``INVALID_FORMAT``, ...); may be empty.
    reason: str = ""


class StitchgraphError(Exception):
    """Base of every error the domain raises on purpose.

    ``reason`` is an UPPER_SNAKE_CASE constant that clients can switch on
    (it becomes ``ErrorInfo.reason``); ``metadata`` becomes ``ErrorInfo.metadata``.
    """

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(StitchgraphError):
    """The request is malformed; ``violations`` name each bad field and the reason."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: list[FieldViolation] = list(violations)

    @classmethod
    def for_field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """An error about exactly one field, with the description as the message."""
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description, reason or "")],
                   reason=reason)

    def prefixed(self, prefix: str) -> InvalidArgument:
        """The same error with every field path placed under ``prefix`` (``identifiers[2]``)."""
        moved = [FieldViolation(f"{prefix}.{v.field}" if v.field else prefix, v.description, v.reason)
                 for v in self.violations]
        message = "; ".join(f"{v.field}: {v.description}" for v in moved) or self.message
        return InvalidArgument(message, violations=moved, reason=self.reason, metadata=self.metadata)


class NotFound(StitchgraphError):
    default_reason = "NOT_FOUND"


class AlreadyExists(StitchgraphError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(StitchgraphError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(StitchgraphError):
    default_reason = "ABORTED"


class Unauthenticated(StitchgraphError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(StitchgraphError):
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(StitchgraphError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(StitchgraphError):
    default_reason = "UNAVAILABLE"


class NotImplementedYet(StitchgraphError):
    """An RPC of the published API whose feature has not landed yet."""

    default_reason = "NOT_IMPLEMENTED_YET"

    def __init__(self, method: str, feature: str) -> None:
        super().__init__(
            f"{method} is part of the v1 API but the feature '{feature}' is not implemented yet",
            metadata={"method": method, "feature": feature},
        )
