"""
Client-controlled text made safe for a log line or a response body.

Domain names, usernames, request lines and CONNECT authorities come from
clients; written raw, a newline or carriage return would forge a log line
and an escape byte would drive the operator's terminal.  Every such value
goes through L{escapeText} before it is logged or echoed.
"""

from __future__ import annotations

_SAFE_BYTES = frozenset(range(0x20, 0x7F)) - {ord("\\")}


def escapeText(value: str | bytes) -> str:
    """
    C{value} with every character that is not printable (and the backslash
    that introduces an escape) written as a Python-style escape: C{\\n},
    C{\\r}, C{\\x1b}, C{\\u2028}; bytes that are not UTF-8 as C{\\xff}.
    Printable text is unchanged, so an ordinary host name reads as itself.
    """
    if isinstance(value, bytes):
        if all(byte in _SAFE_BYTES for byte in value):
            return value.decode("ascii")
        value = value.decode("utf-8", "surrogateescape")
    if value.isprintable() and "\\" not in value:
        return value
    return "".join(_escapeChar(char) for char in value)


def _escapeChar(char: str) -> str:
    if char.isprintable() and char != "\\":
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")
