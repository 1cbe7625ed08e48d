"""
What the private tailnet's two processes say to each other, defined once (the layout of treq's
C{local_httpbin}: parent, child, shared).

    - parent: L{tests._tailnet}, in the test process. It starts the child with the arguments of
      L{ChildOptions.toArgv}, reads one L{Ready} (or L{StartFailed}) line, then writes one
      L{Command} per line and reads one L{CommandReply} line for each.
    - child: L{tests._netns_tailnet}, run under C{unshare -n}: tailscaled and the targets. It reads
      its arguments with L{ChildOptions.fromArgv} and writes the same messages.

Every message is one line of JSON, C{{"message": KIND, FIELD: VALUE, ...}}, written by
L{Message.toJSON} and read by L{Message.fromJSON}; neither side spells a key. Standard library only:
the child imports nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

CHILD_MODULE = "tests._netns_tailnet"

HELLO_BODY = b"hello from the tailnet\n"
"""What the HTTP target answers to C{GET /}."""

PATTERN_BLOCK = bytes(range(256)) * 256
"""64 KiB of the pattern, a whole number of its periods."""


def patternBytes(offset: int, length: int) -> bytes:
    """
    The slice [offset, offset+length) of the endless C{bytes(range(256))} pattern that the HTTP
    target's C{/big?n=N} serves; tests use it to check what arrived.
    """
    # The block is whole periods of 256: its tail from the offset's phase, then whole blocks.
    head = PATTERN_BLOCK[offset % 256 :]
    return (head + PATTERN_BLOCK * (length // len(PATTERN_BLOCK) + 1))[:length]


@dataclass(frozen=True)
class ChildOptions:
    """The child's command line."""

    tailscaled: str
    """Path of the tailscaled binary."""
    directory: str
    """Holds tailscaled's state and logs."""
    socket: str | None = None
    """LocalAPI socket path (default C{directory/tailscaled.sock}); for a directory too long for a
    Unix socket path (108 bytes)."""

    def toArgv(self, python: str = sys.executable) -> list[str]:
        """The child's whole command line (the caller puts C{unshare -n --} in front)."""
        argv = [python, "-m", CHILD_MODULE, "--tailscaled", self.tailscaled, "--dir", self.directory]
        if self.socket is not None:
            argv += ["--socket", self.socket]
        return argv

    @classmethod
    def fromArgv(cls, argv: list[str]) -> ChildOptions:
        """Parse the arguments after C{python -m tests._netns_tailnet}."""
        parser = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}")
        parser.add_argument("--tailscaled", required=True)
        parser.add_argument("--dir", required=True)
        parser.add_argument("--socket", help="LocalAPI socket path (default DIR/tailscaled.sock)")
        options = parser.parse_args(argv)
        return cls(options.tailscaled, options.dir, options.socket)


class Command(enum.Enum):
    """What the parent may ask the child, one per line on its stdin; EOF means: clean up and exit."""

    STOP = "stop"
    """SIGTERM tailscaled (SIGKILL after a grace period)."""
    START = "start"
    """Start it again with the same state directory; the reply carries its pid."""
    KILL = "kill"
    """SIGKILL tailscaled, as a crash would."""

    def toLine(self) -> bytes:
        return self.value.encode() + b"\n"

    @classmethod
    def fromLine(cls, line: str) -> Command:
        """Raises C{ValueError} for an unknown command."""
        return cls(line.strip())


_M = TypeVar("_M", bound="Message")


@dataclass(frozen=True)
class Message:
    """A line of JSON from the child; subclasses name their kind and fields."""

    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Message]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Message._kinds[cls.kind] = cls

    def toJSON(self) -> bytes:
        """One line: the kind and every field, newline-terminated."""
        return json.dumps({"message": self.kind, **dataclasses.asdict(self)}).encode() + b"\n"

    @staticmethod
    def fromJSON(line: bytes | str) -> Message:
        """The message a line carries; C{ValueError} if it is no known message."""
        fields = json.loads(line)
        if not isinstance(fields, dict) or fields.get("message") not in Message._kinds:
            raise ValueError(f"not a tailnet helper message: {line!r}")
        cls = Message._kinds[fields.pop("message")]
        return cls(**fields)

    @classmethod
    def expect(cls: type[_M], message: Message) -> _M:
        """C{message} if it is a C{cls}, else C{ValueError}."""
        if not isinstance(message, cls):
            raise ValueError(f"expected a {cls.kind!r} message, got {message!r}")
        return message


@dataclass(frozen=True)
class Ready(Message):
    """The child is up: tailscaled accepts and the targets listen."""

    kind: ClassVar[str] = "ready"

    localapi: str
    """tailscaled's LocalAPI socket path (reachable from the host namespace)."""
    httpPort: int
    """C{GET /} -> L{HELLO_BODY}; C{GET /big?n=N} -> N bytes of L{patternBytes}."""
    echoPort: int
    """Echoes; answers the client's EOF with its own once everything was echoed."""
    closedPort: int
    """Nothing listens there: connection refused."""
    socks5Port: int
    """tailscaled's own SOCKS5 server."""
    tailscaledPid: int
    log: str
    """tailscaled's log file."""


@dataclass(frozen=True)
class StartFailed(Message):
    """The child could not set up (it then exits with status 1)."""

    kind: ClassVar[str] = "start-failed"

    error: str


@dataclass(frozen=True)
class CommandReply(Message):
    """The answer to one L{Command}."""

    kind: ClassVar[str] = "reply"

    ok: bool
    error: str | None = None
    tailscaledPid: int | None = None
    """After L{Command.START}: the new tailscaled's pid."""
