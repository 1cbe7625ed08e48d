"""
Many sockets from one config file, rules in tailnet terms, and reloads (issue 11), end to end.

The real tsmux (C{tsmux --config FILE}) runs inside a private network namespace that holds only
loopback, with made-up tailnet addresses (100.64.0.5, fd7a:115c:a1e0::5, ...) on C{lo} and an
identifying echo target on all of them (L{tests._netns_targets}): whatever tsmux dials stays on
this machine, and an allowed dial comes back with a line naming the address it reached. Its
tailnet view comes from a fake LocalAPI in this process (L{tests._fakelocalapi}), whose status the
tests change at will; its way out is the C{direct} dialer. The tests talk to tsmux through its Unix
sockets (the filesystem is shared across network namespaces), as root and, through C{setpriv}, as
uid 65534; reloads are C{SIGHUP}.

Needs root, C{unshare}, C{ip} and C{setpriv}; skipped without them, and failed instead when
C{TSMUX_REQUIRE_INTEGRATION=1}.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from ._fakelocalapi import FakeLocalAPI
from ._fakes import TestCaseMixinBase
from ._httpclient import buildRequest, exchange, request, scriptArgv
from ._netns_targets import clientArgv, connectProbe, socks5Open, socks5Probe
from ._otheruser import NOBODY, NOBODY_IDS, requireOtherUser, runPythonAs
from ._tailnet import REPO_ROOT, endHelper, integrationRequired, skipOrFail
from ._tsmuxprocess import CONNECTION_LINE, answers, assertCleanLog, childEnvironment, shortDir, tsmuxCommand
from ._waiting import waitUntil

PORT = 4242
"""Where the echo target listens inside each namespace (a fresh namespace: every port is free)."""

WEB_1 = "100.64.0.5"
WEB_1_V6 = "fd7a:115c:a1e0::5"
DB = "100.64.0.6"
DB_V6 = "fd7a:115c:a1e0::6"
LAPTOP = "100.64.0.7"
ADDRESSES = (WEB_1, DB, LAPTOP, WEB_1_V6, DB_V6)

STATUS: dict[str, Any] = {
    "BackendState": "Running",
    "Self": {
        "ID": "n0",
        "DNSName": "this.example.ts.net.",
        "HostName": "this",
        "TailscaleIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
        "UserID": 1,
    },
    "Peer": {
        "nodekey:web1": {
            "ID": "n1",
            "DNSName": "web-1.example.ts.net.",
            "HostName": "WebHost",
            "TailscaleIPs": [WEB_1, WEB_1_V6],
            "Tags": ["tag:prod"],
            "UserID": 2,
        },
        "nodekey:db": {
            "ID": "n2",
            "DNSName": "db.example.ts.net.",
            "HostName": "Database",
            "TailscaleIPs": [DB, DB_V6],
            "UserID": 3,
        },
        "nodekey:laptop": {
            "ID": "n3",
            "DNSName": "laptop.example.ts.net.",
            "HostName": "Bobs-MacBook",
            "TailscaleIPs": [LAPTOP],
            "UserID": 3,
        },
    },
    "User": {
        "1": {"ID": 1, "LoginName": "me@example.com"},
        "2": {"ID": 2, "LoginName": "tagged-devices"},
        "3": {"ID": 3, "LoginName": "bob@example.com"},
    },
}
"""tailscaled's status as the fake tells it: web-1 (tag:prod), db and laptop (both bob's)."""


# --- prerequisites -------------------------------------------------------------------------------


@functools.cache
def namespaceUnavailableReason() -> str | None:
    """Why these tests cannot run here, or None. Cached: probing spawns processes."""
    if not sys.platform.startswith("linux"):
        return "these tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "these tests need root (unshare -n, ip addr add, setpriv)"
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {package})"
    try:
        probe = subprocess.run(
            ["unshare", "-n", "--", "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -n` failed: {e}"
    if probe.returncode != 0:
        return f"`unshare -n` is not permitted here: {probe.stderr.strip()}"
    return None


def requireNamespace() -> None:
    """Return if a namespace can be made; else skip, or fail when integration tests are required."""
    reason = namespaceUnavailableReason()
    if reason is not None:
        skipOrFail(reason)


SKIP = None if integrationRequired() else namespaceUnavailableReason()


# --- tsmux in a namespace ------------------------------------------------------------------------


class NamespacedTsmux:
    """
    A L{tests._netns_targets} helper under C{unshare -n}, running C{tsmux --config CONFIG}.

    @ivar tsmuxPid: tsmux's pid (the same in this pid namespace): for C{SIGHUP}.
    """

    tsmuxPid: int

    def __init__(self, directory: str, configPath: str, sockets: list[str]) -> None:
        self.directory = directory
        self.configPath = configPath
        self.logPath = os.path.join(directory, "tsmux.log")
        self.helperLogPath = os.path.join(directory, "helper.log")
        self.messages: list[dict[str, Any]] = []
        self._helperLog: IO[bytes] = open(self.helperLogPath, "wb")
        addresses = [arg for address in ADDRESSES for arg in ("--address", address)]
        argv = [
            *("unshare", "-n", "--", sys.executable, "-m", "tests._netns_targets"),
            *addresses,
            *("--port", str(PORT), "--log", self.logPath, "--"),
            *tsmuxCommand(),
            *("--config", configPath),
        ]
        self.helper = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=childEnvironment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._helperLog,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._waitUntilListening(sockets)
        except BaseException:
            self.stop()
            raise

    def _waitUntilListening(self, sockets: list[str]) -> None:
        ready = waitUntil(
            lambda: self._message("ready") or self._message("failed") or self.helper.poll() is not None,
            30,
            lambda: f"the namespace helper to start:\n{self._helperTail()}",
        )
        if not isinstance(ready, dict) or "ready" not in ready:
            raise AssertionError(f"the namespace helper failed: {self.messages}\n{self._helperTail()}")
        self.tsmuxPid = ready["ready"]["tsmuxPid"]
        waitUntil(
            lambda: self.exitCode() is not None or all(answers(path) for path in sockets),
            20,
            lambda: f"tsmux to listen on {sockets}:\n{self.log()[-3000:]}",
        )
        if self.exitCode() is not None:
            raise AssertionError(f"tsmux exited with {self.exitCode()}:\n{self.log()[-3000:]}")
        # The probes above are logged once tsmux runs its reactor, after startService (and its
        # SIGHUP handler): from then on a reload cannot kill it.
        self.waitForLog(CONNECTION_LINE)

    def _read(self) -> None:
        stdout = self.helper.stdout
        assert stdout is not None
        for line in stdout:
            try:
                self.messages.append(json.loads(line))
            except ValueError:
                self.messages.append({"garbage": line.decode("utf-8", "replace")})

    def _message(self, kind: str) -> dict[str, Any] | None:
        for message in list(self.messages):
            if kind in message:
                return message
        return None

    def _helperTail(self) -> str:
        try:
            with open(self.helperLogPath, encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def exitCode(self) -> int | None:
        """tsmux's exit status once it has exited, else None."""
        message = self._message("exited")
        return None if message is None else int(message["exited"])

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Where the last whole line of the log ends now: for lines logged after it (L{linesSince})."""
        return self.log().rfind("\n") + 1

    def linesSince(self, mark: int) -> list[str]:
        return self.log()[mark:].splitlines()

    def waitForLog(self, text: str, timeout: float = 10.0) -> None:
        waitUntil(lambda: text in self.log(), timeout, lambda: f"{text!r} in tsmux's log:\n{self.log()[-3000:]}")

    def waitForLine(self, mark: int, *fragments: str, timeout: float = 10.0) -> str:
        """The first line logged after C{mark} that holds every fragment (waiting for it)."""

        def found() -> str | None:
            for line in self.linesSince(mark):
                if all(fragment in line for fragment in fragments):
                    return line
            return None

        line = waitUntil(
            found, timeout, lambda: f"a line with {fragments!r} in tsmux's log:\n{self.log()[mark:][-3000:]}"
        )
        assert line is not None
        return line

    def reload(self) -> None:
        os.kill(self.tsmuxPid, signal.SIGHUP)

    def stop(self) -> int | None:
        """Close the helper's stdin (it stops tsmux, then itself); tsmux's exit status."""
        helper = self.helper
        if helper.poll() is None:
            endHelper(helper, 20)  # tsmux dies with it if it comes to SIGKILL (PR_SET_PDEATHSIG)
        self._reader.join(5)
        if helper.stdout is not None:
            helper.stdout.close()
        self._helperLog.close()
        return self.exitCode()


def writeAtomically(path: str, text: str) -> None:
    """Replace C{path} at once, so that a reload never reads half a file."""
    temporary = path + ".new"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def lineOf(text: str, fragment: str) -> int:
    """The number (from 1) of the first line of C{text} holding C{fragment}."""
    for number, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in {text!r}")


class NamespaceTestMixin(TestCaseMixinBase):
    """setUp: a fake LocalAPI, then tsmux with C{self.configText()} in a fresh namespace."""

    skip = SKIP
    ns: NamespacedTsmux
    fake: FakeLocalAPI
    directory: str
    configPath: str

    def configText(self) -> str:
        raise NotImplementedError

    def socketNames(self) -> list[str]:
        raise NotImplementedError

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.sock")

    def setUp(self) -> None:
        requireNamespace()
        requireOtherUser()
        self.directory = shortDir(self)
        self.fake = FakeLocalAPI(os.path.join(self.directory, "localapi.sock"), STATUS)
        self.fake.start()
        self.addCleanup(self.fake.stop)
        self.configPath = os.path.join(self.directory, "tsmux.toml")
        writeAtomically(self.configPath, self.configText())
        sockets = [self.path(name) for name in self.socketNames()]
        self.ns = NamespacedTsmux(self.directory, self.configPath, sockets)
        self.addCleanup(self.stopAndCheck)

    def stopAndCheck(self) -> None:
        """tsmux exits 0 on SIGTERM, with no traceback in its log."""
        code = self.ns.stop()
        log = self.ns.log()
        assertCleanLog(self, log)
        if code != 0:
            self.fail(f"tsmux exited with {code}:\n{log[-3000:]}")

    # clients

    def socks5AsNobody(self, name: str, host: str, port: int) -> dict[str, Any]:
        result = runPythonAs(NOBODY_IDS, *clientArgv("socks5", self.path(name), host, str(port)), timeout=30)
        if result.returncode != 0:
            self.fail(f"the SOCKS5 client as uid {NOBODY} failed: {result.stderr.decode()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def connectAsNobody(self, name: str, authority: str) -> dict[str, Any]:
        result = runPythonAs(NOBODY_IDS, *clientArgv("connect", self.path(name), authority), timeout=30)
        if result.returncode != 0:
            self.fail(f"the CONNECT client as uid {NOBODY} failed: {result.stderr.decode()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def localapiAsNobody(self, name: str, target: str) -> list[str]:
        """A LocalAPI GET as uid 65534: the status lines of the answers."""
        result = runPythonAs(NOBODY_IDS, *scriptArgv("pipeline", self.path(name), buildRequest("GET", target).decode()))
        if result.returncode != 0:
            self.fail(f"the HTTP client as uid {NOBODY} failed: {result.stderr.decode()}")
        return result.stdout.decode().splitlines()


def targetText(host: str, port: int) -> str:
    """A target as tsmux's log line writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hello(host: str, port: int = PORT) -> str:
    return f"hello from {targetText(host, port)}\n"


