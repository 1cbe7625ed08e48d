"""The nc dialer: a process per connection, with a fake `tailscale nc` and a fake LocalAPI."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.internet import threads
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tsmux import _nc
from tsmux._localapi import LocalAPIAccess
from tsmux._nc import NcDialer
from tsmux._peercred import PeerCredentials
from tsmux._socks5 import Reply

from ._fakes import capturedEvents
from ._otheruser import NOBODY, requireOtherUser
from ._realsockets import (
    Echo,
    listenTCP,
    reactor,
    recvAll,
    recvExactly,
    shortTempDir,
    socksConnect,
    startMux,
    waitUntilClosed,
)
from ._tailnet import startPrivateTailnet, tailnetSkipReason
from ._tsmuxprocess import startTsmux
from ._waiting import waitUntilAsync

FAKE_NC = """#!{python}
# Stands in for `tailscale --socket PATH nc HOST PORT`; records that it ran.
import os, socket, sys, threading
open(os.environ["FAKE_NC_MARKER"], "a").write(" ".join(sys.argv[1:]) + "\\n")
host, port = sys.argv[4], int(sys.argv[5])
if host == "refuse.invalid":
    sys.stderr.write("dial failure: dial tcp 127.0.0.1:1: connect: connection refused\\n")
    sys.exit(1)
if host == "slow.invalid":
    import time
    time.sleep(20)  # not a wait: a dial that never finishes (not reading stdin) is the case under test
    sys.exit(1)
