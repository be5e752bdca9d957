"""A small AIP-160 filter subset for list RPCs: comparisons joined by ``AND``.

``field op value`` where ``op`` is one of ``= != < <= > >=`` and ``value`` is a
double-quoted string (with ``\\"`` escapes) or a bare word (enum names, numbers).
Anything else is ``INVALID_ARGUMENT`` on ``filter`` with the column and a hint.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from stitchgraph.errors import InvalidArgument

_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op><=|>=|!=|=|<|>)|(?P<word>[A-Za-z0-9_.:+\-$]+))')
#: What each operator does; works on Python values and on SQLAlchemy columns alike.
OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
OPS = tuple(OPERATORS)


@dataclass(frozen=True)
class Comparison:
    field: str
    op: str
    value: str

    def apply(self, left: Any, right: Any) -> Any:
        """``left op right``: a bool for values, a SQL condition for a column."""
        return OPERATORS[self.op](left, right)


def parse_filter(text: str, fields: Iterable[str]) -> list[Comparison]:
    """The comparisons of ``text`` (empty = none); every field must be one of ``fields``."""
    allowed = set(fields)
    tokens: list[tuple[str, str, int]] = []
    position = 0
    while position < len(text):
        if not text[position:].strip():
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            _fail(text, position, "unexpected character")
        assert match is not None
        kind = match.lastgroup or ""
        value = match.group(kind)
        start = match.start(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value, start))
        position = match.end()
    comparisons: list[Comparison] = []
    i = 0
    while i < len(tokens):
        if comparisons:
            kind, word, start = tokens[i]
            if kind != "word" or word != "AND":
                _fail(text, start, "expected AND between comparisons (OR and parentheses are not supported)")
            i += 1
        if i + 3 > len(tokens):
            _fail(text, len(text), "expected a comparison: field op value")
        (fkind, name, fstart), (okind, op, ostart), (vkind, value, vstart) = tokens[i:i + 3]
        if fkind != "word" or name not in allowed:
            _fail(text, fstart, f"unknown field; filterable fields: {', '.join(sorted(allowed))}")
        if okind != "op":
            _fail(text, ostart, f"expected one of {' '.join(OPS)}")
        if vkind == "op":
            _fail(text, vstart, "expected a value")
        comparisons.append(Comparison(name, op, value))
        i += 3
    return comparisons


def _fail(text: str, position: int, hint: str) -> None:
    raise InvalidArgument.for_field("filter", f"invalid filter at column {position + 1}: {hint}",
                                    reason="INVALID_FILTER")
