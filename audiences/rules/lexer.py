"""Source positions, diagnostics and tokens of the audience rule language.

This is the bottom layer of the rule front end (docs/audiences.md, "Rule language"):

- :class:`Source` maps 0-based offsets to 1-based line/column :class:`~audiences.rules.ast.Span`\\ s
  (columns count code points, so they match what an editor shows for any text Python can hold);
- :class:`Diagnostic` is the one currency of problems for the lexer, the parser and the checker;
- :func:`tokenize` turns the text into :class:`Token`\\ s.

The lexer never raises. It stops at the first malformed token (an unterminated string, a bad
escape, ``7days``...) and ends the token list with an ``ERROR`` token carrying the diagnostic.
The parser reports that diagnostic only when it reaches the token, so a syntax error earlier in
the rule is the one reported. Operators the language does not have but people type anyway
(``&&``, ``||``, ``!``, ``<>``) come out as ``BAD`` tokens, so the parser can say what it
expected *there* and add a hint ("use `and`").

Keywords (``and``, ``or``, ``not``, ``in``, ``contains``, ``true``, ``false``) are ``IDENT``
tokens; the parser decides by position what a word means, so an event may be called ``count``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Final
from typing import Literal as TypingLiteral

from audiences.rules.ast import Span

Severity = TypingLiteral["ERROR", "WARNING"]

# Diagnostic codes (docs/audiences.md, "Diagnostics").
SYNTAX_ERROR: Final = "SYNTAX_ERROR"
UNEXPECTED_END: Final = "UNEXPECTED_END"
UNKNOWN_FUNCTION: Final = "UNKNOWN_FUNCTION"
WRONG_ARGUMENTS: Final = "WRONG_ARGUMENTS"
TYPE_MISMATCH: Final = "TYPE_MISMATCH"
UNKNOWN_EVENT: Final = "UNKNOWN_EVENT"
UNKNOWN_PURPOSE: Final = "UNKNOWN_PURPOSE"
UNKNOWN_IDENTIFIER_TYPE: Final = "UNKNOWN_IDENTIFIER_TYPE"
UNKNOWN_COHORT_SOURCE: Final = "UNKNOWN_COHORT_SOURCE"
INVALID_LITERAL: Final = "INVALID_LITERAL"
UNSUPPORTED: Final = "UNSUPPORTED"
MISSING_CURRENCY: Final = "MISSING_CURRENCY"
ALWAYS_TRUE: Final = "ALWAYS_TRUE"
ALWAYS_FALSE: Final = "ALWAYS_FALSE"
RULE_TOO_LONG: Final = "RULE_TOO_LONG"
EMPTY_RULE: Final = "EMPTY_RULE"

#: The length of time units, in microseconds.
DURATION_UNITS: Final = {
    "s": 1_000_000,
    "m": 60 * 1_000_000,
    "h": 3600 * 1_000_000,
    "d": 86_400 * 1_000_000,
    "w": 7 * 86_400 * 1_000_000,
}
KEYWORDS: Final = frozenset({"and", "or", "not", "in", "contains", "true", "false"})


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A problem found in a rule. ``span`` points at the offending text (end exclusive; an
    empty span marks a point, e.g. the end of the rule); ``hint`` suggests a fix or is empty."""

    severity: Severity
    code: str
    message: str
    span: Span
    hint: str = ""


