"""``stitchgraph audiences validate|preview|apply PATH``: audience rules as code.

Growth teams keep one TOML file per audience in a folder under version control::

    # audiences/eu-abandoners.toml
    name = "EU checkout abandoners"
    description = "Abandoned a checkout in the EU and bought nothing since."
    destinations = ["meta-ca"]
    rule = \"\"\"
    cohort("posthog", "checkout_abandoners")
      and trait("country") in ["DE", "FR", "NL"]
      and count(purchase, within=7d) == 0
    \"\"\"

``validate`` checks the files locally and every rule on the server (ValidateAudienceRule) and prints
diagnostics as ``file.toml:LINE:COL`` with the position mapped from the rule into the file. ``preview``
evaluates each rule (PreviewAudience) without saving anything. ``apply`` reads the server's audiences, prints
a plan (create / update with a diff / unchanged / delete with ``--prune``) and, once confirmed, applies it with
etags and idempotency keys. The command talks to a running server over gRPC like any other client.
"""

from __future__ import annotations

import argparse
import bisect
import difflib
import json
import os
import re
import sys
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stitchgraph.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    audiences_pb2,
    destination_service_pb2,
    destination_service_pb2_grpc,
)

apb = audience_service_pb2
DEFAULT_SERVER = "127.0.0.1:50051"
MANAGED_BY_KEY = "managed_by"
MANAGED_BY = "stitchgraph-cli"
KEYS = ("id", "name", "description", "rule", "destinations", "state", "labels")
STATES = ("active", "paused")
MAX_RULE_BYTES = 16 * 1024
_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
# File keys in the order the API lists mutable fields, with the Audience field each one sets.
_FIELDS = (("name", "display_name"), ("description", "description"), ("rule", "rule"),
           ("destinations", "destinations"), ("state", "state"), ("labels", "labels"))

Severity = Literal["error", "warning"]


class CliError(Exception):
    """A failure that ends the command with a one-line message and exit code 1 (no traceback)."""


# -- locating things in a TOML file -------------------------------------------------------------------------------

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\\n]|\\.)*"'
_LITERAL = r"'[^'\n]*'"
_PART = f"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_PATH = rf"{_PART}(?:[ \t]*\.[ \t]*{_PART})*"
_KEY_RE = re.compile(rf"({_PATH})[ \t]*=[ \t]*")
_HEADER_RE = re.compile(rf"\[\[?[ \t]*({_PATH})[ \t]*\]\]?")
_PART_RE = re.compile(_PART)
_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _key_path(raw: str) -> str:
    parts = []
    for match in _PART_RE.finditer(raw):
        part = match.group(0)
        parts.append(part[1:-1] if part[0] in "\"'" else part)
    return ".".join(parts)


@dataclass(frozen=True)
class _StringExtent:
    """Where a TOML string value sits in the file text."""

    basic: bool  # "..." or \"\"\"...\"\"\" (escapes apply); otherwise a literal '...' string
    multiline: bool
    content_start: int  # first character of the value (after a trimmed first newline)
    content_end: int  # index of the closing delimiter


def _string_extent(text: str, start: int) -> _StringExtent | None:
    """The string literal starting at ``start``, or None if there is none there."""
    for delimiter in ('"""', "'''", '"', "'"):
        if text.startswith(delimiter, start):
            break
    else:
        return None
    basic, multiline = delimiter[0] == '"', len(delimiter) == 3
    j, n = start + len(delimiter), len(text)
    content_start = j
    if multiline and text.startswith("\n", j):
        content_start = j + 1
    while j < n:
        if basic and text[j] == "\\":
            j += 2
            continue
        if text.startswith(delimiter, j):
            run = len(delimiter)
            while multiline and run < 5 and text.startswith(delimiter[0], j + run):
                run += 1  # up to two quotes right before the closing delimiter belong to the content
            return _StringExtent(basic, multiline, content_start, j + run - len(delimiter))
        if not multiline and text[j] == "\n":
            break
        j += 1
    return None


def _decoded_origins(text: str, extent: _StringExtent) -> list[int]:
    """For each character of the decoded string, the index in ``text`` it comes from."""
    origins: list[int] = []
    j, end = extent.content_start, extent.content_end
    while j < end:
        if extent.basic and text[j] == "\\":
            k = j + 1
            while k < end and text[k] in " \t":
                k += 1
            if extent.multiline and k < end and text[k] == "\n":  # line-ending backslash: trimmed
                while k < end and text[k] in " \t\n":
                    k += 1
                j = k
                continue
            origins.append(j)
            j += {"u": 6, "U": 10}.get(text[j + 1] if j + 1 < end else "", 2)
            continue
        origins.append(j)
        j += 1
    return origins


