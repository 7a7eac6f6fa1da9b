"""Per-layer compress rates: the paper's ``[0.]+[0.1]*2+[0.4]*5`` strings, parsed without ``eval``.

Grammar (whitespace is allowed between any two tokens)::

    spec   := term ("+" term)*
    term   := "[" number ("," number)* [","] "]" ["*" count]
    number := digits ["." digits*] | "." digits       (an optional exponent: e-2, E+1)
    count  := digits                                  (>= 1)

``[a, b]*2`` is the list ``[a, b, a, b]`` and ``+`` concatenates, as in Python;
every rate must lie in ``[0, 1)`` (the fraction of a layer's filters to remove).
A spec holds at most :data:`norton.limits.MAX_COMPRESS_RATE_ENTRIES` rates, checked
before a repeat is expanded (``[0.1]*99999999999`` fails at once, allocating nothing).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NoReturn

from norton.errors import UserError
from norton.limits import MAX_COMPRESS_RATE_ENTRIES

_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_COUNT = re.compile(r"\d+")


def parse_compress_rate(spec: str | Sequence[float]) -> list[float]:
    """Parse ``spec`` (a string such as ``"[0.]+[0.1]*2"``, or a list of floats) into a list of rates.

    Raises ``UserError`` (a ``ValueError``) saying what is wrong and at which
    character position, or which entry is out of ``[0, 1)``.
    """
    if isinstance(spec, str):
        return _Parser(spec).parse()
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        if len(spec) > MAX_COMPRESS_RATE_ENTRIES:
            raise UserError(f"compress rate has {len(spec):,} entries; at most {MAX_COMPRESS_RATE_ENTRIES:,}")
        return [_check_rate(value, f"entry {i}") for i, value in enumerate(spec)]
    raise UserError(
        f"compress rate must be a string like '[0.]+[0.1]*2' or a list of floats, got {type(spec).__name__}"
    )


def format_compress_rate(rates: Sequence[float]) -> str:
    """The shortest run-length spec for ``rates``, e.g. ``[0.0]+[0.1]*2`` (parses back to ``rates``)."""
    terms: list[str] = []
    i = 0
    while i < len(rates):
        j = i
        while j < len(rates) and rates[j] == rates[i]:
            j += 1
        count = j - i
        terms.append(f"[{float(rates[i])!r}]" + (f"*{count}" if count > 1 else ""))
        i = j
    return "+".join(terms)


def _check_rate(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"compress rate {where} must be a number in [0, 1), got {value!r}")
    rate = float(value)
    if not math.isfinite(rate) or not 0.0 <= rate < 1.0:
        raise UserError(f"compress rate {where} is {value!r}; every rate must lie in [0, 1)")
    return rate


class _Parser:
    """A recursive-descent parser over one spec string (keeps the position for error messages)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list[float]:
        if not self.text.strip():
            raise UserError("compress rate is empty; expected something like '[0.]+[0.1]*2'")
        rates = self._term(0)
        while self._peek() == "+":
            self.pos += 1
            rates += self._term(len(rates))
        if self._peek() != "":
            self._fail("expected '+' or the end of the spec")
        return rates

    def _term(self, before: int) -> list[float]:
        """One ``[...]`` or ``[...]*count``; ``before`` entries precede it (for the size bound)."""
        self._expect("[")
        values = [self._number()]
        while self._peek() == ",":
            self.pos += 1
            if self._peek() == "]":  # trailing comma, as Python allows
                break
            values.append(self._number())
        self._expect("]")
        if before + len(values) > MAX_COMPRESS_RATE_ENTRIES:
            self._fail(f"the spec would hold more than {MAX_COMPRESS_RATE_ENTRIES:,} rates")
        if self._peek() == "*":
            self.pos += 1
            self._skip_space()
            start = self.pos
            match = _COUNT.match(self.text, self.pos)
            if match is None:
                self._fail("expected a whole repeat count after '*'")
            digits = match.group().lstrip("0") or "0"
            # Bound the count before int() and before expanding: a 5000-digit count would
            # otherwise hit Python's int-parsing limit, a large one would allocate gigabytes.
            count = int(digits) if len(digits) <= len(str(MAX_COMPRESS_RATE_ENTRIES)) else MAX_COMPRESS_RATE_ENTRIES + 1
            if count < 1:
                self.pos = start
                self._fail("the repeat count must be at least 1")
            if before + len(values) * count > MAX_COMPRESS_RATE_ENTRIES:
                self.pos = start
                self._fail(f"the spec would hold more than {MAX_COMPRESS_RATE_ENTRIES:,} rates")
            self.pos = match.end()
            values = values * count
        return values

    def _number(self) -> float:
        self._skip_space()
        start = self.pos
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            self._fail("expected a number such as 0.1")
        self.pos = match.end()
        value = float(match.group())
        if not 0.0 <= value < 1.0:
            self.pos = start
            self._fail(f"rate {match.group()} is outside [0, 1)")
        return value

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            self._fail(f"expected {char!r}")
        self.pos += 1

    def _peek(self) -> str:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _fail(self, what: str) -> NoReturn:
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
        spec = self.text if len(self.text) <= 80 else self.text[:60] + "..." + self.text[-10:]
        raise UserError(f"invalid compress rate {spec!r}: {what} at position {self.pos}, found {found}")
