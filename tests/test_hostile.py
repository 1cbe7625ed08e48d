"""
tsmux under hostile and heavy use, as a real process in front of a real
tailscaled: junk input, silent connections, connection limits, shutdown and
tailscaled dying mid-transfer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tsmux._dialers import buildDialRequest
from tsmux._socks5 import buildRequest

from ._httpclient import socksCurl
from ._otheruser import NOBODY_IDS, requireOtherUser, runPythonAs
from ._realsockets import recvExactly
from ._tailnet import HELLO_BODY
from ._tsmuxprocess import IntegrationTestMixin, TsmuxProcess, assertCleanLog
from ._waiting import waitUntil

# A SOCKS5 greeting (no authentication) and its answer, then a CONNECT's answer for an IPv4 target.
GREETING = b"\x05\x01\x00"
SOCKS5_ANSWERS = 2 + 10


def mutate(rng: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.6 and data:
            del data[rng.randrange(len(data)) :]
        elif choice < 0.8:
            position = rng.randrange(len(data) + 1)
            data[position:position] = rng.randbytes(rng.randint(1, 20))
        else:
            data += data[: rng.randint(0, len(data))]
    return bytes(data)


def hostileInputs(seed: int, count: int, echoPort: int, closedPort: int) -> list[bytes]:
    """Random bytes, and mutations of what tsmux expects."""
    rng = random.Random(seed)
    seeds = [
        b"\x05\x01\x00" + buildRequest("127.0.0.1", echoPort) + b"hello",
        b"\x05\x01\x00" + buildRequest("127.0.0.1", closedPort),
        b"\x05\x02\x00\x02" + buildRequest("peer.example.ts.net", 80),
        b"\x05\x01\x00" + buildRequest("::1", echoPort, command=3),
        b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n",
        b"POST /localapi/v0/logout HTTP/1.1\r\nHost: local-tailscaled.sock\r\nContent-Length: 0\r\n\r\n",
        b"PUT /localapi/v0/file-put/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        buildDialRequest("127.0.0.1", echoPort) + b"raw",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        b"\x16\x03\x01\x00\x05hello",
    ]
    inputs = []
    for index in range(count):
        if index % 4 == 0:
            inputs.append(rng.randbytes(rng.randint(0, 300)))
        else:
            inputs.append(mutate(rng, rng.choice(seeds)))
    return inputs


# Run as another user too (the LocalAPI guard's parser only sees non-admins).
FUZZER = r"""
import json, socket, sys, threading
path = sys.argv[1]
inputs = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
def one(data, index):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.3)
    try:
        s.connect(path)
        s.sendall(data)
        if index % 2:
            s.shutdown(socket.SHUT_WR)
        s.recv(65536)
    except OSError:
        pass
    finally:
        s.close()
def worker(start):
    for index in range(start, len(inputs), 16):
        one(inputs[index], index)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print("done", len(inputs))
"""


class HostileTestMixin(IntegrationTestMixin):
    def startTsmux(self, *args: str, **kw: Any) -> TsmuxProcess:
        return super().startTsmux("--mode", "0666", *args, **kw)

    def goodClientWorks(self, tsmux: TsmuxProcess) -> None:
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/")
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)

    def relayedEcho(self, tsmux: TsmuxProcess) -> socket.socket:
        """A SOCKS5 connection to the echo target, relaying once this returns."""
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.settimeout(10)
        sock.connect(tsmux.socketPath)
        sock.sendall(GREETING + buildRequest("127.0.0.1", self.tailnet.echoPort))
        self.assertEqual(recvExactly(sock, SOCKS5_ANSWERS)[:4], b"\x05\x00\x05\x00")
        return sock

    def curlToFile(self, tsmux: TsmuxProcess, size: int, rate: str) -> tuple[subprocess.Popen[bytes], str]:
        """curl downloading C{size} bytes through tsmux at C{rate}, into a file (returned) as they come."""
        directory = self.mktemp()
        os.makedirs(directory)
        output = os.path.join(directory, "download")
        curl = subprocess.Popen(
            [
                "curl",
                "-sS",
                "--limit-rate",
                rate,
                "-o",
                output,
                "-x",
                f"socks5h://localhost{tsmux.socketPath}",
                f"http://127.0.0.1:{self.tailnet.httpPort}/big?n={size}",
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(stopCurl, curl)
        return curl, output


def stopCurl(curl: subprocess.Popen[bytes]) -> None:
    if curl.poll() is None:
        curl.kill()
    curl.wait()
    if curl.stderr is not None:
        curl.stderr.close()


def downloadStarted(path: str) -> bool:
    """Whether a download into C{path} has its first bytes."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