# --- sockets: what each offers, to whom; a reload that adds and removes ---------------------------


SOCKETS_TOP = """\
dialer = "direct"
localapi = "{directory}/localapi.sock"
mode = "0666"
"""

SOCKET_A = """
[[socket]]
name = "a"
listen = "{directory}/a.sock"
offer = ["socks5"]
allow-callers = ["uid:0"]
"""

SOCKET_B = """
[[socket]]
name = "b"
listen = "{directory}/b.sock"
offer = ["http-connect", "localapi"]
allow-callers = ["uid:65534"]
"""

SOCKET_C = """
[[socket]]
name = "c"
listen = "{directory}/c.sock"
offer = ["socks5", "http-connect"]
allow-callers = ["uid:0"]
"""


class SocketsTests(NamespaceTestMixin, SynchronousTestCase):
    """Two sockets from one file, each answering only what it offers, to whom it allows."""

    def configText(self) -> str:
        return (SOCKETS_TOP + SOCKET_A + SOCKET_B).format(directory=self.directory)

    def socketNames(self) -> list[str]:
        return ["a", "b"]

    def test_eachSocketAnswersOnlyWhatItOffers(self) -> None:
        a, b = self.path("a"), self.path("b")
        ns = self.ns
        # a: SOCKS5 for root.
        mark = ns.mark()
        self.assertEqual(socks5Probe(a, WEB_1, PORT), {"method": 0, "reply": 0, "hello": hello(WEB_1)})
        line = ns.waitForLine(mark, "socks5 socket=a ", f"target={WEB_1}:{PORT}")
        self.assertIn(" uid=0 ", line)
        self.assertTrue(line.endswith(" ok"), line)
        # a offers neither HTTP CONNECT nor the LocalAPI: 403 naming the socket.
        answer = connectProbe(a, f"{DB}:{PORT}")
        self.assertEqual(answer["status"], 403)
        self.assertEqual(answer["body"], "tsmux: socket a does not offer http-connect (it offers socks5)\n")
        response = request(a, "/localapi/v0/status")
        self.assertEqual(response.status, 403)
        self.assertEqual(response.text, "tsmux: socket a does not offer localapi (it offers socks5)\n")
        # ... and SOCKS5 to root only: nobody gets 05 FF.
        mark = ns.mark()
        self.assertEqual(self.socks5AsNobody("a", WEB_1, PORT), {"method": 0xFF, "reply": None, "hello": ""})
        line = ns.waitForLine(mark, "socks5 socket=a ", f"uid={NOBODY} ")
        self.assertIn(f"refused-by-policy: uid {NOBODY} is not in socket a's allow-callers", line)

        # b: no SOCKS5 at all (05 FF, also for its own caller), HTTP CONNECT and the LocalAPI for nobody only.
        mark = ns.mark()
        self.assertEqual(socks5Probe(b, WEB_1, PORT)["method"], 0xFF)
        self.assertEqual(self.socks5AsNobody("b", WEB_1, PORT)["method"], 0xFF)
        line = ns.waitForLine(mark, "socks5 socket=b ", "uid=0 ")
        self.assertIn("refused-by-policy: socket b does not offer socks5 (it offers http-connect, localapi)", line)
        answer = connectProbe(b, f"{DB}:{PORT}")
        self.assertEqual((answer["status"], answer["body"]), (403, "tsmux: uid 0 is not in socket b's allow-callers\n"))
        response = request(b, "/localapi/v0/status")
        self.assertEqual((response.status, response.text), (403, "tsmux: uid 0 is not in socket b's allow-callers\n"))
        mark = ns.mark()
        self.assertEqual(self.connectAsNobody("b", f"{DB}:{PORT}"), {"status": 200, "body": "", "hello": hello(DB)})
        line = ns.waitForLine(mark, "http-connect socket=b ", f"target={DB}:{PORT}")
        self.assertIn(f" uid={NOBODY} ", line)
        before = len(self.fake.requests)
        self.assertEqual(self.localapiAsNobody("b", "/localapi/v0/status"), ["HTTP/1.1 200 OK"])
        self.assertEqual([r.target for r in self.fake.requests[before:]], ["/localapi/v0/status"])
        # tsmux's own API answers its admins on every socket, whatever it offers.
        for name in ("a", "b"):
            self.assertEqual(request(self.path(name), "/tsmux/v0/status").status, 200, name)

    def test_reloadAddsAndRemovesSocketsWhileARelayFlows(self) -> None:
        a, c = self.path("a"), self.path("c")
        ns = self.ns
        answer, relay = socks5Open(a, WEB_1, PORT)
        self.assertEqual(answer, {"method": 0, "reply": 0, "hello": hello(WEB_1)})
        assert relay is not None
        self.addCleanup(relay.close)
        relay.sendall(b"before the reload\n")
        self.assertEqual(relay.recv(100), b"before the reload\n")

        mark = ns.mark()
        writeAtomically(self.configPath, (SOCKETS_TOP + SOCKET_B + SOCKET_C).format(directory=self.directory))
        ns.reload()
        reloaded = ns.waitForLine(mark, "reloaded ")
        self.assertIn(f"reloaded {self.configPath}: 2 sockets, 0 rules; added c; removed a", reloaded)
        ns.waitForLine(mark, "socket c listening on ", c)
        # a's path is gone, c answers, b is as it was.
        self.assertFalse(os.path.exists(a))
        self.assertFalse(answers(a))
        self.assertEqual(socks5Probe(c, DB, PORT), {"method": 0, "reply": 0, "hello": hello(DB)})
        self.assertEqual(connectProbe(c, f"{LAPTOP}:{PORT}")["hello"], hello(LAPTOP))
        self.assertEqual(connectProbe(self.path("b"), f"{DB}:{PORT}")["status"], 403)

        # The relay through the removed socket flows on, both ways, to a clean end.
        for _ in range(3):
            relay.sendall(b"after the reload\n")
            self.assertEqual(relay.recv(100), b"after the reload\n")
        relay.shutdown(socket.SHUT_WR)  # the target answers our EOF with its own
        self.assertEqual(relay.recv(100), b"")
        relay.close()
        line = ns.waitForLine(mark, "socks5 socket=a ", f"target={WEB_1}:{PORT}")
        self.assertRegex(line, r" ok$")
        self.assertEqual([x for x in ns.linesSince(0) if "reloaded " in x], [reloaded])
        status = json.loads(request(c, "/tsmux/v0/status").body)
        self.assertEqual([s["name"] for s in status["sockets"] if s["accepting"]], ["b", "c"])
        self.assertEqual(status["lastReload"]["added"], ["c"])


