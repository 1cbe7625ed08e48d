"""
HTTP over a Unix socket, the one way the suite speaks it (to tsmux, or to tailscaled directly).

In this process:
    - L{request}: one request on a fresh connection (C{Connection: close}) -> L{Response}
      (status, reason, headers, body).
    - L{exchange}: raw bytes in, everything the server sent until it closed out; for what
      L{request} would tidy away (pipelining, a HEAD's missing body, a 101 upgrade).
    - L{curl}, L{socksCurl}, L{curlStatus}: the real curl, for what a user's client does.

As another uid (the clients of per-caller tests must be separate processes): this file is its
own client program, standard library only, so a parent passes its source to C{python -c}
(L{scriptArgv}) and runs it as any user, whatever that user may read. Its commands:

    - C{pipeline PATH REQUEST...}: all requests in one write, prints the answers' status lines.
    - C{sweep} (JSON on stdin: sockets, requests, timeout): each request on a fresh connection to
      each socket, 16 at a time; prints a JSON table of status codes (or what went wrong).
    - C{keepalive PATH}: one keep-alive connection; a request per stdin line (JSON
      C{[method, target, body]}), a JSON answer per stdout line.
    - C{half-closed PATH COUNT}: COUNT pipelined requests, then EOF; prints C{sent}, waits for a
      stdin line while reading nothing, then reads and parses every answer.
    - C{connect-probe PATH AUTHORITY} (JSON list of Proxy-Authorization lists on stdin): one HTTP
      CONNECT per list; prints the status lines.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

LOCALAPI_HOST = "local-tailscaled.sock"
"""The Host header tailscale's own clients send to the LocalAPI."""

DEFAULT_TIMEOUT = 10.0

_STATUS_LINE = re.compile(rb"HTTP/1\.1 \d{3} [^\r]*")


@dataclass(frozen=True)
class Response:
    """One parsed HTTP response."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header C{name} (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def buildRequest(
    method: str,
    target: str,
    body: bytes | str = b"",
    headers: Sequence[tuple[str, str]] = (),
    close: bool = True,
    host: str = LOCALAPI_HOST,
) -> bytes:
    """
    An HTTP/1.1 request, byte for byte: C{Host}, then C{headers}, C{Content-Length} when there
    is a body or the method is not GET, HEAD or CONNECT, and C{Connection: close} if C{close}.
    """
    data = body.encode() if isinstance(body, str) else body
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    if data or method not in ("GET", "HEAD", "CONNECT"):
        head += f"Content-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + data


def readResponse(sock: socket.socket, method: str = "GET") -> Response:
    """Read one response from C{sock} (which stays usable for the next one, unless it closed)."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return Response(response.status, response.reason, tuple(response.getheaders()), body)


def parseResponses(data: bytes, count: int, method: str = "GET") -> list[Response]:
    """Up to C{count} consecutive responses from C{data}; raises if one is cut short or malformed."""

    class Unclosable(io.BufferedReader):
        def close(self) -> None:
            """HTTPResponse closes its stream after each body: keep it for the next one."""

    stream = Unclosable(io.BytesIO(data))

    class OneStream:
        """What HTTPResponse reads from: the same buffered stream for each response in turn."""

        def makefile(self, mode: str) -> io.BufferedReader:
            return stream

    responses: list[Response] = []
    while len(responses) < count:
        response = http.client.HTTPResponse(OneStream(), method=method)  # type: ignore[arg-type]
        response.begin()
        body = response.read()
        responses.append(Response(response.status, response.reason, tuple(response.getheaders()), body))
    return responses