class FuzzTests(HostileTestMixin, SynchronousTestCase):
    def test_thousandsOfHostileInputs(self) -> None:
        requireOtherUser()
        tsmux = self.startTsmux("--detect-timeout", "2", "--handshake-timeout", "2", "--dial-timeout", "3")
        self.goodClientWorks(tsmux)
        tsmux.waitForConnectionLines(2)  # the readiness probe's and the good client's: all closed
        baseline = tsmux.openFds()
        inputs = hostileInputs(20261125, 3000, self.tailnet.echoPort, self.tailnet.closedPort)
        hexed = [data.hex() for data in inputs]
        halves = (hexed[:1500], hexed[1500:])
        root = subprocess.run(
            [sys.executable, "-c", FUZZER, tsmux.socketPath],
            input=json.dumps(halves[0]).encode(),
            capture_output=True,
            timeout=300,
        )
        self.assertEqual(root.returncode, 0, root.stderr)
        nobody = runPythonAs(
            NOBODY_IDS, "-c", FUZZER, tsmux.socketPath, input=json.dumps(halves[1]).encode(), timeout=300
        )
        self.assertEqual(nobody.returncode, 0, nobody.stderr)
        self.assertIsNone(tsmux.process.poll(), "tsmux died")
        self.goodClientWorks(tsmux)
        waitUntil(
            lambda: tsmux.openFds() <= baseline, 30, lambda: f"tsmux's fds back to {baseline} (now {tsmux.openFds()})"
        )
        log = tsmux.log()
        assertCleanLog(self, log)
        self.assertGreater(log.count("tsmux.connection"), 3000)


class SilentConnectionTests(HostileTestMixin, SynchronousTestCase):
    def test_silentConnectionsClosedAtDetectTimeoutWhileServing(self) -> None:
        tsmux = self.startTsmux("--detect-timeout", "2")
        silent = []
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(tsmux.socketPath)
            silent.append(sock)
        for sock in silent:
            self.addCleanup(sock.close)
        started = time.monotonic()
        self.goodClientWorks(tsmux)
        self.assertLess(time.monotonic() - started, 1.5, "the good client waited behind the silent ones")
        for sock in silent:
            sock.settimeout(10)
            self.assertEqual(sock.recv(1), b"")  # closed by tsmux
        self.assertLess(time.monotonic() - started, 6)
        tsmux.stop()
        self.assertEqual(tsmux.log().count("timeout: no protocol shown within 2 s"), 300)


class MaxConnectionsTests(HostileTestMixin, SynchronousTestCase):
    def test_exactlyTheExcessRefusedThenServiceResumes(self) -> None:
        tsmux = self.startTsmux("--max-connections", "20", "--detect-timeout", "60")
        tsmux.waitForConnectionLines(1)  # the readiness probe's connection is gone
        held = []
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(tsmux.socketPath)
            held.append(sock)
        for sock in held:
            self.addCleanup(sock.close)
        # No need to wait for tsmux to accept them: a listening Unix socket's queue is first in,
        # first out, so tsmux takes these 20 before any of the 5 below.
        for _ in range(5):
            extra = socket.socket(socket.AF_UNIX)
            extra.settimeout(5)
            extra.connect(tsmux.socketPath)
            try:
                self.assertEqual(extra.recv(1), b"")
            except ConnectionResetError:
                pass  # closed at once, with a reset
            extra.close()
        for sock in held:
            sock.close()
        tsmux.waitForConnectionLines(1 + 20)  # the 20 closed (refused connections have no line)
        self.goodClientWorks(tsmux)
        tsmux.stop()
        log = tsmux.log()
        # Not a line per refused connection (a flood would flood the log): one per burst, and its sum.
        self.assertEqual(log.count("refusing new connections at the limit: 20 connections open"), 1, log)
        self.assertIn("refused 5 connection(s) at the limits (from uid 0)", log)


