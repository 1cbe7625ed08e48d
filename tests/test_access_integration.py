"""
Who may do what, end to end: a second uid (nobody) against tsmux running as
root in front of a real tailscaled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from ._otheruser import NOBODY, pythonAsNobody, requireOtherUser, runAsNobody
from ._realsockets import socksConnect
from ._tailnet import HELLO_BODY
from .test_integration import IntegrationTestMixin, curl

PREFS_PATCH = '{"HostnameSet": true, "Hostname": "tsmux-test"}'

# Sends its requests in one write (pipelined) and prints the status lines of the answers.
PIPELINE = r"""
import socket, sys
path, *requests = sys.argv[1:]
s = socket.socket(socket.AF_UNIX)
s.settimeout(15)
s.connect(path)
s.sendall("".join(requests).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
# Status lines, wherever they start (a JSON body may end right before the next one).
import re
for line in re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", data):
    print(line.decode())
"""


def localapiRequest(method: str, path: str, body: str = "", close: bool = False) -> str:
    head = f"{method} /localapi/v0/{path} HTTP/1.1\r\nHost: local-tailscaled.sock\r\n"
    if body or method not in ("GET", "HEAD"):
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head + "\r\n" + body


class AccessTestMixin(IntegrationTestMixin):
    def setUp(self) -> None:
        requireOtherUser()
        super().setUp()

    def startTsmux(self, *args: str, **kw):
        # 0666: the socket's mode is not what these tests are about; tsmux's decisions are.
        return super().startTsmux("--mode", "0666", *args, **kw)

    def curlAs(self, nobody: bool, *args: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["curl", "-sS", "--max-time", "20", *args]
        if nobody:
            return runAsNobody(argv)
        return subprocess.run(argv, capture_output=True, timeout=30)

    def localapiStatus(self, socketPath: str, method: str, path: str, body: str = "", nobody: bool = True) -> int:
        args = ["-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--unix-socket", socketPath]
        if body:
            args += ["-H", "Content-Type: application/json", "--data", body]
        result = self.curlAs(nobody, *args, f"http://local-tailscaled.sock/localapi/v0/{path}")
        self.assertEqual(result.returncode, 0, result.stderr)
        return int(result.stdout)


class LocalAPIGuardTests(AccessTestMixin, SynchronousTestCase):
    def test_readAllowedWriteRefusedLikeTailscaled(self) -> None:
        tsmux = self.startTsmux()
        for method, path, body in (
            ("GET", "status", ""),
            ("GET", "prefs", ""),
            ("PATCH", "prefs", PREFS_PATCH),
            ("GET", "goroutines", ""),
            ("GET", "metrics", ""),
            ("POST", "logout", ""),
        ):
            direct = self.localapiStatus(self.tailnet.localapi, method, path, body)
            through = self.localapiStatus(tsmux.socketPath, method, path, body)
            expected = 200 if method == "GET" and path in ("status", "prefs") else 403
            self.assertEqual((direct, through), (expected, expected), (method, path))

    def test_refusalNamesTheRule(self) -> None:
        tsmux = self.startTsmux()
        result = self.curlAs(
            True, "--unix-socket", tsmux.socketPath, "-X", "POST", "http://local-tailscaled.sock/localapi/v0/logout"
        )
        self.assertIn(b"needs LocalAPI write access", result.stdout)
        self.assertIn(f"not to uid {NOBODY}".encode(), result.stdout)
        tsmux.stop()
        self.assertIn("refused-by-policy status=403", tsmux.log())

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
        self.assertEqual(json.loads(result.stdout)["localapi"]["reachable"], True)

    def test_absoluteFormCannotReachWriterOnlyEndpoints(self) -> None:
        """Regression: tailscaled takes any scheme in any case; tsmux's guard takes paths only."""
        tsmux = self.startTsmux()
        for target in ("HTTP://local-tailscaled.sock/localapi/v0/goroutines", "http:/localapi/v0/goroutines"):
            result = pythonAsNobody(PIPELINE, tsmux.socketPath, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 400 Bad Request"], target)

    def test_ipnBusForReadersOnlyWithoutPrivateKeys(self) -> None:
        tsmux = self.startTsmux()
        firstLine = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
            "s.sendall(sys.argv[2].encode())\n"
            "data = b''\n"
            "while b'\\r\\n' not in data:\n"
            "    chunk = s.recv(1)\n"
            "    if not chunk: break\n"
            "    data += chunk\n"
            "print(data.split(b'\\r\\n')[0].decode())\n"
        )
        for mask, expected in (("2", "HTTP/1.1 403 Forbidden"), ("18", "HTTP/1.1 200 OK")):
            request = f"GET /localapi/v0/watch-ipn-bus?mask={mask} HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
            result = pythonAsNobody(firstLine, tsmux.socketPath, request)
            self.assertEqual(result.stdout.decode().strip(), expected, (mask, result.stderr))

    def test_pipelinedWriteAfterRead(self) -> None:
        tsmux = self.startTsmux()
        result = pythonAsNobody(
            PIPELINE,
            tsmux.socketPath,
            localapiRequest("GET", "status"),
            localapiRequest("PATCH", "prefs", PREFS_PATCH),
            localapiRequest("GET", "status", close=True),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden"])

    def test_rootWriteReachesTailscaled(self) -> None:
        tsmux = self.startTsmux()
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH, nobody=False), 200)
        prefs = json.loads(
            curl("--unix-socket", self.tailnet.localapi, "http://local-tailscaled.sock/localapi/v0/prefs").stdout
        )
        self.assertEqual(prefs["Hostname"], "tsmux-test")

    def test_adminUidGetsThePassthrough(self) -> None:
        tsmux = self.startTsmux("--admin-uid", str(NOBODY))
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 200)

    def test_operatorBecomesAdmin(self) -> None:
        tsmux = self.startTsmux("--operator-refresh", "0.2")
        self.assertEqual(self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH), 403)
        result = self.tailnet.runTailscale(["set", "--operator=nobody"], capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        deadline = time.monotonic() + 10
        while self.localapiStatus(tsmux.socketPath, "PATCH", "prefs", PREFS_PATCH) != 200:
            self.assertLess(time.monotonic(), deadline, tsmux.log())
            time.sleep(0.2)
        self.assertIn("tailscaled's operator: nobody (uid 65534)", tsmux.log())

    def test_tailscaleCLIAsNobody(self) -> None:
        tsmux = self.startTsmux()
        directory = tsmux.socketPath.rsplit("/", 1)[0]
        cli = os.path.join(directory, "tailscale")
        shutil.copy(self.tailnet.tailscale, cli)
        os.chmod(cli, 0o755)
        result = runAsNobody([cli, f"--socket={tsmux.socketPath}", "status"])
        self.assertEqual((result.returncode, result.stdout), (1, b"Logged out.\n"), result.stderr)
        result = runAsNobody([cli, f"--socket={tsmux.socketPath}", "set", "--hostname=nope"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"Access denied: tsmux: ", result.stderr + result.stdout)
        self.assertIn(b"needs LocalAPI write access", result.stderr + result.stdout)


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
        result = pythonAsNobody(PIPELINE, tsmux.socketPath, dial)
        self.assertEqual(result.stdout.decode().splitlines(), ["HTTP/1.1 403 Forbidden"])

    def test_allowedGroup(self) -> None:
        tsmux = self.startTsmux("--socks-allow-gid", str(NOBODY))
        code = pythonAsNobody(
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