@dataclass
class Source:
    """A TOML file's text with the positions of its keys."""

    display: str
    text: str
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # key path -> (key index, value index)
    _line_starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._line_starts = [0] + [i + 1 for i, c in enumerate(self.text) if c == "\n"]
        self.keys = _scan_keys(self.text)

    def position(self, index: int) -> tuple[int, int]:
        """1-based (line, column in code points) of a text index."""
        line = bisect.bisect_right(self._line_starts, index)
        return line, index - self._line_starts[line - 1] + 1

    def line_text(self, line: int) -> str:
        if not 1 <= line <= len(self._line_starts):
            return ""
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start:] if end < 0 else self.text[start:end]

    def key_position(self, key: str) -> tuple[int, int] | None:
        found = self.keys.get(key)
        return self.position(found[0]) if found else None

    def value_position(self, key: str) -> tuple[int, int] | None:
        found = self.keys.get(key)
        return self.position(found[1]) if found else None

    def item_position(self, key: str, *items: str) -> tuple[int, int] | None:
        """Best effort: where one of the strings ``items`` is written inside the value of ``key``."""
        found = self.keys.get(key)
        if found is None:
            return None
        for quoted in [q for item in items for q in (json.dumps(item), f"'{item}'")]:
            index = self.text.find(quoted, found[1])
            if index >= 0:
                return self.position(index)
        return self.position(found[0])


def _scan_keys(text: str) -> dict[str, tuple[int, int]]:
    """Positions of the keys and table headers of a TOML document (first occurrence; best effort)."""
    keys: dict[str, tuple[int, int]] = {}
    table, depth, line_start, i, n = "", 0, True, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line_start = line_start or depth == 0
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif line_start and depth == 0:
            line_start = False
            match = (_HEADER_RE if c == "[" else _KEY_RE).match(text, i)
            if match is None:
                continue
            path = _key_path(match.group(1))
            if c == "[":
                table = path
            else:
                path = f"{table}.{path}" if table else path
            keys.setdefault(path, (i, match.end()))
            i = match.end()
        elif c in "\"'":
            extent = _string_extent(text, i)
            if extent is None:
                end = text.find("\n", i)
                i = n if end < 0 else end
            else:
                i = extent.content_end + (3 if extent.multiline else 1)
        else:
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth = max(0, depth - 1)
            i += 1
    return keys


# -- audience files -----------------------------------------------------------------------------------------------

@dataclass
class Problem:
    """An error or warning about a file, at a line and column when known."""

    source: Source | None
    display: str
    line: int | None
    column: int | None
    severity: Severity
    code: str
    message: str
    hint: str = ""
    width: int = 1


@dataclass
class AudienceSpec:
    """One audience as written in its file."""

    audience_id: str
    name: str
    description: str
    rule: str
    destinations: list[str]  # destination IDs, without the "destinations/" prefix
    state: str | None  # "active", "paused" or None (not managed)
    labels: dict[str, str]
    source: Source
    rule_origins: list[int] | None  # text index of each rule character (None: not mappable exactly)
    rule_start: tuple[int, int]  # (line, column) where the rule's first character is written

    @property
    def name_path(self) -> str:
        return f"audiences/{self.audience_id}"

    @property
    def desired_labels(self) -> dict[str, str]:
        return {**self.labels, MANAGED_BY_KEY: MANAGED_BY}

    def rule_position(self, line: int, column: int) -> tuple[int, int]:
        """Map a (line, column) of the rule to the file."""
        line, column = max(line, 1), max(column, 1)
        if self.rule_origins is not None:
            starts = [0] + [i + 1 for i, c in enumerate(self.rule) if c == "\n"]
            offset = starts[min(line, len(starts)) - 1] + column - 1
            if offset < len(self.rule_origins):
                return self.source.position(self.rule_origins[offset])
            if self.rule_origins:
                last_line, last_column = self.source.position(self.rule_origins[-1])
                return last_line, last_column + 1 + offset - len(self.rule_origins)
        first_line, first_column = self.rule_start
        return first_line + line - 1, column + (first_column - 1 if line == 1 else 0)


@dataclass
class FileReport:
    """A loaded file: its audience (None when unusable) and its local problems."""

    display: str
    sort_key: str
    spec: AudienceSpec | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return self.spec is not None and not any(p.severity == "error" for p in self.problems)


