"""
The benchmark's load generator. It runs INSIDE the private network namespace (the orchestrator starts
it with nsenter, one process per measurement), so it reaches tailscaled's TCP SOCKS5 port and the
loopback targets there, and the Unix sockets through the shared filesystem. It prints one JSON line.

How a connection is opened is the same for every workload (C{--proto}, C{--connect}):
    - C{socks}: SOCKS5 to C{--connect} (C{unix:/path} or C{tcp:HOST:PORT}), no auth, CONNECT to the
      target by IPv4 address; the client waits for each answer, as curl does.
    - C{tsdial}: C{POST /localapi/v0/dial} with C{Upgrade: ts-dial} to the LocalAPI socket
      C{--connect}, then raw bytes (what C{tailscale nc} does; contender (d)).
    - C{direct}: plain TCP to the target (contender (f), the floor).

Workloads (subcommands):
    - C{bulk}: one connection; download or upload C{--size} bytes in 1 MiB reads/writes; the clock
      runs from the request to the last byte (download) or to the server's count (upload).
    - C{rate}: C{--count} connections, C{--concurrency} at a time, each: connect, handshake, 16-byte
      echo, close; a single-threaded epoll loop over non-blocking sockets, the leanest Python gets.
      Latency is per connection, from C{socket()} to the echo's last byte.
    - C{held}: warm up, read the RSS of C{--pids}, open C{--count} connections (C{--concurrency} at a
      time) and keep them, one echo on each, read the RSS again, close them all, read it once more.
    - C{http}: C{--count} C{GET}s of C{--path} on one keep-alive connection to a Unix socket. Given
      C{--connect} more than once, one keep-alive connection to each, the requests taking turns (one on
      each, in an order that rotates), so that every path is measured under the same background load:
      the difference between two paths' latencies is then far steadier than from separate runs.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import resource
import selectors
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

CHUNK = 1024 * 1024
PAYLOAD = b"0123456789abcdef"
HEADER = struct.Struct("!cQ")
LOCALAPI_HOST = "local-tailscaled.sock"


class BenchError(Exception):
    """A protocol step failed: wrong answer, early EOF."""


# --- addresses and handshakes on blocking sockets (bulk, http) --------------------------------


def parseAddress(text: str) -> tuple[int, Any]:
    """C{unix:/path} or C{tcp:HOST:PORT} -> (family, sockaddr)."""
    kind, _, rest = text.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    raise ValueError(f"not an address: {text!r}")


def socksGreeting() -> bytes:
    return b"\x05\x01\x00"


def socksRequest(target: tuple[str, int]) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1])


def tsdialRequest(target: tuple[str, int]) -> bytes:
    return (
        "POST /localapi/v0/dial HTTP/1.1\r\n"
        f"Host: {LOCALAPI_HOST}\r\n"
        "Connection: upgrade\r\n"
        "Upgrade: ts-dial\r\n"
        f"Dial-Host: {target[0]}\r\n"
        f"Dial-Port: {target[1]}\r\n"
        "Dial-Network: tcp\r\n"
        "\r\n"
    ).encode()


def socksReplyLength(head: bytes) -> int | None:
    """How long the SOCKS5 reply starting with C{head} is, or None while unknown (need 5 bytes)."""
    if len(head) < 5:
        return None
    atyp = head[3]
    if atyp == 1:
        return 10
    if atyp == 4:
        return 22
    if atyp == 3:
        return 7 + head[4]
    raise BenchError(f"bad SOCKS5 reply {head!r}")


def _recvExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def openStream(proto: str, connect: str | None, target: tuple[str, int]) -> socket.socket:
    """A blocking socket, connected through C{proto} to C{target}, handshake done."""
    if proto == "direct":
        sock = socket.create_connection(target)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert connect is not None
    family, address = parseAddress(connect)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proto == "socks":
            sock.sendall(socksGreeting())
            if _recvExactly(sock, 2) != b"\x05\x00":
                raise BenchError("SOCKS5 method refused")
            sock.sendall(socksRequest(target))
            head = _recvExactly(sock, 5)
            length = socksReplyLength(head)
            assert length is not None
            reply = head + _recvExactly(sock, length - 5)
            if reply[1] != 0:
                raise BenchError(f"SOCKS5 CONNECT failed: reply {reply[1]}")
        elif proto == "tsdial":
            sock.sendall(tsdialRequest(target))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError(f"EOF in the ts-dial answer: {head!r}")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise BenchError(f"ts-dial refused: {head[:200]!r}")
            if not head.endswith(b"\r\n\r\n"):
                raise BenchError("bytes after the 101 answer")  # the target never speaks first
        else:
            raise ValueError(f"unknown proto {proto!r}")
    except BaseException:
        sock.close()
        raise
    return sock


# --- bulk ---------------------------------------------------------------------------------------


def bulk(proto: str, connect: str | None, target: tuple[str, int], direction: str, size: int) -> dict[str, Any]:
    sock = openStream(proto, connect, target)
    cpu0 = os.times()
    try:
        if direction == "down":
            buffer = bytearray(CHUNK)
            start = time.perf_counter()
            sock.sendall(HEADER.pack(b"D", size))
            left = size
            while left > 0:
                n = sock.recv_into(buffer, CHUNK)
                if n == 0:
                    raise BenchError(f"EOF with {left} bytes to come")
                left -= n
            seconds = time.perf_counter() - start
            if left != 0:
                raise BenchError(f"{-left} bytes too many")
        else:
            view = memoryview(bytes(CHUNK))
            start = time.perf_counter()
            sock.sendall(HEADER.pack(b"U", size))
            left = size
            while left >= CHUNK:
                sock.sendall(view)
                left -= CHUNK
            if left:
                sock.sendall(view[:left])
            answer = _recvExactly(sock, 10)
            seconds = time.perf_counter() - start
            if answer != b"OK" + struct.pack("!Q", size):
                raise BenchError(f"upload answer {answer!r}")
    finally:
        sock.close()
    cpu1 = os.times()
    return {
        "bytes": size,
        "seconds": seconds,
        "mib_s": size / CHUNK / seconds,
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


# --- many connections: a small epoll state machine ------------------------------------------------

# A step: ("send", bytes) | ("recv", n, expected or None) | ("socksreply",) | ("httphead",)
Step = tuple[Any, ...]


def handshakeSteps(proto: str, target: tuple[str, int]) -> list[Step]:
    if proto == "socks":
        return [
            ("send", socksGreeting()),
            ("recv", 2, b"\x05\x00"),
            ("send", socksRequest(target)),
            ("socksreply",),
        ]
    if proto == "tsdial":
        return [("send", tsdialRequest(target)), ("httphead",)]
    if proto == "direct":
        return []
    raise ValueError(f"unknown proto {proto!r}")


ECHO_STEPS: list[Step] = [("send", PAYLOAD), ("recv", len(PAYLOAD), PAYLOAD)]


class Conn:
    __slots__ = ("sock", "steps", "index", "buffer", "start", "end", "error", "registered", "retries")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.steps: list[Step] = []
        self.index = 0
        self.buffer = b""
        self.start = 0.0
        self.end = 0.0
        self.error: str | None = None
        self.registered = False
        self.retries = 0


class Engine:
    """
    Runs step lists on non-blocking sockets with one epoll loop. A Unix connect that finds the
    accept queue full (EAGAIN) is retried after 1 ms, counted in C{retries}.
    """

    def __init__(self, family: int, address: Any, timeout: float) -> None:
        self.family = family
        self.address = address
        self.timeout = timeout
        self.selector = selectors.EpollSelector()
        self.timers: list[tuple[float, int, Conn]] = []
        self._seq = 0
        self._pendingDone: dict[int, Callable[[Conn], None]] = {}
        self.retries = 0

    def connect(self, conn: Conn, steps: list[Step], done: Callable[[Conn], None]) -> None:
        conn.steps = steps
        conn.index = 0
        conn.buffer = b""
        conn.start = time.perf_counter()
        self._connect(conn, done)

    def _connect(self, conn: Conn, done: Callable[[Conn], None]) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn.sock = sock
        code = sock.connect_ex(self.address)
        if code == 0:
            if self.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(sock, selectors.EVENT_READ, (conn, done))
            conn.registered = True
            self._advance(conn, done)
        elif code == errno.EINPROGRESS:
            self.selector.register(sock, selectors.EVENT_WRITE, (conn, done))
            conn.registered = True
        elif code == errno.EAGAIN and self.family == socket.AF_UNIX:
            sock.close()
            conn.sock = None
            conn.retries += 1
            self.retries += 1
            self._seq += 1
            heapq.heappush(self.timers, (time.perf_counter() + 0.001, self._seq, conn))
            self._pendingDone[id(conn)] = done
        else:
            sock.close()
            conn.sock = None
            conn.error = f"connect: {os.strerror(code)}"
            done(conn)

    def resume(self, conn: Conn, steps: list[Step], done: Callable[[Conn], None]) -> None:
        """Run more steps on an open connection (registered for reading)."""
        conn.steps = steps
        conn.index = 0
        conn.start = time.perf_counter()
        assert conn.sock is not None
        self.selector.modify(conn.sock, selectors.EVENT_READ, (conn, done))
        self._advance(conn, done)

    def _fail(self, conn: Conn, done: Callable[[Conn], None], message: str) -> None:
        conn.error = message
        self.close(conn)
        done(conn)

    def close(self, conn: Conn) -> None:
        if conn.sock is not None:
            if conn.registered:
                self.selector.unregister(conn.sock)
                conn.registered = False
            conn.sock.close()
            conn.sock = None

    def _advance(self, conn: Conn, done: Callable[[Conn], None]) -> None:
        """Run steps until one needs to wait for bytes; call C{done} after the last."""
        sock = conn.sock
        assert sock is not None
        steps = conn.steps
        while conn.index < len(steps):
            step = steps[conn.index]
            kind = step[0]
            if kind == "send":
                try:
                    sent = sock.send(step[1])
                except OSError as e:
                    return self._fail(conn, done, f"send: {e}")
                if sent != len(step[1]):
                    return self._fail(conn, done, "short send")
                conn.index += 1
                continue
            buffer = conn.buffer
            if kind == "recv":
                need = step[1]
                if len(buffer) < need:
                    return
                if step[2] is not None and buffer[:need] != step[2]:
                    return self._fail(conn, done, f"unexpected answer {buffer[:need]!r}")
                conn.buffer = buffer[need:]
            elif kind == "socksreply":
                try:
                    need = socksReplyLength(buffer)
                except BenchError as e:
                    return self._fail(conn, done, str(e))
                if need is None or len(buffer) < need:
                    return
                if buffer[1] != 0:
                    return self._fail(conn, done, f"SOCKS5 reply {buffer[1]}")
                conn.buffer = buffer[need:]
            elif kind == "httphead":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                if not buffer.startswith(b"HTTP/1.1 101"):
                    return self._fail(conn, done, f"ts-dial answer {buffer[:80]!r}")
                conn.buffer = buffer[end + 4 :]
            conn.index += 1
        conn.end = time.perf_counter()
        done(conn)

    def run(self, finished: Callable[[], bool], refill: Callable[[], None]) -> None:
        """
        Dispatch events until C{finished()} or the timeout. C{refill()} runs before each wait and
        starts new work (never from inside a completion, so failures cannot recurse).
        """
        deadline = time.perf_counter() + self.timeout
        select = self.selector.select
        while True:
            refill()
            if finished():
                return
            now = time.perf_counter()
            if now > deadline:
                raise BenchError(f"workload did not finish within {self.timeout:g} s")
            wait = 0.5
            timers = self.timers
            while timers and timers[0][0] <= now:
                _, _, conn = heapq.heappop(timers)
                self._connect(conn, self._pendingDone.pop(id(conn)))
            if timers:
                wait = max(0.0, min(wait, timers[0][0] - now))
            for key, mask in select(wait):
                conn, done = key.data
                sock = conn.sock
                if mask & selectors.EVENT_WRITE:  # only while a TCP connect is in progress
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        self._fail(conn, done, f"connect: {os.strerror(code)}")
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.selector.modify(sock, selectors.EVENT_READ, key.data)
                    self._advance(conn, done)
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._fail(conn, done, f"recv: {e}")
                    continue
                if not data:
                    self._fail(conn, done, f"EOF at step {conn.index}")
                    continue
                conn.buffer += data
                self._advance(conn, done)


def _stats(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] * 1000

    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def _engineFor(proto: str, connect: str | None, target: tuple[str, int], timeout: float) -> Engine:
    if proto == "direct":
        engine = Engine(socket.AF_INET, target, timeout)
    else:
        assert connect is not None
        family, address = parseAddress(connect)
        engine = Engine(family, address, timeout)
    return engine


def rate(
    proto: str, connect: str | None, target: tuple[str, int], count: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    engine = _engineFor(proto, connect, target, timeout)
    steps = handshakeSteps(proto, target) + ECHO_STEPS
    latencies: list[float] = []
    errors: list[str] = []
    state = {"started": 0, "finished": 0}

    def done(conn: Conn) -> None:
        state["finished"] += 1
        if conn.error is None:
            latencies.append(conn.end - conn.start)
        else:
            errors.append(conn.error)
        engine.close(conn)

    def refill() -> None:
        while state["started"] < count and state["started"] - state["finished"] < concurrency:
            state["started"] += 1
            engine.connect(Conn(), steps, done)

    cpu0 = os.times()
    start = time.perf_counter()
    engine.run(lambda: state["finished"] >= count, refill)
    seconds = time.perf_counter() - start
    cpu1 = os.times()
    result: dict[str, Any] = {
        "count": count,
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "connect_retries": engine.retries,
        "seconds": seconds,
        "conn_s": len(latencies) / seconds,
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }
    result.update(_stats(latencies))
    return result


def readRSS(pid: int) -> int | None:
    """VmRSS of C{pid} in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def held(
    proto: str,
    connect: str | None,
    target: tuple[str, int],
    count: int,
    concurrency: int,
    warmup: int,
    pids: list[int],
    settle: float,
    timeout: float,
) -> dict[str, Any]:
    engine = _engineFor(proto, connect, target, timeout)
    handshake = handshakeSteps(proto, target)

    def rss() -> dict[str, int | None]:
        return {str(pid): readRSS(pid) for pid in pids}

    # Warm-up: connections opened, echoed and closed, so first-use costs are not counted.
    if warmup:
        rate(proto, connect, target, warmup, min(concurrency, warmup), timeout)
    time.sleep(settle)
    before = rss()

    opened: list[Conn] = []
    errors: list[str] = []
    state = {"started": 0, "finished": 0}

    def openedOne(conn: Conn) -> None:
        state["finished"] += 1
        if conn.error is None:
            opened.append(conn)
        else:
            errors.append(conn.error)

    def refillOpen() -> None:
        while state["started"] < count and state["started"] - state["finished"] < concurrency:
            state["started"] += 1
            engine.connect(Conn(), handshake, openedOne)

    start = time.perf_counter()
    engine.run(lambda: state["finished"] >= count, refillOpen)
    openSeconds = time.perf_counter() - start

    # One echo on each held connection, concurrency at a time.
    pending = list(opened)
    echoed: list[Conn] = []
    echoErrors: list[str] = []
    echo = {"running": 0}

    def echoedOne(conn: Conn) -> None:
        echo["running"] -= 1
        if conn.error is None:
            echoed.append(conn)
        else:
            echoErrors.append(conn.error)

    def refillEcho() -> None:
        while pending and echo["running"] < concurrency:
            echo["running"] += 1
            engine.resume(pending.pop(), ECHO_STEPS, echoedOne)

    engine.run(lambda: not pending and echo["running"] == 0, refillEcho)
    errors.extend(echoErrors)
    time.sleep(settle)
    whileHeld = rss()
    for conn in opened:
        engine.close(conn)
    time.sleep(max(settle, 1.0))
    after = rss()
    return {
        "count": count,
        "held": len(echoed),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "connect_retries": engine.retries,
        "open_seconds": openSeconds,
        "rss_before_kib": before,
        "rss_held_kib": whileHeld,
        "rss_after_close_kib": after,
    }


