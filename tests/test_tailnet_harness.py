"""
Tests for the integration-test harness itself: if these fail, integration failures elsewhere say
nothing about tsmux.
"""

from __future__ import annotations

import os
import socket
import sys
import unittest

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import _tailnet
from tests._tailnet import (
    HELLO_BODY,
    PrivateTailnet,
    TailnetUnavailable,
    skipOrFail,
    startPrivateTailnet,
    tailnetSkipReason,
)

# Run inside the namespace: send to the echo target, half-close, read until its EOF.
_ECHO_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"ping " * 1000)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    got += data
sys.stdout.write(repr(got == b"ping " * 1000))
"""


def _accepts(path: str) -> bool:
    """
    Whether something listens on the Unix socket C{path}.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _isLiveTailscaled(pid: int) -> bool:
    """
    Whether C{pid} is a tailscaled that has not exited (zombies count as gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2]
    return comm == "tailscaled" and state not in "ZX"


class SkipOrFailTests(SynchronousTestCase):
    """
    CI must never skip integration tests silently.
    """

    def setUp(self) -> None:
        self.patch(_tailnet, "tailnetUnavailableReason", lambda: "no tailnet for you")

    def _setRequired(self, value: str | None) -> None:
        old = os.environ.pop("TSMUX_REQUIRE_INTEGRATION", None)
        if value is not None:
            os.environ["TSMUX_REQUIRE_INTEGRATION"] = value

        def restore() -> None:
            os.environ.pop("TSMUX_REQUIRE_INTEGRATION", None)
            if old is not None:
                os.environ["TSMUX_REQUIRE_INTEGRATION"] = old

        self.addCleanup(restore)

    def test_skipsWhenNotRequired(self) -> None:
        """
        On a developer machine without root or binaries, the tests skip with the reason.
        """
        self._setRequired(None)
        exc = self.assertRaises(unittest.SkipTest, skipOrFail, "no tailnet for you")
        self.assertEqual(str(exc), "no tailnet for you")
        self.assertEqual(tailnetSkipReason(), "no tailnet for you")

    def test_failsWhenRequired(self) -> None:
        """
        Under TSMUX_REQUIRE_INTEGRATION=1 the same condition is an error, not a skip.
        """
        self._setRequired("1")
        exc = self.assertRaises(TailnetUnavailable, _tailnet.requireTailnet)
        self.assertIn("no tailnet for you", str(exc))
        self.assertIn("TSMUX_REQUIRE_INTEGRATION=1", str(exc))
        self.assertIsNone(tailnetSkipReason())


class PrivateTailnetTests(TestCase):
    """
    A real tailscaled in a private namespace comes up logged out, its targets answer, and it can
    be stopped, started and killed without leaking processes.
    """

    skip = tailnetSkipReason()

    def setUp(self) -> None:
        self.tailnet = startPrivateTailnet(self)

    def test_loggedOut(self) -> None:
        """
        A fresh tailscaled has no login: C{tailscale status} says so and exits 1.
        """
        result = self.tailnet.runTailscale(["status"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 1, result)
        self.assertIn("Logged out.", result.stdout)

    def test_targetsInNamespace(self) -> None:
        """
        The HTTP target answers inside the namespace, directly and through tailscaled's SOCKS5;
        the closed port refuses.
        """
        if self.tailnet.runInNamespace(["curl", "--version"], capture_output=True).returncode:
            skipOrFail("curl is missing (apt-get install curl)")
        base = f"http://127.0.0.1:{self.tailnet.httpPort}"
        curl = ["curl", "-sS", "--max-time", "10"]
        hello = self.tailnet.runInNamespace(curl + [base + "/"], capture_output=True)
        self.assertEqual((hello.returncode, hello.stdout), (0, HELLO_BODY), hello)
        big = self.tailnet.runInNamespace(curl + [base + "/big?n=300000"], capture_output=True)
        self.assertEqual(big.returncode, 0, big)
        self.assertEqual(big.stdout, (bytes(range(256)) * 1200)[:300000])
        proxied = self.tailnet.runInNamespace(
            curl + ["-x", f"socks5h://127.0.0.1:{self.tailnet.socks5Port}", base + "/"],
            capture_output=True,
        )
        self.assertEqual((proxied.returncode, proxied.stdout), (0, HELLO_BODY), proxied)
        refused = self.tailnet.runInNamespace(
            curl + [f"http://127.0.0.1:{self.tailnet.closedPort}/"], capture_output=True
        )
        self.assertEqual(refused.returncode, 7, refused)  # curl: couldn't connect

    def test_echoHalfClose(self) -> None:
        """
        The echo target returns everything and then its own EOF after the client's EOF.
        """
        result = self.tailnet.runInNamespace(
            [sys.executable, "-c", _ECHO_CLIENT, str(self.tailnet.echoPort)],
            capture_output=True,
            text=True,
        )
        self.assertEqual((result.returncode, result.stdout), (0, "True"), result)

    def test_stopStartKill(self) -> None:
        """
        tailscaled can be stopped and started again on the same socket, and survives a SIGKILL
        restart (leftover socket file).
        """
        tailnet = self.tailnet
        firstPid = tailnet.tailscaledPid
        assert firstPid is not None
        tailnet.stopTailscaled()
        self.assertIsNone(tailnet.tailscaledPid)
        self.assertFalse(_isLiveTailscaled(firstPid))
        self.assertFalse(_accepts(tailnet.localapi))
        tailnet.startTailscaled()
        self.assertTrue(_accepts(tailnet.localapi))
        self.assertNotEqual(tailnet.tailscaledPid, firstPid)
        status = tailnet.runTailscale(["status"], capture_output=True, text=True)
        self.assertIn("Logged out.", status.stdout)

        secondPid = tailnet.tailscaledPid
        assert secondPid is not None
        tailnet.killTailscaled()
        self.assertFalse(_isLiveTailscaled(secondPid))
        self.assertFalse(_accepts(tailnet.localapi))
        tailnet.startTailscaled()
        self.assertTrue(_accepts(tailnet.localapi))

    def test_stopLeavesNothing(self) -> None:
        """
        stop() ends tailscaled and the helper, and may be called again.
        """
        tailscaledPid = self.tailnet.tailscaledPid
        helperPid = self.tailnet.helperPid
        assert tailscaledPid is not None
        self.assertTrue(_isLiveTailscaled(tailscaledPid))
        self.tailnet.stop()
        self.assertFalse(_isLiveTailscaled(tailscaledPid))
        self.assertFalse(os.path.exists(f"/proc/{helperPid}"))
        self.tailnet.stop()


class LongWorkdirTests(SynchronousTestCase):
    """
    A work directory too long for a Unix socket path still works: the socket goes elsewhere.
    """

    skip = tailnetSkipReason()

    def test_longWorkdir(self) -> None:
        """
        The LocalAPI socket path stays short enough, and is removed on stop.
        """
        _tailnet.requireTailnet()
        workdir = os.path.join(os.path.abspath(self.mktemp()), "d" * 120)
        tailnet = PrivateTailnet(workdir)
        self.addCleanup(tailnet.stop)
        tailnet.start()
        self.assertLess(len(tailnet.localapi), 100)
        self.assertTrue(_accepts(tailnet.localapi))
        socketDir = os.path.dirname(tailnet.localapi)
        tailnet.stop()
        self.assertFalse(os.path.exists(socketDir))
