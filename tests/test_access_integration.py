"""
Who may do what, end to end: a second uid (nobody) against tsmux running as
root in front of a real tailscaled, which sees that uid itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ._httpclient import buildRequest, curl, curlStatus, scriptArgv
from ._otheruser import NOBODY, NOBODY_IDS, pythonAsNobody, requireOtherUser, runAsNobody, runPythonAs, setpriv
from ._realsockets import socksConnect
from ._tailnet import HELLO_BODY
from ._tsmuxprocess import IntegrationTestMixin, TsmuxProcess

PREFS_PATCH = '{"HostnameSet": true, "Hostname": "tsmux-test"}'


def localapiRequest(method: str, path: str, body: str = "", close: bool = False) -> str:
    return buildRequest(method, f"/localapi/v0/{path}", body, close=close).decode()


def pipelineAsNobody(socketPath: str, *requests: str) -> subprocess.CompletedProcess[bytes]:
    """As uid 65534: C{requests} in one write; stdout has the status lines of the answers."""
    return pythonAsNobody(*scriptArgv("pipeline", socketPath, *requests))


class AccessTestMixin(IntegrationTestMixin):
    def setUp(self) -> None:
        requireOtherUser()
        super().setUp()

    def startTsmux(self, *args: str, **kw: Any) -> TsmuxProcess:
        # 0666: the socket's mode is not what these tests are about; tsmux's decisions are.
        return super().startTsmux("--mode", "0666", *args, **kw)

    def curlAs(self, nobody: bool, *args: str) -> subprocess.CompletedProcess[bytes]:
        return curl(*args, prefix=setpriv() if nobody else ())

    def localapiStatus(self, socketPath: str, method: str, path: str, body: str = "", nobody: bool = True) -> int:
        result = curlStatus(socketPath, method, f"/localapi/v0/{path}", body, prefix=setpriv() if nobody else ())
        self.assertEqual(result.returncode, 0, result.stderr)
        return int(result.stdout)


class TailscaledDecidesTests(AccessTestMixin, SynchronousTestCase):
    """
    tsmux connects to tailscaled as each caller: what a caller gets through
    tsmux is what tailscaled answers that caller directly.
    """

    def test_sameAnswersAsDirect(self) -> None:
        tsmux = self.startTsmux()
        for method, path, body, expected in (
            ("GET", "status", "", 200),
            ("GET", "prefs", "", 200),
            ("PATCH", "prefs", PREFS_PATCH, 403),
            ("GET", "goroutines", "", 403),
            ("GET", "metrics", "", 403),
            ("POST", "logout", "", 403),
        ):
            direct = self.localapiStatus(self.tailnet.localapi, method, path, body)
            through = self.localapiStatus(tsmux.socketPath, method, path, body)
            self.assertEqual((direct, through), (expected, expected), (method, path))

    def test_refusalIsTailscaledsOwn(self) -> None:
        tsmux = self.startTsmux()
        url = "http://local-tailscaled.sock/localapi/v0/logout"
        direct = self.curlAs(True, "--unix-socket", self.tailnet.localapi, "-X", "POST", url)
        through = self.curlAs(True, "--unix-socket", tsmux.socketPath, "-X", "POST", url)
        self.assertEqual(through.stdout, direct.stdout)
        self.assertNotIn(b"tsmux", through.stdout)
        tsmux.stop()
        (line,) = [line for line in tsmux.log().splitlines() if "localapi socket=tsmux pid=" in line]
        self.assertIn(f"uid={NOBODY}", line)
        self.assertIn("access=passthrough", line)

    def test_tsmuxEndpointsAreForAdmins(self) -> None:
        tsmux = self.startTsmux()
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "GET", "../../tsmux/v0/metrics"), 403)
        result = self.curlAs(
            True,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            tsmux.socketPath,
            "http://local-tailscaled.sock/tsmux/v0/status",
        )
        self.assertEqual(result.stdout, b"403")
        result = self.curlAs(False, "--unix-socket", tsmux.socketPath, "http://local-tailscaled.sock/tsmux/v0/status")
        status = json.loads(result.stdout)
        self.assertEqual(status["localapi"]["reachable"], True)
        self.assertEqual(status["localapi"]["actsAsCallers"], True)

    def test_absoluteFormGetsTailscaledsAnswer(self) -> None:
        """What used to slip past the guard now reaches tailscaled as nobody, which refuses it itself."""
        tsmux = self.startTsmux()
        for target in ("HTTP://local-tailscaled.sock/localapi/v0/goroutines", "http:/localapi/v0/goroutines"):
            request = f"GET {target} HTTP/1.1\r\nHost: local-tailscaled.sock\r\nConnection: close\r\n\r\n"
            direct = pipelineAsNobody(self.tailnet.localapi, request)
            through = pipelineAsNobody(tsmux.socketPath, request)
            self.assertEqual(through.stdout, direct.stdout, target)
            self.assertNotIn(b"200 OK", through.stdout, target)

    def test_ipnBusAsTailscaledAnswersReaders(self) -> None:
        """
        tailscaled's own rule for readers, applied by tailscaled itself (the
        old guard refused mask=2 to readers; tailscaled 1.96.4 answers it).
        """
        tsmux = self.startTsmux()
        # A long poll: the status line is the answer (the sweep then hangs up).
        spec = {
            "sockets": [self.tailnet.localapi, tsmux.socketPath],
            "requests": [["GET", f"/localapi/v0/watch-ipn-bus?mask={mask}"] for mask in ("2", "18")],
            "timeout": 10,
        }
        result = runPythonAs(NOBODY_IDS, *scriptArgv("sweep"), input=json.dumps(spec).encode())
        self.assertEqual(result.returncode, 0, result.stderr)
        for mask, (direct, through) in zip(("2", "18"), json.loads(result.stdout), strict=True):
            self.assertEqual(through, direct, mask)
            self.assertIsInstance(through, int, mask)

    def test_pipelinedWriteAfterRead(self) -> None:
        tsmux = self.startTsmux()
        requests = (
            localapiRequest("GET", "status"),
            localapiRequest("PATCH", "prefs", PREFS_PATCH),
            localapiRequest("GET", "status", close=True),
        )
        direct = pipelineAsNobody(self.tailnet.localapi, *requests)
        through = pipelineAsNobody(tsmux.socketPath, *requests)
        self.assertEqual(through.returncode, 0, through.stderr)
        self.assertEqual(through.stdout, direct.stdout)
        self.assertEqual(
            through.stdout.decode().splitlines(), ["HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden", "HTTP/1.1 200 OK"]
        )

    def test_rootWriteReachesTailscaled(self) -> None:
        tsmux = self.startTsmux()
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH, nobody=False), 200)
        prefs = json.loads(
            curl("--unix-socket", self.tailnet.localapi, "http://local-tailscaled.sock/localapi/v0/prefs").stdout
        )
        self.assertEqual(prefs["Hostname"], "tsmux-test")

    def test_adminUidIsTsmuxsAdminNotTailscaleds(self) -> None:
        tsmux = self.startTsmux("--admin-uid", str(NOBODY))
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "GET", "../../tsmux/v0/status"), 200)
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 403)

    def test_operatorRightsAreTailscaledsAtOnce(self) -> None:
        """No lookup, no refresh interval: tailscaled decides on every request."""
        tsmux = self.startTsmux("--operator-refresh", "60")
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 403)
        result = self.tailnet.runTailscale(["set", "--operator=nobody"], capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.addCleanup(self.tailnet.runTailscale, ["set", "--operator="], capture_output=True)
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 200)
        result = self.tailnet.runTailscale(["set", "--operator="], capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 403)
        self.assertIn("--operator-refresh is obsolete and ignored", tsmux.log())

    def test_tailscaleCLIAsNobody(self) -> None:
        tsmux = self.startTsmux()
        directory = tsmux.socketPath.rsplit("/", 1)[0]
        cli = os.path.join(directory, "tailscale")
        shutil.copy(self.tailnet.tailscale, cli)
        os.chmod(cli, 0o755)
        result = runAsNobody([cli, f"--socket={tsmux.socketPath}", "status"])
        self.assertEqual((result.returncode, result.stdout), (1, b"Logged out.\n"), result.stderr)
        through = runAsNobody([cli, f"--socket={tsmux.socketPath}", "set", "--hostname=nope"])
        direct = runAsNobody([cli, f"--socket={self.tailnet.localapi}", "set", "--hostname=nope"])
        self.assertNotEqual(through.returncode, 0)
        # The same refusal, but for the socket path the CLI names in its advice.
        self.assertEqual(
            (through.stderr + through.stdout).replace(tsmux.socketPath.encode(), b"SOCKET"),
            (direct.stderr + direct.stdout).replace(self.tailnet.localapi.encode(), b"SOCKET"),
        )
        self.assertIn(b"Access denied", through.stderr + through.stdout)


class SOCKSAllowListTests(AccessTestMixin, SynchronousTestCase):
    def test_allowListDecidesWhoDials(self) -> None:
        tsmux = self.startTsmux("--socks-allow-uid", "0")
        url = f"http://127.0.0.1:{self.tailnet.httpPort}/"
        proxy = f"socks5h://localhost{tsmux.socketPath}"
        root = self.curlAs(False, "-x", proxy, url)
        self.assertEqual((root.returncode, root.stdout), (0, HELLO_BODY), root.stderr)
        nobody = self.curlAs(True, "-x", proxy, url)
        self.assertEqual(nobody.returncode, 97, nobody.stderr)
        tsmux.stop()
        self.assertIn("refused-by-policy: uid 65534 is not in --socks-allow-uid", tsmux.log())

    def test_localapiDialFollowsTheAllowList(self) -> None:
        tsmux = self.startTsmux("--socks-allow-uid", "0")
        dial = (
            "POST /localapi/v0/dial HTTP/1.1\r\nHost: local-tailscaled.sock\r\nConnection: upgrade\r\n"
            f"Upgrade: ts-dial\r\nDial-Host: 127.0.0.1\r\nDial-Port: {self.tailnet.echoPort}\r\n\r\n"
        )
        result = pipelineAsNobody(tsmux.socketPath, dial)
        self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 403 Forbidden"])

    def test_allowedGroup(self) -> None:
        tsmux = self.startTsmux("--socks-allow-gid", str(NOBODY))
        code = pythonAsNobody(
            "-c",
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(bytes.fromhex(sys.argv[2])); import time\n"
            "d=b''\n"
            "while len(d)<12: d+=s.recv(100)\n"
            "print(d[3])",
            tsmux.socketPath,
            ("050100" + "05010001" + "7f000001" + f"{self.tailnet.httpPort:04x}"),
        )
        self.assertEqual(code.stdout.strip(), b"0", code.stderr)
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.httpPort)
        sock.close()
        self.assertEqual(reply, 2)  # root is not in that group's list and no uid list allows it
