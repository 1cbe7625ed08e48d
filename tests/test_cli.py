"""The command line, run for real: options, errors, socket files, shutdown."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

from twisted.internet.protocol import Factory
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tsmux._listen import StartupError, listenOnDescription, listenOnPath, withBacklog
from tsmux._options import Options

from ._tsmuxprocess import REPO_ROOT, childEnvironment, shortDir, startTsmux, tsmuxCommand, twistdCommand


def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=childEnvironment())


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        config = options.toConfig()
        self.assertEqual(config.listen, ("/var/run/tailscale/tsmux.sock",))
        self.assertEqual(config.localapi, "/var/run/tailscale/tailscaled.sock")
        self.assertEqual((config.mode, str(config.dialer), config.dialSelf), (0o660, "localapi", "refuse"))
        self.assertEqual((config.detectTimeout, config.dialTimeout), (15.0, 10.0))
        with open("/proc/sys/net/core/somaxconn") as f:
            self.assertEqual(config.backlog, int(f.read()))

    def test_listenRepeats(self) -> None:
        options = Options()
        options.parseOptions(["--listen", "/a.sock", "--listen", "tcp:0:interface=127.0.0.1", "--mode", "0600"])
        self.assertEqual(options.toConfig().listen, ("/a.sock", "tcp:0:interface=127.0.0.1"))
        self.assertEqual(options.toConfig().mode, 0o600)


class CommandLineTests(SynchronousTestCase):
    def assertOneLineError(self, result: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
        self.assertEqual(result.returncode, status, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertTrue(lines and lines[0].startswith("tsmux: "), result.stderr)
        self.assertLessEqual(len(lines), 2, result.stderr)
        for needle in needles:
            self.assertIn(needle, lines[0])

    def test_help(self) -> None:
        result = run([*tsmuxCommand(), "--help"])
        self.assertEqual(result.returncode, 0)
        for option in ("--listen", "--mode", "--localapi", "--dialer", "--dial-self", "--detect-timeout", "--backlog"):
            self.assertIn(option, result.stdout)

    def test_badOptions(self) -> None:
        for argv, needle in (
            (["--dialer", "carrier-pigeon"], "--dialer: expected localapi, direct, socks5:ENDPOINT, nc or nc:CLI"),
            (["--mode", "999"], "--mode: expected an octal mode"),
            (["--detect-timeout", "-1"], "--detect-timeout: expected a positive number of seconds, got '-1'"),
            (["--frobnicate"], "unknown option --frobnicate"),
            (["--localapi", "relative.sock"], "--localapi: expected an absolute path, got 'relative.sock'"),
        ):
            self.assertOneLineError(run([*tsmuxCommand(), *argv]), 2, needle)

    def test_missingDirectory(self) -> None:
        result = run([*tsmuxCommand(), "--listen", "/nonexistent-dir/tsmux.sock"])
        self.assertOneLineError(result, 1, "/nonexistent-dir/tsmux.sock", "does not exist")

    def test_pathIsNotASocket(self) -> None:
        path = os.path.join(shortDir(self), "file")
        open(path, "w").close()
        self.assertOneLineError(run([*tsmuxCommand(), "--listen", path]), 1, path, "not a socket")

    def test_liveServerAtPath(self) -> None:
        first = startTsmux(self, "--dialer", "direct")
        for command in (tsmuxCommand(), twistdCommand()):
            result = run([*command, "--listen", first.socketPath, "--dialer", "direct"])
            self.assertOneLineError(result, 1, first.socketPath, "another server is already listening")
        self.assertIsNone(first.process.poll())

    def test_staleSocketReplaced(self) -> None:
        directory = shortDir(self)
        path = os.path.join(directory, "tsmux.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        tsmux = startTsmux(self, "--dialer", "direct", socketPath=path)
        self.assertIn("removed a stale socket", tsmux.log())

    def test_modeAndCleanShutdown(self) -> None:
        tsmux = startTsmux(self, "--dialer", "direct", "--localapi", "/nonexistent/tailscaled.sock")
        self.assertEqual(stat.S_IMODE(os.stat(tsmux.socketPath).st_mode), 0o660)
        self.assertEqual(tsmux.stop(), 0)
        self.assertFalse(os.path.exists(tsmux.socketPath))
        log = tsmux.log()
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("LocalAPI at /nonexistent/tailscaled.sock is unreachable"), 1, log)

    def test_explicitMode(self) -> None:
        tsmux = startTsmux(self, "--dialer", "direct", "--mode", "0600")
        self.assertEqual(stat.S_IMODE(os.stat(tsmux.socketPath).st_mode), 0o600)

    def test_twistdListsThePlugin(self) -> None:
        result = run([*twistdCommand()[:-2], "--help"])
        self.assertIn("tsmux", result.stdout)


class RecordingReactor:
    """Binds for real, like listenUNIX, and records the mode the file had at bind time."""

    def __init__(self) -> None:
        self.modeAtBind: int | None = None

    def listenUNIX(self, path: str, factory, backlog: int, mode: int, wantPID: bool):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        self.modeAtBind = stat.S_IMODE(os.stat(path).st_mode)
        sock.close()
        os.chmod(path, mode)
        return sock


class SocketModeTests(SynchronousTestCase):
    def test_neverWiderThanAskedAtBind(self) -> None:
        """The socket file is born with the asked mode: no window at the umask's wider mode."""
        for mode in (0o600, 0o660, 0o666):
            reactor = RecordingReactor()
            path = os.path.join(shortDir(self), "s.sock")
            previous = os.umask(0o022)
            try:
                listenOnPath(reactor, path, Factory(), mode, 16)
                self.assertEqual(os.umask(0o022), 0o022, "umask restored")
            finally:
                os.umask(previous)
            self.assertEqual(reactor.modeAtBind, mode)


