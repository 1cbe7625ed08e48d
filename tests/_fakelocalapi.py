"""
A fake tailscaled LocalAPI on a Unix socket, in the test process, for tests that need tailscaled's
status (the tailnet view tsmux's rules read) but no real tailscaled.

It answers C{GET /localapi/v0/status} with L{FakeLocalAPI.status}, a JSON object the test may change
at any time (L{FakeLocalAPI.setStatus}), and C{404} to everything else; it records every request it
got (L{FakeLocalAPI.requests}). Threads and the standard library only, so it answers while a
synchronous test blocks, with no reactor running. Each answer closes its connection (C{Connection: close}).
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import socketserver
import threading
from dataclasses import dataclass
from typing import Any

STATUS_PATH = "/localapi/v0/status"


@dataclass(frozen=True)
class SeenRequest:
    """One request the fake received: method, target and headers (names lowercased)."""

    method: str
    target: str
    headers: dict[str, str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # with Connection: close on every answer
    server_version = "fake-tailscaled"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet (and the Unix socket has no client address to log)."""

    def _handle(self) -> None:
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.rfile.read(int(length))  # read it: closing on unread bytes would reset the connection
        fake = self.server.fake
        fake._seen(SeenRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.command == "GET" and self.path == STATUS_PATH:
            self._send(200, "application/json", json.dumps(fake.status).encode())
            fake._answeredStatus()
        else:
            self._send(404, "text/plain; charset=utf-8", b"404 page not found\n")

    def _send(self, status: int, contentType: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", contentType)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, fake: FakeLocalAPI) -> None:
        self.fake = fake
        super().__init__(path, _Handler)


class FakeLocalAPI:
    """
    The fake on C{path} (mode 0666, so tsmux acting as any caller may connect). L{start} listens,
    L{stop} stops and removes the socket.
    """

    def __init__(self, path: str, status: dict[str, Any]) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._status = copy.deepcopy(status)
        self._requests: list[SeenRequest] = []
        self._statusAnswers = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._status)

    def setStatus(self, status: dict[str, Any]) -> None:
        with self._lock:
            self._status = copy.deepcopy(status)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def statusAnswers(self) -> int:
        """How many status answers were sent whole."""
        with self._lock:
            return self._statusAnswers

    def _seen(self, request: SeenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _answeredStatus(self) -> None:
        with self._lock:
            self._statusAnswers += 1

    def start(self) -> None:
        server = self._server = _Server(self.path, self)
        os.chmod(self.path, 0o666)
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
