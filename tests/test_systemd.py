"""Socket activation as systemd does it: LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, and sd_notify readiness."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from ._realsockets import socksConnect
from ._tsmuxprocess import REPO_ROOT, TsmuxProcess, childEnvironment, shortDir, tsmuxCommand

# What systemd does between fork and exec: the socket becomes fd 3, and the
# variables name this very process.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execvp(sys.argv[3], sys.argv[3:])
"""


class SocketActivationTests(SynchronousTestCase):
    def activate(self, listen: str, fdName: str = "tsmux") -> tuple[TsmuxProcess, socket.socket, str]:
        directory = shortDir(self)
        path = os.path.join(directory, "tsmux.sock")
        unit = socket.socket(socket.AF_UNIX)
        unit.bind(path)
        unit.listen(64)
        os.chmod(path, 0o640)  # the unit's SocketMode
        self.addCleanup(unit.close)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notifyPath = os.path.join(directory, "notify")
        notify.bind(notifyPath)
        notify.settimeout(15)
        self.addCleanup(notify.close)
        env = childEnvironment()
        env["NOTIFY_SOCKET"] = notifyPath
        log = os.path.join(directory, "tsmux.log")
        argv = [sys.executable, "-c", LAUNCHER, str(unit.fileno()), fdName, *tsmuxCommand()]
        argv += ["--listen", listen, "--dialer", "direct", "--localapi", "/nonexistent/tailscaled.sock"]
        tsmux = TsmuxProcess.__new__(TsmuxProcess)
        tsmux.socketPath, tsmux.logPath, tsmux.returncode = path, log, None
        tsmux._log = open(log, "wb")
        tsmux.process = subprocess.Popen(
            argv, stdout=tsmux._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, pass_fds=(unit.fileno(),)
        )
        self.addCleanup(tsmux.stop)
        unit.close()  # only tsmux holds the listening socket now, as with systemd
        return tsmux, notify, path

    def test_activatedByName(self) -> None:
        tsmux, notify, path = self.activate("systemd:domain=UNIX:name=tsmux")
        message = notify.recv(4096).decode()
        self.assertIn("READY=1", message)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        sock, reply = socksConnect(path, "127.0.0.1", 1)
        sock.close()
        self.assertEqual(reply, 5)  # served (and refused by the target, a closed port)
        tsmux.process.send_signal(signal.SIGTERM)
        self.assertEqual(tsmux.process.wait(15), 0)
        self.assertIn("STOPPING=1", notify.recv(4096).decode())
        self.assertTrue(os.path.exists(path), "systemd's socket path must not be unlinked")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    def test_activatedByIndex(self) -> None:
        tsmux, notify, path = self.activate("systemd:domain=UNIX:index=0")
        self.assertIn("READY=1", notify.recv(4096).decode())
        sock, reply = socksConnect(path, "127.0.0.1", 1)
        sock.close()
        self.assertEqual(reply, 5)

    def test_withoutNamesIsOneClearLine(self) -> None:
        """systemd >= 227 always sets LISTEN_FDNAMES; without it Twisted sees no sockets."""
        tsmux, notify, path = self.activate("systemd:domain=UNIX:index=0", fdName="")
        self.assertEqual(tsmux.process.wait(15), 1)
        tsmux.stop()
        self.assertIn("systemd passed no sockets", tsmux.log())
        self.assertNotIn("Traceback", tsmux.log())

    def test_wrongNameIsOneClearLine(self) -> None:
        tsmux, notify, path = self.activate("systemd:domain=UNIX:name=other")
        self.assertEqual(tsmux.process.wait(15), 1)
        tsmux.stop()
        lines = [line for line in tsmux.log().splitlines() if line.startswith("tsmux: ")]
        self.assertEqual(len(lines), 1, tsmux.log())
        self.assertIn("no such socket from systemd (1 passed; names: tsmux)", lines[0])
        self.assertNotIn("Traceback", tsmux.log())
