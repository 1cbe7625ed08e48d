"""
The splice(2) fast path when peers misbehave: resets in either direction,
a source that resets while the destination is slow, and half-close both ways
with bulk data.  Every case must end with the connection closed, its pipes
and sockets released (fd count back), and an exact log line.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from ._fakes import capturedEvents
from ._realsockets import openFds, recvAll, recvExactly, socksConnect, startMux, waitUntilReactorRuns
from ._waiting import waitUntilAsync


def rawTarget(handler: Callable[[socket.socket], None]) -> int:
    """A one-connection TCP target run by plain blocking code in a thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)

    def run() -> None:
        connection, _ = server.accept()
        try:
            handler(connection)
        except OSError:
            pass
        finally:
            connection.close()
            server.close()

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def drain(sock: socket.socket) -> int:
    count = 0
    try:
        while chunk := sock.recv(65536):
            count += len(chunk)
    except OSError:
        pass
    return count


class SpliceMisbehaviourTests(TestCase):
    timeout = 60

    async def relayOnce(self, target: Callable[[socket.socket], None], client: Callable[[str, int], object]) -> dict:
        path, factory = startMux(self, splice=True)
        events = capturedEvents(self)
        await waitUntilReactorRuns()
        before = openFds()
        port = rawTarget(target)
        self.clientResult = await threads.deferToThread(client, path, port)
        await waitUntilAsync(lambda: not factory.openConnections, what="the connection to close")
        await waitUntilAsync(lambda: openFds() <= before, what=f"fds back to {before}")
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        return line

    async def test_targetResetsMidUpload(self) -> None:
        def target(connection: socket.socket) -> None:
            received = 0
            while received < 600_000:
                received += len(connection.recv(65536))
            reset(connection)

        def client(path: str, port: int) -> None:
            sock, reply = socksConnect(path, "127.0.0.1", port)
            assert reply == 0
            try:
                sock.sendall(os.urandom(3_000_000))
            except OSError:
                pass
            sock.close()

        line = await self.relayOnce(target, client)
        self.assertEqual(line["outcome"], "error")
        self.assertGreaterEqual(line["bytesFromClient"], 600_000)

    async def test_clientResetsMidDownload(self) -> None:
        def target(connection: socket.socket) -> None:
            connection.sendall(os.urandom(5_000_000))
            connection.settimeout(10)
            connection.recv(10)

        def client(path: str, port: int) -> None:
            sock, reply = socksConnect(path, "127.0.0.1", port)
            assert reply == 0
            recvExactly(sock, 700_000)
            reset(sock)

        line = await self.relayOnce(target, client)
        self.assertEqual(line["outcome"], "error")

    async def test_sourceResetsWhileTheClientIsSlow(self) -> None:
        def target(connection: socket.socket) -> None:
            connection.recv(2)  # the relay is up (a reset during the connect would be a dial error)
            connection.sendall(os.urandom(2_000_000))
            reset(connection)

        def client(path: str, port: int) -> int:
            sock, reply = socksConnect(path, "127.0.0.1", port)
            assert reply == 0
            sock.sendall(b"go")
            time.sleep(1)  # not a wait: a client that is slow to read is what this test is about
            sock.settimeout(10)
            received = drain(sock)
            sock.close()
            return received

        line = await self.relayOnce(target, client)
        # The log counts what tsmux relayed; the client got that, or less if the reset
        # reached it first (Linux may drop queued bytes on a reset).
        self.assertGreater(self.clientResult, 0)  # type: ignore[misc]
        self.assertLessEqual(self.clientResult, line["bytesToClient"] - 12)
        self.assertEqual(line["outcome"], "error")

    async def test_halfCloseBothWaysWithBulkData(self) -> None:
        payload = os.urandom(2_000_000)
        received: dict[str, int] = {}

        def target(connection: socket.socket) -> None:
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
            received["target"] = drain(connection)

        def client(path: str, port: int) -> int:
            sock, reply = socksConnect(path, "127.0.0.1", port)
            assert reply == 0

            def upload() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

            uploader = threading.Thread(target=upload)
            uploader.start()
            count = len(recvAll(sock))
            uploader.join()
            sock.close()
            return count

        line = await self.relayOnce(target, client)
        self.assertEqual(self.clientResult, len(payload))
        self.assertEqual(line["outcome"], "ok")
        self.assertEqual(line["bytesToClient"], 12 + len(payload))
        await waitUntilAsync(lambda: "target" in received, what="the target to finish")
        self.assertEqual(received["target"], len(payload))
