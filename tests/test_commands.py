"""
C{tsmux status}, C{tsmux explain} and C{tsmux reload} against a real tsmux
in front of the real tailscaled (in its private network namespace), and
against no daemon at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase, TestCase

from ._otheruser import NOBODY_IDS, pythonArgv, requireOtherUser
from ._realsockets import socksConnect
from ._tsmuxprocess import IntegrationTestMixin, TsmuxProcess, childEnvironment, shortDir, tsmuxCommand
from ._waiting import waitUntil


def runTsmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tsmuxCommand(), *args], capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd="/"
    )


class NoDaemonTests(SynchronousTestCase):
    def test_statusWithoutADaemonIsOneLine(self) -> None:
        for command in ("status", "reload"):
            result = runTsmux(command, "--socket", "/nonexistent/tsmux.sock")
            self.assertEqual(result.returncode, 1, result)
            self.assertEqual(
                result.stderr, f"tsmux {command}: no tsmux is listening at /nonexistent/tsmux.sock (no such socket)\n"
            )

    def test_explainWithoutADaemonIsOneLine(self) -> None:
        result = runTsmux("explain", "--socket", "/nonexistent/t.sock", "--caller", "uid:0", "--to", "db:5432")
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(
            result.stderr, "tsmux explain: no tsmux is listening at /nonexistent/t.sock (no such socket)\n"
        )

    def test_explainNeedsItsArguments(self) -> None:
        result = runTsmux("explain", "--socket", "/nonexistent/tsmux.sock", "--to", "a:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--caller is required", result.stderr)

    def test_somethingElseListening(self) -> None:
        import socket

        path = os.path.join(shortDir(self), "other.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        server.listen(1)
        server.settimeout(5)
        import threading

        def answer() -> None:
            connection, _ = server.accept()
            connection.recv(1000)
            connection.sendall(b"SSH-2.0-OpenSSH\r\n")
            connection.close()

        thread = threading.Thread(target=answer)
        thread.start()
        self.addCleanup(thread.join)
        result = runTsmux("status", "--socket", path)
        self.assertEqual(result.returncode, 1)
        self.assertIn("is not tsmux", result.stderr)


class CommandsAgainstARealTsmuxTests(IntegrationTestMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.directory = shortDir(self)
        self.file = os.path.join(self.directory, "tsmux.toml")
        self.web = os.path.join(self.directory, "web.sock")

    def writeConfig(self, extra: str = "") -> None:
        port = self.tailnet.httpPort
        with open(self.file, "w") as file:
            file.write(
                f'localapi = "{self.tailnet.localapi}"\n'
                "[[socket]]\n"
                f'listen = "{self.web}"\n'
                'mode = "0666"\n'
                'offer = ["socks5", "http-connect"]\n'
                f'rules = [{{ allow = ["127.0.0.1:{port}"], callers = ["uid:0"] }}, {{ deny = ["*:*"] }}]\n'
                "[[socket]]\n"
                f'listen = "{self.directory}/admin.sock"\n'
                'mode = "0600"\n' + extra
            )

    def startWithConfig(self) -> TsmuxProcess:
        self.writeConfig()
        tsmux = TsmuxProcess([*tsmuxCommand(), "--config", self.file], self.web, os.path.join(self.directory, "log"))
        self.addCleanup(self.assertNoTraceback, tsmux)
        tsmux.waitUntilListening()
        return tsmux

    def test_status(self) -> None:
        tsmux = self.startWithConfig()
        waitUntil(
            lambda: json.loads(runTsmux("status", "--socket", self.web, "--json").stdout)["sockets"][0]["tailnetView"][
                "fresh"
            ],
            what="tsmux's first read of tailscaled's status",
        )
        held, reply = socksConnect(self.web, "127.0.0.1", self.tailnet.httpPort)
        self.addCleanup(held.close)
        self.assertEqual(reply, 0)
        result = runTsmux("status", "--config", self.file)
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout
        self.assertTrue(text.startswith("tsmux "), text)
        self.assertIn(f"config {self.file}", text)
        self.assertIn(f"tailscaled's LocalAPI at {self.tailnet.localapi}: reachable", text)
        self.assertIn(f"web    {self.web}: 2 open (socks5 1, tsmux-api 1); 2 rules; offers http-connect, socks5", text)
        self.assertIn("admin  ", text)
        # web's rules need the tailnet view (an address rule), read from the real tailscaled.
        self.assertRegex(text, r"web .*; tailnet view [0-9.]+ s old, [0-9]+ nodes")
        self.assertIn("busiest callers: uid 0 (root) 2", text)
        self.assertIn(f"busiest destinations: 127.0.0.1:{self.tailnet.httpPort} 1", text)
        asJSON = runTsmux("status", "--socket", self.web, "--json")
        self.assertEqual(asJSON.returncode, 0, asJSON.stderr)
        status = json.loads(asJSON.stdout)
        self.assertEqual([entry["name"] for entry in status["sockets"]], ["web", "admin"])
        self.assertEqual(status["socket"], "web")
        tsmux.stop()

    def test_explain(self) -> None:
        self.startWithConfig()
        to = f"127.0.0.1:{self.tailnet.httpPort}"
        allowed = runTsmux("explain", "--socket", self.web, "--caller", "uid:0", "--to", to)
        self.assertEqual(allowed.returncode, 0, allowed.stderr)
        self.assertIn("caller uid 0 (root); gid 0; groups from the user database", allowed.stdout)
        self.assertIn(f"ALLOW by web#1: rule web#1 allows 127.0.0.1:{self.tailnet.httpPort}", allowed.stdout)
        denied = runTsmux("explain", "--socket", self.web, "--caller", "uid:65534", "--to", to)
        self.assertIn("DENY by web#2: rule web#2 denies *:*", denied.stdout)
        bad = runTsmux("explain", "--socket", self.web, "--caller", "user:no-such-user-here", "--to", to)
        self.assertEqual(
            (bad.returncode, bad.stderr), (1, "tsmux explain: there is no local user named 'no-such-user-here'\n")
        )

    def test_reload(self) -> None:
        tsmux = self.startWithConfig()
        self.writeConfig(f'[[socket]]\nlisten = "{self.directory}/third.sock"\n')
        result = runTsmux("reload", "--config", self.file)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "reloaded: 3 sockets, 2 rules; added third\n")
        waitUntil(lambda: os.path.exists(f"{self.directory}/third.sock"), what="the third socket")
        with open(self.file, "a") as file:
            file.write("dialr = 1\n")
        broken = runTsmux("reload", "--config", self.file)
        self.assertEqual(broken.returncode, 1)
        self.assertIn("tsmux reload: the running config is kept:", broken.stderr)
        self.assertIn("dialr: unknown key (did you mean 'dialer'?)", broken.stderr)
        tsmux.waitForLog("reload of")

    def test_notAnAdmin(self) -> None:
        requireOtherUser()
        self.startWithConfig()
        argv = pythonArgv(NOBODY_IDS, "-m", "tsmux", "status", "--socket", self.web)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd="/")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn("answers its admins only", result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1)

    def test_flagFormHasNothingToReload(self) -> None:
        tsmux = self.startTsmux()
        result = runTsmux("reload", "--socket", tsmux.socketPath)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr, "tsmux reload: tsmux was started with flags: there is no config file to reload\n"
        )


if sys.platform != "linux":  # pragma: no cover
    CommandsAgainstARealTsmuxTests.skip = "Linux only"
