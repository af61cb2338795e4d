"""Bounded parsing of untrusted JSON and TOML documents.

Owns the shape limits checked *before* the standard-library parser runs: nesting depth,
the number of values (which is what a parser allocates), the length of integer literals
and, for TOML, the number of parts in a dotted key. Each is measured in linear time
with C-level scans, so neither the parser's recursion (``json`` recurses on the C stack,
``tomllib`` on the Python stack) nor its memory, nor ``tomllib``'s work on long dotted
keys (quadratic), can be driven by the document. Every failure is the caller's typed
error; its message quotes nothing from the document, except that a TOML syntax error
carries ``tomllib``'s own message (cut to 120 characters), as the callers always did.

Knows no schema: callers pass the limits their schema implies and validate the result.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

ErrorFactory = Callable[[str], Exception]

_WINDOW = 1 << 20
_OPENERS = bytes.maketrans(b"{}", b"[]")  # one kind of bracket: depth is all that is measured
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
MAX_INT_DIGITS = 40  # any u64 and more; int() of a long literal is quadratic

# TOML strings (the four kinds) and comments, in the order a TOML lexer tries them.
# A multi-line string may end in up to two extra quotes that belong to its content.
_TOML_SKIPPED = (
    r'"""(?:[^"\\]++|\\.|"(?!""))*+"{3,5}'
    r"|'''(?:[^']++|'(?!''))*+'{3,5}"
    r'|"(?:[^"\\\n]++|\\.)*+"'
    r"|'[^'\n]*+'"
    r"|#[^\n]*+"
)
_TOML_LEXICAL = re.compile("(?:" + _TOML_SKIPPED + r"|[^\"'#]++)*+", re.DOTALL)
_TOML_STRIP = re.compile(_TOML_SKIPPED, re.DOTALL)
_BARE = r"[A-Za-z0-9_-]"
# A run of more digits than any integer literal may have, outside strings and comments. It
# also catches a long float or bare key, which no schema here has. ``tomllib`` would raise a
# bare ValueError past 4300 digits, and ``int()`` below that is quadratic.
_TOML_LONG_NUMBER = re.compile(f"[0-9_]{{{MAX_INT_DIGITS + 1}}}")


def _depth_ok(brackets: bytes, max_depth: int) -> bool:
    """Whether a string of only ``[`` and ``]`` is balanced and nests at most ``max_depth``
    deep. Each pass removes every innermost pair, so it lowers the depth by exactly one."""
    if brackets.count(b"[") != brackets.count(b"]"):
        return False
    for _ in range(max_depth):
        if not brackets:
            return True
        if b"[" * (max_depth + 1) in brackets:
            return False  # the common attack, refused without further passes
        brackets = brackets.replace(b"[]", b"")
    return not brackets


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise ValueError("integer literal too long")
    return int(text)


def _count(text: bytes, separators: bytes) -> tuple[int, bytes]:
    """The separators in ``text``, and its brackets (all made ``[`` or ``]``)."""
    return sum(text.count(bytes([c])) for c in separators), text.translate(_OPENERS, _NOT_BRACKETS)


def _json_outside_strings(data: bytes, error: ErrorFactory, what: str) -> Iterator[bytes]:
    """The bytes of ``data`` outside its strings, window by window (so the pieces stay
    small, however many strings there are). Escapes are neutralised first (``\\\\`` and
    ``\\"`` pair from the left, as in JSON), so every quote left delimits a string and the
    parity of the quotes before a position says whether it lies inside one. Brackets in
    strings must not count: they could hide real nesting (``["]", ["]", ...]``)."""
    cleaned = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    inside = False
    for start in range(0, len(cleaned), _WINDOW):
        parts = cleaned[start : start + _WINDOW].split(b'"')
        yield b"".join(parts[1 if inside else 0 :: 2])
        if len(parts) % 2 == 0:  # an odd number of quotes in this window
            inside = not inside
    if inside:
        raise error(f"{what} is not JSON (an unterminated string)")


def _check_json_shape(data: bytes, max_depth: int, max_values: int, error: ErrorFactory, what: str) -> None:
    commas, found, parts = 0, 0, []
    for text in _json_outside_strings(data, error, what):
        c, b = _count(text, b",")
        commas, found = commas + c, found + len(b)
        if commas + found // 2 >= max_values:  # stop at the first window over the bound
            raise error(f"{what} holds more than {max_values} values")
        parts.append(b)
    if not _depth_ok(b"".join(parts), max_depth):
        raise error(f"{what} is malformed or nested more than {max_depth} levels deep")


def json_loads(
    data: bytes,
    *,
    max_depth: int,
    max_values: int,
    error: ErrorFactory,
    what: str = "the document",
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` of untrusted bytes, after checking in linear time that the document
    nests at most ``max_depth`` containers deep, holds at most ``max_values`` values
    (elements, members and containers: what the parser allocates), and, while parsing,
    that no integer literal is longer than 40 digits. Invalid JSON and every bound raise
    ``error(message)``; so does a recursion or memory failure of the parser itself,
    should one still happen."""
    # The scan reads bytes: only in UTF-8 is every quote, bracket and backslash byte that
    # character (``json.loads`` would also decode UTF-16 and UTF-32, where it is not).
    if json.detect_encoding(data) not in ("utf-8", "utf-8-sig"):
        raise error(f"{what} is not UTF-8 JSON")
    _check_json_shape(data, max_depth, max_values, error, what)
    try:
        return json.loads(data, object_pairs_hook=object_pairs_hook, parse_int=_bounded_int)
    except (ValueError, RecursionError, MemoryError):
        raise error(f"{what} is not valid JSON") from None


def toml_loads(
    text: str,
    *,
    max_depth: int,
    max_key_parts: int,
    max_values: int,
    error: ErrorFactory,
    what: str = "the document",
) -> dict[str, Any]:
    """``tomllib.loads`` of untrusted text, after checking in linear time the nesting of
    arrays and inline tables (table headers count as brackets too), the number of values,
    and that no dotted key (or any dotted run outside strings and comments) has more than
    ``max_key_parts`` parts: ``tomllib``'s work on a dotted key grows with its square; and
    that no number outside strings and comments has more than 40 digits."""
    if not _TOML_LEXICAL.fullmatch(text):
        raise error(f"{what} is not valid TOML (an unterminated string)")
    # Strings become one bare character (so a quoted key still counts as a key part);
    # comments disappear. A key never spans lines.
    stripped = _TOML_STRIP.sub(lambda m: "" if m.group().startswith("#") else "s", text)
    chain = re.compile(f"(?<!{_BARE}){_BARE}++(?:[ \t]*+\\.[ \t]*+{_BARE}++){{{max_key_parts}}}")
    if chain.search(stripped):
        raise error(f"{what} has a dotted key of more than {max_key_parts} parts")
    separators, brackets = _count(stripped.encode("utf-8", "surrogatepass"), b",=")
    if separators + len(brackets) // 2 >= max_values:
        raise error(f"{what} holds more than {max_values} values")
    if not _depth_ok(brackets, max_depth):
        raise error(f"{what} is malformed or nested more than {max_depth} levels deep")
    if _TOML_LONG_NUMBER.search(stripped):
        raise error(f"{what} has a number of more than {MAX_INT_DIGITS} digits")
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError, MemoryError) as e:
        detail = f" ({str(e)[:120]})" if isinstance(e, tomllib.TOMLDecodeError) else ""
        raise error(f"{what} is not valid TOML{detail}") from None