def _type_name(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float", list: "an array",
             dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def audience_files(path: Path) -> list[Path]:
    """The ``*.toml`` files of a folder (not recursive), or the file itself."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".toml" and p.is_file())
        if not files:
            raise CliError(f"{path}: no audience files (*.toml) in this folder")
        return files
    if path.is_file():
        return [path]
    raise CliError(f"{path}: no such file or folder")


def load_file(path: Path) -> FileReport:
    """Read and check one audience file locally."""
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return FileReport(display, path.stem, None, [Problem(None, display, None, None, "error", "INVALID_ENCODING",
                                                             f"not UTF-8 text: {exc}")])
    except OSError as exc:
        return FileReport(display, path.stem, None, [Problem(None, display, None, None, "error", "READ_ERROR",
                                                             exc.strerror or str(exc))])
    source = Source(display, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_POSITION_RE.search(message)
        line, column = (int(at.group(1)), int(at.group(2))) if at else (None, None)
        return FileReport(display, path.stem, None, [Problem(
            source, display, line, column, "error", "TOML_SYNTAX", _TOML_POSITION_RE.sub("", message),
            hint="see https://toml.io for the syntax; multi-line rules go between triple quotes")])
    return _check_data(path, source, data)


def _check_data(path: Path, source: Source, data: dict[str, Any]) -> FileReport:
    problems: list[Problem] = []
    display = source.display

    def problem(key: str | None, code: str, message: str, hint: str = "",
                at: tuple[int, int] | None = None) -> None:
        where = at or (source.value_position(key) if key else None)
        problems.append(Problem(source, display, where[0] if where else None, where[1] if where else None,
                                "error", code, message, hint))

    def text_value(key: str, *, required: bool, limit: int, default: str = "") -> str:
        if key not in data:
            if required:
                problem(None, "MISSING_KEY", f"'{key}' is required")
            return default
        value = data[key]
        if not isinstance(value, str):
            problem(key, "INVALID_TYPE", f"'{key}' must be a string, not {_type_name(value)}")
            return default
        if required and not value.strip():
            problem(key, "EMPTY_VALUE", f"'{key}' must not be empty")
        elif len(value) > limit:
            problem(key, "TOO_LONG", f"'{key}' is {len(value)} characters long; at most {limit} are allowed")
        return value

    for key in data:
        if key not in KEYS:
            problem(key, "UNKNOWN_KEY", f"unknown key '{key}'", hint="allowed keys: " + ", ".join(KEYS),
                    at=source.key_position(key))

    if "id" in data:
        audience_id = text_value("id", required=True, limit=MAX_RULE_BYTES)  # INVALID_ID covers the length
        if audience_id and not _ID_RE.fullmatch(audience_id):
            problem("id", "INVALID_ID", f"'{audience_id}' is not a valid audience id",
                    hint="1 to 63 characters of a-z, 0-9 and '-', starting with a letter")
    else:
        audience_id = path.stem
        if not _ID_RE.fullmatch(audience_id):
            problem(None, "INVALID_ID", f"the file name '{path.stem}' is not a valid audience id",
                    hint="rename the file or set id = \"...\" (1 to 63 characters of a-z, 0-9 and '-', "
                         "starting with a letter)")
    name = text_value("name", required=True, limit=256)
    description = text_value("description", required=False, limit=4096)

    rule = ""
    rule_ok = False
    if "rule" not in data:
        problem(None, "MISSING_KEY", "'rule' is required", hint='write it as a multi-line string: rule = """ ... """')
    elif not isinstance(data["rule"], str):
        problem("rule", "INVALID_TYPE", f"'rule' must be a string, not {_type_name(data['rule'])}",
                hint='write it as a multi-line string: rule = """ ... """')
    elif not data["rule"].strip():
        problem("rule", "EMPTY_VALUE", "'rule' must not be empty")
    elif len(data["rule"].encode()) > MAX_RULE_BYTES:
        problem("rule", "TOO_LONG", "'rule' is longer than 16 KiB")
    else:
        rule, rule_ok = data["rule"].rstrip(), True

    destinations: list[str] = []
    raw_destinations = data.get("destinations", [])
    if not isinstance(raw_destinations, list):
        problem("destinations", "INVALID_TYPE",
                f"'destinations' must be an array of destination ids, not {_type_name(raw_destinations)}",
                hint='for example destinations = ["meta-ca"]')
    else:
        for item in raw_destinations:
            if not isinstance(item, str) or not item.removeprefix("destinations/"):
                problem("destinations", "INVALID_TYPE", f"destination {item!r} must be a non-empty string")
                continue
            destination_id = item.removeprefix("destinations/")
            if destination_id in destinations:
                problem("destinations", "DUPLICATE_DESTINATION", f"destination '{destination_id}' is listed twice",
                        at=source.item_position("destinations", item))
            else:
                destinations.append(destination_id)

    state: str | None = None
    if "state" in data:
        raw_state = data["state"]
        if not isinstance(raw_state, str) or raw_state.lower() not in STATES:
            shown = _quote(raw_state) if isinstance(raw_state, str) else _type_name(raw_state)
            problem("state", "INVALID_STATE", f"'state' must be \"active\" or \"paused\", not {shown}")
        else:
            state = raw_state.lower()

    labels: dict[str, str] = {}
    raw_labels = data.get("labels", {})
    if not isinstance(raw_labels, dict):
        problem("labels", "INVALID_TYPE", f"'labels' must be a table, not {_type_name(raw_labels)}",
                hint='for example labels = { team = "growth" }')
    else:
        for key, value in raw_labels.items():
            where = source.key_position(f"labels.{key}") or source.key_position("labels")
            if not isinstance(value, str):
                problem(None, "INVALID_TYPE", f"label '{key}' must be a string, not {_type_name(value)}", at=where)
            elif key == MANAGED_BY_KEY and value != MANAGED_BY:
                problem(None, "RESERVED_LABEL", f"label '{MANAGED_BY_KEY}' is set by this command",
                        hint=f"remove it; applied audiences are labelled {MANAGED_BY_KEY}={MANAGED_BY}", at=where)
            elif not 1 <= len(key) <= 63 or len(value) > 63:
                problem(None, "INVALID_LABEL", f"label '{key}': keys need 1 to 63 characters, values at most 63",
                        at=where)
            elif key != MANAGED_BY_KEY:
                labels[key] = value
        if len(labels) > 63:
            problem("labels", "TOO_MANY_LABELS", "at most 63 labels (one more is added by this command)")

    spec = None
    if rule_ok:
        origins, start = None, (1, 1)
        found = source.keys.get("rule")
        extent = _string_extent(source.text, found[1]) if found else None
        if found and extent is not None:
            origins = _decoded_origins(source.text, extent)
            if len(origins) != len(data["rule"]):
                origins = None
            start = source.position(extent.content_start)
        spec = AudienceSpec(audience_id, name, description, rule, destinations, state, labels, source, origins,
                            start)
    return FileReport(display, audience_id or path.stem, spec, problems)


def load_reports(path: Path) -> list[FileReport]:
    """Load every audience file of ``path``, checked locally, ordered by audience id."""
    reports = [load_file(p) for p in audience_files(path)]
    seen: dict[str, FileReport] = {}
    for report in sorted(reports, key=lambda r: r.display):
        if report.spec is None:
            continue
        first = seen.setdefault(report.spec.audience_id, report)
        if first is not report:
            where = report.spec.source.value_position("id")
            report.problems.append(Problem(
                report.spec.source, report.display, where[0] if where else None, where[1] if where else None,
                "error", "DUPLICATE_ID", f"audience id '{report.spec.audience_id}' is also used by {first.display}"))
    return sorted(reports, key=lambda r: (r.sort_key, r.display))


# -- output -------------------------------------------------------------------------------------------------------

def render_problem(p: Problem) -> str:
    """``file:LINE:COL: severity CODE: message``, the source line with a caret, and the hint."""
    location = p.display + (f":{p.line}" if p.line else "") + (f":{p.column}" if p.line and p.column else "")
    out = [f"{location}: {p.severity} {p.code}: {p.message}"]
    source_line = p.source.line_text(p.line) if p.source and p.line else ""
    gutter = " " * len(str(p.line or ""))
    if source_line.strip():
        out.append(f" {p.line} | {source_line}")
        if p.column:
            pad = "".join("\t" if c == "\t" else " " for c in source_line[:p.column - 1])
            out.append(f" {gutter} | {pad}^" + "~" * max(p.width - 1, 0))
    if p.hint:
        out.append(f" {gutter} = hint: {p.hint}")
    return "\n".join(out)


def _counts(problems: Sequence[Problem]) -> str:
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    return f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(v.removeprefix("destinations/") for v in values) + "]"


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _state_name(state: int) -> str:
    return "paused" if state == audiences_pb2.AUDIENCE_STATE_PAUSED else "active"


# -- talking to the server ----------------------------------------------------------------------------------------

def _rpc_text(error: grpc.RpcError) -> str:
    """``CODE: details`` plus any field violations of a failed call."""
    call = cast(grpc.Call, error)
    code = call.code()
    text = f"{code.name if code else 'UNKNOWN'}: {call.details() or ''}".rstrip(": ")
    try:
        status = rpc_status.from_call(call)
    except Exception:  # malformed trailers: the plain details are enough
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                text += "".join(f"\n    {v.field}: {v.description}" for v in bad.field_violations)
    return text


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return cast(grpc.Call, error).code()


class Connection:
    """A channel to the server with the bearer token and deadline every call carries."""

    def __init__(self, target: str, token: str, *, tls: bool, ca_file: str | None, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        if tls or ca_file:
            root = None
            if ca_file:
                try:
                    root = Path(ca_file).read_bytes()
                except OSError as exc:
                    raise CliError(f"--ca-file {ca_file}: {exc.strerror or exc}") from exc
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))
        else:
            self.channel = grpc.insecure_channel(target)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        # The generated stubs are untyped; every call goes through call() with a typed result.
        self.audiences: Any = audience_service_pb2_grpc.AudienceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.destinations: Any = destination_service_pb2_grpc.DestinationServiceStub(  # type: ignore[no-untyped-call]
            self.channel)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.channel.close()

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=self.timeout)

    def validate(self, rule: str) -> apb.ValidateAudienceRuleResponse:
        response: apb.ValidateAudienceRuleResponse = self.call(
            self.audiences.ValidateAudienceRule, apb.ValidateAudienceRuleRequest(rule=rule))
        return response

    def list_audiences(self) -> list[audiences_pb2.Audience]:
        found: list[audiences_pb2.Audience] = []
        token = ""
        while True:
            page: apb.ListAudiencesResponse = self.call(
                self.audiences.ListAudiences, apb.ListAudiencesRequest(page_size=1000, page_token=token))
            found.extend(page.audiences)
            token = page.next_page_token
            if not token:
                return found

    def destination_exists(self, destination_id: str) -> bool:
        try:
            self.call(self.destinations.GetDestination,
                      destination_service_pb2.GetDestinationRequest(name=f"destinations/{destination_id}"))
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True


def _server_checks(conn: Connection, specs: Sequence[AudienceSpec]
                   ) -> tuple[dict[str, list[Problem]], dict[str, apb.ValidateAudienceRuleResponse]]:
    """Validate every rule and check that every destination exists, as problems per audience id."""
    problems: dict[str, list[Problem]] = {s.audience_id: [] for s in specs}
    results: dict[str, apb.ValidateAudienceRuleResponse] = {}
    for spec in specs:
        result = conn.validate(spec.rule)
        results[spec.audience_id] = result
        for d in result.diagnostics:
            line, column = spec.rule_position(d.line, d.column)
            width = 1
            if d.end_line == d.line and d.end_column > d.column:
                end_line, end_column = spec.rule_position(d.end_line, d.end_column)
                width = end_column - column if end_line == line and end_column > column else 1
            severity: Severity = "error" if d.severity == audiences_pb2.DIAGNOSTIC_SEVERITY_ERROR else "warning"
            problems[spec.audience_id].append(Problem(spec.source, spec.source.display, line, column, severity,
                                                      d.code, d.message, d.hint, width))
    exists: dict[str, bool] = {}
    for spec in specs:
        for destination_id in spec.destinations:
            if destination_id not in exists:
                exists[destination_id] = conn.destination_exists(destination_id)
            if not exists[destination_id]:
                where = spec.source.item_position("destinations", destination_id,
                                                  f"destinations/{destination_id}") or (None, None)
                problems[spec.audience_id].append(Problem(
                    spec.source, spec.source.display, where[0], where[1], "error", "DESTINATION_NOT_FOUND",
                    f"destination '{destination_id}' does not exist on {conn.target}",
                    hint="create it first (DestinationService.CreateDestination) or fix the id"))
    return problems, results


# -- validate -----------------------------------------------------------------------------------------------------

def _references(result: apb.ValidateAudienceRuleResponse) -> str:
    parts = [f"{label} {', '.join(values)}" for label, values in (
        ("cohorts", result.referenced_cohorts), ("traits", result.referenced_traits),
        ("events", result.referenced_events), ("consent", result.referenced_purposes)) if values]
    return "; reads " + "; ".join(parts) if parts else ""


def cmd_validate(reports: list[FileReport], conn: Connection) -> int:
    specs = [r.spec for r in reports if r.spec is not None]
    remote, results = _server_checks(conn, specs)
    failed = 0
    for report in reports:
        problems = report.problems + (remote[report.spec.audience_id] if report.spec else [])
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        for p in problems:
            print(render_problem(p))
        has_errors = report.spec is None or any(p.severity == "error" for p in problems)
        failed += has_errors
        if has_errors:
            print(f"{report.display}: invalid ({_counts(problems)})")
        else:
            assert report.spec is not None
            warnings = f" ({_counts(problems)})" if problems else ""
            print(f"{report.display}: ok, audience {report.spec.audience_id}{warnings}"
                  f"{_references(results[report.spec.audience_id])}")
    total = len(reports)
    print(f"\n{total} file{'s' if total != 1 else ''} checked: {total - failed} valid, {failed} invalid.")
    return 1 if failed else 0


# -- preview ------------------------------------------------------------------------------------------------------

def cmd_preview(reports: list[FileReport], conn: Connection, sample_size: int) -> int:
    specs = [r.spec for r in reports if r.ok and r.spec is not None]
    remote, _ = _server_checks(conn, specs)
    failed = 0
    for report in reports:
        problems = report.problems + (remote[report.spec.audience_id] if report.ok and report.spec else [])
        for p in sorted(problems, key=lambda p: (p.line or 0, p.column or 0)):
            print(render_problem(p))
        spec = report.spec
        if spec is None or not report.ok or any(p.severity == "error" for p in problems):
            failed += 1
            print(f"{report.display}: not previewed ({_counts(problems)})\n")
            continue
        preview: apb.PreviewAudienceResponse = conn.call(conn.audiences.PreviewAudience, apb.PreviewAudienceRequest(
            rule=spec.rule, destinations=[f"destinations/{d}" for d in spec.destinations], sample_size=sample_size))
        print(f"{spec.audience_id} ({report.display}): {preview.member_count} "
              f"member{'s' if preview.member_count != 1 else ''}")
        for stats in preview.destination_stats:
            print(f"  {stats.destination.removeprefix('destinations/')}: {stats.eligible_count} eligible; "
                  f"excluded: {stats.excluded_no_consent_count} without consent, "
                  f"{stats.excluded_no_match_keys_count} without a match key")
        if not spec.destinations:
            print("  (no destinations)")
        sample = [p.name.removeprefix("persons/") for p in preview.sample]
        print(f"  sample ({len(sample)} of {preview.member_count}): {', '.join(sample) if sample else '-'}\n")
    print(f"{len(reports) - failed} previewed, {failed} with errors.")
    return 1 if failed else 0


# -- apply --------------------------------------------------------------------------------------------------------

@dataclass
class Change:
    """One field that differs between the server and the file."""

    key: str  # the file's key
    api_field: str  # the Audience field (and update_mask path)
    old: str
    new: str
    diff: list[str] = field(default_factory=list)


@dataclass
class Step:
    """What apply does to one audience."""

    action: Literal["create", "update", "delete", "unchanged"]
    audience_id: str
    spec: AudienceSpec | None
    current: audiences_pb2.Audience | None
    changes: list[Change] = field(default_factory=list)


def _changes(spec: AudienceSpec, current: audiences_pb2.Audience) -> list[Change]:
    changes: list[Change] = []
    if spec.name != current.display_name:
        changes.append(Change("name", "display_name", _quote(current.display_name), _quote(spec.name)))
    if spec.description != current.description:
        changes.append(Change("description", "description", _quote(current.description), _quote(spec.description)))
    if spec.rule != current.rule.rstrip():
        diff = list(difflib.unified_diff(current.rule.rstrip().splitlines(), spec.rule.splitlines(),
                                         fromfile=f"{spec.name_path} (server)", tofile=spec.source.display,
                                         lineterm=""))
        changes.append(Change("rule", "rule", current.rule, spec.rule, diff))
    wanted = [f"destinations/{d}" for d in spec.destinations]
    if wanted != list(current.destinations):
        changes.append(Change("destinations", "destinations", _list(current.destinations), _list(wanted)))
    if spec.state is not None and spec.state != _state_name(current.state):
        changes.append(Change("state", "state", _state_name(current.state), spec.state))
    if spec.desired_labels != dict(current.labels):
        changes.append(Change("labels", "labels", _labels(dict(current.labels)), _labels(spec.desired_labels)))
    return changes


def make_plan(specs: Sequence[AudienceSpec], server: Sequence[audiences_pb2.Audience], *, prune: bool) -> list[Step]:
    """Compare the files with the server's audiences: one step per audience, ordered by audience id."""
    current = {a.name.removeprefix("audiences/"): a for a in server}
    steps: list[Step] = []
    for spec in specs:
        existing = current.get(spec.audience_id)
        if existing is None:
            steps.append(Step("create", spec.audience_id, spec, None))
        else:
            changes = _changes(spec, existing)
            steps.append(Step("update" if changes else "unchanged", spec.audience_id, spec, existing, changes))
    if prune:
        wanted = {s.audience_id for s in specs}
        for audience_id, audience in current.items():
            if audience_id not in wanted and audience.labels.get(MANAGED_BY_KEY) == MANAGED_BY:
                steps.append(Step("delete", audience_id, None, audience))
    return sorted(steps, key=lambda s: s.audience_id)


def _indent(lines: Sequence[str], prefix: str) -> Iterator[str]:
    return (prefix + line for line in lines)


def render_plan(steps: Sequence[Step]) -> str:
    out: list[str] = []
    for step in steps:
        name = f"audiences/{step.audience_id}"
        if step.action == "create":
            spec = step.spec
            assert spec is not None
            out.append(f"+ create {name}  ({spec.source.display})")
            out.append(f"    name:         {_quote(spec.name)}")
            if spec.description:
                out.append(f"    description:  {_quote(spec.description)}")
            out.append(f"    destinations: {_list(spec.destinations)}")
            if spec.state:
                out.append(f"    state:        {spec.state}")
            out.append(f"    labels:       {_labels(spec.desired_labels)}")
            out.append("    rule:")
            out.extend(_indent(spec.rule.splitlines(), "      | "))
        elif step.action == "update":
            assert step.spec is not None and step.current is not None
            adopting = "" if step.current.labels.get(MANAGED_BY_KEY) == MANAGED_BY else \
                ", not yet managed by this command"
            out.append(f"~ update {name}  ({step.spec.source.display}{adopting})")
            for change in step.changes:
                if change.key == "rule":
                    out.append("    rule:")
                    out.extend(_indent(change.diff, "      "))
                else:
                    out.append(f"    {change.key + ':':<13} {change.old} -> {change.new}")
        elif step.action == "delete":
            out.append(f"- delete {name}  (labelled {MANAGED_BY_KEY}={MANAGED_BY}, no file)")
        else:
            assert step.spec is not None
            out.append(f"= unchanged {name}  ({step.spec.source.display})")
    counts = {a: sum(s.action == a for s in steps) for a in ("create", "update", "delete", "unchanged")}
    out.append(f"\nPlan: {counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete, "
               f"{counts['unchanged']} unchanged.")
    return "\n".join(out)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _ask(question: str) -> str:
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower()


def _state_pb(state: str | None) -> audiences_pb2.AudienceState:
    return {"active": audiences_pb2.AUDIENCE_STATE_ACTIVE, "paused": audiences_pb2.AUDIENCE_STATE_PAUSED}.get(
        state or "", audiences_pb2.AUDIENCE_STATE_UNSPECIFIED)


def _execute(conn: Connection, step: Step) -> str:
    name = f"audiences/{step.audience_id}"
    if step.action == "create":
        spec = step.spec
        assert spec is not None
        created: apb.CreateAudienceResponse = conn.call(conn.audiences.CreateAudience, apb.CreateAudienceRequest(
            request_id=str(uuid.uuid4()), audience_id=spec.audience_id, audience=audiences_pb2.Audience(
                display_name=spec.name, description=spec.description, rule=spec.rule,
                destinations=[f"destinations/{d}" for d in spec.destinations], state=_state_pb(spec.state),
                labels=spec.desired_labels)))
        state = audiences_pb2.AudienceState.Name(created.audience.state).removeprefix("AUDIENCE_STATE_").lower()
        return f"created {name}: {state}, {created.audience.member_count} members"
    if step.action == "update":
        spec, current = step.spec, step.current
        assert spec is not None and current is not None
        audience = audiences_pb2.Audience(name=name, etag=current.etag)
        for change in step.changes:
            if change.api_field == "display_name":
                audience.display_name = spec.name
            elif change.api_field == "description":
                audience.description = spec.description
            elif change.api_field == "rule":
                audience.rule = spec.rule
            elif change.api_field == "destinations":
                audience.destinations.extend(f"destinations/{d}" for d in spec.destinations)
            elif change.api_field == "state":
                audience.state = _state_pb(spec.state)
            elif change.api_field == "labels":
                audience.labels.update(spec.desired_labels)
        paths = [change.api_field for change in step.changes]
        updated: apb.UpdateAudienceResponse = conn.call(conn.audiences.UpdateAudience, apb.UpdateAudienceRequest(
            request_id=str(uuid.uuid4()), audience=audience, update_mask=field_mask_pb2.FieldMask(paths=paths)))
        return (f"updated {name} ({', '.join(c.key for c in step.changes)}): "
                f"{updated.audience.member_count} members")
    assert step.current is not None
    conn.call(conn.audiences.DeleteAudience, apb.DeleteAudienceRequest(
        request_id=str(uuid.uuid4()), name=name, etag=step.current.etag))
    return f"deleted {name}"


def cmd_apply(reports: list[FileReport], conn: Connection, *, folder: bool, yes: bool, prune: bool,
              dry_run: bool) -> int:
    if prune and not folder:
        raise CliError("--prune needs a folder: with a single file every other managed audience would be deleted")
    bad = [r for r in reports if not r.ok]
    for report in bad:
        for p in report.problems:
            print(render_problem(p))
    if bad:
        print(f"\nNothing applied: {len(bad)} file{'s' if len(bad) != 1 else ''} with errors.")
        return 1
    specs = [r.spec for r in reports if r.spec is not None]
    remote, _ = _server_checks(conn, specs)
    problems = [p for ps in remote.values() for p in ps if p.severity == "error"]
    if problems:
        for p in problems:
            print(render_problem(p))
        print(f"\nNothing applied: {_counts(problems)} (see `stitchgraph audiences validate`).")
        return 1
    server = conn.list_audiences()
    steps = make_plan(specs, server, prune=prune)
    print(f"Plan for {conn.target} ({len(specs)} audience file{'s' if len(specs) != 1 else ''}):\n")
    print(render_plan(steps))
    if not prune and folder:
        wanted = {s.audience_id for s in specs}
        orphans = sorted(a.name.removeprefix("audiences/") for a in server
                         if a.labels.get(MANAGED_BY_KEY) == MANAGED_BY and
                         a.name.removeprefix("audiences/") not in wanted)
        if orphans:
            print(f"Note: {', '.join(orphans)} {'is' if len(orphans) == 1 else 'are'} labelled "
                  f"{MANAGED_BY_KEY}={MANAGED_BY} but has no file; --prune deletes "
                  f"{'it' if len(orphans) == 1 else 'them'}.")
    todo = [s for s in steps if s.action != "unchanged"]
    if not todo:
        print("No changes.")
        return 0
    if dry_run:
        print("Dry run: nothing changed.")
        return 0
    if not yes:
        if not _stdin_is_tty():
            print("Dry run: nothing changed (no --yes, and no terminal to confirm on). Re-run with --yes to apply.")
            return 2
        if _ask(f"Apply {len(todo)} change{'s' if len(todo) != 1 else ''} to {conn.target}? [y/N] ") \
                not in ("y", "yes"):
            print("Cancelled: nothing changed.")
            return 2
    done = 0
    for step in todo:
        try:
            print(_execute(conn, step))
        except grpc.RpcError as exc:
            what = (f"audiences/{step.audience_id} changed on the server after the plan was made"
                    if _code(exc) == grpc.StatusCode.ABORTED
                    else f"could not {step.action} audiences/{step.audience_id}")
            print(f"error: {what} ({_rpc_text(exc)}).", file=sys.stderr)
            print(f"Stopped after {done} of {len(todo)} changes; run apply again to see the new plan.")
            return 1
        done += 1
    print(f"Applied {done} change{'s' if done != 1 else ''}.")
    return 0


# -- command line -------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``validate``, ``preview`` and ``apply`` (with their options) to the ``audiences`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", type=Path, help="a folder of audience files (*.toml) or one file")
    common.add_argument("--server", default=None,
                        help=f"HOST:PORT of the server (default: $STITCHGRAPH_SERVER or {DEFAULT_SERVER})")
    common.add_argument("--token", default=None, help="bearer token (default: $STITCHGRAPH_TOKEN)")
    common.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    common.add_argument("--ca-file", default=None, help="PEM CA certificate to verify the server with (implies --tls)")
    common.add_argument("--timeout", type=float, default=300.0, help="deadline per call in seconds (default 300)")
    sub = parser.add_subparsers(dest="audiences_command", required=True, metavar="ACTION")
    sub.add_parser("validate", parents=[common], help="check the files and their rules; exit 1 on any error")
    preview = sub.add_parser("preview", parents=[common],
                             help="evaluate each rule now: member count, per-destination counts, a sample")
    preview.add_argument("--sample-size", type=int, default=10, help="sample persons to show (default 10, max 100)")
    apply = sub.add_parser("apply", parents=[common], help="show the changes against the server, then apply them")
    apply.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    apply.add_argument("--dry-run", action="store_true", help="only print the plan")
    apply.add_argument("--prune", action="store_true",
                       help=f"delete audiences labelled {MANAGED_BY_KEY}={MANAGED_BY} that have no file")


def run(args: argparse.Namespace) -> int:
    """Run ``stitchgraph audiences ACTION PATH``; returns the exit code."""
    target = args.server or os.environ.get("STITCHGRAPH_SERVER") or DEFAULT_SERVER
    token = args.token if args.token is not None else os.environ.get("STITCHGRAPH_TOKEN", "")
    try:
        path: Path = args.path
        reports = load_reports(path)
        with Connection(target, token, tls=args.tls, ca_file=args.ca_file, timeout=args.timeout) as conn:
            if args.audiences_command == "validate":
                return cmd_validate(reports, conn)
            if args.audiences_command == "preview":
                return cmd_preview(reports, conn, args.sample_size)
            return cmd_apply(reports, conn, folder=path.is_dir(), yes=args.yes, prune=args.prune,
                             dry_run=args.dry_run)
    except CliError as exc:
        print(f"stitchgraph audiences: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstitchgraph audiences: interrupted", file=sys.stderr)
        return 130
    except grpc.RpcError as exc:
        code = _code(exc)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"stitchgraph audiences: cannot reach the server at {target} ({_rpc_text(exc)}); is it running? "
                  "Set --server HOST:PORT (or $STITCHGRAPH_SERVER), and --tls/--ca-file if it speaks TLS.",
                  file=sys.stderr)
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            print(f"stitchgraph audiences: the server refused the call ({_rpc_text(exc)}); pass a token with "
                  "--token or $STITCHGRAPH_TOKEN (apply needs the admin scope).", file=sys.stderr)
        else:
            print(f"stitchgraph audiences: the server failed the call ({_rpc_text(exc)}).", file=sys.stderr)
        return 1
