"""The relay on real sockets: half-close, flow control, optimistic data, no fd leaks."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

from twisted.internet import defer, task, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tsmux import _relay
from tsmux._peercred import _peerGroups
from tsmux._socks5 import buildRequest
from tsmux._splice import PIPE_SIZE

from ._fakes import capturedEvents
from ._otheruser import requireOtherUser
from ._realsockets import (
    Echo,
    Sink,
    Source,
    listenTCP,
    openFds,
    pattern,
    reactor,
    recvAll,
    recvExactly,
    relayBufferedBytes,
    shortTempDir,
    socksConnect,
    startMux,
    waitUntilReactorRuns,
)
from ._waiting import waitUntilAsync


class HalfCloseTests(TestCase):
    splice = False
    timeout = 30

    def test_uploadShutdownThenReadReply(self) -> defer.Deferred[None]:
        """The client shuts down its write side; the target's reply still arrives."""
        path, _ = startMux(self, splice=self.splice)
        echoPort = listenTCP(self, Echo)
        payload = os.urandom(300_000)

        def client() -> bytes:
            sock, reply = socksConnect(path, "127.0.0.1", echoPort)
            assert reply == 0, reply
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = recvAll(sock)
            sock.close()
            return data

        return threads.deferToThread(client).addCallback(lambda data: self.assertEqual(data, payload))

    def test_shutdownBeforeTheReply(self) -> defer.Deferred[None]:
        """EOF sent with the request, before the dial finished, is kept and forwarded."""
        path, _ = startMux(self, splice=self.splice)
        echoPort = listenTCP(self, Echo)

        def client() -> bytes:
            import tsmux._socks5 as s

            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"\x05\x01\x00" + s.buildRequest("127.0.0.1", echoPort) + b"ping")
            sock.shutdown(socket.SHUT_WR)
            data = recvAll(sock)
            sock.close()
            return data

        def check(data: bytes) -> None:
            self.assertEqual(data[:2], b"\x05\x00")
            self.assertTrue(data.endswith(b"ping"), data)

        return threads.deferToThread(client).addCallback(check)


class FlowControlTests(TestCase):
    splice = False
    timeout = 60

    async def test_slowReaderBoundsMemory(self) -> None:
        size = 48 * 1024 * 1024
        path, factory = startMux(self, splice=self.splice)
        sourcePort = listenTCP(self, Source, size=size)
        sock, reply = await threads.deferToThread(socksConnect, path, "127.0.0.1", sourcePort)
        self.addCleanup(sock.close)
        self.assertEqual(reply, 0)
        # Read a first part (with splicing on, that moves the relay to the kernel path),
        # then stop reading: the target writes everything at once into its own buffer,
        # and tsmux must stop reading from it instead of queueing toward us.
        first = await threads.deferToThread(recvExactly, sock, 2 * 1024 * 1024)
        (relay,) = factory.relays
        self.assertEqual(relay.splice is not None, self.splice)
        peaks = []
        # Not a wait: what is under test is that the buffers stay bounded over a while (0.5 s)
        # in which the client reads nothing, sampled every 20 ms.
        for _ in range(25):
            await task.deferLater(reactor, 0.02, lambda: None)
            peaks.append(relayBufferedBytes(factory))
        # About one read chunk per direction: Twisted's 64 KiB buffer, or one pipe when spliced.
        limit = PIPE_SIZE + 128 * 1024 if self.splice else 1024 * 1024
        self.assertLessEqual(max(peaks), limit, peaks)
        self.assertGreater(max(peaks), 0, "the stall was not observed")
        data = first + await threads.deferToThread(recvAll, sock)
        self.assertEqual(len(data), size)
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(pattern(size)).digest())


class LingerTests(TestCase):
    timeout = 30

    async def test_peerThatNeverReadsIsCutAfterTheLinger(self) -> None:
        """
        Regression (review): the client side is cut (as at shutdown) while the
        target never reads; the relay must still end, with its log line.
        """
        self.patch(_relay, "LINGER", 0.5)
        path, factory = startMux(self, splice=False)
        port = listenTCP(self, Sink)

        def client() -> socket.socket:
            sock, reply = socksConnect(path, "127.0.0.1", port)
            assert reply == 0
            sock.settimeout(1)
            try:
                for _ in range(1024):  # up to 64 MiB, until everything between us and the target is full
                    sock.sendall(b"x" * 65536)
            except TimeoutError:
                pass
            return sock

        self.addCleanup(Sink.dropAll)
        sock = await threads.deferToThread(client)
        self.addCleanup(sock.close)
        (relay,) = factory.relays
        await waitUntilAsync(lambda: relay.client.transport not in reactor.getReaders(), what="the client to be paused")
        for record in list(factory.openConnections):
            record.transport.abortConnection()
        await waitUntilAsync(lambda: not factory.openConnections, timeout=5, what="the relay to be cut")


class OptimisticDataTests(TestCase):
    splice = False
    timeout = 30

    def test_dataBeforeTheReplyReachesTheTarget(self) -> defer.Deferred[None]:
        path, _ = startMux(self, splice=self.splice)
        echoPort = listenTCP(self, Echo)

        def client() -> bytes:
            sock, reply = socksConnect(path, "127.0.0.1", echoPort, extra=b"hello before reply")
            assert reply == 0
            data = recvExactly(sock, len(b"hello before reply"))
            sock.close()
            return data

        return threads.deferToThread(client).addCallback(self.assertEqual, b"hello before reply")