def connect(path: str, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A connected Unix stream socket with a timeout on every operation."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def request(
    path: str,
    target: str,
    method: str = "GET",
    body: bytes | str = b"",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """
    One request on a fresh connection to the Unix socket C{path}, with C{Connection: close}.
    Raises C{OSError} (the socket) or C{http.client.HTTPException} (the answer) when it fails.
    """
    with connect(path, timeout) as sock:
        sock.sendall(buildRequest(method, target, body, headers))
        return readResponse(sock, method)


def recvAll(sock: socket.socket) -> bytes:
    """Everything until the peer closes."""
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(path: str, data: bytes, timeout: float = DEFAULT_TIMEOUT, shutdown: bool = False) -> bytes:
    """
    Send C{data} in one write (then EOF if C{shutdown}), and return all the server sent until it
    closed; the request must make it close (C{Connection: close}, a HEAD, an error).
    """
    with connect(path, timeout) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        return recvAll(sock)


def statusLines(data: bytes) -> list[str]:
    """The status lines in C{data}, wherever they start (a JSON body may end right before the next)."""
    return [line.decode() for line in _STATUS_LINE.findall(data)]


def firstLine(path: str, data: bytes, timeout: float) -> tuple[bytes, str | None]:
    """
    Send C{data} on a fresh connection and read up to the first CRLF, for at most C{timeout}
    seconds in all: (the bytes before it, or all that came; what cut it short, or None). What cut
    it short is C{"timeout"} or an exception's name, e.g. C{"PermissionError"} for the connect.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    received = b""
    error = None
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while b"\r\n" not in received:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        error = "timeout"
    except OSError as e:
        error = type(e).__name__
    finally:
        sock.close()
    return received.split(b"\r\n", 1)[0], error


def statusCode(path: str, method: str, target: str, timeout: float) -> int | str:
    """The status code of one request (C{Connection: close}), or what went wrong instead."""
    line, error = firstLine(path, buildRequest(method, target), timeout)
    if error is not None and not line:
        return error
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[0].startswith(b"HTTP/") and fields[1].isdigit():
        return int(fields[1])
    return "no status line: " + repr(line[:60])


# --- the client program, for another uid -------------------------------------------------------


def scriptArgv(command: str, *args: str) -> list[str]:
    """C{["-c", SOURCE, command, *args]}: put a Python interpreter (and setpriv) in front."""
    with open(__file__, encoding="utf-8") as source:
        return ["-c", source.read(), command, *args]


def _pipeline(path: str, *requests: str) -> None:
    with connect(path, 15) as sock:
        sock.sendall("".join(requests).encode())
        data = recvAll(sock)
    for line in statusLines(data):
        print(line)


def _sweep() -> None:
    spec = json.load(sys.stdin)
    timeout = spec["timeout"]
    with ThreadPoolExecutor(16) as pool:
        futures = [
            [pool.submit(statusCode, path, method, target, timeout) for path in spec["sockets"]]
            for method, target in spec["requests"]
        ]
        json.dump([[future.result() for future in row] for row in futures], sys.stdout)


def _keepalive(path: str) -> None:
    with connect(path, 20) as sock:
        for line in sys.stdin:
            method, target, body = json.loads(line)
            headers = [("Content-Type", "application/json")] if body or method not in ("GET", "HEAD") else []
            answer: dict[str, Any]
            try:
                sock.sendall(buildRequest(method, target, body, headers, close=False))
                response = readResponse(sock, method)
                answer = {"status": response.status, "body": response.text[:500]}
            except Exception as e:
                answer = {"error": repr(e)}
            print(json.dumps(answer), flush=True)


def _halfClosed(path: str, count: str) -> None:
    total = int(count)
    requests = [buildRequest("GET", "/localapi/v0/status", close=index == total - 1) for index in range(total)]
    with connect(path, 30) as sock:
        sock.sendall(b"".join(requests))
        sock.shutdown(socket.SHUT_WR)
        print("sent", flush=True)
        sys.stdin.readline()
        data = recvAll(sock)
    statuses: list[int | str] = []
    try:
        for response in parseResponses(data, total):
            json.loads(response.body)
            statuses.append(response.status)
    except Exception as e:
        statuses.append(repr(e))
    print(json.dumps({"statuses": statuses, "bytes": len(data)}), flush=True)


def _connectProbe(path: str, authority: str) -> None:
    lines = []
    for values in json.loads(sys.stdin.read()):
        headers = [("Proxy-Authorization", value) for value in values]
        data = buildRequest("CONNECT", authority, headers=headers, close=False, host=authority)
        line, error = firstLine(path, data, 10)
        if error is not None:
            line += f"|{error}".encode()
        lines.append(line.decode("latin-1"))
    print(json.dumps(lines))


_COMMANDS: dict[str, Any] = {
    "pipeline": _pipeline,
    "sweep": _sweep,
    "keepalive": _keepalive,
    "half-closed": _halfClosed,
    "connect-probe": _connectProbe,
}


# --- curl --------------------------------------------------------------------------------------


def curl(*args: str, timeout: float = 30, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    """
    The real curl (C{-sS --max-time 20}), output captured; C{prefix} goes before it, e.g.
    L{tests._otheruser.setpriv} to run it as another uid.
    """
    argv = [*prefix, "curl", "-sS", "--max-time", "20", *args]
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def socksCurl(socketPath: str, url: str, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    """curl to C{url} through the SOCKS5 server on the Unix socket C{socketPath} (names unresolved)."""
    return curl("-x", f"socks5h://localhost{socketPath}", *args, url, prefix=prefix)


def curlStatus(
    socketPath: str, method: str, target: str, body: str = "", prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """curl's request to the LocalAPI-style server on C{socketPath}: stdout is just the status code."""
    args = ["-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--unix-socket", socketPath]
    if body:
        args += ["-H", "Content-Type: application/json", "--data", body]
    return curl(*args, f"http://{LOCALAPI_HOST}{target}", prefix=prefix)


if __name__ == "__main__":
    _COMMANDS[sys.argv[1]](*sys.argv[2:])
