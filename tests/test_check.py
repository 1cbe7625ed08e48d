"""
C{tsmux check}: the configuration's summary first, then one line per finding about the host
(C{ok:}, C{warning:}, C{problem:}); problems exit 1, warnings only with C{--strict}. Unit tests run
it in-process against temporary paths and fake servers; integration tests against a real
tailscaled in its private network namespace, and as another uid.
"""

from __future__ import annotations

import io
import json
import os
import resource
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import tsmux._check
from tsmux._check import ancestors, checkOpenToOthers, main
from tsmux._configfile import ConfigError, loadConfigFile

from ._otheruser import NOBODY, requireOtherUser, setpriv
from ._tailscale_binaries import TAILSCALE_VERSION
from ._tsmuxprocess import REPO_ROOT, IntegrationTestMixin, childEnvironment, shortDir, tsmuxCommand

PREFIXES = ("ok: ", "warning: ", "problem: ")


class CheckRunner(SynchronousTestCase):
    """Runs C{tsmux check} in this process, its output captured."""

    def check(self, *arguments: str) -> tuple[int, list[str]]:
        out = io.StringIO()
        saved, sys.stdout = sys.stdout, out
        try:
            code = main(list(arguments))
        finally:
            sys.stdout = saved
        return code, out.getvalue().splitlines()

    def dir(self) -> str:
        return shortDir(self)

    def missingLocalapi(self) -> str:
        return os.path.join(self.dir(), "tailscaled.sock")

    def write(self, text: str) -> str:
        path = os.path.join(self.dir(), "tsmux.toml")
        with open(path, "w") as file:
            file.write(text)
        return path

    def assertWellFormed(self, lines: list[str], summary: str | None) -> None:
        """The summary first (when the config is valid), then only ok/warning/problem lines, a tally last."""
        body = lines
        if summary is not None:
            self.assertEqual(lines[0], summary)
            body = lines[1:]
        for line in body:
            if line.endswith(("tsmux would not start", "(--strict: exit 1)")):
                self.assertIs(line, lines[-1])
                continue
            self.assertTrue(line.startswith(PREFIXES), line)
            if line.startswith("problem: "):
                self.assertIn("; fix: ", line)

    def matching(self, lines: list[str], prefix: str, *texts: str) -> list[str]:
        return [line for line in lines if line.startswith(prefix) and all(text in line for text in texts)]

    def findOne(self, lines: list[str], prefix: str, *texts: str) -> str:
        found = self.matching(lines, prefix, *texts)
        self.assertEqual(len(found), 1, f"one {prefix!r} line with {texts!r} in:\n" + "\n".join(lines))
        return found[0]


def boundSocket(path: str, listening: bool) -> socket.socket:
    """A Unix socket bound at C{path}; unless C{listening}, closed at once (a stale socket file)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listening:
        sock.listen(1)
    else:
        sock.close()
    return sock


class FakeLocalAPI:
    """A LocalAPI that answers C{GET /localapi/v0/status} with C{status}, in a thread."""

    def __init__(self, testCase: SynchronousTestCase, path: str, code: int = 200, status: Any = None) -> None:
        self.requests: list[tuple[str, str | None]] = []
        body = json.dumps(status if status is not None else {"Version": "1.2.3-fake", "BackendState": "Running"})
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append((self.path, self.headers.get("Host")))
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(socketserver.UnixStreamServer):
            def get_request(self) -> tuple[Any, Any]:
                request, _ = super().get_request()
                return request, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) client address

        self.server = Server(path, Handler)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)

        testCase.addCleanup(stop)


GOOD = """
dialer = "direct"

[[socket]]
name = "web"
listen = "{dir}/web.sock"
offer = ["socks5", "http-connect"]
rules = [{{ allow = ["127.0.0.1:*"] }}, {{ deny = ["*:*"] }}]

