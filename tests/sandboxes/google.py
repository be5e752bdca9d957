"""A local stand-in for Google's OAuth token endpoint, the Google Ads API conversion uploads
and the Data Manager API's audience members, all on one port (``specs/destinations.md`` §2, §5).

Served routes (point the adapter's ``token_url`` and ``base_url`` settings at :attr:`url`):

* ``POST /token``: the refresh-token grant for the configured client and refresh token;
  answers ``access_token`` + ``expires_in``. Refusals use OAuth's shape
  (``{"error": "invalid_grant", "error_description": ...}``: 400 for a bad refresh token,
  401 ``invalid_client`` for a bad client).
* ``POST /{version}/customers/{cid}:uploadClickConversions`` and
  ``:uploadConversionAdjustments``: bearer token (the constructor's ``tokens`` or one this
  sandbox issued) and a ``developer-token`` header required; ``partialFailure`` must be true
  (``PARTIAL_FAILURE_MODE_REQUIRED``); at most 2,000 rows (``TOO_MANY_CONVERSIONS_IN_REQUEST``);
  all whole-request errors in Google's envelope ``{"error": {code, message, status, details:
  [GoogleAdsFailure]}}``. An unknown field or enum value fails the whole request with a
  ``google.rpc.BadRequest`` naming ``conversions[i]`` (as Google's JSON transcoding does).
  Row problems come back with HTTP 200 in ``partialFailureError`` located by
  ``fieldPathElements [{fieldName: "conversions", index: i}, ...]``: the date-time format, at
  most five identifiers, only ``hashedEmail``/``hashedPhoneNumber`` (plus ``addressInfo`` for
  adjustments), one key per identifier, 64 lower-case hex hashes, both braids, no click ID and
  no identifier, an unknown conversion action (``NO_CONVERSION_ACTION_FOUND``, when the
  sandbox is given its known action IDs). Order IDs are unique per conversion action like
  Google's: an order ID already recorded is ``ORDER_ID_ALREADY_IN_USE``, a repeat within one
  request ``DUPLICATE_ORDER_ID`` (Google's enum documentation; the first row is kept);
  an enhancement already applied is ``CONVERSION_ALREADY_ENHANCED``.
* ``POST /v1/audienceMembers:ingest`` and ``:remove``: bearer token; destinations present (at
  most 10, each with an operating account and a product destination ID), 1 to 10,000 members,
  1 to 10 identifiers each (``emailAddress``/``phoneNumber``/``address``, one per identifier),
  ``encoding`` HEX (64 lower-case hex) or BASE64 (32 bytes). Any problem refuses the whole
  request (``google.rpc.Status`` with ``ErrorInfo`` and ``BadRequest`` field violations like
  ``audience_members.audience_members[0].user_data.user_identifiers``); success answers a
  ``requestId``.

The sandbox takes lowerCamelCase JSON names only (Google also accepts proto names). What it
accepted: :attr:`GoogleSandbox.accepted_conversions`, :attr:`accepted_adjustments`,
:meth:`audience_members` (hex hashes per product destination ID), :attr:`audience_requests`,
and counters. :meth:`reset` forgets them (issued access tokens stay valid);
:meth:`expire_issued_tokens` makes every issued access token invalid,
:meth:`exhaust_quota` answers the next uploads 429 with a ``retryDelay`` but no ``Retry-After``,
and :meth:`fail_row` gives the row with an order ID a chosen row error once.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import threading
import uuid
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tests.sandboxes.base import Reply, Request, Sandbox, SandboxError, is_hash, json_reply

__all__ = ["AcceptedAdjustment", "AcceptedConversion", "AudienceRequest", "GoogleSandbox"]

ADS_VERSION = "v25"
MAX_CONVERSIONS = 2000
MAX_IDENTIFIERS = 5
MAX_MEMBERS = 10_000
MAX_MEMBER_IDENTIFIERS = 10
MAX_DESTINATIONS = 10

_DATE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
_ACTION_RE = re.compile(r"customers/(\d+)/conversionActions/(\d+)")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_ADS_CODES = {400: ("fieldError", "INVALID_VALUE"), 401: ("authenticationError", "OAUTH_TOKEN_INVALID"),
              403: ("authorizationError", "USER_PERMISSION_DENIED"), 429: ("quotaError", "RESOURCE_EXHAUSTED"),
              500: ("internalError", "INTERNAL_ERROR"), 503: ("internalError", "TRANSIENT_ERROR"),
              504: ("internalError", "DEADLINE_EXCEEDED")}

_CONVERSION_FIELDS = frozenset({
    "gclid", "gbraid", "wbraid", "conversionAction", "conversionDateTime", "conversionValue", "currencyCode",
    "orderId", "externalAttributionData", "customVariables", "cartData", "userIdentifiers", "conversionEnvironment",
    "consent", "customerType", "userIpAddress", "sessionAttributesEncoded", "sessionAttributesKeyValuePairs"})
_ADJUSTMENT_FIELDS = frozenset({"gclidDateTimePair", "orderId", "conversionAction", "adjustmentDateTime",
                                "adjustmentType", "restatementValue", "userIdentifiers", "userAgent"})
_IDENTIFIER_KEYS = frozenset({"hashedEmail", "hashedPhoneNumber", "mobileId", "thirdPartyUserId", "addressInfo"})
_IDENTIFIER_FIELDS = _IDENTIFIER_KEYS | {"userIdentifierSource"}
_CONSENT_VALUES = frozenset({"UNSPECIFIED", "UNKNOWN", "GRANTED", "DENIED"})
_SOURCE_VALUES = frozenset({"UNSPECIFIED", "UNKNOWN", "FIRST_PARTY", "THIRD_PARTY"})
_ADJUSTMENT_TYPES = frozenset({"UNSPECIFIED", "UNKNOWN", "ENHANCEMENT", "RETRACTION", "RESTATEMENT"})
_ACCOUNT_TYPES = frozenset({"GOOGLE_ADS", "DISPLAY_VIDEO_PARTNER", "DISPLAY_VIDEO_ADVERTISER", "DATA_PARTNER"})
_DM_CONSENT_VALUES = frozenset({"CONSENT_STATUS_UNSPECIFIED", "CONSENT_GRANTED", "CONSENT_DENIED"})
_DM_INGEST_FIELDS = frozenset({"destinations", "audienceMembers", "consent", "validateOnly", "encoding",
                               "encryptionInfo", "termsOfService"})
_DM_REMOVE_FIELDS = frozenset({"destinations", "audienceMembers", "validateOnly", "encoding", "encryptionInfo"})


@dataclass(frozen=True)
class AcceptedConversion:
    """A click conversion the sandbox recorded, as Google would hold it."""

    customer_id: str
    login_customer_id: str
    conversion_action: str
    action_id: str
    conversion_date_time: str
    order_id: str
    value: float | None
    currency: str | None
    gclid: str
    gbraid: str
    wbraid: str
    #: (``hashedEmail`` | ``hashedPhoneNumber``, hash) in the order sent.
    identifiers: tuple[tuple[str, str], ...]
    identifier_sources: tuple[str, ...]
    #: ``consent.adUserData``; ``UNSPECIFIED`` when the conversion carried none.
    ad_user_data: str


@dataclass(frozen=True)
class AcceptedAdjustment:
    """A conversion adjustment (an enhancement, usually) the sandbox recorded."""

    customer_id: str
    conversion_action: str
    action_id: str
    adjustment_type: str
    order_id: str
    conversion_date_time: str
    user_agent: str
    identifiers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class AudienceRequest:
    """One accepted Data Manager audience request, without its members."""

    action: str  # ingest | remove
    #: (account type, account ID, product destination ID, login account ID) per destination.
    destinations: tuple[tuple[str, str, str, str], ...]
    encoding: str
    consent: Mapping[str, str]
    members: int
    request_id: str


class _Invalid(Exception):
    """A row refused in ``partialFailureError``: the error code, message, sub-field and trigger."""

    def __init__(self, category: str, enum: str, message: str, field: str = "", trigger: str = "") -> None:
        super().__init__(message)
        self.category, self.enum, self.message, self.field, self.trigger = category, enum, message, field, trigger


class _Violation(Exception):
    """A Data Manager request refused as a whole: the field and the ``ErrorReason``."""

    def __init__(self, field: str, reason: str, description: str) -> None:
        super().__init__(description)
        self.field, self.reason, self.description = field, reason, description


class GoogleSandbox(Sandbox):
    """Google's token endpoint, Ads conversion uploads and Data Manager audience members."""

    name = "google"

    def __init__(self, tokens: set[str] | None = None, *, client_id: str = "sandbox-client-id",
                 client_secret: str = "sandbox-client-secret", refresh_token: str = "sandbox-refresh-token",
                 token_lifetime: int = 3599, conversion_actions: Collection[str] | None = None,
                 unapproved_developer_tokens: Collection[str] = ()) -> None:
        """``tokens``: access tokens accepted besides those the sandbox issues. ``conversion_actions``:
        the known conversion action IDs (``None`` accepts any). A developer token in
        ``unapproved_developer_tokens`` gets 403 ``DEVELOPER_TOKEN_NOT_APPROVED``."""
        super().__init__()
        self.tokens = set(tokens) if tokens is not None else {"sandbox-token"}
        self.client_id, self.client_secret, self.refresh_token = client_id, client_secret, refresh_token
        self.token_lifetime = token_lifetime
        self.conversion_actions = None if conversion_actions is None else {str(a) for a in conversion_actions}
        self.unapproved_developer_tokens = set(unapproved_developer_tokens)
        self._issued: set[str] = set()
        self._local = threading.local()
        self._quota_faults: list[float] = []
        self._row_faults: dict[str, tuple[str, str]] = {}
        self._init_records()
        self.route("POST", r"/token", self._token)
        self.route("POST", r"/(v\d+)/customers/([^/:]+):uploadClickConversions", self._click_conversions)
        self.route("POST", r"/(v\d+)/customers/([^/:]+):uploadConversionAdjustments", self._adjustments)
        self.route("POST", r"/(v\d+)/audienceMembers:(ingest|remove)", self._audience_members)

    def _init_records(self) -> None:
        self.accepted_conversions: list[AcceptedConversion] = []
        self.accepted_adjustments: list[AcceptedAdjustment] = []
        self.audience_requests: list[AudienceRequest] = []
        self._audiences: dict[str, set[str]] = {}
        self._orders: dict[tuple[str, str], set[str]] = {}
        self._clicks: set[tuple[str, str, str, str]] = set()
        self._enhanced: set[tuple[str, str, str]] = set()
        self.token_requests = 0
        self.upload_requests = 0
        self.rows_received = 0
        self.row_errors = 0
        #: Rows refused because Google already holds them (order ID, click or enhancement repeats).
        self.duplicate_count = 0
        self.members_received = 0

    # -- accessors and controls ----------------------------------------------------------------

    def audience_members(self, list_id: str) -> set[str]:
        """The identifier hashes (hex) held in the user list ``list_id``."""
        with self.lock:
            return set(self._audiences.get(str(list_id), ()))

    def expire_issued_tokens(self) -> None:
        """Every access token the sandbox issued stops working (as if it expired)."""
        with self.lock:
            self._issued.clear()

    def exhaust_quota(self, count: int, retry_delay: float = 30.0) -> None:
        """The next ``count`` upload or audience requests get 429 ``RESOURCE_EXHAUSTED`` with a
        ``retryDelay`` in the error details and no ``Retry-After`` header."""
        with self.lock:
            self._quota_faults.extend([retry_delay] * count)

    def fail_row(self, order_id: str, code: str) -> None:
        """The next row (conversion or adjustment) with ``order_id`` gets the row error ``code``
        (``"conversionUploadError.TOO_RECENT_EVENT"``) in ``partialFailureError``, once."""
        category, _, enum = code.partition(".")
        with self.lock:
            self._row_faults[order_id] = (category, enum)

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self._quota_faults.clear()
            self._row_faults.clear()
            self._init_records()

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "token_requests": self.token_requests, "upload_requests": self.upload_requests,
                "rows_received": self.rows_received, "row_errors": self.row_errors,
                "duplicate_count": self.duplicate_count, "members_received": self.members_received,
                "accepted_conversions": [asdict(c) for c in self.accepted_conversions],
                "accepted_adjustments": [asdict(a) for a in self.accepted_adjustments],
                "audience_requests": [asdict(r) for r in self.audience_requests],
                "audiences": {k: sorted(v) for k, v in self._audiences.items()},
            }

    # -- envelopes -------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Reply:
        self._local.path = request.path  # error_reply picks the envelope of the API asked
        return super().dispatch(request)

    def error_reply(self, status: int, message: str) -> Reply:
        path = getattr(self._local, "path", "")
        if path == "/token":
            return json_reply(status, {"error": "rate_limit_exceeded" if status == 429 else "server_error",
                                       "error_description": message})
        if "audienceMembers" in path:
            reason = {429: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED", 401: "UNAUTHENTICATED",
                      403: "PERMISSION_DENIED", 404: "NOT_FOUND"}.get(status, "INTERNAL_ERROR" if status >= 500
                                                                       else "INVALID_ARGUMENT")
            return self._status_reply(status, message, [self._error_info(reason)])
        version = path.split("/")[1] if path.count("/") > 1 and path.split("/")[1].startswith("v") else ADS_VERSION
        code = _ADS_CODES.get(status)
        errors = [{"errorCode": {code[0]: code[1]}, "message": message}] if code else []
        return self._ads_error(status, message, version, errors)

    @staticmethod
    def _status_reply(status: int, message: str, details: list[dict[str, Any]], **headers: str) -> Reply:
        return json_reply(status, {"error": {"code": status, "message": message,
                                             "status": _STATUS_NAMES.get(status, "UNKNOWN"), "details": details}},
                          **headers)

    @staticmethod
    def _error_info(reason: str, domain: str = "datamanager.googleapis.com") -> dict[str, Any]:
        return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": domain}

    @staticmethod
    def _failure(version: str, errors: list[dict[str, Any]]) -> dict[str, Any]:
        return {"@type": f"type.googleapis.com/google.ads.googleads.{version}.errors.GoogleAdsFailure",
                "errors": errors, "requestId": uuid.uuid4().hex[:22]}

    def _ads_error(self, status: int, message: str, version: str, errors: list[dict[str, Any]]) -> Reply:
        details = [self._failure(version, errors)] if errors else []
        return self._status_reply(status, message, details)

    def _ads_refusal(self, status: int, version: str, category: str, enum: str, message: str) -> SandboxError:
        return SandboxError(self._ads_error(status, message, version, [{"errorCode": {category: enum},
                                                                        "message": message}]))

    @staticmethod
    def _bad_request(message: str, field: str) -> SandboxError:
        """Google's JSON transcoding refusal (unknown field, bad enum value): the whole request."""
        return SandboxError(GoogleSandbox._status_reply(400, message, [{
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field, "description": message}]}]))

    # -- OAuth -----------------------------------------------------------------------------------

    def _token(self, request: Request, match: re.Match[str]) -> Reply:
        fields: Mapping[str, Any] = request.form or (request.json if isinstance(request.json, dict) else {})
        with self.lock:
            self.token_requests += 1
        if fields.get("grant_type") != "refresh_token":
            return json_reply(400, {"error": "unsupported_grant_type",
                                    "error_description": "Invalid grant_type: " + str(fields.get("grant_type"))})
        if fields.get("client_id") != self.client_id or fields.get("client_secret") != self.client_secret:
            return json_reply(401, {"error": "invalid_client", "error_description": "Unauthorized"})
        if fields.get("refresh_token") != self.refresh_token:
            return json_reply(400, {"error": "invalid_grant",
                                    "error_description": "Token has been expired or revoked."})
        token = f"ya29.sandbox-{secrets.token_urlsafe(24)}"
        with self.lock:
            self._issued.add(token)
        return json_reply(200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer",
                                "scope": "https://www.googleapis.com/auth/adwords "
                                         "https://www.googleapis.com/auth/datamanager"})

    def _bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        with self.lock:
            return bool(token) and (token in self.tokens or token in self._issued)

    def _take_quota_fault(self) -> float | None:
        with self.lock:
            return self._quota_faults.pop(0) if self._quota_faults else None

    # -- Google Ads ------------------------------------------------------------------------------

    def _ads_preamble(self, request: Request, version: str, customer_id: str) -> tuple[str, Mapping[str, Any]]:
        """Authenticate an upload and return (login customer ID, body); raise the refusal."""
        delay = self._take_quota_fault()
        if delay is not None:
            message = "Resource has been exhausted (e.g. check quota)."
            raise SandboxError(self._ads_error(429, message, version, [{
                "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": message,
                "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "rateName": "Number of operations",
                                                  "retryDelay": f"{delay:g}s"}}}]))
        if not self._bearer_ok(request):
            missing = not request.headers.get("authorization")
            raise self._ads_refusal(401, version, "authenticationError",
                                    "OAUTH_TOKEN_HEADER_INVALID" if missing else "OAUTH_TOKEN_INVALID",
                                    "Request had invalid authentication credentials. Expected OAuth 2 access token.")
        developer_token = request.headers.get("developer-token", "")
        if not developer_token:
            raise self._ads_refusal(400, version, "requestError", "DEVELOPER_TOKEN_PARAMETER_MISSING",
                                    "The developer-token parameter is required for all requests.")
        if developer_token in self.unapproved_developer_tokens:
            raise self._ads_refusal(403, version, "authorizationError", "DEVELOPER_TOKEN_NOT_APPROVED",
                                    "The developer token is only approved for use with test accounts.")
        login = request.headers.get("login-customer-id", "")
        if not customer_id.isdigit() or (login and not login.isdigit()):
            raise self._ads_refusal(400, version, "requestError", "INVALID_CUSTOMER_ID",
                                    "Customer IDs must be digits without dashes.")
        if not isinstance(request.json, dict):
            raise self._bad_request("Invalid JSON payload received.", "")
        return login, request.json

    def _rows(self, body: Mapping[str, Any], version: str, rows_field: str, top_fields: frozenset[str],
              row_fields: frozenset[str], too_many: tuple[str, str]) -> list[Mapping[str, Any]]:
        """The request's rows after the whole-request checks."""
        for name in body:
            if name not in top_fields:
                raise self._bad_request(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.',
                                        name)
        rows = body.get(rows_field)
        if not isinstance(rows, list) or not rows:
            raise self._ads_refusal(400, version, "fieldError", "REQUIRED", f"{rows_field} is required.")
        if body.get("partialFailure") is not True:
            raise self._ads_refusal(400, version, "partialFailureError", "PARTIAL_FAILURE_MODE_REQUIRED",
                                    "The partial failure field must be set to true.")
        if len(rows) > MAX_CONVERSIONS:
            raise self._ads_refusal(400, version, too_many[0], too_many[1],
                                    f"Upload fewer than {MAX_CONVERSIONS + 1} rows in a single request.")
        snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), rows_field)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise self._bad_request("Invalid JSON payload received.", f"{snake}[{i}]")
            for name in row:
                if name not in row_fields:
                    raise self._bad_request(f'Invalid JSON payload received. Unknown name "{name}" at '
                                            f"'{snake}[{i}]': Cannot find field.", f"{snake}[{i}]")
            consent = row.get("consent")
            if consent is not None and (not isinstance(consent, dict) or any(
                    k not in ("adUserData", "adPersonalization") or v not in _CONSENT_VALUES
                    for k, v in consent.items())):
                raise self._bad_request(f"Invalid value at '{snake}[{i}].consent'", f"{snake}[{i}].consent")
            if "adjustmentType" in row and row["adjustmentType"] not in _ADJUSTMENT_TYPES:
                raise self._bad_request(f"Invalid value at '{snake}[{i}].adjustment_type'",
                                        f"{snake}[{i}].adjustment_type")
            identifiers = row.get("userIdentifiers", [])
            if not isinstance(identifiers, list) or any(
                    not isinstance(u, dict) or any(k not in _IDENTIFIER_FIELDS for k in u)
                    or u.get("userIdentifierSource", "UNSPECIFIED") not in _SOURCE_VALUES for u in identifiers):
                raise self._bad_request(f"Invalid value at '{snake}[{i}].user_identifiers'",
                                        f"{snake}[{i}].user_identifiers")
        return rows

    def _action(self, row: Mapping[str, Any], adjustments: bool) -> tuple[str, str]:
        resource = row.get("conversionAction")
        if not resource:
            raise _Invalid("fieldError", "REQUIRED", "The conversion action is required.", "conversion_action")
        match = _ACTION_RE.fullmatch(str(resource))
        if match is None:
            raise _Invalid("requestError", "RESOURCE_NAME_MALFORMED", "Malformed conversion action resource name.",
                           "conversion_action", str(resource))
        action_id = match.group(2)
        if self.conversion_actions is not None and action_id not in self.conversion_actions:
            category = "conversionAdjustmentUploadError" if adjustments else "conversionUploadError"
            raise _Invalid(category, "NO_CONVERSION_ACTION_FOUND",
                           "The conversion action specified in the upload request cannot be found.",
                           "conversion_action", str(resource))
        return str(resource), action_id

    @staticmethod
    def _identifiers(row: Mapping[str, Any], allowed: frozenset[str], category: str) -> tuple[tuple[str, str], ...]:
        identifiers = row.get("userIdentifiers") or []
        if len(identifiers) > MAX_IDENTIFIERS:
            raise _Invalid("collectionSizeError", "TOO_MANY", f"At most {MAX_IDENTIFIERS} user identifiers.",
                           "user_identifiers")
        found: list[tuple[str, str]] = []
        for identifier in identifiers:
            keys = [k for k in identifier if k in _IDENTIFIER_KEYS]
            if len(keys) != 1:
                raise _Invalid(category, "INVALID_USER_IDENTIFIER",
                               "Each user identifier must set exactly one identifier.", "user_identifiers")
            key = keys[0]
            if key not in allowed:
                raise _Invalid(category, "UNSUPPORTED_USER_IDENTIFIER",
                               "The provided user identifiers are not supported.", "user_identifiers")
            value = identifier[key]
            if key == "addressInfo":
                found.append((key, str(sorted(value.items())) if isinstance(value, dict) else str(value)))
                continue
            if not is_hash(value):
                raise _Invalid(category, "INVALID_USER_IDENTIFIER",
                               "Hash user provided data using SHA-256 (64 lower-case hex characters).",
                               "user_identifiers", str(value))
            found.append((key, value))
        return tuple(found)

    def _upload(self, request: Request, match: re.Match[str], *, adjustments: bool) -> Reply:
        version, customer_id = match.group(1), match.group(2)
        login, body = self._ads_preamble(request, version, customer_id)
        if adjustments:
            rows = self._rows(body, version, "conversionAdjustments",
                              frozenset({"conversionAdjustments", "partialFailure", "validateOnly", "jobId"}),
                              _ADJUSTMENT_FIELDS, ("conversionAdjustmentUploadError",
                                                   "TOO_MANY_ADJUSTMENTS_IN_REQUEST"))
            row_name = "conversion_adjustments"
        else:
            rows = self._rows(body, version, "conversions",
                              frozenset({"conversions", "partialFailure", "validateOnly", "jobId"}),
                              _CONVERSION_FIELDS, ("conversionUploadError", "TOO_MANY_CONVERSIONS_IN_REQUEST"))
            row_name = "conversions"
        validate_only = body.get("validateOnly") is True
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        accepted = duplicates = 0
        with self.lock:  # dedup and recording must see one consistent set of order IDs
            seen: set[tuple[str, ...]] = set()
            for i, row in enumerate(rows):
                try:
                    injected = self._row_faults.pop(str(row.get("orderId") or ""), None)
                    if injected is not None:
                        raise _Invalid(injected[0], injected[1], f"Injected {injected[1]}.")
                    if adjustments:
                        result = self._adjustment(customer_id, row, seen, validate_only)
                    else:
                        result = self._conversion(customer_id, login, row, seen, validate_only)
                except _Invalid as problem:
                    path = [{"fieldName": row_name, "index": i}]
                    if problem.field:
                        path.append({"fieldName": problem.field})
                    error: dict[str, Any] = {"errorCode": {problem.category: problem.enum},
                                             "message": problem.message, "location": {"fieldPathElements": path}}
                    if problem.trigger:
                        error["trigger"] = {"stringValue": problem.trigger}
                    errors.append(error)
                    results.append({})
                    if problem.enum in ("ORDER_ID_ALREADY_IN_USE", "DUPLICATE_ORDER_ID",
                                        "CLICK_CONVERSION_ALREADY_EXISTS", "CONVERSION_ALREADY_ENHANCED",
                                        "DUPLICATE_ENHANCEMENT_IN_REQUEST"):
                        duplicates += 1
                    continue
                accepted += 1
                results.append(result)
            self.upload_requests += 1
            self.rows_received += len(rows)
            self.row_errors += len(errors)
            self.duplicate_count += duplicates
        reply: dict[str, Any] = {"results": results, "jobId": secrets.randbelow(2**31 - 1) + 1}
        if errors:
            first = errors[0]
            where = first["location"]["fieldPathElements"][0]["index"]
            reply["partialFailureError"] = {"code": 3, "message": f"{first['message']}, at {row_name}[{where}]",
                                            "details": [self._failure(version, errors)]}
        return json_reply(200, reply)

    def _click_conversions(self, request: Request, match: re.Match[str]) -> Reply:
        return self._upload(request, match, adjustments=False)

    def _adjustments(self, request: Request, match: re.Match[str]) -> Reply:
        return self._upload(request, match, adjustments=True)

    def _conversion(self, customer_id: str, login: str, row: Mapping[str, Any], seen: set[tuple[str, ...]],
                    validate_only: bool) -> dict[str, Any]:
        """Validate and (unless ``validate_only``) record one click conversion; the caller holds the lock."""
        resource, action_id = self._action(row, adjustments=False)
        when = row.get("conversionDateTime")
        if not isinstance(when, str) or not _DATE_TIME_RE.match(when):
            raise _Invalid("dateError", "INVALID_FIELD_VALUES_IN_DATE_TIME",
                           "The conversion date time must be yyyy-mm-dd hh:mm:ss+|-hh:mm.", "conversion_date_time")
        gclid, gbraid, wbraid = (str(row.get(k) or "") for k in ("gclid", "gbraid", "wbraid"))
        if gbraid and wbraid:
            raise _Invalid("conversionUploadError", "GBRAID_WBRAID_BOTH_SET", "Can't use both gbraid and wbraid.",
                           "gbraid")
        if gclid and (gbraid or wbraid):
            raise _Invalid("fieldError", "VALUE_MUST_BE_UNSET", "Set only one click identifier.", "gbraid")
        identifiers = self._identifiers(row, frozenset({"hashedEmail", "hashedPhoneNumber"}), "conversionUploadError")
        if not (gclid or gbraid or wbraid or identifiers):
            raise _Invalid("fieldError", "REQUIRED", "A click identifier or user identifiers are required.", "gclid")
        consent = row.get("consent") or {}
        if "adPersonalization" in consent:
            raise _Invalid("fieldError", "VALUE_MUST_BE_UNSET",
                           "ad_personalization consent cannot be set for click conversions.", "consent")
        value = row.get("conversionValue")
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise _Invalid("fieldError", "INVALID_VALUE", "conversion_value must be a number.",
                               "conversion_value") from None
        currency = row.get("currencyCode")
        if currency is not None and (not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency)):
            raise _Invalid("currencyCodeError", "UNSUPPORTED", "Unsupported currency code.", "currency_code")
        order_id = str(row.get("orderId") or "")
        if order_id:
            orders = self._orders.setdefault((customer_id, action_id), set())
            if ("order", action_id, order_id) in seen:
                raise _Invalid("conversionUploadError", "DUPLICATE_ORDER_ID",
                               "Imported events include multiple conversions with the same order ID.", "order_id")
            if order_id in orders:
                raise _Invalid("conversionUploadError", "ORDER_ID_ALREADY_IN_USE",
                               "The imported event includes an order ID that was previously recorded.", "order_id")
            seen.add(("order", action_id, order_id))
        click = gclid or gbraid or wbraid
        if click and not order_id and (customer_id, action_id, click, when) in self._clicks:
            raise _Invalid("conversionUploadError", "CLICK_CONVERSION_ALREADY_EXISTS",
                           "The imported event has the same click and conversion_date_time as an existing "
                           "conversion.", "conversion_date_time")
        if not validate_only:
            if order_id:
                self._orders[(customer_id, action_id)].add(order_id)
            if click:
                self._clicks.add((customer_id, action_id, click, when))
            self.accepted_conversions.append(AcceptedConversion(
                customer_id=customer_id, login_customer_id=login, conversion_action=resource, action_id=action_id,
                conversion_date_time=when, order_id=order_id, value=value, currency=currency, gclid=gclid,
                gbraid=gbraid, wbraid=wbraid, identifiers=identifiers,
                identifier_sources=tuple(str(u.get("userIdentifierSource", "UNSPECIFIED"))
                                         for u in row.get("userIdentifiers") or ()),
                ad_user_data=str(consent.get("adUserData", "UNSPECIFIED"))))
        result: dict[str, Any] = {"conversionAction": resource, "conversionDateTime": when}
        for key, click_value in (("gclid", gclid), ("gbraid", gbraid), ("wbraid", wbraid)):
            if click_value:
                result[key] = click_value
        if identifiers:
            result["userIdentifiers"] = [{key: value} for key, value in identifiers]
        return result

    def _adjustment(self, customer_id: str, row: Mapping[str, Any], seen: set[tuple[str, ...]],
                    validate_only: bool) -> dict[str, Any]:
        """Validate and record one conversion adjustment; the caller holds the lock."""
        category = "conversionAdjustmentUploadError"
        resource, action_id = self._action(row, adjustments=True)
        kind = str(row.get("adjustmentType") or "UNSPECIFIED")
        if kind not in ("ENHANCEMENT", "RETRACTION", "RESTATEMENT"):
            raise _Invalid("fieldError", "REQUIRED", "The adjustment type is required.", "adjustment_type")
        order_id = str(row.get("orderId") or "")
        pair = row.get("gclidDateTimePair") or {}
        when = str(pair.get("conversionDateTime") or "")
        if when and not _DATE_TIME_RE.match(when):
            raise _Invalid("dateError", "INVALID_FIELD_VALUES_IN_DATE_TIME",
                           "The conversion date time must be yyyy-mm-dd hh:mm:ss+|-hh:mm.", "gclid_date_time_pair")
        if order_id and pair.get("gclid"):
            raise _Invalid(category, "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET",
                           "Cannot set both gclid_date_time_pair and order_id.", "order_id")
        identifiers = self._identifiers(row, frozenset({"hashedEmail", "hashedPhoneNumber", "addressInfo"}), category)
        if kind == "ENHANCEMENT":
            if not order_id:
                raise _Invalid(category, "MISSING_ORDER_ID_FOR_WEBPAGE",
                               "Adjustment for website conversion requires Order ID.", "order_id")
            if not identifiers:
                raise _Invalid("fieldError", "REQUIRED", "Enhancements need user identifiers.", "user_identifiers")
            if ("enhancement", action_id, order_id) in seen:
                raise _Invalid(category, "DUPLICATE_ENHANCEMENT_IN_REQUEST",
                               "Multiple enhancements have the same conversion action and Order ID.", "order_id")
            if (customer_id, action_id, order_id) in self._enhanced:
                raise _Invalid(category, "CONVERSION_ALREADY_ENHANCED",
                               "Conversion already has enhancements with the same Order ID and conversion action.",
                               "order_id")
            seen.add(("enhancement", action_id, order_id))
        elif not _DATE_TIME_RE.match(str(row.get("adjustmentDateTime") or "")):
            raise _Invalid("dateError", "INVALID_FIELD_VALUES_IN_DATE_TIME", "The adjustment date time is required.",
                           "adjustment_date_time")
        if not validate_only:
            if kind == "ENHANCEMENT":
                self._enhanced.add((customer_id, action_id, order_id))
            self.accepted_adjustments.append(AcceptedAdjustment(
                customer_id=customer_id, conversion_action=resource, action_id=action_id, adjustment_type=kind,
                order_id=order_id, conversion_date_time=when, user_agent=str(row.get("userAgent") or ""),
                identifiers=identifiers))
        return {"conversionAction": resource, "adjustmentType": kind, "orderId": order_id}

    # -- Data Manager ----------------------------------------------------------------------------

    def _dm_refusal(self, violations: list[_Violation]) -> SandboxError:
        return SandboxError(self._status_reply(400, "There was a problem with the request.", [
            self._error_info("INVALID_ARGUMENT"),
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": v.field, "description": v.description, "reason": v.reason}
                                 for v in violations]}]))

    def _audience_members(self, request: Request, match: re.Match[str]) -> Reply:
        action = match.group(2)
        delay = self._take_quota_fault()
        if delay is not None:
            raise SandboxError(self._status_reply(429, "Too many requests.", [
                self._error_info("RESOURCE_EXHAUSTED"),
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay:g}s"}]))
        if not self._bearer_ok(request):
            reason = "ACCESS_TOKEN_EXPIRED" if request.headers.get("authorization") else "CREDENTIALS_MISSING"
            raise SandboxError(self._status_reply(
                401, "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                [self._error_info(reason, "googleapis.com")]))
        body = request.json
        if not isinstance(body, dict):
            raise self._bad_request("Invalid JSON payload received.", "")
        allowed = _DM_INGEST_FIELDS if action == "ingest" else _DM_REMOVE_FIELDS
        for name in body:
            if name not in allowed:
                raise self._bad_request(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.',
                                        name)
        destinations = self._dm_destinations(body.get("destinations"))
        members = body.get("audienceMembers")
        if not isinstance(members, list) or not members:
            raise self._dm_refusal([_Violation("audience_members", "REQUIRED_FIELD_MISSING",
                                               "At least one audience member is required.")])
        if len(members) > MAX_MEMBERS:
            raise self._dm_refusal([_Violation("audience_members", "TOO_MANY_AUDIENCE_MEMBERS",
                                               f"At most {MAX_MEMBERS} audience members per request.")])
        encoding = body.get("encoding")
        if encoding is None:
            raise self._dm_refusal([_Violation("encoding", "REQUIRED_FIELD_MISSING",
                                               "encoding is required for UserData uploads.")])
        if encoding not in ("HEX", "BASE64"):
            raise self._dm_refusal([_Violation("encoding", "INVALID_ENUM_VALUE", "Unknown encoding.")])
        consent = self._dm_consent(body.get("consent"), "consent")
        hashes: list[list[str]] = []
        violations: list[_Violation] = []
        for i, member in enumerate(members):
            try:
                hashes.append(self._dm_member(member, i, encoding))
            except _Violation as violation:
                violations.append(violation)
        if violations:
            raise self._dm_refusal(violations)
        request_id = str(uuid.uuid4())
        if body.get("validateOnly") is True:
            return json_reply(200, {"requestId": request_id})
        with self.lock:
            for _, _, list_id, _ in destinations:
                members_of = self._audiences.setdefault(list_id, set())
                for member_hashes in hashes:
                    if action == "ingest":
                        members_of.update(member_hashes)
                    else:
                        members_of.difference_update(member_hashes)
            self.members_received += len(members)
            self.audience_requests.append(AudienceRequest(action, tuple(destinations), encoding, consent,
                                                          len(members), request_id))
        return json_reply(200, {"requestId": request_id})

    def _dm_destinations(self, destinations: Any) -> list[tuple[str, str, str, str]]:
        if not isinstance(destinations, list) or not destinations:
            raise self._dm_refusal([_Violation("destinations", "REQUIRED_FIELD_MISSING",
                                               "At least one destination is required.")])
        if len(destinations) > MAX_DESTINATIONS:
            raise self._dm_refusal([_Violation("destinations", "TOO_MANY_DESTINATIONS",
                                               f"At most {MAX_DESTINATIONS} destinations per request.")])
        found = []
        for i, destination in enumerate(destinations):
            where = f"destinations.destinations[{i}]"
            account = destination.get("operatingAccount") if isinstance(destination, dict) else None
            if not isinstance(account, dict) or not account.get("accountId"):
                raise self._dm_refusal([_Violation(f"{where}.operating_account", "REQUIRED_FIELD_MISSING",
                                                   "The operating account is required.")])
            account_type = account.get("accountType") or account.get("product")
            if account_type not in _ACCOUNT_TYPES:
                raise self._dm_refusal([_Violation(f"{where}.operating_account.account_type", "INVALID_ENUM_VALUE",
                                                   "Unknown account type.")])
            list_id = destination.get("productDestinationId")
            if not list_id:
                raise self._dm_refusal([_Violation(f"{where}.product_destination_id", "REQUIRED_FIELD_MISSING",
                                                   "The product destination ID is required.")])
            login = destination.get("loginAccount") or {}
            found.append((str(account_type), str(account["accountId"]), str(list_id), str(login.get("accountId", ""))))
        return found

    def _dm_consent(self, consent: Any, where: str) -> dict[str, str]:
        if consent is None:
            return {}
        if not isinstance(consent, dict) or any(k not in ("adUserData", "adPersonalization")
                                                or v not in _DM_CONSENT_VALUES for k, v in consent.items()):
            raise self._dm_refusal([_Violation(where, "INVALID_ENUM_VALUE", "Invalid consent.")])
        return dict(consent)

    def _dm_member(self, member: Any, index: int, encoding: str) -> list[str]:
        """The hex hashes of one member; raise the :class:`_Violation` that refuses the request."""
        where = f"audience_members.audience_members[{index}]"
        if not isinstance(member, dict) or not isinstance(member.get("userData"), dict):
            raise _Violation(where, "INVALID_AUDIENCE_MEMBER", "The audience member needs user_data.")
        if "consent" in member:
            self._dm_consent(member["consent"], f"{where}.consent")
        identifiers = member["userData"].get("userIdentifiers")
        if not isinstance(identifiers, list) or not identifiers:
            raise _Violation(f"{where}.user_data.user_identifiers", "REQUIRED_FIELD_MISSING",
                             "At least one user identifier is required.")
        if len(identifiers) > MAX_MEMBER_IDENTIFIERS:
            raise _Violation(f"{where}.user_data.user_identifiers", "TOO_MANY_USER_IDENTIFIERS",
                             f"At most {MAX_MEMBER_IDENTIFIERS} user identifiers per audience member.")
        hashes = []
        for identifier in identifiers:
            keys = [k for k in identifier if k in ("emailAddress", "phoneNumber", "address")] \
                if isinstance(identifier, dict) else []
            if len(keys) != 1 or len(identifier) != 1:
                raise _Violation(f"{where}.user_data.user_identifiers", "INVALID_FORMAT",
                                 "Each user identifier sets exactly one of email_address, phone_number, address.")
            value = identifier[keys[0]]
            if keys[0] == "address":
                needed = ("givenName", "familyName", "regionCode", "postalCode")
                if not isinstance(value, dict) or not all(value.get(k) for k in needed):
                    raise _Violation(f"{where}.user_data.user_identifiers", "REQUIRED_FIELD_MISSING",
                                     "An address needs given_name, family_name, region_code and postal_code.")
                hashes.append("|".join(str(value[k]) for k in needed))
                continue
            hashes.append(self._dm_hash(value, where, encoding))
        return hashes

    @staticmethod
    def _dm_hash(value: Any, where: str, encoding: str) -> str:
        field = f"{where}.user_data.user_identifiers"
        if not isinstance(value, str):
            raise _Violation(field, "INVALID_FORMAT", "Identifiers are strings.")
        if encoding == "HEX":
            if not _HEX_RE.fullmatch(value) or len(value) % 2:
                raise _Violation(field, "INVALID_HEX_ENCODING", "The value is not hex encoded.")
            if not is_hash(value):
                raise _Violation(where, "INVALID_SHA256_FORMAT", "The value is not a SHA-256 hash.")
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _Violation(field, "INVALID_BASE64_ENCODING", "The value is not base64 encoded.") from None
        if len(raw) != 32:
            raise _Violation(where, "INVALID_SHA256_FORMAT", "The value is not a SHA-256 hash.")
        return raw.hex()
