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
from tests._tailnet_shared import (
    ChildOptions,
    Command,
    CommandReply,
    Message,
    Ready,
    StartFailed,
    patternBytes,
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


class WireProtocolTests(SynchronousTestCase):
    """
    What parent and child say to each other (L{tests._tailnet_shared}), with no process started.
    """

    def test_messagesRoundTrip(self) -> None:
        """
        Every message is one JSON line that reads back as the same message.
        """
        for message in (
            Ready("/tmp/x/tailscaled.sock", 1, 2, 3, 4, 5, "/tmp/x/tailscaled.log"),
            StartFailed("refusing to run: not in a private network namespace"),
            CommandReply(ok=True, tailscaledPid=42),
            CommandReply(ok=False, error="tailscaled exited"),
        ):
            line = message.toJSON()
            self.assertTrue(line.endswith(b"\n"))
            self.assertNotIn(b"\n", line[:-1])
            self.assertEqual(Message.fromJSON(line), message)

    def test_expectAndUnknown(self) -> None:
        """
        A reader names the kind it expects; lines that are no message are refused.
        """
        reply = Message.fromJSON(CommandReply(ok=True).toJSON())
        self.assertEqual(CommandReply.expect(reply), CommandReply(ok=True))
        self.assertRaises(ValueError, Ready.expect, reply)
        for line in (b'{"ok": true}', b'{"message": "hello"}', b"[1, 2]"):
            self.assertRaises(ValueError, Message.fromJSON, line)

    def test_commandsAndArguments(self) -> None:
        """
        Commands are single lines; the child's command line parses back to the options.
        """
        for command in Command:
            self.assertEqual(Command.fromLine(command.toLine().decode()), command)
        self.assertRaises(ValueError, Command.fromLine, "reboot\n")
        for options in (ChildOptions("/bin/tailscaled", "/tmp/d"), ChildOptions("/bin/tailscaled", "/tmp/d", "/s")):
            argv = options.toArgv("python3")
            self.assertEqual(argv[:3], ["python3", "-m", "tests._netns_tailnet"])
            self.assertEqual(ChildOptions.fromArgv(argv[3:]), options)

    def test_pattern(self) -> None:
        """
        The pattern /big serves continues across any offset.
        """
        self.assertEqual(patternBytes(0, 300), (bytes(range(256)) * 2)[:300])
        self.assertEqual(patternBytes(65530, 12), bytes(range(250, 256)) + bytes(range(6)))


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