class DescriptionTests(SynchronousTestCase):
    def test_backlogAdded(self) -> None:
        self.assertEqual(withBacklog("unix:/a.sock", 4096), "unix:/a.sock:backlog=4096")
        self.assertEqual(withBacklog("tcp:1080:interface=127.0.0.1", 9), "tcp:1080:interface=127.0.0.1:backlog=9")
        self.assertEqual(withBacklog("unix:/a.sock:backlog=5", 4096), "unix:/a.sock:backlog=5")
        self.assertEqual(withBacklog("systemd:domain=UNIX:index=0", 4096), "systemd:domain=UNIX:index=0")

    def test_listensOnADescription(self) -> None:
        from twisted.internet import reactor

        port = listenOnDescription(reactor, "tcp:0:interface=127.0.0.1", Factory(), 16)
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "127.0.0.1")  # type: ignore[attr-defined]

    def test_badDescription(self) -> None:
        from twisted.internet import reactor

        with self.assertRaises(StartupError) as caught:
            listenOnDescription(reactor, "carrier:pigeon", Factory(), 16)
        self.assertIn("bad --listen 'carrier:pigeon'", str(caught.exception))


class GroupAndLogFormatTests(SynchronousTestCase):
    def test_groupOwnsTheSocket(self) -> None:
        import grp

        if os.geteuid() != 0:
            raise SkipTest("chown to another group needs root")
        nogroup = grp.getgrnam("nogroup").gr_gid
        tsmux = startTsmux(self, "--dialer", "direct", "--group", "nogroup")
        info = os.stat(tsmux.socketPath)
        self.assertEqual((info.st_gid, stat.S_IMODE(info.st_mode)), (nogroup, 0o660))

    def test_unknownGroup(self) -> None:
        result = run([*tsmuxCommand(), "--group", "no-such-group-here"])
        self.assertEqual(result.returncode, 2)
        self.assertIn("no such group", result.stderr)

    def test_jsonLines(self) -> None:
        import json

        tsmux = startTsmux(self, "--dialer", "direct", "--log-format", "json")
        tsmux.waitForConnectionLines(1)
        tsmux.stop()
        self.assertNotIn("\x1e", tsmux.log())  # plain JSON lines, not json-seq
        events = [json.loads(line) for line in tsmux.log().splitlines() if line.startswith("{")]
        self.assertTrue(any(e.get("log_namespace") == "tsmux.connection" for e in events), tsmux.log())

    def test_twistdJsonLogger(self) -> None:
        import json

        tsmux = startTsmux(self, "--dialer", "direct", twistd=True, twistdArgs=["--logger=tsmux.jsonLogObserver"])
        # The readiness probe's connection is logged once the reactor runs (twistd
        # installs its signal handlers only then: a SIGTERM before would just kill it).
        tsmux.waitForConnectionLines(1)
        tsmux.stop()
        events = [json.loads(line) for line in tsmux.log().splitlines() if line.startswith("{")]
        self.assertTrue(any(e.get("log_namespace") == "tsmux.connection" for e in events), tsmux.log())
