"""Exact money: decimal strings in, decimal strings and integer micro-units out.

Values are never floats: payload numbers are parsed as :class:`~decimal.Decimal`, and a
value is kept to six decimal places (the precision of every ad platform's API and more
than any ISO-4217 currency's minor unit). Sums are exact integers of micro-units.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

MICROS = 1_000_000
_QUANTUM = Decimal("0.000001")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
#: Largest absolute value accepted (fits a signed 64-bit count of micro-units).
MAX_ABS = Decimal("9000000000000")


def parse_money(raw: Any) -> tuple[str, int]:
    """``raw`` (decimal string, int or Decimal; floats via their shortest repr) as a
    normalised decimal string and micro-units. Raises :class:`ValueError` with a reason."""
    if isinstance(raw, bool) or raw is None:
        raise ValueError("must be a decimal number, for example \"19.99\"")
    if isinstance(raw, float):
        raw = repr(raw)
    text = str(raw).strip()
    if not _DECIMAL_TEXT.fullmatch(text):
        raise ValueError("must be a decimal number, for example \"19.99\"")
    try:
        amount = Decimal(text).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)
    except InvalidOperation as exc:
        raise ValueError("is out of range") from exc
    if abs(amount) > MAX_ABS:
        raise ValueError("is out of range")
    return format_micros(int(amount * MICROS)), int(amount * MICROS)


def format_micros(micros: int) -> str:
    """Micro-units as the shortest exact decimal string ("19.99", "5", "-0.5")."""
    amount = (Decimal(micros) / MICROS).quantize(_QUANTUM)
    text = format(amount.normalize(), "f")
    return text