# --- HTTP keep-alive ------------------------------------------------------------------------------


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(CHUNK)
        if not chunk:
            raise BenchError("EOF in an HTTP response")
        self.buffer += chunk

    def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                return line
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def readResponse(reader: _Reader) -> tuple[int, int]:
    """Read one HTTP/1.1 response; return (status, body length)."""
    status = int(reader.line().split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = reader.line()
        if not line:
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        return status, len(reader.exactly(int(headers[b"content-length"])))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        length = 0
        while True:
            size = int(reader.line().split(b";")[0], 16)
            if size == 0:
                while reader.line():
                    pass
                return status, length
            length += len(reader.exactly(size))
            reader.exactly(2)
    raise BenchError(f"response without framing: {headers!r}")


def httpInterleaved(connects: list[str], path: str, count: int) -> dict[str, Any]:
    """C{count} requests on each of C{connects}, taking turns; one result per address under C{paths}."""
    socks: list[socket.socket] = []
    try:
        for connect in connects:
            family, address = parseAddress(connect)
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.connect(address)
        request = f"GET {path} HTTP/1.1\r\nHost: {LOCALAPI_HOST}\r\n\r\n".encode()
        readers = [_Reader(sock) for sock in socks]
        latencies: list[list[float]] = [[] for _ in connects]
        bodies = [0] * len(connects)
        n = len(connects)
        start = time.perf_counter()
        for i in range(count):
            for j in range(n):
                k = (i + j) % n
                t0 = time.perf_counter()
                socks[k].sendall(request)
                status, bodies[k] = readResponse(readers[k])
                latencies[k].append(time.perf_counter() - t0)
                if status != 200:
                    raise BenchError(f"{path} via {connects[k]} answered {status}")
        seconds = time.perf_counter() - start
    finally:
        for sock in socks:
            sock.close()
    paths: dict[str, Any] = {}
    for k, connect in enumerate(connects):
        spent = sum(latencies[k])
        entry: dict[str, Any] = {"count": count, "seconds": spent, "req_s": count / spent, "body_bytes": bodies[k]}
        entry.update(_stats(latencies[k]))
        paths[connect] = entry
    return {"count": count, "seconds": seconds, "interleaved": True, "paths": paths}


def http(connect: str, path: str, count: int) -> dict[str, Any]:
    family, address = parseAddress(connect)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    request = f"GET {path} HTTP/1.1\r\nHost: {LOCALAPI_HOST}\r\n\r\n".encode()
    reader = _Reader(sock)
    latencies: list[float] = []
    bodyLength = 0
    cpu0 = os.times()
    start = time.perf_counter()
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(request)
            status, bodyLength = readResponse(reader)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise BenchError(f"{path} answered {status}")
    finally:
        sock.close()
    seconds = time.perf_counter() - start
    cpu1 = os.times()
    result: dict[str, Any] = {
        "count": count,
        "seconds": seconds,
        "req_s": count / seconds,
        "body_bytes": bodyLength,
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }
    result.update(_stats(latencies))
    return result


# --- command line -----------------------------------------------------------------------------------


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench._load")
    sub = parser.add_subparsers(dest="workload", required=True)
    for name in ("bulk", "rate", "held"):
        p = sub.add_parser(name)
        p.add_argument("--proto", choices=("socks", "tsdial", "direct"), required=True)
        p.add_argument("--connect", help="unix:/path or tcp:HOST:PORT (not for --proto direct)")
        p.add_argument("--target", type=_target, required=True, help="HOST:PORT inside the namespace")
        p.add_argument("--timeout", type=float, default=300.0)
        if name == "bulk":
            p.add_argument("--direction", choices=("down", "up"), required=True)
            p.add_argument("--size", type=int, required=True)
        else:
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--concurrency", type=int, default=50)
        if name == "held":
            p.add_argument("--warmup", type=int, default=100)
            p.add_argument("--pids", default="", help="comma-separated pids whose RSS to read")
            p.add_argument("--settle", type=float, default=0.5)
    p = sub.add_parser("http")
    p.add_argument("--connect", required=True, action="append", help="unix:/path; repeat to interleave paths")
    p.add_argument("--path", default="/localapi/v0/status")
    p.add_argument("--count", type=int, required=True)
    options = parser.parse_args(argv)

    # Thousands of held connections need thousands of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    try:
        if options.workload == "bulk":
            result = bulk(options.proto, options.connect, options.target, options.direction, options.size)
        elif options.workload == "rate":
            result = rate(
                options.proto, options.connect, options.target, options.count, options.concurrency, options.timeout
            )
        elif options.workload == "held":
            pids = [int(p) for p in options.pids.split(",") if p]
            result = held(
                options.proto,
                options.connect,
                options.target,
                options.count,
                options.concurrency,
                options.warmup,
                pids,
                options.settle,
                options.timeout,
            )
        elif len(options.connect) == 1:
            result = http(options.connect[0], options.path, options.count)
        else:
            result = httpInterleaved(options.connect, options.path, options.count)
    except (OSError, BenchError) as e:
        sys.stdout.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
