"""
LocalAPI rights are tailscaled's own, per request, and no caller can starve tsmux (issue 9).

Against the real tailscaled 1.96.4 in the harness's private network namespace, with clients
run as other users (uid 65534 ``nobody``; uid 5 ``games`` made tailscaled's operator):

- every LocalAPI endpoint tailscaled 1.96 registers answers a caller through tsmux exactly as it
  answers that caller directly (tsmux connects to tailscaled with the caller's ids);
- tailscaled's finer rules (serving a path, operator revocation) hold through tsmux;
- the caller's ids reach tailscaled even when its socket sits in a directory only root can enter;
- a tsmux without the privilege to switch ids gives other uids no LocalAPI, but still SOCKS5;
- clients that leave a paused connection, fd exhaustion, forged log lines and a password oracle.

Each test starts its own tailnet and tsmux; clients that must be another uid are one Python
process each (``setpriv``), sending raw HTTP/SOCKS5 over Unix sockets.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
from typing import IO

from twisted.trial.unittest import SynchronousTestCase

from ._httpclient import request, scriptArgv, socksCurl
from ._otheruser import NOBODY, NOBODY_IDS, pythonArgv, pythonForNobody, requireOtherUser, runPythonAs, setpriv
from ._realsockets import recvExactly
from ._tailnet import HELLO_BODY, skipOrFail
from ._tsmuxprocess import IntegrationTestMixin, TsmuxProcess, openFds, shortDir, startTsmux
from ._waiting import waitUntil

# ---------------------------------------------------------------------------------------------
# The LocalAPI endpoints tailscaled 1.96.4 registers.
#
# Source: tailscale/tailscale at tag v1.96.4 (the `fetch` mirror of github:tailscale/tailscale),
# every name in the `handler` map of ipn/localapi/localapi.go and every `Register(...)` /
# `localapi.Register(...)` call (`git grep -n 'Register(' v1.96.4 -- '*.go'`), all of them built
# into the 1.96.4 tailscaled the harness runs: its symbol table names every handler function
# (`strings tailscaled | grep 'localapi.(\*Handler).serve'`, plus the feature/* handlers).
# A name ending in "/" is a prefix route; the sweep requests the bare prefix.
# ---------------------------------------------------------------------------------------------
LOCALAPI_ENDPOINTS: tuple[str, ...] = (
    # ipn/localapi/localapi.go, the `handler` map
    "profiles/",
    "check-prefs",
    "check-so-mark-in-use",
    "derpmap",
    "goroutines",
    "login-interactive",
    "logout",
    "ping",
    "prefs",
    "reload-config",
    "reset-auth",
    "set-expiry-sooner",
    "shutdown",
    "start",
    "status",
    "whois",
    # ipn/localapi/localapi.go, init()
    "appc-route-info",
    "check-ip-forwarding",
    "check-udp-gro-forwarding",
    "set-udp-gro-forwarding",
    "upload-client-metrics",
    "update/check",
    "suggest-exit-node",
    "set-use-exit-node-enabled",
    "set-dns",
    "bugreport",
    "pprof",
    "watch-ipn-bus",
    "dns-osconfig",
    "dns-query",
    "usermetrics",
    "query-feature",
    "dial",
    "metrics",
    "disconnect-control",
    "id-token",
    "alpha-set-device-attrs",
    "handle-push-message",
    "set-push-device-token",
    "set-gui-visible",
    "logtap",
    # ipn/localapi/debug.go
    "component-debug-logging",
    "debug",
    "debug-rotate-disco-key",
    "dev-set-state-store",
    "debug-bus-events",
    "debug-bus-graph",
    "debug-bus-queues",
    "debug-derp-region",
    "debug-dial-types",
    "debug-log",
    "debug-packet-filter-matches",
    "debug-packet-filter-rules",
    "debug-peer-endpoint-changes",
    "debug-optional-features",
    # ipn/localapi/cert.go, localapi_drive.go, serve.go, syspolicy_api.go
    "cert/",
    "drive/fileserver-address",
    "drive/shares",
    "serve-config",
    "policy/",
    # ipn/localapi/tailnetlock.go
    "tka/affected-sigs",
    "tka/cosign-recovery-aum",
    "tka/disable",
    "tka/force-local-disable",
    "tka/generate-recovery-aum",
    "tka/init",
    "tka/log",
    "tka/modify",
    "tka/sign",
    "tka/status",
    "tka/submit-recovery-aum",
    "tka/verify-deeplink",
    "tka/wrap-preauth-key",
    # feature/capture, clientupdate, debugportmapper, relayserver, taildrop
    "debug-capture",
    "update/install",
    "update/progress",
    "debug-portmap",
    "debug-peer-relay-sessions",
    "file-put/",
    "files/",
    "file-targets",
)

# Handlers that act on GET and HEAD (they do not check the method before acting), read from
# their 1.96.4 source. Every other handler either only reads, or refuses any method but
# POST/PUT/PATCH/DELETE (405 or 400) before touching anything: e.g. logout, start, shutdown,
# reset-auth, login-interactive, set-*, check-prefs, debug, dev-set-state-store, tka/* (all
# POST-only), profiles/ (GET lists), serve-config (GET reads), file-put/ (PUT/POST only).
# The operator has write rights, so the sweep never sends these to it. uid 65534 gets them:
# each checks PermitWrite before acting, so tailscaled refuses them to it (403); through tsmux
# they would only run if tsmux lent it more rights, which is what the sweep is there to catch
# (and the tailnet is a private throwaway).
ACTS_ON_GET: dict[str, str] = {
    "set-udp-gro-forwarding": "changes the UDP GRO setting of the default-route interface on any method",
    "component-debug-logging": "turns on a component's debug logging on any method",
    "cert/": "fetches (ACME) and stores a TLS certificate on GET",
    "debug-portmap": "runs a port-mapping probe on any method",
}

# Endpoints whose handler only reads whatever the method (or, for POST, answers 4xx/5xx before
# doing anything): the sweep also POSTs to these, with an empty body. Not here: POST actions
# (bugreport, debug-log write log lines; dial is tsmux's to frame; id-token asks the control
# server for a token; serve-config, drive/shares and profiles/ write on POST).
POST_READ_ONLY: frozenset[str] = frozenset(
    {
        "status",
        "whois",
        "goroutines",
        "prefs",  # POST is 405: only PATCH writes
        "derpmap",
        "check-so-mark-in-use",
        "check-ip-forwarding",
        "check-udp-gro-forwarding",
        "usermetrics",
        "metrics",
        "pprof",  # no profile name: 404
        "dns-osconfig",
        "dns-query",
        "suggest-exit-node",
        "appc-route-info",
        "update/check",
        "update/progress",
        "watch-ipn-bus",
        "logtap",
        "query-feature",  # POST is its method; it only asks control, and without ?feature= fails at once
        "debug-bus-events",
        "debug-bus-graph",
        "debug-bus-queues",
        "debug-packet-filter-matches",
        "debug-packet-filter-rules",
        "debug-peer-endpoint-changes",
        "debug-optional-features",
        "debug-peer-relay-sessions",
        "file-targets",
        "files/",  # the bare prefix lists waiting files; POST there is 400
        "tka/status",
        "tka/log",
        "tka/verify-deeplink",  # POST, verifies a deep link it is given
        "tka/affected-sigs",  # POST, computes from the key it is given
        "policy/",  # POST re-reads the policy sources, a reader's right
    }
)

# Long polls (watch-ipn-bus, logtap, debug-bus-events) never end: the sweep takes the status line
# as the answer and hangs up; a request with no status line within this many seconds is "timeout".
SWEEP_READ_TIMEOUT = 3.0

OPERATOR_NAME = "games"

# Run as the caller: opens COUNT connections, sends PAYLOAD (hex) on each, prints "held N" and
# holds them until stdin closes.
HOLDER = r"""
import socket, sys
path, count, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(payload)
    except OSError:
        pass  # refused and closed already: still counts as an attempt
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()
"""

# Run as the caller: COUNT clients in parallel each send a watch-ipn-bus long poll followed by SIZE
# bytes of pipelined requests (which tailscaled does not read while the long poll runs), as much as
# goes within 3 s, then all exit. Prints how many were stalled (neither done nor cut off) at the end.
PUSHERS = r"""
import socket, sys, threading, time
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
head = "HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
data = f"GET /localapi/v0/watch-ipn-bus?mask=16 {head}".encode()
data += f"GET /localapi/v0/status {head}".encode() * (size // len(head) + 1)
stalled = []
sockets = []
def push():
    s = socket.socket(socket.AF_UNIX)
    sockets.append(s)
    s.connect(path)
    deadline = time.monotonic() + 3
    sent = 0
    while sent < len(data) and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sent += s.send(data[sent:sent + 65536])
        except socket.timeout:
            stalled.append(sent)
            return
        except OSError:
            return
threads = [threading.Thread(target=push) for _ in range(count)]
for t in threads: t.start()
for t in threads: t.join()
print(len(stalled), flush=True)
"""

# Run as the caller: SOCKS5 exchanges, each [methods, user, password], on a fresh connection:
# greeting; if the server picks 02, RFC 1929 with USER/PASSWORD; if it then may, a CONNECT to
# 127.0.0.1:PORT. Prints each exchange's transcript: what the server sent, step by step.
SOCKS_PROBE = r"""
import json, socket, sys
path, port = sys.argv[1], int(sys.argv[2])
def recv(s, n):
    data = b""
    try:
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                return data.hex() + "|EOF"
            data += chunk
    except socket.timeout:
        return data.hex() + "|timeout"
    except OSError as e:
        return data.hex() + "|" + type(e).__name__
    return data.hex()
def exchange(methods, user, password):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    steps = []
    try:
        s.sendall(bytes([5, len(methods), *methods]))
        greeting = recv(s, 2)
        steps.append(greeting)
        if greeting == "0502":
            u, p = user.encode(), password.encode()
            s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
            auth = recv(s, 2)
            steps.append(auth)
            if auth != "0100":
                return steps
        elif greeting != "0500":
            return steps
        s.sendall(bytes([5, 1, 0, 1, 127, 0, 0, 1]) + port.to_bytes(2, "big"))
        steps.append(recv(s, 10))
        return steps
    except OSError as e:
        steps.append(type(e).__name__)
        return steps
    finally:
        s.close()
print(json.dumps([exchange(*case) for case in json.loads(sys.stdin.read())]))
"""


def operatorIds() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(OPERATOR_NAME)
    except KeyError:
        skipOrFail(f"user {OPERATOR_NAME!r} (the operator for these tests) does not exist")
        raise AssertionError("unreachable") from None
    return entry.pw_uid, entry.pw_gid


def settledFds(pid: int) -> int:
    """tsmux's fd count once it stops changing (the connection that just ended is closed)."""
    count, since = openFds(pid), time.monotonic()

    def settled() -> bool:
        nonlocal count, since
        now = openFds(pid)
        if now != count:
            count, since = now, time.monotonic()
        return time.monotonic() - since >= 0.3

    waitUntil(settled, 10, "tsmux's fd count to settle")
    return count


def socksRequest(host: bytes | str, port: int) -> bytes:
    """A SOCKS5 CONNECT request (after the greeting) for an IPv4 literal or a domain name."""
    name = host.encode() if isinstance(host, str) else host
    try:
        return b"\x05\x01\x00\x01" + socket.inet_aton(name.decode("latin-1")) + port.to_bytes(2, "big")
    except OSError:
        return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def socksEcho(path: str, port: int, greeting: bytes = b"\x05\x01\x00", auth: bytes = b"") -> bytes:
    """
    As this process's uid: SOCKS5 to the echo target and back. Returns what came back for
    b"ping", or raises AssertionError with what the server said instead.
    """
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    try:
        sock.connect(path)
        sock.sendall(greeting)
        chosen = recvExactly(sock, 2)
        if auth:
            if chosen != b"\x05\x02":
                raise AssertionError(f"greeting answered {chosen!r}, expected password auth")
            sock.sendall(auth)
            authReply = recvExactly(sock, 2)
            if authReply != b"\x01\x00":
                raise AssertionError(f"password answered {authReply!r}")
        elif chosen != b"\x05\x00":
            raise AssertionError(f"greeting answered {chosen!r}")
        sock.sendall(socksRequest("127.0.0.1", port))
        reply = recvExactly(sock, 10)
        if reply[:2] != b"\x05\x00":
            raise AssertionError(f"CONNECT answered {reply!r}")
        sock.sendall(b"ping")
        return recvExactly(sock, 4)
    except OSError as e:
        raise AssertionError(f"SOCKS5 to the echo target failed: {e!r}") from e
    finally:
        sock.close()


def passwordAuth(user: str, password: str) -> bytes:
    return bytes([1, len(user)]) + user.encode() + bytes([len(password)]) + password.encode()


def endChild(process: subprocess.Popen[bytes], timeout: float) -> None:
    """A helper child ends when its stdin closes; killed if it has not within C{timeout} s; pipes closed."""
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None and not stream.closed:
            stream.close()


class HeldConnections:
    """A process of another uid holding connections open (L{HOLDER}) until L{release}."""

    def __init__(
        self, testCase: SynchronousTestCase, ids: tuple[int, int], path: str, count: int, payload: bytes
    ) -> None:
        self.process = subprocess.Popen(
            pythonArgv(ids, "-c", HOLDER, path, str(count), payload.hex()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        testCase.addCleanup(self.release)
        line = readLine(self.process, 60)
        if line != f"held {count}":
            self.release()
            raise AssertionError(f"holder said {line!r}: {readAll(self.process.stderr)}")

    def release(self) -> None:
        endChild(self.process, 15)


def readAll(stream: IO[bytes] | None) -> str:
    """What is left in a child's pipe, as text."""
    return stream.read().decode(errors="replace") if stream is not None else ""


def tell(process: subprocess.Popen[bytes], data: bytes) -> None:
    """Write C{data} to a child's stdin, at once."""
    assert process.stdin is not None
    process.stdin.write(data)
    process.stdin.flush()


def readLine(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout within C{timeout} s ("" at EOF)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line from pid {process.pid} within {timeout:g} s (got {data!r})")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            byte = os.read(fd, 1)
            if not byte:
                break
            data += byte
    return data.decode().strip()


class KeepAliveClient:
    """One keep-alive LocalAPI connection held by a process of another uid (L{KEEPALIVE})."""

    def __init__(self, testCase: SynchronousTestCase, ids: tuple[int, int], path: str) -> None:
        self.process = subprocess.Popen(
            pythonArgv(ids, *scriptArgv("keepalive", path)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        testCase.addCleanup(self.close)

    def request(self, method: str, name: str, body: str = "") -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([method, f"/localapi/v0/{name}", body]).encode() + b"\n")
        self.process.stdin.flush()
        line = readLine(self.process, 30)
        if not line:
            self.process.wait(10)
            return {"error": f"client exited: {readAll(self.process.stderr)}"}
        answer: dict = json.loads(line)
        return answer

    def close(self) -> None:
        endChild(self.process, 10)


class RightsTestMixin(IntegrationTestMixin):
    def setUp(self) -> None:
        requireOtherUser()
        super().setUp()

    def startTsmux(self, *args: str, **kw) -> TsmuxProcess:
        # 0666: who may open tsmux's socket is not what these tests are about.
        return super().startTsmux("--mode", "0666", *args, **kw)

    def makeOperator(self) -> None:
        """uid 5 (games) becomes tailscaled's operator; undone at cleanup."""
        operatorIds()
        result = self.tailnet.runTailscale(["set", f"--operator={OPERATOR_NAME}"], capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.addCleanup(self.tailnet.runTailscale, ["set", "--operator="], capture_output=True)
        self.assertEqual(self.operatorInPrefs(), OPERATOR_NAME)

    def operatorInPrefs(self) -> str:
        response = request(self.tailnet.localapi, "/localapi/v0/prefs")
        self.assertEqual(response.status, 200, response.body)
        operator: str = json.loads(response.body).get("OperatorUser", "")
        return operator

    def sweep(self, ids: tuple[int, int], sockets: list[str], requests: list[tuple[str, str]]) -> list[list]:
        """Each request on a fresh connection to each socket, as C{ids}: one list of statuses per request."""
        spec = {
            "sockets": sockets,
            "requests": [[method, f"/localapi/v0/{name}"] for method, name in requests],
            "timeout": SWEEP_READ_TIMEOUT,
        }
        result = runPythonAs(ids, *scriptArgv("sweep"), input=json.dumps(spec).encode(), timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        statuses: list[list] = json.loads(result.stdout)
        return statuses

    def assertSameAnswers(self, ids: tuple[int, int], who: str, tsmux: TsmuxProcess, requests) -> None:
        """Every request gets the same status through tsmux as directly; all differences in one failure."""
        sockets = [self.tailnet.localapi, tsmux.socketPath]
        first = self.sweep(ids, sockets, requests)
        differing = [(request, pair) for request, pair in zip(requests, first, strict=True) if pair[0] != pair[1]]
        unreachable = [
            (request, pair) for request, pair in zip(requests, first, strict=True) if not isinstance(pair[0], int)
        ]
        self.assertEqual(unreachable, [], f"tailscaled itself gave {who} no status for these (harness problem)")
        confirmed = []
        if differing:
            # Ask again: a difference counts only if it is there both times.
            again = self.sweep(ids, sockets, [request for request, _ in differing])
            confirmed = [
                (request, pair, pair2)
                for (request, pair), pair2 in zip(differing, again, strict=True)
                if pair2[0] != pair2[1]
            ]
        if confirmed:
            lines = [
                f"  {method} {name}: direct {pair[0]}, through tsmux {pair[1]}"
                + ("" if pair == pair2 else f" (then direct {pair2[0]}, through tsmux {pair2[1]})")
                for (method, name), pair, pair2 in confirmed
            ]
            self.fail(
                f"{len(confirmed)} of {len(requests)} LocalAPI requests by {who} got a different status "
                f"through tsmux than from tailscaled directly:\n" + "\n".join(lines)
            )


def sweepRequests(operator: bool) -> list[tuple[str, str]]:
    requests = []
    for name in LOCALAPI_ENDPOINTS:
        if not (operator and name in ACTS_ON_GET):
            requests += [("GET", name), ("HEAD", name)]
        if name in POST_READ_ONLY:
            requests.append(("POST", name))
    return requests


class EndpointDataTests(SynchronousTestCase):
    def test_endpointDataConsistent(self) -> None:
        """The data above is self-consistent (a typo would silently leave an endpoint out)."""
        self.assertEqual(len(set(LOCALAPI_ENDPOINTS)), len(LOCALAPI_ENDPOINTS))
        self.assertEqual(len(LOCALAPI_ENDPOINTS), 81)
        self.assertLessEqual(set(ACTS_ON_GET) | POST_READ_ONLY, set(LOCALAPI_ENDPOINTS))
        self.assertFalse(set(ACTS_ON_GET) & POST_READ_ONLY)
        self.assertEqual(len(sweepRequests(operator=False)), 2 * 81 + len(POST_READ_ONLY))


class EndpointSweepTests(RightsTestMixin, SynchronousTestCase):
    """tailscaled's answer to a caller is the same through tsmux as directly, endpoint by endpoint."""

    def test_nobodySweep(self) -> None:
        tsmux = self.startTsmux()
        requests = sweepRequests(operator=False)
        self.assertSameAnswers(NOBODY_IDS, f"uid {NOBODY}", tsmux, requests)

    def test_operatorSweep(self) -> None:
        # tsmux first, then the operator: tailscaled's rights change at once for a new operator,
        # and so must its rights through tsmux (no copy of them that goes stale).
        tsmux = self.startTsmux()
        self.makeOperator()
        ids = operatorIds()
        # The harness check first: the operator really has write rights at tailscaled.
        status = self.sweep(ids, [self.tailnet.localapi], [("GET", "goroutines")])
        self.assertEqual(status, [[200]])
        self.assertSameAnswers(ids, f"the operator (uid {ids[0]})", tsmux, sweepRequests(operator=True))


# A serve config with a Path handler: tailscaled lets only root (or an operator who may run
# `sudo tailscale`) serve a filesystem path.
SERVE_PATH_CONFIG = json.dumps(
    {"TCP": {"443": {"HTTPS": True}}, "Web": {"tsmux-test.example.ts.net:443": {"Handlers": {"/": {"Path": "/tmp"}}}}}
)


class OperatorTests(RightsTestMixin, SynchronousTestCase):
    def test_servingAPathNeedsMoreThanOperator(self) -> None:
        self.makeOperator()
        tsmux = self.startTsmux()
        ids = operatorIds()
        answers = []
        for path in (self.tailnet.localapi, tsmux.socketPath):
            client = KeepAliveClient(self, ids, path)
            answers.append(client.request("POST", "serve-config", SERVE_PATH_CONFIG))
            client.close()
        direct, through = answers
        self.assertEqual(direct.get("status"), 401, direct)
        self.assertIn("must be root, or be an operator and able to run 'sudo tailscale'", direct["body"])
        self.assertEqual(through, direct)

    def test_revokedOperatorRefusedOnItsOpenConnection(self) -> None:
        self.makeOperator()
        tsmux = self.startTsmux()
        ids = operatorIds()
        direct = KeepAliveClient(self, ids, self.tailnet.localapi)
        through = KeepAliveClient(self, ids, tsmux.socketPath)
        before = [client.request("GET", "goroutines").get("status") for client in (direct, through)]
        self.assertEqual(before, [200, 200], "the operator's goroutine dump (direct, through tsmux)")

        result = self.tailnet.runTailscale(["set", "--operator="], capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.operatorInPrefs(), "")

        after = [client.request("GET", "goroutines") for client in (direct, through)]
        self.assertEqual(after[0].get("status"), 403, after[0])
        self.assertIn("goroutine dump access denied", after[0]["body"])
        self.assertEqual(after[1], after[0], "through tsmux, on the connection opened while it was operator")
        # Still the same connection, still served: reads pass.
        self.assertEqual(through.request("GET", "status").get("status"), 200)


class PrivateSocketDirectoryTests(RightsTestMixin, SynchronousTestCase):
    """tailscaled's socket in a directory only root may enter, as the drop-in deployment has it."""

    def test_callerRightsThroughARootOnlyDirectory(self) -> None:
        # debug-bus-graph (any reader) and goroutines (writers only) tell the caller's rights from
        # root's and from an imitation's; status is the plain read.
        requests = [
            ("GET", "status"),
            ("GET", "goroutines"),
            ("GET", "debug-bus-graph"),
            ("POST", "status"),
            ("GET", "metrics"),
        ]
        (direct,) = zip(*self.sweep(NOBODY_IDS, [self.tailnet.localapi], requests), strict=True)
        self.assertEqual(direct[:2], (200, 403), "uid 65534's own rights at tailscaled")

        directory = os.path.dirname(self.tailnet.localapi)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        os.chmod(directory, 0o700)
        self.addCleanup(os.chmod, directory, mode)
        self.assertEqual(os.stat(directory).st_uid, 0)
        (closed,) = zip(*self.sweep(NOBODY_IDS, [self.tailnet.localapi], requests[:1]), strict=True)
        self.assertEqual(closed, ("PermissionError",), "uid 65534 must not reach the socket itself")

        tsmux = self.startTsmux()
        (through,) = zip(*self.sweep(NOBODY_IDS, [tsmux.socketPath], requests), strict=True)
        self.assertEqual(
            dict(zip(requests, through, strict=True)),
            dict(zip(requests, direct, strict=True)),
            "through tsmux vs uid 65534 directly",
        )


def startNotices(log: str) -> list[str]:
    """Lines saying tsmux cannot act as its callers (toward tailscaled)."""
    pattern = re.compile(r"(?i)\b(cannot|can't|unable to|not able to)\b.*\bact as\b.*\bcallers?\b")
    return [line for line in log.splitlines() if pattern.search(line)]


class UnprivilegedTsmuxTests(RightsTestMixin, SynchronousTestCase):
    def test_withoutPrivilegeOnlyItsOwnUidGetsTheLocalAPI(self) -> None:
        if pythonForNobody() != sys.executable:
            skipOrFail(f"uid {NOBODY} cannot run {sys.executable}, so tsmux cannot be started as that user")
        directory = shortDir(self)
        os.chown(directory, NOBODY, NOBODY)
        tsmux = startTsmux(
            self,
            "--localapi",
            self.tailnet.localapi,
            "--mode",
            "0666",
            socketPath=os.path.join(directory, "tsmux.sock"),
            prefix=setpriv(*NOBODY_IDS),
        )
        self.addCleanup(self.assertNoTraceback, tsmux)
        self.assertEqual(os.stat(f"/proc/{tsmux.process.pid}").st_uid, NOBODY)

        # Another uid (root here) gets a 403 that says why, never tsmux's own (uid 65534's) rights.
        response = request(tsmux.socketPath, "/localapi/v0/status")
        status, body = response.status, response.body
        self.assertEqual(status, 403, body)
        self.assertIn(b"uid 0", body, "the refusal names the caller")
        self.assertRegex(body.decode(errors="replace"), r"(?i)privilege|CAP_SETUID|setuid|not root", "and why")
        # Its own uid passes.
        (mine,) = self.sweep(NOBODY_IDS, [tsmux.socketPath], [("GET", "status")])
        self.assertEqual(mine, [200])
        # SOCKS5 still serves the refused uid: root to the HTTP target inside the namespace.
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/")
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)
        self.assertEqual(socksEcho(tsmux.socketPath, self.tailnet.echoPort), b"ping")
        # One line (at start; the refusals above have lines of their own) says it cannot act as its callers.
        notices = startNotices(tsmux.log())
        self.assertEqual(len(notices), 1, f"one line saying tsmux cannot act as its callers:\n{tsmux.log()}")


def longPoll() -> bytes:
    # mask 16 (NotifyNoPrivateKeys), as a reader's client asks.
    return b"GET /localapi/v0/watch-ipn-bus?mask=16 HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"


class LeavingClientsTests(RightsTestMixin, SynchronousTestCase):
    def test_clientsLeavingAPausedLongPollAreNoticedHalfClosedKept(self) -> None:
        """
        60 clients (uid 65534) push 600 KiB into a watch-ipn-bus long poll, so tsmux stops
        reading them, and exit: tsmux's fds return to their baseline within 20 s. Meanwhile a
        client that half-closed after its requests and reads nothing yet is kept: once the
        others are gone (so the hang-up sweep has run while it waited), it reads all its answers.
        """
        tsmux = self.startTsmux("--shutdown-timeout", "2")
        pid = tsmux.process.pid
        self.assertEqual(request(tsmux.socketPath, "/localapi/v0/status").status, 200)
        baseline = settledFds(pid)

        # Enough pipelined answers (about 1 KiB each) that they cannot all sit in socket buffers.
        count = 600
        halfClosed = subprocess.Popen(
            pythonArgv(NOBODY_IDS, *scriptArgv("half-closed", tsmux.socketPath, str(count))),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self.addCleanup(stopProcess, halfClosed)
        self.assertEqual(readLine(halfClosed, 30), "sent")
        withHalfClosed = settledFds(pid)

        pushers = runPythonAs(NOBODY_IDS, "-c", PUSHERS, tsmux.socketPath, "60", str(600 * 1024))
        self.assertEqual(pushers.returncode, 0, pushers.stderr)
        self.assertEqual(pushers.stdout.strip(), b"60", "every client must be stalled (tsmux not reading it)")
        waitUntil(
            lambda: openFds(pid) <= withHalfClosed,
            20,
            lambda: f"tsmux's fds back to {withHalfClosed} once the 60 clients left (now {openFds(pid)})",
        )

        tell(halfClosed, b"go\n")
        answer = json.loads(readLine(halfClosed, 60) or "{}")
        self.assertEqual(answer.get("statuses"), [200] * count, answer)
        waitUntil(lambda: openFds(pid) <= baseline, 20, lambda: f"tsmux's fds back to {baseline} ({openFds(pid)})")

    def test_halfClosedClientDirectlyGetsEverything(self) -> None:
        """The harness check for the test above: tailscaled itself answers a half-closed client."""
        process = subprocess.Popen(
            pythonArgv(NOBODY_IDS, *scriptArgv("half-closed", self.tailnet.localapi, "600")),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self.addCleanup(stopProcess, process)
        self.assertEqual(readLine(process, 30), "sent")
        tell(process, b"go\n")
        answer = json.loads(readLine(process, 60) or "{}")
        self.assertEqual(answer.get("statuses"), [200] * 600, answer)
        self.assertGreater(answer["bytes"], 1 << 19, "the answers must be more than socket buffers hold")


def stopProcess(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def limitRefusalLines(log: str) -> list[str]:
    """Lines about connections refused at a connection limit."""
    return [line for line in log.splitlines() if re.search(r"(?i)refus.*(limit|max-connections)", line)]


class DescriptorLimitTests(RightsTestMixin, SynchronousTestCase):
    def test_rootGetsInWhileAnotherUidHoldsHundreds(self) -> None:
        if shutil.which("prlimit") is None:
            skipOrFail("prlimit (util-linux) is missing")
        tsmux = self.startTsmux("--shutdown-timeout", "2", prefix=["prlimit", "--nofile=256:256", "--"])
        pid = tsmux.process.pid
        with open(f"/proc/{pid}/limits") as limits:
            (line,) = [line for line in limits if line.startswith("Max open files")]
        self.assertEqual(line.split()[3:5], ["256", "256"], line)

        HeldConnections(self, NOBODY_IDS, tsmux.socketPath, 400, longPoll())
        waitUntil(
            lambda: limitRefusalLines(tsmux.log()) or openFds(pid) >= 250,
            20,
            lambda: f"tsmux to take uid 65534's connections (fds {openFds(pid)}):\n{tsmux.log()[-2000:]}",
        )

        response = request(tsmux.socketPath, "/localapi/v0/status")
        self.assertEqual(response.status, 200, f"root's LocalAPI request: {response.body[:200]!r}")
        self.assertEqual(socksEcho(tsmux.socketPath, self.tailnet.echoPort), b"ping")

        log = tsmux.log()
        refusals = limitRefusalLines(log)
        self.assertTrue(refusals, f"no refusal logged:\n{log[-3000:]}")
        self.assertLess(len(refusals), 50, "refusals at the limit are logged once per burst, not per connection")
        self.assertNotIn("Too many open files", log)


# A domain name a client controls, with a forged log line in it.
FORGED = b"evil\nFORGED log line\r\x1b[2Jend.example"


class LogInjectionTests(RightsTestMixin, SynchronousTestCase):
    def test_socksDomainEscapedOnItsOwnLine(self) -> None:
        tsmux = self.startTsmux()
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(15)
        sock.connect(tsmux.socketPath)
        sock.sendall(b"\x05\x01\x00" + socksRequest(FORGED, 80))
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()
        tsmux.stop()
        log = tsmux.log()
        self.assertNotIn("\r", log)
        self.assertNotIn("\x1b", log)
        forged = [line for line in log.splitlines() if line.lstrip().startswith("FORGED")]
        self.assertEqual(forged, [], "a log line starts with text the client sent")
        own = [line for line in log.splitlines() if "evil" in line and "FORGED log line" in line]
        self.assertEqual(len(own), 1, f"the connection's own line, with the whole name escaped:\n{log}")
        (line,) = own
        self.assertRegex(line, r"evil(\\n|\\x0a|\\u000a)FORGED log line(\\r|\\x0d|\\u000d)(\\x1b|\\u001b|\\e)\[2J")


AUTH_USER = "alice"
AUTH_PASSWORD = "right-password"
WRONG_PASSWORD = "wrong-password"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class RefusedFirstTests(RightsTestMixin, SynchronousTestCase):
    """With --socks-auth and --socks-allow-uid 0: a refused uid learns nothing about passwords."""

    def startAuthTsmux(self, *args: str) -> TsmuxProcess:
        directory = shortDir(self)
        path = os.path.join(directory, "socks-auth")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(f"{AUTH_USER}:{AUTH_PASSWORD}\n")
        return self.startTsmux("--socks-auth", path, "--socks-allow-uid", "0", *args)

    def test_refusedUidCannotTellARightPasswordFromAWrongOne(self) -> None:
        tsmux = self.startAuthTsmux()
        port = str(self.tailnet.echoPort)
        cases = [
            [[2], AUTH_USER, AUTH_PASSWORD],
            [[2], AUTH_USER, WRONG_PASSWORD],
            [[0, 2], AUTH_USER, AUTH_PASSWORD],
            [[0, 2], AUTH_USER, WRONG_PASSWORD],
        ]
        result = runPythonAs(NOBODY_IDS, "-c", SOCKS_PROBE, tsmux.socketPath, port, input=json.dumps(cases).encode())
        self.assertEqual(result.returncode, 0, result.stderr)
        onlyPassword, onlyPasswordWrong, both, bothWrong = json.loads(result.stdout)
        self.assertEqual(onlyPassword, onlyPasswordWrong, "SOCKS5, only method 02 offered: right vs wrong password")
        self.assertEqual(both, bothWrong, "SOCKS5, 00 and 02 offered: right vs wrong password")
        self.assertEqual(onlyPassword[0].split("|")[0], "05ff", f"only 02 offered: {onlyPassword}")
        self.assertEqual(both[0], "0500", f"00 and 02 offered: {both}")
        self.assertEqual(both[1][:4], "0502", f"its CONNECT: reply 02 (not allowed by ruleset): {both}")

        authority = f"127.0.0.1:{port}"
        headers = [[basic(AUTH_USER, AUTH_PASSWORD)], [basic(AUTH_USER, WRONG_PASSWORD)], []]
        result = runPythonAs(
            NOBODY_IDS, *scriptArgv("connect-probe", tsmux.socketPath, authority), input=json.dumps(headers).encode()
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        statuses = [line.split(" ")[1] if line.count(" ") else line for line in json.loads(result.stdout)]
        self.assertEqual(statuses, ["403", "403", "403"], "HTTP CONNECT: right, wrong, no Proxy-Authorization")

    def test_allowedRootStillAuthenticates(self) -> None:
        tsmux = self.startAuthTsmux()
        port = self.tailnet.echoPort
        wrong = socket.socket(socket.AF_UNIX)
        wrong.settimeout(10)
        wrong.connect(tsmux.socketPath)
        wrong.sendall(b"\x05\x01\x02")
        self.assertEqual(recvExactly(wrong, 2), b"\x05\x02")
        wrong.sendall(passwordAuth(AUTH_USER, WRONG_PASSWORD))
        self.assertEqual(recvExactly(wrong, 2), b"\x01\x01")
        wrong.close()
        self.assertEqual(
            socksEcho(tsmux.socketPath, port, b"\x05\x01\x02", passwordAuth(AUTH_USER, AUTH_PASSWORD)), b"ping"
        )

        authority = f"127.0.0.1:{port}"
        headers = [
            [basic(AUTH_USER, AUTH_PASSWORD)],
            [basic(AUTH_USER, WRONG_PASSWORD)],
            [basic(AUTH_USER, AUTH_PASSWORD), basic(AUTH_USER, AUTH_PASSWORD)],
        ]
        result = runPythonAs(
            (0, 0), *scriptArgv("connect-probe", tsmux.socketPath, authority), input=json.dumps(headers).encode()
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        statuses = [line.split(" ")[1] if line.count(" ") else line for line in json.loads(result.stdout)]
        self.assertEqual(statuses, ["200", "407", "400"], "HTTP CONNECT: right, wrong, two Proxy-Authorization")

    def test_stalledHandshakesOfOneUidDoNotStopRoot(self) -> None:
        # A global limit below what uid 65534 holds: alone, it would let that uid lock root out.
        tsmux = self.startAuthTsmux("--max-connections", "256", "--shutdown-timeout", "2")
        pid = tsmux.process.pid
        HeldConnections(self, NOBODY_IDS, tsmux.socketPath, 300, b"\x05")
        waitUntil(
            lambda: limitRefusalLines(tsmux.log()),
            20,
            lambda: f"tsmux to refuse some of uid 65534's 300 connections (fds {openFds(pid)}):\n{tsmux.log()[-2000:]}",
        )
        self.assertEqual(
            socksEcho(tsmux.socketPath, self.tailnet.echoPort, b"\x05\x01\x02", passwordAuth(AUTH_USER, AUTH_PASSWORD)),
            b"ping",
        )