sock = socket.create_connection((host, port))
die = host == "localhost"
def upstream():
    while True:
        data = os.read(0, 65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(data)
        if die:
            os._exit(3)
threading.Thread(target=upstream, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


class FakeStatus(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.state = "Running"

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"BackendState": self.state}).encode()


class NcDialerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = shortTempDir(self)
        self.marker = os.path.join(directory, "ran")
        open(self.marker, "w").close()
        self.cli = os.path.join(directory, "tailscale")
        with open(self.cli, "w") as f:
            f.write(FAKE_NC.format(python=sys.executable))
        os.chmod(self.cli, 0o755)
        os.environ["FAKE_NC_MARKER"] = self.marker
        self.addCleanup(os.environ.pop, "FAKE_NC_MARKER", None)
        self.status = FakeStatus()
        self.localapi = os.path.join(directory, "localapi.sock")
        site = server.Site(self.status)
        site.noisy = False
        port = reactor.listenUNIX(self.localapi, site)
        self.addCleanup(port.stopListening)
        self.dialer = NcDialer(reactor, self.cli, self.localapi, timeout=10, grace=0.3)
        self.addCleanup(self.dialer._client.close)
        self.path, self.factory = startMux(self, dialer=self.dialer)
        self.echoPort = listenTCP(self, Echo)

    def runs(self) -> list[str]:
        with open(self.marker) as f:
            return f.read().splitlines()

    async def test_relaysThroughTheProcess(self) -> None:
        def client() -> bytes:
            sock, reply = socksConnect(self.path, "127.0.0.1", self.echoPort, extra=b"hello ")
            assert reply == 0, reply
            sock.sendall(b"world")
            data = recvExactly(sock, 11)
            sock.close()
            return data

        self.assertEqual(await threads.deferToThread(client), b"hello world")
        self.assertEqual(self.runs(), [f"--socket {self.localapi} nc 127.0.0.1 {self.echoPort}"])

    async def test_earlyExitMappedFromStderr(self) -> None:
        def client() -> int:
            sock, reply = socksConnect(self.path, "refuse.invalid", 80)
            sock.close()
            return reply

        self.assertEqual(await threads.deferToThread(client), Reply.CONNECTION_REFUSED)

    async def test_notRunningMeansNoSpawn(self) -> None:
        self.status.state = "NeedsLogin"

        def client() -> int:
            sock, reply = socksConnect(self.path, "127.0.0.1", self.echoPort)
            sock.close()
            return reply

        self.assertEqual(await threads.deferToThread(client), Reply.NETWORK_UNREACHABLE)
        self.assertEqual(self.runs(), [])

    async def test_processDyingMidStream(self) -> None:
        port = listenTCP(self, Echo)

        def client() -> bytes:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(self.path)
            from tsmux._socks5 import buildRequest

            # "localhost" makes the fake die after forwarding its first write.
            sock.sendall(b"\x05\x01\x00" + buildRequest("localhost", port))
            data = recvExactly(sock, 12)
            sock.sendall(b"x")
            data += recvAll(sock)
            sock.close()
            return data

        events = capturedEvents(self)
        data = await threads.deferToThread(client)
        self.assertEqual(data[:3], b"\x05\x00\x05")
        self.assertEqual(data[3], Reply.SUCCEEDED)
        await waitUntilClosed(self.factory)
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        self.assertEqual(line["outcome"], "error")
        self.assertIn("tailscale nc exited with status 3", line["detail"])

    async def test_processKilledWhenTheClientLeaves(self) -> None:
        """Regression (review): a client leaving must not leave tailscale nc running, nor the record open."""
        self.patch(_nc, "STDIN_CLOSED_KILL_AFTER", 0.5)

        def client() -> int:
            sock, reply = socksConnect(self.path, "slow.invalid", 80)
            sock.close()
            return reply

        self.assertEqual(await threads.deferToThread(client), Reply.SUCCEEDED)  # after the grace period
        await waitUntilClosed(self.factory, timeout=5)


class NcAgainstTailscaledTests(TestCase):
    skip = tailnetSkipReason()

    def test_loggedOutTailscaledNoSpawn(self) -> None:
        tailnet = startPrivateTailnet(self)
        tsmux = startTsmux(self, "--localapi", tailnet.localapi, "--dialer", f"nc:{tailnet.tailscale}")
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", tailnet.httpPort)
        sock.close()
        self.assertEqual(reply, Reply.NETWORK_UNREACHABLE)
        tsmux.stop()
        self.assertIn("tailscaled is NeedsLogin; not spawning", tsmux.log())


FAKE_NC_IDS = """#!{python}
# Stands in for `tailscale --socket PATH nc HOST PORT`: says who it runs as and
# whether it can reach the LocalAPI socket it was given, then ends.
import os, socket, sys
socketPath = sys.argv[2]
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(socketPath)
    reached = "reached"
except OSError as error:
    reached = "unreachable " + error.strerror
with open(os.environ["FAKE_NC_MARKER"], "a") as marker:
    marker.write(repr((os.getresuid(), os.getresgid(), sorted(os.getgroups()), socketPath, reached)) + "\\n")
print("up", flush=True)
"""


class NcAsCallerTests(TestCase):
    """The child runs as the caller, and reaches a LocalAPI socket in a directory only root may enter."""

    timeout = 60

    def setUp(self) -> None:
        requireOtherUser()
        # The system's Python: the child execs it with the caller's own rights, and a
        # Python under /root (pyenv) is out of uid 65534's reach.
        python = "/usr/bin/python3"
        if not os.path.exists(python):
            self.skipTest(f"{python} is missing")
        directory = shortTempDir(self)
        os.chmod(directory, 0o755)
        self.marker = os.path.join(directory, "ran")
        open(self.marker, "w").close()
        os.chmod(self.marker, 0o666)
        self.cli = os.path.join(directory, "tailscale")
        with open(self.cli, "w") as f:
            f.write(FAKE_NC_IDS.format(python=python))
        os.chmod(self.cli, 0o755)
        os.environ["FAKE_NC_MARKER"] = self.marker
        self.addCleanup(os.environ.pop, "FAKE_NC_MARKER", None)
        private = os.path.join(directory, "private")
        os.mkdir(private, 0o700)
        self.localapi = os.path.join(private, "localapi.sock")
        site = server.Site(FakeStatus())
        site.noisy = False
        port = reactor.listenUNIX(self.localapi, site, mode=0o666)
        self.addCleanup(port.stopListening)
        access = LocalAPIAccess(reactor, self.localapi, 10)
        access.decide()
        self.dialer = NcDialer(reactor, self.cli, self.localapi, timeout=10, grace=5, access=access)
        self.addCleanup(self.dialer._client.close)

    async def test_childRunsAsTheCaller(self) -> None:
        caller = PeerCredentials(1, NOBODY, NOBODY, frozenset({NOBODY, 4242}))
        upstream: Any = await self.dialer.dial("127.0.0.1", 9, caller)
        upstream.abort()
        process = upstream.process
        await waitUntilAsync(lambda: process.pid is None and not process.pipes, what="the child to be reaped")
        with open(self.marker) as f:
            (line,) = f.read().splitlines()
        ids, gids, groups, socketPath, reached = eval(line)  # written by the fake just above
        self.assertEqual((ids, gids, groups), ((NOBODY,) * 3, (NOBODY,) * 3, [4242, NOBODY]))
        self.assertEqual(socketPath, "/proc/self/fd/3")
        self.assertEqual(reached, "reached")