# --- rules ---------------------------------------------------------------------------------------


RULES = """\
dialer = "direct"
localapi = "{directory}/localapi.sock"
mode = "0666"

[[socket]]
name = "web"
listen = "{directory}/web.sock"
rules = [
  {{ deny = ["tag:prod:22"] }},
  {{ allow = ["tag:prod:{port}"] }},
  {{ allow = ["bob@example.com:{port}"], callers = ["uid:0"] }},
  {{ allow = ["{db}/32:{port}", "[fd7a:115c:a1e0::/120]:{port}"], callers = ["uid:{nobody}"] }},
  {{ allow = ["localhost:{port}", "*.internal.example:*"] }},
  {{ deny = ["*:*"] }},
]

[[socket]]
name = "ops"
listen = "{directory}/ops.sock"
offer = ["socks5"]
allow-callers = ["uid:0"]
rules = [
  {{ allow = ["db.example.ts.net:{port}"] }},
  {{ allow = ["[{web1v6}]:{port}"] }},
  {{ allow = ["tag:new:{port}"] }},
]

[[socket]]
name = "free"
listen = "{directory}/free.sock"
offer = ["socks5"]
rules = []

[[socket]]
name = "blind"
listen = "{directory}/blind.sock"
offer = ["socks5"]
localapi = "{directory}/no-tailscaled.sock"
rules = [
  {{ allow = ["tag:prod:*"] }},
  {{ allow = ["*:*"] }},
]
"""