[[socket]]
listen = "{dir}/tsmux.sock"
localapi = "{localapi}"
"""


class ConfigTests(CheckRunner):
    def test_goodFile(self) -> None:
        directory = self.dir()
        path = self.write(GOOD.format(dir=directory, localapi=self.missingLocalapi()))
        code, lines = self.check("--config", path)
        self.assertEqual(code, 0, lines)
        self.assertWellFormed(lines, "2 sockets, 2 rules")
        self.findOne(lines, "ok: ", f"socket web: {directory}/web.sock", "free")
        self.findOne(lines, "ok: ", f"socket tsmux: {directory}/tsmux.sock", "free")
        self.assertEqual(self.matching(lines, "problem: "), [])

    def test_badFileEveryError(self) -> None:
        path = self.write(
            '[[socket]]\nlisten = "relative.sock"\n\n[[socket]]\nlisten = "/a.sock"\nmode = 660\nbogus = 1\n'
        )
        expected = self.assertRaises(ConfigError, loadConfigFile, path).errors
        self.assertGreaterEqual(len(expected), 3)
        code, lines = self.check("--config", path)
        self.assertEqual(code, 1)
        self.assertWellFormed(lines, None)
        self.assertEqual(lines[-1], f"{len(expected)} problems: tsmux would not start")
        self.assertEqual(len(lines), len(expected) + 1)
        for line, error in zip(lines, expected, strict=False):
            self.assertEqual(line, f"problem: {error}; fix: edit {path}")

    def test_unreadableFile(self) -> None:
        path = os.path.join(self.dir(), "missing.toml")
        code, lines = self.check("--config", path)
        self.assertEqual(code, 1)
        self.assertIn("cannot read", lines[0])
        self.assertIn("; fix: give --config a file that exists", lines[0])
        self.assertEqual(lines[-1], "1 problem: tsmux would not start")

    def test_flagForm(self) -> None:
        """The daemon's flags, with --strict beside them (not a flag that describes a socket)."""
        directory = self.dir()
        code, lines = self.check(
            "--listen", f"{directory}/a.sock", "--localapi", self.missingLocalapi(), "--dialer", "direct"
        )
        self.assertEqual(code, 0, lines)
        self.assertWellFormed(lines, "1 socket, 0 rules")
        path = self.write(GOOD.format(dir=directory, localapi=self.missingLocalapi()))
        code, lines = self.check("--config", path, "--strict")
        self.assertEqual(lines[0], "2 sockets, 2 rules")