class ByteCountTests(TestCase):
    splice = False
    timeout = 30

    async def test_logLineCountsEveryByte(self) -> None:
        path, factory = startMux(self, splice=self.splice)
        echoPort = listenTCP(self, Echo)
        events = capturedEvents(self)
        payload = os.urandom(3 * 1024 * 1024 + 17)

        def client() -> bytes:
            sock, reply = socksConnect(path, "127.0.0.1", echoPort)
            assert reply == 0
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = recvAll(sock)
            sock.close()
            return data

        self.assertEqual(await threads.deferToThread(client), payload)
        await waitUntilAsync(lambda: not factory.openConnections, what="the connection to end")
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        handshake = len(b"\x05\x01\x00" + buildRequest("127.0.0.1", echoPort))
        self.assertEqual(line["bytesFromClient"], handshake + len(payload))
        self.assertEqual(line["bytesToClient"], 2 + 10 + len(payload))
        self.assertEqual(line["outcome"], "ok")


class ResourceTests(TestCase):
    splice = False
    timeout = 120

    async def test_noFdLeakAfterManyConnections(self) -> None:
        path, factory = startMux(self, splice=self.splice)
        echoPort = listenTCP(self, Echo)
        await waitUntilReactorRuns()
        before = openFds()

        def clients(count: int) -> None:
            for index in range(count):
                sock, reply = socksConnect(path, "127.0.0.1", echoPort if index % 5 else 1)
                if reply == 0:
                    sock.sendall(b"x")
                    recvExactly(sock, 1)
                    if index % 2:
                        sock.shutdown(socket.SHUT_WR)
                        recvAll(sock)
                sock.close()

        await defer.gatherResults([threads.deferToThread(clients, 60) for _ in range(4)])
        await waitUntilAsync(lambda: not factory.openConnections, what="connections to close")
        await waitUntilAsync(lambda: openFds() <= before, what=f"fds back to {before}")
        self.assertEqual(openFds(), before)

    async def test_burstOfConnectsQueues(self) -> None:
        """Hundreds of simultaneous connects queue in the backlog instead of failing."""
        path, factory = startMux(self, splice=self.splice)

        def burst() -> int:
            socks = []
            try:
                for _ in range(400):
                    sock = socket.socket(socket.AF_UNIX)
                    sock.setblocking(False)
                    sock.connect(path)  # raises BlockingIOError if the backlog is full
                    socks.append(sock)
                return len(socks)
            finally:
                for sock in socks:
                    sock.close()

        self.assertEqual(await threads.deferToThread(burst), 400)
        await waitUntilAsync(lambda: not factory.openConnections, what="connections to close")


class PeerCredentialTests(TestCase):
    splice = False
    timeout = 30

    async def test_logLineNamesTheCaller(self) -> None:
        path, factory = startMux(self, splice=self.splice)
        events = capturedEvents(self)

        def client() -> None:
            sock, reply = socksConnect(path, "127.0.0.1", 1)
            assert reply == 5, reply
            sock.close()

        await threads.deferToThread(client)
        await waitUntilAsync(lambda: any(e.get("log_namespace") == "tsmux.connection" for e in events))
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        self.assertEqual((line["pid"], line["uid"], line["gid"]), (os.getpid(), os.getuid(), os.getgid()))
        self.assertEqual((line["outcome"], line["reply"], line["errorKind"]), ("dial-error", 5, "connection-refused"))


# The same tests with the splice(2) fast path on.


class HalfCloseTestsSpliced(HalfCloseTests):
    splice = True


class FlowControlTestsSpliced(FlowControlTests):
    splice = True


class OptimisticDataTestsSpliced(OptimisticDataTests):
    splice = True


class ByteCountTestsSpliced(ByteCountTests):
    splice = True


class ResourceTestsSpliced(ResourceTests):
    splice = True


class PeerCredentialTestsSpliced(PeerCredentialTests):
    splice = True


class PeerGroupsTests(SynchronousTestCase):
    """Regression: supplementary groups come from SO_PEERGROUPS at accept (Python caps its buffer at 1 KiB)."""

    def groupsOfAClientWith(self, count: int) -> frozenset[int] | None:
        requireOtherUser()
        directory = shortTempDir(self)
        path = os.path.join(directory, "s.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        self.addCleanup(server.close)
        groups = ",".join(str(gid) for gid in range(1000, 1000 + count))
        # Holds the connection until the cleanup below kills it.
        script = f"import signal, socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); signal.pause()"
        child = subprocess.Popen(["setpriv", f"--groups={groups}", sys.executable, "-c", script])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        connection, _ = server.accept()
        self.addCleanup(connection.close)
        return _peerGroups(connection)

    def test_manyGroupsRead(self) -> None:
        self.assertEqual(self.groupsOfAClientWith(100), frozenset(range(1000, 1100)))

    def test_tooManyGroupsFallBack(self) -> None:
        self.assertIsNone(self.groupsOfAClientWith(400))  # the policy then reads /proc
