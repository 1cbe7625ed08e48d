"""
Helper process for the integration tests: a real tailscaled plus loopback targets, all inside a
private network namespace that the caller created.

Run it as::

    unshare -n -- python -m tests._netns_tailnet --tailscaled PATH --dir DIR [--socket PATH]

It refuses to start tailscaled unless its network namespace holds nothing but loopback, so no
traffic can leave the machine. What it says and hears is defined in L{tests._tailnet_shared}:
once ready it prints one L{Ready} line on stdout (or L{StartFailed} and exits with status 1),
then obeys one L{Command} per stdin line (stop, start, kill tailscaled), each answered with one
L{CommandReply} line.

On stdin EOF (the test process went away, or closed the pipe), SIGTERM or SIGINT it stops
tailscaled and the servers and exits 0. tailscaled also gets PR_SET_PDEATHSIG=SIGKILL, so it
never outlives this process.

Targets, on 127.0.0.1 inside the namespace (reachable only through tailscaled or nsenter):
    - httpPort: C{GET /} -> C{hello from the tailnet\\n}; C{GET /big?n=N} -> N bytes of the
      pattern C{bytes(range(256))} repeated, so a receiver can check content as well as length.
    - echoPort: echoes bytes; on the client's EOF it shuts down its write side once everything
      was echoed, so a half-close that passes through a relay is observable.
    - closedPort: nothing listens there: connection refused.
"""

from __future__ import annotations

import ctypes
import http.server
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests._tailnet_shared import (
    HELLO_BODY,
    PATTERN_BLOCK,
    ChildOptions,
    Command,
    CommandReply,
    Message,
    Ready,
    StartFailed,
    patternBytes,
)
from tests._waiting import WaitTimeout, waitUntil

__all__ = ["HELLO_BODY", "main", "patternBytes"]

READY_TIMEOUT = 20.0
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1


class _TargetHTTPHandler(http.server.BaseHTTPRequestHandler):
    """
    The HTTP target: a fixed greeting and a sized stream, keep-alive capable.
    """

    protocol_version = "HTTP/1.1"
    server_version = "tsmux-test-target"

    def log_message(self, format: str, *args: Any) -> None:
        """
        Stay quiet: stderr of this helper is a log file nobody needs flooded.
        """

    def do_GET(self) -> None:
        """
        Serve C{/} and C{/big?n=BYTES}; anything else is 404.
        """
        url = urlsplit(self.path)
        if url.path == "/":
            self._send(200, HELLO_BODY)
        elif url.path == "/big":
            try:
                n = int(parse_qs(url.query).get("n", ["0"])[0])
                if n < 0:
                    raise ValueError(n)
            except ValueError:
                self._send(400, b"bad n\n")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            while sent < n:
                chunk = min(len(PATTERN_BLOCK), n - sent)
                self.wfile.write(PATTERN_BLOCK[:chunk])
                sent += chunk
        else:
            self._send(404, b"not found\n")

    def _send(self, status: int, body: bytes) -> None:
        """
        A complete response with Content-Length, so the connection can be reused.
        """
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _EchoHandler(socketserver.BaseRequestHandler):
    """
    Pure echo; the client's EOF is answered with our own EOF after the last echoed byte.
    """

    def handle(self) -> None:
        """
        Copy until EOF, then shut down the write side (half-close), then close.
        """
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    break
                sock.sendall(data)
        except OSError:
            pass


class _ThreadingHTTPServer(http.server.ThreadingHTTPServer):
    """
    Daemon threads, so a hung client cannot keep the helper alive at exit.
    """

    daemon_threads = True
    block_on_close = False


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    """
    Daemon threads, so a hung client cannot keep the helper alive at exit.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


def _freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on now. The namespace is private, so nothing
    else will grab it before we use it (or deliberately leave it closed).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensurePrivateNamespace() -> None:
    """
    Refuse to go on unless this network namespace is not our parent's and has only loopback:
    tailscaled must never see a route off this machine.
    """
    try:
        mine = os.readlink("/proc/self/ns/net")
        parents = os.readlink(f"/proc/{os.getppid()}/ns/net")
    except OSError:
        pass
    else:
        if mine == parents:
            raise SystemExit("refusing to run: not in a private network namespace (run under `unshare -n --`)")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line]
    if names != ["lo"]:
        raise SystemExit(f"refusing to run: network namespace has interfaces {names!r}, expected only lo")


def _makePdeathsig() -> Callable[[], None]:
    """
    A preexec_fn that sets PR_SET_PDEATHSIG=SIGKILL in the child. libc is loaded here, in the
    parent, so the child runs no imports or allocations between fork and exec (we have threads).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    signum = int(signal.SIGKILL)
    parent = os.getpid()

    def preexec() -> None:
        """
        Runs in the child between fork and exec.
        """
        # If the parent died before prctl took effect, no signal will ever come: give up.
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)

    return preexec