def rulesConfig(directory: str) -> str:
    return RULES.format(directory=directory, port=PORT, db=DB, nobody=NOBODY, web1v6=WEB_1_V6)


class RulesTests(NamespaceTestMixin, SynchronousTestCase):
    """
    Rules in tailnet terms, decided against the fake LocalAPI's status, with the direct dialer to
    the addresses inside the namespace.
    """

    def configText(self) -> str:
        return rulesConfig(self.directory)

    def socketNames(self) -> list[str]:
        return ["web", "ops", "free", "blind"]

    def setUp(self) -> None:
        super().setUp()
        # Until tsmux has read the status once, tag rules deny (no view): wait for the first view.
        waitUntil(lambda: self.fake.statusAnswers > 0, 10, "tsmux to ask the fake LocalAPI for the status")
        waitUntil(
            lambda: socks5Probe(self.path("web"), WEB_1, PORT)["reply"] == 0,
            10,
            lambda: f"tsmux to have a tailnet view:\n{self.ns.log()[-2000:]}",
        )

    def checkSOCKS5(
        self,
        name: str,
        host: str,
        port: int,
        rule: str,
        reply: int | None,
        nobody: bool = False,
        helloFrom: str | None = None,
    ) -> str:
        """
        A SOCKS5 CONNECT through socket C{name} (as nobody or root) is decided by C{rule}, logged so, and
        answered C{reply} (C{None}: a dial error, neither 0 nor 2), with the hello line of
        C{helloFrom} (the target's address; by default C{host}) when it succeeds.
        """
        mark = self.ns.mark()
        answer = self.socks5AsNobody(name, host, port) if nobody else socks5Probe(self.path(name), host, port)
        where = f"{name} {host}:{port}{' as nobody' if nobody else ''}"
        self.assertEqual(answer["method"], 0, where)
        if reply is None:
            self.assertNotIn(answer["reply"], (0, 2), where)
        else:
            self.assertEqual(answer["reply"], reply, where)
        if reply == 0:
            self.assertEqual(answer["hello"], hello(helloFrom or host), where)
        line = self.ns.waitForLine(mark, f"socks5 socket={name} ", f"target={targetText(host, port)} ")
        self.assertIn(f" rule={rule} ", line, where)
        self.assertIn(f" uid={NOBODY if nobody else 0} ", line, where)
        if reply == 0:
            self.assertRegex(line, " ok$", where)
        elif reply == 2:
            self.assertIn(" refused-by-policy: ", line, where)
        else:
            self.assertIn(" dial-error ", line, where)
        return line

    def test_rulesDecideEachDial(self) -> None:
        """Tags, logins, names and suffixes, addresses and networks, IPv6 and IPv4-mapped; first match wins."""
        check = self.checkSOCKS5
        # tag:prod, by address; the deny for port 22 comes first.
        line = check("web", WEB_1, PORT, "web#2", 0)
        self.assertIn("rule=web#2 up=", line)
        line = check("web", WEB_1, 22, "web#1", 2)
        self.assertIn("refused-by-policy: rule web#1 denies tag:prod:22", line)
        # ... not by its names: these sockets dial directly, so a name goes to the system's resolver, and
        # an allow rule trusts no name's tie to a node (with tailscaled's dialers it would: test_sockets).
        for name in ("web-1.example.ts.net", "web-1.example.ts.net.", "WEB-1"):
            check("web", name, PORT, "web#6", 2)
        # A deny rule takes every tie: the name is denied as the node's.
        check("web", "web-1", 22, "web#1", 2)
        # Its host name is the owner's choice and goes to DNS: it ties the node for deny rules only.
        check("web", "webhost", PORT, "web#6", 2)
        check("web", "webhost", 22, "web#1", 2)
        # IPv6: a SOCKS5 IPv6 target is web-1's; an IPv4-mapped one is its IPv4 address.
        check("web", WEB_1_V6, PORT, "web#2", 0)
        check("web", f"::ffff:{WEB_1}", PORT, "web#2", 0, helloFrom=WEB_1)
        check("web", f"::ffff:{WEB_1}", 22, "web#1", 2)
        # A login: db and laptop are bob's (for root only: web#3's callers).
        check("web", DB, PORT, "web#3", 0)
        check("web", DB_V6, PORT, "web#3", 0)
        check("web", LAPTOP, PORT, "web#3", 0)
        check("web", "db", 22, "web#6", 2)
        # Names tied to no node: the tag rule does not match them, their own name or suffix does.
        check("web", "localhost", PORT, "web#5", 0, helloFrom="127.0.0.1")
        check("web", "git.internal.example", PORT, "web#5", None)
        check("web", "nowhere.example.com", PORT, "web#6", 2)
        check("web", "internal.example", PORT, "web#6", 2)
        check("web", "localhost", 22, "web#6", 2)
        # HTTP CONNECT is decided by the same rules.
        mark = self.ns.mark()
        self.assertEqual(connectProbe(self.path("web"), f"{DB}:{PORT}")["hello"], hello(DB))
        answer = connectProbe(self.path("web"), f"[{WEB_1_V6}]:22")
        self.assertEqual((answer["status"], answer["body"]), (403, "tsmux: rule web#1 denies tag:prod:22\n"))
        line = self.ns.waitForLine(mark, "http-connect socket=web ", f"target=[{WEB_1_V6}]:22 ")
        self.assertIn(" rule=web#1 ", line)
        self.assertIn("refused-by-policy status=403", line)

    def test_callersNarrowARule(self) -> None:
        """web#3 (bob's nodes) is root's; nobody gets web#4 (db's addresses) and the rest."""
        check = self.checkSOCKS5
        check("web", DB, PORT, "web#3", 0)
        check("web", DB, PORT, "web#4", 0, nobody=True)
        check("web", DB_V6, PORT, "web#4", 0, nobody=True)
        check("web", LAPTOP, PORT, "web#3", 0)
        check("web", LAPTOP, PORT, "web#6", 2, nobody=True)
        check("web", WEB_1, PORT, "web#2", 0, nobody=True)
        check("web", "localhost", PORT, "web#5", 0, nobody=True, helloFrom="127.0.0.1")

    def test_namesAndAddressesTieToNodes(self) -> None:
        """A name rule matches the node's other names and addresses; an address rule the node's names."""
        check = self.checkSOCKS5
        # ops#1 names db: its own text, and both addresses through the node's full name; not its short name
        # or host name (the direct dialer sends names to the system's resolver: no tie is trusted to allow).
        check("ops", "db.example.ts.net", PORT, "ops#1", None)
        check("ops", "db", PORT, "ops#end", 2)
        check("ops", "DATABASE", PORT, "ops#end", 2)
        check("ops", DB, PORT, "ops#1", 0)
        check("ops", DB_V6, PORT, "ops#1", 0)
        check("ops", "db", 22, "ops#end", 2)
        # ops#2 is web-1's IPv6 address (bracketed): the address and web-1's names, not its IPv4 address.
        check("ops", WEB_1_V6, PORT, "ops#2", 0)
        check("ops", "web-1", PORT, "ops#end", 2)
        line = check("ops", WEB_1, PORT, "ops#end", 2)
        self.assertIn("refused-by-policy: no rule of socket ops allows it", line)
        # A socket with rules = []: every destination, logged as NAME#open.
        check("free", WEB_1, PORT, "free#open", 0)
        check("free", "nowhere.example.com", PORT, "free#open", None)

    def test_viewChangesApply(self) -> None:
        """laptop gains tag:new in tailscaled's status: ops#3 allows it within 5 s."""
        self.checkSOCKS5("ops", LAPTOP, PORT, "ops#end", 2)
        status = self.fake.status
        status["Peer"]["nodekey:laptop"]["Tags"] = ["tag:new"]
        self.fake.setStatus(status)
        waitUntil(
            lambda: socks5Probe(self.path("ops"), LAPTOP, PORT)["reply"] == 0,
            5,
            lambda: f"laptop's new tag to allow it:\n{self.ns.log()[-2000:]}",
            interval=0.1,
        )
        self.checkSOCKS5("ops", LAPTOP, PORT, "ops#3", 0)
        # And losing it again denies it again.
        del status["Peer"]["nodekey:laptop"]["Tags"]
        self.fake.setStatus(status)
        waitUntil(
            lambda: socks5Probe(self.path("ops"), LAPTOP, PORT)["reply"] == 2, 5, "laptop to be denied again", 0.1
        )

    def test_noViewFailsClosed(self) -> None:
        """
        blind's LocalAPI does not answer, so there is no view: its tag rule denies (reply 02), even
        though an allow for everything follows; and the metrics count every decision.
        """
        line = self.checkSOCKS5("blind", WEB_1, PORT, "blind#1", 2)
        self.assertIn("refused-by-policy: rule blind#1 needs the tailnet view, which is missing: ", line)
        self.assertIn("no answer from tailscaled's status yet; last error: ", line)
        self.checkSOCKS5("web", WEB_1, 22, "web#1", 2)
        self.checkSOCKS5("ops", WEB_1, PORT, "ops#end", 2)
        self.checkSOCKS5("free", WEB_1, PORT, "free#open", 0)
        metrics = request(self.path("web"), "/tsmux/v0/metrics")
        self.assertEqual(metrics.status, 200)
        counts = {
            match[1]: int(match[2])
            for match in re.finditer(r"^tsmux_rule_decisions_total(\{[^}]*\}) (\d+)$", metrics.text, re.M)
        }
        for labels in (
            '{socket="blind",rule="blind#1",verdict="no-netmap"}',
            '{socket="web",rule="web#1",verdict="deny"}',
            '{socket="web",rule="web#2",verdict="allow"}',
            '{socket="ops",rule="ops#end",verdict="deny"}',
            '{socket="free",rule="free#open",verdict="allow"}',
        ):
            self.assertGreaterEqual(counts.get(labels, 0), 1, f"{labels} in\n{metrics.text}")
        self.assertEqual(counts['{socket="blind",rule="blind#1",verdict="no-netmap"}'], 1)
        # Nobody else may read them.
        result = runPythonAs(
            NOBODY_IDS, *scriptArgv("pipeline", self.path("web"), buildRequest("GET", "/tsmux/v0/metrics").decode())
        )
        self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 403 Forbidden"], result.stderr)

    def test_localAPIDialIsDecidedByRules(self) -> None:
        """
        On a socket with rules that offers the LocalAPI, a C{dial} is decided by them: 403 from tsmux
        when denied, forwarded to tailscaled (the fake answers 404) when allowed.
        """
        web = self.path("web")

        def dial(host: str, port: int) -> bytes:
            headers = [
                ("Connection", "upgrade"),
                ("Upgrade", "ts-dial"),
                ("Dial-Host", host),
                ("Dial-Port", str(port)),
                ("Dial-Network", "tcp"),
            ]
            return buildRequest("POST", "/localapi/v0/dial", headers=headers, close=False)

        mark = self.ns.mark()
        before = len(self.fake.requests)
        answer = exchange(web, dial(WEB_1, 22))
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer)
        self.assertTrue(
            answer.endswith(b"\r\n\r\ntsmux: LocalAPI dial to 100.64.0.5:22 refused: rule web#1 denies tag:prod:22\n"),
            answer,
        )
        line = self.ns.waitForLine(mark, "localapi socket=web ", " uid=0 ")
        self.assertIn(" access=dial-rules rule=web#1 ", line)
        self.assertIn("refused-by-policy status=403: LocalAPI dial to 100.64.0.5:22 refused: rule web#1", line)
        self.assertEqual(self.fake.requests[before:], [])  # nothing reached tailscaled

        mark = self.ns.mark()
        answer = exchange(web, dial(WEB_1, PORT))
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer)  # the fake's answer
        (seen,) = self.fake.requests[before:]
        self.assertEqual((seen.method, seen.target), ("POST", "/localapi/v0/dial"))
        self.assertEqual((seen.headers["dial-host"], seen.headers["dial-port"]), (WEB_1, str(PORT)))
        line = self.ns.waitForLine(mark, "localapi socket=web ", " uid=0 ")
        self.assertIn(" requests=1 access=dial-rules rule=web#2 ", line)

        # For every caller: nobody's dial to laptop is denied by web#6 (web#3 is root's).
        mark = self.ns.mark()
        result = runPythonAs(NOBODY_IDS, *scriptArgv("pipeline", web, dial(LAPTOP, PORT).decode()))
        self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 403 Forbidden"], result.stderr)
        line = self.ns.waitForLine(mark, "localapi socket=web ", f" uid={NOBODY} ")
        self.assertIn(" access=dial-rules rule=web#6 ", line)
        # Other LocalAPI requests on the socket still go to tailscaled.
        self.assertEqual(request(web, "/localapi/v0/status").status, 200)

    def test_brokenReloadKeepsTheRunningConfig(self) -> None:
        """A broken file changes nothing and logs one error line; a good one then applies."""
        good = self.configText()
        broken = good.replace('name = "web"\n', 'name = "web"\nallow-caller = ["uid:0"]\n').replace(
            f'"[{WEB_1_V6}]:{PORT}"', f'"{WEB_1_V6}:{PORT}"'
        )
        self.assertNotEqual(broken, good)
        mark = self.ns.mark()
        writeAtomically(self.configPath, broken)
        self.ns.reload()
        failed = self.ns.waitForLine(mark, "reload of ")
        first = f"{self.configPath}:{lineOf(broken, 'allow-caller =')}: socket[1].allow-caller: unknown key"
        self.assertIn(f"reload of {self.configPath} failed, the running config is kept: {first}", failed)
        self.assertIn("(did you mean 'allow-callers'?)", failed)
        opsRules = [n for n, text in enumerate(broken.splitlines(), 1) if text.startswith("rules = [")][1]
        self.assertIn(f"; {self.configPath}:{opsRules}: socket[2].rules[2]: rule #2: bad destination ", failed)
        # The old rules are in force, tsmux runs on, and that was the one error line.
        self.checkSOCKS5("web", WEB_1, 22, "web#1", 2)
        self.checkSOCKS5("web", WEB_1, PORT, "web#2", 0)
        self.checkSOCKS5("ops", WEB_1_V6, PORT, "ops#2", 0)
        self.assertIsNone(self.ns.exitCode())
        errors = [line for line in self.ns.linesSince(mark) if "#error]" in line or "#critical]" in line]
        self.assertEqual(errors, [failed])
        self.assertNotIn("reloaded ", self.ns.log()[mark:])

        # A good file then applies at once: web now denies web-1 first.
        mark = self.ns.mark()
        writeAtomically(self.configPath, good.replace('{ deny = ["tag:prod:22"] }', '{ deny = ["tag:prod:*"] }'))
        self.ns.reload()
        reloaded = self.ns.waitForLine(mark, "reloaded ")
        self.assertIn(f"reloaded {self.configPath}: 4 sockets, 11 rules; updated web", reloaded)
        self.checkSOCKS5("web", WEB_1, PORT, "web#1", 2)
        self.checkSOCKS5("ops", WEB_1_V6, PORT, "ops#2", 0)