class Source:
    """The rule text with a line index: turns offsets into spans and spans back into text."""

    __slots__ = ("_line_starts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._line_starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based (line, column) of a 0-based offset."""
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def span(self, start: int, end: int) -> Span:
        line, column = self.position(start)
        end_line, end_column = self.position(end)
        return Span(line, column, end_line, end_column, start, end)

    def where(self, offset: int) -> str:
        """``line:column`` of an offset, for messages."""
        line, column = self.position(offset)
        return f"{line}:{column}"


def clause_text(text: str, span: Span) -> str:
    """The source text a node (or diagnostic) covers."""
    return text[span.start : span.end]


class TokenKind(Enum):
    IDENT = "a name"
    STRING = "a string"
    NUMBER = "a number"
    DURATION = "a duration"
    LPAREN = '"("'
    RPAREN = '")"'
    LBRACKET = '"["'
    RBRACKET = '"]"'
    COMMA = '","'
    ASSIGN = '"="'
    OP = "an operator"  # == != < <= > >=
    BAD = "an unsupported operator"  # && || & | ! <> -
    EOF = "end of rule"
    ERROR = "a malformed token"


@dataclass(frozen=True, slots=True)
class Token:
    """One token. ``value`` is the decoded string (STRING), a ``Decimal`` (NUMBER) or the length
    in microseconds (DURATION); ``error`` is set on the final ERROR token only."""

    kind: TokenKind
    text: str
    start: int
    end: int
    value: str | Decimal | int | None = None
    error: Diagnostic | None = None


_DIGITS = "0123456789"  # ASCII only: str.isdigit() also accepts "²"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A number, and whatever word characters stick to it (so `7days` and `1e5` are one bad literal).
_NUMBER = re.compile(r"-?[0-9]+(?P<fraction>\.[0-9]+)?(?P<suffix>[A-Za-z0-9_.]*)")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_BAD_OPERATORS = ("&&", "||", "<>", "&", "|", "!", "-")
_SIMPLE = {
    "(": TokenKind.LPAREN,
    ")": TokenKind.RPAREN,
    "[": TokenKind.LBRACKET,
    "]": TokenKind.RBRACKET,
    ",": TokenKind.COMMA,
}
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_CURLY_QUOTES = "\u201c\u201d\u201e\u2018\u2019"
_CURLY_REST = re.compile(f"[^{_CURLY_QUOTES}\n]*[{_CURLY_QUOTES}]")  # the rest of a curly-quoted string


class _LexError(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def tokenize(source: Source, start: int = 0, stop: int | None = None) -> list[Token]:
    """The tokens of ``source.text[start:stop]`` (offsets stay those of the whole text), ending
    with an ``EOF`` token at ``stop`` or with an ``ERROR`` token at the first malformed one."""
    lexer = _Lexer(source, start, len(source.text) if stop is None else stop)
    tokens: list[Token] = []
    try:
        while (token := lexer.next_token()).kind is not TokenKind.EOF:
            tokens.append(token)
        tokens.append(token)
    except _LexError as exc:
        span = exc.diagnostic.span
        tokens.append(Token(TokenKind.ERROR, "", span.start, span.end, error=exc.diagnostic))
    return tokens


class _Lexer:
    def __init__(self, source: Source, start: int, stop: int) -> None:
        self.source = source
        self.text = source.text
        self.pos = start
        self.stop = stop

    def _fail(self, code: str, message: str, start: int, end: int, hint: str = "") -> _LexError:
        return _LexError(Diagnostic("ERROR", code, message, self.source.span(start, end), hint))

    def _skip_blank(self) -> None:
        text, pos, stop = self.text, self.pos, self.stop
        while pos < stop:
            char = text[pos]
            if char.isspace():
                pos += 1
            elif char == "#":
                newline = text.find("\n", pos, stop)
                pos = stop if newline < 0 else newline + 1
            else:
                break
        self.pos = pos

    def next_token(self) -> Token:
        self._skip_blank()
        text, pos = self.text, self.pos
        if pos >= self.stop:
            return Token(TokenKind.EOF, "", self.stop, self.stop)
        char = text[pos]
        if char in _SIMPLE:
            return self._emit(_SIMPLE[char], pos + 1)
        if char == '"':
            return self._string()
        if char in _DIGITS or (char == "-" and text[pos + 1 : pos + 2] in _DIGITS and pos + 1 < self.stop):
            return self._number()
        if match := _IDENT.match(text, pos, self.stop):
            return self._emit(TokenKind.IDENT, match.end())
        for operator in _OPERATORS:
            if text.startswith(operator, pos, self.stop):
                return self._emit(TokenKind.OP, pos + len(operator))
        if char == "=":
            return self._emit(TokenKind.ASSIGN, pos + 1)
        for operator in _BAD_OPERATORS:
            if text.startswith(operator, pos, self.stop):
                return self._emit(TokenKind.BAD, pos + len(operator))
        raise self._unexpected_character(char, pos)

    def _emit(self, kind: TokenKind, end: int, value: str | Decimal | int | None = None) -> Token:
        token = Token(kind, self.text[self.pos : end], self.pos, end, value)
        self.pos = end
        return token

    def _unexpected_character(self, char: str, pos: int) -> _LexError:
        if char == "'":
            close = self.text.find("'", pos + 1, self.stop)
            inner = self.text[pos + 1 : close] if close > 0 and "\n" not in self.text[pos:close] else None
            end = pos + 1 if inner is None else close + 1
            hint = "strings use double quotes" + (f": write {quote(inner)}" if inner is not None else "")
            return self._fail(INVALID_LITERAL, "strings cannot be in single quotes", pos, end, hint)
        if char in _CURLY_QUOTES:
            match = _CURLY_REST.match(self.text, pos + 1, self.stop)
            end = match.end() if match else pos + 1
            hint = f"use straight double quotes: write {quote(self.text[pos + 1 : end - 1])}" if match else ""
            return self._fail(INVALID_LITERAL, f"curly quote {char} cannot start a string", pos, end,
                              hint or 'use straight double quotes: "DE"')
        hints = {
            "$": 'quote names that start with $, e.g. count("$pageview")',
            ";": "a rule is one expression: join clauses with `and` or `or`",
            ".": "numbers are written like 0.5; property paths go in a string: property(\"a.b\")",
        }
        printable = char if char.isprintable() else f"U+{ord(char):04X}"
        return self._fail(SYNTAX_ERROR, f'unexpected character "{printable}"', pos, pos + 1, hints.get(char, ""))

    def _string(self) -> Token:
        text, start = self.text, self.pos
        pos = start + 1
        chars: list[str] = []
        while True:
            if pos >= self.stop:
                raise self._fail(
                    UNEXPECTED_END, f"string starting at {self.source.where(start)} is not closed, found end of rule",
                    start, pos, 'end the string with "',
                )
            char = text[pos]
            if char == '"':
                break
            if char == "\n":
                where = self.source.where(start)
                raise self._fail(
                    SYNTAX_ERROR, f"string starting at {where} is not closed before the end of the line", start, pos,
                    'end the string with "; write \\n for a line break inside a string',
                )
            if char != "\\":
                chars.append(char)
                pos += 1
                continue
            escape = text[pos + 1 : pos + 2]
            if escape in _ESCAPES:
                chars.append(_ESCAPES[escape])
                pos += 2
            elif escape == "u":
                decoded, pos = self._unicode_escape(pos)
                chars.append(decoded)
            else:
                shown = "\\" + escape if escape and escape.isprintable() else "\\"
                raise self._fail(
                    INVALID_LITERAL, f'unknown escape "{shown}" in a string', pos, min(pos + 2, self.stop),
                    'escapes are \\" \\\\ \\n \\t and \\uXXXX; write \\\\ for a backslash',
                )
        self.pos = pos + 1
        return Token(TokenKind.STRING, text[start : pos + 1], start, pos + 1, "".join(chars))

    def _hex4(self, pos: int) -> int | None:
        """The code unit of ``\\uXXXX`` at ``pos`` (the backslash), or None."""
        digits = self.text[pos + 2 : pos + 6]
        if pos + 6 > self.stop or not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
            return None
        return int(digits, 16)

    def _unicode_escape(self, pos: int) -> tuple[str, int]:
        unit = self._hex4(pos)
        if unit is None:
            raise self._fail(
                INVALID_LITERAL, "\\u must be followed by four hex digits", pos, min(pos + 6, self.stop),
                'for example "\\u00e9" for é',
            )
        if 0xD800 <= unit < 0xDC00 and self.text.startswith("\\u", pos + 6):
            low = self._hex4(pos + 6)
            if low is not None and 0xDC00 <= low < 0xE000:
                return chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)), pos + 12
        if 0xD800 <= unit < 0xE000:
            raise self._fail(
                INVALID_LITERAL, f"\\u{unit:04x} is half of a surrogate pair", pos, pos + 6,
                "write the character itself, or both halves of the pair",
            )
        return chr(unit), pos + 6

    def _number(self) -> Token:
        start = self.pos
        match = _NUMBER.match(self.text, start, self.stop)
        assert match is not None  # next_token saw a digit
        text, suffix = match.group(), match.group("suffix")
        if not suffix:
            return self._emit(TokenKind.NUMBER, match.end(), Decimal(text))
        digits = text[: len(text) - len(suffix)]
        if suffix in DURATION_UNITS and match.group("fraction") is None and not digits.startswith("-"):
            return self._emit(TokenKind.DURATION, match.end(), int(digits) * DURATION_UNITS[suffix])
        raise self._fail(
            INVALID_LITERAL, f'"{text}" is neither a number nor a duration', start, match.end(),
            _number_hint(digits, suffix),
        )


def _number_hint(digits: str, suffix: str) -> str:
    if digits.startswith("-") and suffix in DURATION_UNITS:
        return "durations are positive: write ago(...) for a time in the past"
    if suffix.lower() in DURATION_UNITS:
        return f"units are lower-case: write {digits}{suffix.lower()}"
    if suffix.startswith("."):
        return f"write {digits} or {digits}.0"
    if suffix[:1] in "eE" and suffix[1:].lstrip("+-").isdigit():
        return "write the number out in full, without an exponent"
    words = {"sec": "s", "second": "s", "min": "m", "minute": "m", "hour": "h", "hr": "h", "day": "d", "week": "w"}
    for word, unit in words.items():
        if suffix.lower().rstrip("s") == word.rstrip("s"):
            return f"write {digits}{unit}"
    if suffix.lower() in {"mo", "month", "months", "y", "yr", "year", "years"}:
        return "months and years vary in length: write days, e.g. 30d or 365d"
    return "durations are a whole number and one of s, m, h, d, w: 90s, 30m, 12h, 7d, 2w"


def quote(value: str) -> str:
    """``value`` as a rule-language string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'