class ListenTests(CheckRunner):
    def flags(self, *listen: str) -> list[str]:
        arguments = ["--localapi", self.missingLocalapi(), "--dialer", "direct"]
        for address in listen:
            arguments += ["--listen", address]
        return arguments

    def test_missingDirectory(self) -> None:
        directory = os.path.join(self.dir(), "nope")
        code, lines = self.check(*self.flags(f"{directory}/tsmux.sock"))
        self.assertEqual(code, 1, lines)
        self.assertWellFormed(lines, "1 socket, 0 rules")
        line = self.findOne(lines, "problem: ", f"directory {directory} does not exist", "; fix: create it")
        self.assertTrue(line.startswith(f"problem: socket tsmux: {directory}/tsmux.sock: "), line)
        self.assertEqual(lines[-1], "1 problem: tsmux would not start")

    def test_unwritableDirectory(self) -> None:
        directory = self.dir()
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o755)
        path = f"{directory}/tsmux.sock"
        if os.geteuid() != 0:
            code, lines = self.check(*self.flags(path))
        else:
            # Root may write anywhere: ask as uid 65534, as the daemon would be if it ran as nobody.
            requireOtherUser()
            result = subprocess.run(
                [*setpriv(), *tsmuxCommand(), "check", *self.flags(path)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO_ROOT,
                env=childEnvironment(),
            )
            code, lines = result.returncode, result.stdout.splitlines()
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", f"directory {directory} is not writable", "; fix: ")

    def test_liveServer(self) -> None:
        path = os.path.join(self.dir(), "tsmux.sock")
        server = boundSocket(path, listening=True)
        self.addCleanup(server.close)
        code, lines = self.check(*self.flags(path))
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", path, "another server is already listening there", "; fix: ")
        self.assertTrue(os.path.exists(path))

    def test_staleSocketLeftAlone(self) -> None:
        """The daemon would remove it; check only says so."""
        path = os.path.join(self.dir(), "tsmux.sock")
        boundSocket(path, listening=False)
        code, lines = self.check(*self.flags(path))
        self.assertEqual(code, 0, lines)
        self.findOne(lines, "ok: ", path, "stale socket, tsmux would remove it")
        self.assertTrue(os.path.exists(path))

    def test_notASocket(self) -> None:
        path = os.path.join(self.dir(), "tsmux.sock")
        open(path, "w").close()
        code, lines = self.check(*self.flags(path))
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", path, "exists and is not a socket")

    def test_samePathTwice(self) -> None:
        path = os.path.join(self.dir(), "tsmux.sock")
        code, lines = self.check(*self.flags(path, path))
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", "already where socket tsmux listens")

    def test_descriptions(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        code, lines = self.check(
            *self.flags(
                f"tcp:{port}:interface=127.0.0.1",
                "systemd:domain=UNIX:name=tsmux",
                "nonsense:1",
                f"unix:{self.dir()}/described.sock",
            )
        )
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", f"tcp:{port}:interface=127.0.0.1", "another server is already listening")
        self.findOne(lines, "ok: ", "systemd:domain=UNIX:name=tsmux", "systemd passes")
        self.findOne(lines, "problem: ", "nonsense:1", "Twisted does not take")
        self.findOne(lines, "ok: ", "described.sock", "nothing listens there yet")


class SocketSettingsTests(CheckRunner):
    def test_socksAuthReadableByOthers(self) -> None:
        directory = self.dir()
        secrets = os.path.join(directory, "users")
        with open(secrets, "w") as f:
            f.write("alice:s3cret\n")
        os.chmod(secrets, 0o644)
        code, lines = self.check(
            "--listen", f"{directory}/t.sock", "--localapi", self.missingLocalapi(), "--socks-auth", secrets
        )
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", secrets, "others may read or change it")
        os.chmod(secrets, 0o600)
        code, lines = self.check(
            "--listen", f"{directory}/t.sock", "--localapi", self.missingLocalapi(), "--socks-auth", secrets
        )
        self.assertEqual(code, 0, lines)
        self.findOne(lines, "ok: ", secrets, "1 user")

    def test_ncDialerWithoutCLI(self) -> None:
        directory = self.dir()
        cli = os.path.join(directory, "no-such-tailscale")
        code, lines = self.check(
            "--listen", f"{directory}/t.sock", "--localapi", self.missingLocalapi(), "--dialer", f"nc:{cli}"
        )
        self.assertEqual(code, 1, lines)
        self.findOne(lines, "problem: ", cli, "not an executable")


class TailscaledTests(CheckRunner):
    def flags(self, localapi: str, *more: str) -> list[str]:
        return ["--listen", f"{self.dir()}/t.sock", "--localapi", localapi, *more]

    def test_missingIsAWarning(self) -> None:
        localapi = self.missingLocalapi()
        code, lines = self.check(*self.flags(localapi))
        self.assertEqual(code, 0, lines)
        line = self.findOne(lines, "warning: ", f"tailscaled's LocalAPI at {localapi} does not answer")
        self.assertIn("; fix: start tailscaled", line)
        self.assertEqual(self.matching(lines, "problem: "), [])
        strictCode, strictLines = self.check(*self.flags(localapi), "--strict")
        self.assertEqual(strictCode, 1, strictLines)
        self.assertRegex(strictLines[-1], r"^\d+ warnings? \(--strict: exit 1\)$")

    def test_answers(self) -> None:
        localapi = os.path.join(self.dir(), "ts.sock")
        fake = FakeLocalAPI(self, localapi)
        code, lines = self.check(*self.flags(localapi))
        self.assertEqual(code, 0, lines)
        self.findOne(lines, "ok: ", f"tailscaled at {localapi} answers: version 1.2.3-fake, BackendState Running")
        self.assertEqual(fake.requests, [("/localapi/v0/status?peers=false", "local-tailscaled.sock")])

    def test_errorAnswer(self) -> None:
        localapi = os.path.join(self.dir(), "ts.sock")
        FakeLocalAPI(self, localapi, code=403, status={"error": "nope"})
        code, lines = self.check(*self.flags(localapi))
        self.assertEqual(code, 0, lines)
        self.findOne(lines, "warning: ", localapi, "does not answer (HTTP 403")

    def test_staleTailscaledSocket(self) -> None:
        localapi = os.path.join(self.dir(), "ts.sock")
        boundSocket(localapi, listening=False)
        code, lines = self.check(*self.flags(localapi))
        self.findOne(lines, "warning: ", localapi, "nothing listens there")

    def test_notUsed(self) -> None:
        """A socket that neither offers the LocalAPI nor dials through tailscaled does not need it."""
        directory = self.dir()
        path = self.write(
            f'[[socket]]\nlisten = "{directory}/t.sock"\ndialer = "direct"\noffer = ["socks5"]\n'
            f'localapi = "{self.missingLocalapi()}"\n'
        )
        code, lines = self.check("--config", path, "--strict")
        self.findOne(lines, "ok: ", "no socket uses tailscaled")
        self.assertEqual(self.matching(lines, "warning: ", "tailscaled's LocalAPI at"), [])


class OpenToOthersTests(SynchronousTestCase):
    """tailscaled's own socket, as L{checkOpenToOthers} sees it (a stand-in socket file under /tmp)."""

    def setUp(self) -> None:
        self.directory = shortDir(self)
        self.path = os.path.join(self.directory, "ts.sock")
        boundSocket(self.path, listening=False)

    def test_openToEveryone(self) -> None:
        os.chmod(self.path, 0o666)
        finding = checkOpenToOthers(self.path, ncDialer=False)
        assert finding is not None
        self.assertEqual(finding.level, "warning")
        self.assertIn("open to the same users", finding.line())
        self.assertIn("a directory only root may enter", finding.line())
        self.assertIn("chmod 0600", finding.line())
        withNc = checkOpenToOthers(self.path, ncDialer=True)
        assert withNc is not None
        self.assertNotIn("chmod 0600", withNc.line())

    def test_closedSocket(self) -> None:
        os.chmod(self.path, 0o600)
        finding = checkOpenToOthers(self.path, ncDialer=False)
        assert finding is not None
        self.assertEqual(finding.line(), f"ok: tailscaled's socket {self.path} is closed to others (mode 0600)")

    def test_closedDirectory(self) -> None:
        os.chmod(self.path, 0o666)
        os.chmod(self.directory, 0o700)
        finding = checkOpenToOthers(self.path, ncDialer=False)
        assert finding is not None
        self.assertEqual(finding.level, "ok")
        self.assertIn(f"directory {self.directory} is 0700", finding.text)

    def test_missing(self) -> None:
        self.assertIsNone(checkOpenToOthers(os.path.join(self.directory, "none.sock"), ncDialer=False))


class ProcessTests(CheckRunner):
    def flags(self, *more: str) -> list[str]:
        return ["--listen", f"{self.dir()}/t.sock", "--localapi", self.missingLocalapi(), "--dialer", "direct", *more]

    def test_cannotActAsCallers(self) -> None:
        self.patch(tsmux._check, "canActAsOthers", lambda: "not root")
        code, lines = self.check(*self.flags())
        self.assertEqual(code, 0, lines)
        line = self.findOne(lines, "warning: ", "cannot act as its callers toward tailscaled (not root)")
        self.assertIn("these findings are this process's: run tsmux check as the user tsmux runs as", line)

    def test_canActAsCallers(self) -> None:
        self.patch(tsmux._check, "canActAsOthers", lambda: None)
        code, lines = self.check(*self.flags())
        self.findOne(lines, "ok: ", "can act as its callers")

    def test_lowFileLimit(self) -> None:
        self.patch(resource, "getrlimit", lambda which: (1024, 1024))
        code, lines = self.check(*self.flags())
        self.assertEqual(code, 0, lines)
        line = self.findOne(lines, "warning: ", "descriptor limit 1024 (hard RLIMIT_NOFILE) carries 160 connections")
        self.assertIn("LimitNOFILE=", line)
        code, lines = self.check(*self.flags("--strict"))
        self.assertEqual(code, 1, lines)

    def test_fileLimit(self) -> None:
        self.patch(resource, "getrlimit", lambda which: (1024, 65536))
        code, lines = self.check(*self.flags())
        self.findOne(lines, "ok: ", "descriptor limit 65536 (hard RLIMIT_NOFILE) carries 10912 connections")
        code, lines = self.check(*self.flags("--max-connections", "20000"))
        self.findOne(lines, "warning: ", "--max-connections 20000 would be lowered to 10912")


class CommandLineTests(SynchronousTestCase):
    def test_subcommand(self) -> None:
        """C{tsmux check} as users run it: the console script (or python -m tsmux)."""
        directory = shortDir(self)
        result = subprocess.run(
            [*tsmuxCommand(), "check", "--listen", f"{directory}/nope/t.sock", "--localapi", f"{directory}/ts.sock"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env=childEnvironment(),
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "1 socket, 0 rules")
        self.assertEqual(lines[-1], "1 problem: tsmux would not start")
        self.assertEqual(result.stderr, "")


class RealTailscaledTests(IntegrationTestMixin, CheckRunner):
    """Against a real tailscaled in its private network namespace."""

    def checkTailnet(self, *more: str) -> tuple[int, list[str]]:
        return self.check("--listen", f"{self.dir()}/t.sock", "--localapi", self.tailnet.localapi, *more)

    def socketDir(self) -> str:
        """
        tailscaled's socket directory, every directory above it made enterable by others (trial's and
        pytest's mktemp() directories are 0700): each mode is restored at cleanup.
        """
        directory = os.path.dirname(self.tailnet.localapi)
        for path in (*ancestors(directory), directory):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            self.addCleanup(os.chmod, path, mode)
            if not mode & stat.S_IXOTH:
                if not path.startswith((REPO_ROOT + os.sep, tempfile.gettempdir() + os.sep)):
                    self.fail(f"{path} (mode {mode:04o}) is not the tests' to open to others")
                os.chmod(path, mode | 0o055)
        return directory

    def test_versionAndState(self) -> None:
        code, lines = self.checkTailnet("--strict")
        self.findOne(
            lines,
            "ok: ",
            f"tailscaled at {self.tailnet.localapi} answers: version {TAILSCALE_VERSION}",
            "BackendState NeedsLogin",
        )
        self.assertEqual(self.matching(lines, "warning: ", "tailscaled's LocalAPI at"), [])

    def test_openToOthers(self) -> None:
        os.chmod(self.socketDir(), 0o755)
        os.chmod(self.tailnet.localapi, 0o666)
        code, lines = self.checkTailnet()
        self.assertEqual(code, 0, lines)
        line = self.findOne(
            lines, "warning: ", f"tailscaled's socket {self.tailnet.localapi} is open to the same users"
        )
        self.assertIn("; fix: put it in a directory only root may enter", line)
        code, lines = self.checkTailnet("--strict")
        self.assertEqual(code, 1, lines)

    def test_closedSocket(self) -> None:
        os.chmod(self.socketDir(), 0o755)
        os.chmod(self.tailnet.localapi, 0o600)
        code, lines = self.checkTailnet()
        self.assertEqual(self.matching(lines, "warning: ", "open to the same users"), [])
        self.findOne(lines, "ok: ", f"tailscaled's socket {self.tailnet.localapi} is closed to others (mode 0600)")
        self.findOne(lines, "ok: ", "BackendState NeedsLogin")

    def test_closedDirectory(self) -> None:
        directory = self.socketDir()
        os.chmod(directory, 0o700)
        os.chmod(self.tailnet.localapi, 0o666)
        code, lines = self.checkTailnet()
        self.assertEqual(self.matching(lines, "warning: ", "open to the same users"), [])
        self.findOne(lines, "ok: ", f"directory {directory} is 0700")

    def test_tailscaledStopped(self) -> None:
        self.tailnet.stopTailscaled()
        code, lines = self.checkTailnet()
        self.assertEqual(code, 0, lines)
        self.findOne(lines, "warning: ", f"tailscaled's LocalAPI at {self.tailnet.localapi} does not answer")
        code, lines = self.checkTailnet("--strict")
        self.assertEqual(code, 1, lines)
        self.assertRegex(lines[-1], r"^\d+ warnings? \(--strict: exit 1\)$")

    def test_asAnotherUser(self) -> None:
        """As uid 65534: it cannot act as its callers, and says that what it found is its own."""
        requireOtherUser()
        self.socketDir()
        directory = self.dir()
        os.chown(directory, NOBODY, NOBODY)
        result = subprocess.run(
            [
                *setpriv(),
                *tsmuxCommand(),
                "check",
                "--listen",
                f"{directory}/t.sock",
                "--localapi",
                self.tailnet.localapi,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env=childEnvironment(),
        )
        lines = result.stdout.splitlines()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(lines[0], "1 socket, 0 rules")
        line = self.findOne(lines, "warning: ", f"this process (uid {NOBODY}) cannot act as its callers", "not root")
        self.assertIn("these findings are this process's", line)
        self.findOne(lines, "ok: ", f"socket t: {directory}/t.sock: free")
        self.findOne(lines, "ok: ", f"version {TAILSCALE_VERSION}")