class ShutdownTests(HostileTestMixin, SynchronousTestCase):
    def test_sigtermDuringATransferLetsItFinish(self) -> None:
        size = 40 * 1024 * 1024
        tsmux = self.startTsmux()
        curl, output = self.curlToFile(tsmux, size, "20M")
        waitUntil(lambda: downloadStarted(output), what="the download to be under way")
        tsmux.process.send_signal(signal.SIGTERM)
        waitUntil(lambda: not os.path.exists(tsmux.socketPath), 5, "the socket to be removed")
        refused = socket.socket(socket.AF_UNIX)
        with self.assertRaises(OSError):
            refused.connect(tsmux.socketPath)
        refused.close()
        curl.wait(60)
        assert curl.stderr is not None
        self.assertEqual(curl.returncode, 0, curl.stderr.read())
        self.assertEqual(os.path.getsize(output), size)
        self.assertEqual(tsmux.process.wait(30), 0)
        log = tsmux.log()
        self.assertIn("waiting up to 30 s for 1 open connection(s)", log)
        self.assertNotIn("cut-at-shutdown", log)

    def test_secondSignalCutsAtOnce(self) -> None:
        tsmux = self.startTsmux("--shutdown-timeout", "60")
        sock = self.relayedEcho(tsmux)
        tsmux.process.send_signal(signal.SIGTERM)
        tsmux.waitForLog("waiting up to 60 s for 1 open connection(s)")  # the first signal was handled
        tsmux.process.send_signal(signal.SIGTERM)
        self.assertEqual(tsmux.process.wait(10), 0)
        sock.close()
        log = tsmux.log()
        self.assertIn("second signal: cutting open connections now", log)
        self.assertIn("cut-at-shutdown", log)
        assertCleanLog(self, log)

    def test_shutdownTimeoutCutsWhatIsLeft(self) -> None:
        tsmux = self.startTsmux("--shutdown-timeout", "1")
        sock = self.relayedEcho(tsmux)
        tsmux.process.send_signal(signal.SIGTERM)
        self.assertEqual(tsmux.process.wait(10), 0)
        sock.close()
        self.assertIn("cut-at-shutdown", tsmux.log())


class TailscaledDiesTests(HostileTestMixin, SynchronousTestCase):
    def test_killedMidTransfer(self) -> None:
        tsmux = self.startTsmux()
        self.goodClientWorks(tsmux)
        tsmux.waitForConnectionLines(2)  # the readiness probe's and the good client's: all closed
        baseline = tsmux.openFds()
        downloads = [self.curlToFile(tsmux, 50 * 1024 * 1024, "5M") for _ in range(3)]
        waitUntil(lambda: all(downloadStarted(output) for _, output in downloads), what="the downloads to be under way")
        self.tailnet.killTailscaled()
        for curl, _ in downloads:
            curl.wait(30)
            self.assertNotEqual(curl.returncode, 0)  # cut short, and told so
        self.assertIsNone(tsmux.process.poll())
        self.tailnet.startTailscaled()
        self.goodClientWorks(tsmux)
        waitUntil(lambda: tsmux.openFds() <= baseline, 20, lambda: f"fds back to {baseline} (now {tsmux.openFds()})")
        assertCleanLog(self, tsmux.log())