# --- tsmux check ---------------------------------------------------------------------------------


class CheckCommandTests(SynchronousTestCase):
    """C{tsmux check --config FILE}: a summary and 0, or every problem and 1; nothing started."""

    def setUp(self) -> None:
        self.directory = shortDir(self)

    def check(self, text: str) -> tuple[int, str, str]:
        path = os.path.join(self.directory, "tsmux.toml")
        writeAtomically(path, text)
        result = subprocess.run(
            [*tsmuxCommand(), "check", "--config", path],
            cwd=REPO_ROOT,
            env=childEnvironment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout, result.stderr

    def test_goodFile(self) -> None:
        code, out, err = self.check(rulesConfig(self.directory))
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(out.splitlines()[0], "4 sockets, 11 rules")
        self.assertNotIn("problem", out)
        self.assertEqual(os.listdir(self.directory), ["tsmux.toml"])  # nothing listens

    def test_badFileListsEveryProblem(self) -> None:
        path = os.path.join(self.directory, "tsmux.toml")
        lines = rulesConfig(self.directory).splitlines(keepends=True)
        rulesAt = [n for n, line in enumerate(lines, 1) if line.startswith("rules = [")]
        namesAt = {line.split('"')[1]: n for n, line in enumerate(lines, 1) if line.startswith("name = ")}
        text = "".join(lines)
        text = text.replace('name = "web"\n', 'name = "web"\nallow-caller = ["uid:0"]\n')  # one line down from here
        text = text.replace(f'"[{WEB_1_V6}]:{PORT}"', f'"{WEB_1_V6}:{PORT}"')
        text = text.replace('name = "free"\n', 'name = "free"\nmode = 432\n')  # and one more from here
        text = text.replace('name = "blind"', 'name = "web"')
        code, out, err = self.check(text)
        self.assertEqual((code, err), (1, ""), out)
        expected = [
            f"{path}:{namesAt['web'] + 1}: socket[1].allow-caller: unknown key (did you mean 'allow-callers'?)",
            f"{path}:{rulesAt[1] + 1}: socket[2].rules[2]: rule #2: bad destination '{WEB_1_V6}:{PORT}': IPv6 "
            "addresses and networks go in brackets, e.g. [fd7a:115c:a1e0::1]:443 or [fd7a:115c:a1e0::/48]:*",
            f'{path}:{namesAt["free"] + 2}: socket[3].mode: expected an octal mode as a string like "0660", got 432',
            f"{path}:{namesAt['blind'] + 2}: socket[4].name: 'web' is already socket[1]'s name",
        ]
        found = out.splitlines()
        for problem in expected:
            self.assertEqual(len([line for line in found if problem in line]), 1, f"{problem!r} once in:\n{out}")
        self.assertEqual(found[-1], "4 problems: tsmux would not start", out)