class _Tailscaled:
    """
    One tailscaled, restartable with the same arguments and state directory.

    PR_SET_PDEATHSIG fires when the *thread* that forked dies, so only the main thread may call
    start().
    """

    def __init__(self, binary: str, directory: str, socketPath: str, socks5Port: int) -> None:
        self.socketPath = socketPath
        self.socks5Port = socks5Port
        self.logPath = os.path.join(directory, "tailscaled.log")
        self.argv = [
            binary,
            "--tun=userspace-networking",
            f"--socket={self.socketPath}",
            f"--statedir={os.path.join(directory, 'state')}",
            "--port=0",
            "--no-logs-no-support",
            f"--socks5-server=127.0.0.1:{socks5Port}",
        ]
        # Without TS_LOGS_DIR, tailscaled's logpolicy writes tailscaled.log.conf (its LogID) to
        # /var/lib/tailscale on the host filesystem even with --no-logs-no-support.
        self.logsDir = os.path.join(directory, "logs")
        self.env = dict(os.environ, TS_LOGS_DIR=self.logsDir)
        self.process: subprocess.Popen[bytes] | None = None
        self._preexec = _makePdeathsig()

    def start(self) -> int:
        """
        Start tailscaled and wait until its LocalAPI socket accepts; return its pid.
        """
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        os.makedirs(self.logsDir, exist_ok=True)
        with open(self.logPath, "ab") as log:
            log.write(f"--- tsmux test helper: starting {self.argv!r}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=self._preexec,
            )
        self._waitReady()
        return self.process.pid

    def _accepts(self) -> bool:
        """
        Whether both the LocalAPI socket and the SOCKS5 port accept. A leftover socket file
        from a killed daemon refuses, so success means the new daemon is listening.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socketPath)
            except OSError:
                return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.connect(("127.0.0.1", self.socks5Port))
            except OSError:
                return False
        return True

    def _waitReady(self) -> None:
        """
        Poll until tailscaled accepts, or fail (killing it) if it exits or takes too long.
        """
        process = self.process
        assert process is not None
        try:
            waitUntil(lambda: process.poll() is not None or self._accepts(), READY_TIMEOUT)
        except WaitTimeout:
            self.kill()
            raise RuntimeError(
                f"tailscaled socket {self.socketPath} did not accept within {READY_TIMEOUT:g} s; see {self.logPath}"
            ) from None
        if process.poll() is not None:
            raise RuntimeError(
                f"tailscaled exited with status {process.returncode} before its socket accepted; see {self.logPath}"
            )

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL after a grace period; always reaps.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def kill(self) -> None:
        """
        SIGKILL at once, as a crash would; reaps.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self.process = None


class _Terminate(BaseException):
    """
    Raised from the SIGTERM handler to leave the command loop and clean up; a BaseException so
    that no C{except Exception} on the way swallows it.
    """


def _onSigterm(signum: int, frame: object) -> None:
    """
    Turn SIGTERM into an exception, so the finally clause stops tailscaled.
    """
    raise _Terminate()


def _reply(message: Message) -> None:
    """
    One message on stdout, flushed: the parent reads line by line.
    """
    sys.stdout.buffer.write(message.toJSON())
    sys.stdout.buffer.flush()


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    """
    Run a server's loop in a daemon thread.
    """
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    """
    Set up the namespace, targets and tailscaled, then obey stdin commands until EOF.
    """
    options = ChildOptions.fromArgv(argv)
    directory = os.path.abspath(options.directory)
    socketPath = os.path.abspath(options.socket or os.path.join(directory, "tailscaled.sock"))
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)

    signal.signal(signal.SIGTERM, _onSigterm)
    servers: list[socketserver.BaseServer] = []
    tailscaled: _Tailscaled | None = None
    try:
        try:
            _ensurePrivateNamespace()
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            httpServer = _ThreadingHTTPServer(("127.0.0.1", 0), _TargetHTTPHandler)
            _serve(httpServer)
            servers.append(httpServer)
            echoServer = _ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
            _serve(echoServer)
            servers.append(echoServer)
            closedPort = _freePort()
            socks5Port = _freePort()
            while socks5Port == closedPort:
                socks5Port = _freePort()
            tailscaled = _Tailscaled(options.tailscaled, directory, socketPath, socks5Port)
            pid = tailscaled.start()
        except (Exception, SystemExit) as e:
            _reply(StartFailed(str(e) or repr(e)))
            return 1
        _reply(
            Ready(
                localapi=tailscaled.socketPath,
                httpPort=httpServer.server_address[1],
                echoPort=echoServer.server_address[1],
                closedPort=closedPort,
                socks5Port=socks5Port,
                tailscaledPid=pid,
                log=tailscaled.logPath,
            )
        )
        for line in sys.stdin:
            try:
                command = Command.fromLine(line)
                if command is Command.STOP:
                    tailscaled.stop()
                    _reply(CommandReply(ok=True))
                elif command is Command.START:
                    _reply(CommandReply(ok=True, tailscaledPid=tailscaled.start()))
                elif command is Command.KILL:
                    tailscaled.kill()
                    _reply(CommandReply(ok=True))
            except Exception as e:
                _reply(CommandReply(ok=False, error=str(e) or repr(e)))
    except (_Terminate, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if tailscaled is not None:
            tailscaled.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
