"""
The benchmark's orchestrator: ``python -m tests.bench [--rounds N] [--quick] [--out FILE.json]``.

Runs as root in the host namespace. It starts a private tailnet (L{tests._tailnet.PrivateTailnet}: a
real tailscaled 1.96.4 in a network namespace of its own, with C{--no-logs-no-support} and
C{--socks5-server=127.0.0.1:PORT}), then, inside that namespace through nsenter, the target servers
(L{tests.bench._targets}), then the contenders:

    - (a) tsmux, C{--dialer localapi}, on a Unix socket; run in the host namespace: it reaches
      tailscaled only through the LocalAPI socket, as in production;
    - (r) the same tsmux, started with C{--config FILE} instead of the flags: one socket like (a)'s with
      50 rules, of which only the last allows the targets (L{tests.bench._rulesfile}): C{r - a} is the cost
      of deciding with 50 rules, per connection;
    - (b) tsmux, C{--dialer direct}; run inside the namespace (nsenter), so its direct dials reach
      the targets on the namespace's loopback; its Unix socket is reachable from anywhere;
    - (c) tailscaled's own SOCKS5 on 127.0.0.1:PORT inside the namespace;
    - (d) no relay: the client speaks C{ts-dial} to tailscaled's LocalAPI itself;
    - (e) socat relaying a Unix socket to (c) (inside the namespace: it must reach (c));
    - (g) tsmux, C{--dialer socks5:tcp:...} chained to (c); inside the namespace, like (b);
    - (i) a bare Twisted SOCKS5 relay (L{tests.bench._barerelay}: handshake, dial, relay with producers;
      no log, credentials, timers or limits), LocalAPI dialer, upstream socket connected at once and
      adopted; (i-cu) the same through C{connectUNIX}; (i-direct) the same with the direct dialer, inside
      the namespace like (b). The reference for what tsmux's own work costs over Twisted's;
    - (h) the workaround's Go relay (L{tests.bench} C{gorelay.go}: a Unix socket copied to (c) with
      C{io.Copy} both ways), built here with Debian's golang-go; inside the namespace like (e);
    - (f) no proxy: the client connects to the target directly (the floor, and the proof that the
      load generator is not the bottleneck).

The load generator (L{tests.bench._load}) always runs inside the namespace, one process per
measurement, so every contender is driven by the same client from the same place. Rounds interleave
the contenders (the order rotates each round) and every figure in the table is a median over rounds;
ratios are computed within a round, then their median is taken.

The connection-rate and LocalAPI workloads also run with the client as another uid (C{--client-uids},
by default 0 and 65534, through C{setpriv}), so that what tsmux does per caller (it connects to
tailscaled as each caller, switching its ids around the connect) is counted; the sockets are then
made mode 0666 so that uid may connect.

CPU time is read per process from C{/proc/PID/task/*/schedstat} (nanoseconds, every thread), or from
C{/proc/PID/stat} (clock ticks) for socat, whose per-connection children count too.

Every process started here is stopped by its pid at the end (and gets PR_SET_PDEATHSIG, so none
outlives a crashed run).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from tests._tailnet import REPO_ROOT, PrivateTailnet, tailnetUnavailableReason
from tests._tailscale_binaries import TAILSCALE_VERSION, defaultCacheDir, fetchTailscaleBinaries, tailscaledVersion
from tests.bench import _report, _rulesfile

MIB = 1024 * 1024
CONTENDERS = ("a", "r", "b", "g", "i", "i-cu", "i-direct", "h", "c", "d", "e", "f")
WORKLOADS = ("bulk", "rate", "held", "http")
HELD_CONTENDERS = ("a", "b", "i", "c", "d")
HTTP_PATHS = ("tailscaled", "a", "socat")
# Run again with the client as a non-root uid: those the targets compare, and (c) for reference.
OTHER_UID_RATE_CONTENDERS = ("a", "r", "b", "i", "i-direct", "c")
# The bare Twisted relays (contender i): key -> (dialer, how the upstream is connected, inside the namespace).
BARE = {
    "i": ("localapi", "adopt", False),
    "i-cu": ("localapi", "twisted", False),
    "i-direct": ("direct", "adopt", True),
}
_RULE_FIELD = re.compile(r" rule=(\S+)")
GO_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gorelay.go")


def _pdeathsig() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL if this process dies, so nothing outlives a crashed run."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    signum = int(signal.SIGKILL)

    def preexec() -> None:
        if prctl(1, signum, 0, 0, 0) != 0 or os.getppid() != parent:  # 1 = PR_SET_PDEATHSIG
            os._exit(127)

    return preexec


def childEnvironment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A long-lived process this benchmark started; L{stop} ends it by its pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logPath: str,
        stdin: int | None = subprocess.DEVNULL,
        cwd: str = REPO_ROOT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.logPath = logPath
        self._log: IO[bytes] = open(logPath, "ab")
        self.process = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE if stdin == subprocess.PIPE else self._log,
            stderr=self._log,
            cwd=cwd,
            env=env if env is not None else childEnvironment(),
            preexec_fn=_pdeathsig(),
        )
        # nsenter --net execs its command (no fork without --pid), so this is the relay's own pid.
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def waitForSocket(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.logTail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {path} within {timeout:g} s:\n{self.logTail()}")
            time.sleep(0.02)

    def logTail(self, lines: int = 20) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


def cpuSeconds(pid: int, children: bool = False) -> float | None:
    """
    The CPU time C{pid} used, in seconds: the sum of its threads' run time from
    C{/proc/PID/task/*/schedstat} (nanoseconds: a few hundred connections are a few clock ticks), or,
    with C{children} (socat's per-connection processes) or without schedstat, utime+stime (and the
    reaped children's) from C{/proc/PID/stat}, in clock ticks.
    """
    if not children:
        try:
            total = 0
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            if total:
                return total / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return cpuTicksSeconds(pid, children)


def cpuTicksSeconds(pid: int, children: bool = False) -> float | None:
    """utime+stime (and, with C{children}, the reaped children's) of C{pid}, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def ensureSocat(install: bool) -> str:
    found = shutil.which("socat")
    if found:
        return found
    if not install:
        raise SystemExit("bench: socat is missing (contender e): apt-get install socat, or drop --no-install")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit("bench: socat is missing (contender e) and cannot be installed here: apt-get install socat")
    print("bench: installing socat (contender e) with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "socat"]
    if subprocess.run(command, env=env, stdout=sys.stderr).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=sys.stderr, check=True)
        subprocess.run(command, env=env, stdout=sys.stderr, check=True)
    found = shutil.which("socat")
    if not found:
        raise SystemExit("bench: socat still missing after apt-get install")
    return found


def _aptInstall(package: str, why: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    print(f"bench: installing {package} ({why}) with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(command, env=env, stdout=sys.stderr).returncode != 0:
        if subprocess.run(["apt-get", "update"], env=env, stdout=sys.stderr).returncode != 0:
            return False
        return subprocess.run(command, env=env, stdout=sys.stderr).returncode == 0
    return True


def findGo(install: bool) -> tuple[str | None, str]:
    """C{go} for contender (h), installing Debian's golang-go if allowed: (path or None, why not)."""
    found = shutil.which("go")
    if found:
        return found, ""
    if not install:
        return None, "go is missing (apt-get install golang-go, or drop --no-install)"
    try:
        installed = _aptInstall("golang-go", "contender h, the Go relay; for the benchmark only")
    except OSError as e:
        installed = False
        print(f"bench: apt-get failed: {e}", file=sys.stderr)
    found = shutil.which("go")
    if found:
        return found, ""
    return None, "go is missing and golang-go could not be installed" if not installed else "go still missing"


def buildGoRelay(go: str, workdir: str) -> tuple[str | None, str]:
    """Build C{gorelay.go} into C{workdir} (cache and GOPATH there too, no network): (binary or None, error)."""
    base = os.path.join(workdir, "go")
    source = os.path.join(base, "src")
    os.makedirs(source, exist_ok=True)
    shutil.copyfile(GO_SOURCE, os.path.join(source, "main.go"))
    binary = os.path.join(workdir, "gorelay")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": base,
        "GOCACHE": os.path.join(base, "cache"),
        "GOPATH": os.path.join(base, "path"),
        "GOENV": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GO111MODULE": "",
        "CGO_ENABLED": "0",
    }
    try:
        done = subprocess.run(
            [go, "build", "-o", binary, "main.go"], cwd=source, env=env, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip()[-2000:]
    return binary, ""


def clientPython(uid: int) -> tuple[str | None, str]:
    """
    An interpreter uid C{uid} can run the load generator with (it only needs the standard library):
    this one if that uid can run it, else the system's python3. (None, why) if none works.
    """
    candidates = [sys.executable]
    for name in ("/usr/bin/python3", shutil.which("python3")):
        if name and name not in candidates:
            candidates.append(name)
    problems = []
    for python in candidates:
        probe = [*setprivArgv(uid), python, "-c", "import selectors, sys; print(sys.version.split()[0], sys.prefix)"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{python}: {e}")
            continue
        words = done.stdout.split()
        # A venv whose base the uid cannot read starts with another libpython's standard library:
        # run that interpreter by name instead, so it is clear which one ran.
        if done.returncode == 0 and words:
            if python == sys.executable and words[0] != sys.version.split()[0]:
                problems.append(f"{python} runs as Python {words[0]} for uid {uid} (its base is unreadable)")
                continue
            return python, ""
        problems.append(f"{python}: exit {done.returncode} {done.stderr.strip()[-200:]}")
    return None, "; ".join(problems)


def setprivArgv(uid: int) -> list[str]:
    """Run as C{uid} (its own group, no others); empty for uid 0 (the benchmark's own)."""
    if uid == 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _run(argv: list[str], **kw: Any) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpuBusy(interval: float = 1.0) -> float:
    """The fraction of all CPUs busy over C{interval} seconds (from /proc/stat), before we start."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def machineInfo(tailscaled: str, socat: str, go: str | None = None) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            memory = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import twisted

        twistedVersion = twisted.__version__
    except ImportError:
        twistedVersion = "?"
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "twisted": twistedVersion,
        "tailscaled": tailscaledVersion(tailscaled),
        "socat": " ".join(_run([socat, "-V"]).splitlines()[1:2]),
        "go": _run([go, "version"]).strip() if go else None,
        "loadavg_start": os.getloadavg(),
    }


def gitInfo() -> dict[str, Any]:
    return {
        "root": REPO_ROOT,
        "commit": _run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"]).strip(),
        "describe": _run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"]).strip(),
        "dirty_files": [line[3:] for line in _run(["git", "-C", REPO_ROOT, "status", "--porcelain"]).splitlines()],
    }


def snapshotTsmux(source: str, workdir: str) -> tuple[str, str]:
    """
    Copy the C{tsmux} package of C{source} into C{workdir}, so that every tsmux this run starts (the
    held-connection workload starts fresh ones all along) runs the same code, even if the tree is edited
    meanwhile. Returns (the directory to run tsmux from, a SHA-256 of the copied files).
    """
    target = os.path.join(workdir, "tsmux-src")
    shutil.copytree(
        os.path.join(source, "tsmux"), os.path.join(target, "tsmux"), ignore=shutil.ignore_patterns("__pycache__")
    )
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(os.path.join(target, "tsmux"))):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, target).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return target, digest.hexdigest()


def defaultOutPath() -> str:
    cacheHome = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(cacheHome, "tsmux", "bench", f"run-{stamp}.json")


class Bench:
    def __init__(self, options: argparse.Namespace, workdir: str, socat: str, goRelay: str | None = None) -> None:
        self.options = options
        self.workdir = workdir
        self.socat = socat
        self.goRelay = goRelay
        self.children: list[Child] = []
        self.tailnet = PrivateTailnet(os.path.join(workdir, "tailnet"))
        self.nsenter: list[str] = []
        self.contenders: dict[str, dict[str, Any]] = {}
        self.measurements: list[dict[str, Any]] = []
        self.roundLoad: list[tuple[float, float, float]] = []
        # uid -> the interpreter that runs the load generator as that uid (uid 0: this one).
        self.clientPythons: dict[int, str] = {0: sys.executable}
        self.clientPythons.update(getattr(options, "client_pythons", {}))
        # Every socket another uid must reach gets mode 0666 when a non-root client runs.
        self.otherUids = [uid for uid in options.client_uids if uid != 0]
        self.mode = "0666" if self.otherUids else "0600"
        self.bare: dict[str, tuple[Child, str]] = {}
        self.socatLocalAPIAs: dict[int, tuple[Child, str]] = {}
        self.go: tuple[Child, str] | None = None
        self.tsmuxR: tuple[Child, str] | None = None
        self.rulesConfig: str | None = None
        self.rulesLogOffset = 0
        """Where (r)'s log is at its first connections with a tailnet view (earlier ones may fail closed)."""
        # Contenders that could not start ((r) with a tsmux that has no --config): key -> why.
        self.skipped: dict[str, str] = {}

    # --- processes ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.tailnet.start()
        self.nsenter = ["nsenter", f"--net=/proc/{self.tailnet.helperPid}/ns/net", "--"]
        targets = self.startChild("targets", [*self.nsenter, sys.executable, "-m", "tests.bench._targets"], pipe=True)
        assert targets.process.stdout is not None
        line = targets.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the target servers did not start:\n{targets.logTail()}")
        ready = json.loads(line)
        self.targets = targets
        self.bulkTarget = f"127.0.0.1:{ready['bulkPort']}"
        self.echoTarget = f"127.0.0.1:{ready['echoPort']}"

        localapi = self.tailnet.localapi
        self.tsmuxA = self.startTsmux("tsmux-a", "localapi", inNamespace=False)
        self.tsmuxB = self.startTsmux("tsmux-b", "direct", inNamespace=True)
        self.tsmuxG = self.startTsmux("tsmux-g", f"socks5:tcp:127.0.0.1:{self.tailnet.socks5Port}", inNamespace=True)
        if "r" in self.options.contenders:
            try:
                self.tsmuxR = self.startTsmuxRules("tsmux-r")
            except RuntimeError as e:
                why = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
                self.skipped["r"] = f"tsmux with {_rulesfile.RULE_COUNT} rules did not start: {why}"
                print(f"bench: skipping contender (r): {self.skipped['r']}", file=sys.stderr, flush=True)
        for key in BARE:
            self.bare[key] = self.startBare(key, f"bare-{key}")
        if self.goRelay is not None:
            self.go = self.startGo("gorelay")
        modeText = self.mode.lstrip("0")
        socatPath = os.path.join(self.workdir, "socat-socks.sock")
        self.socatSocks = self.startChild(
            "socat-socks",
            [
                *self.nsenter,
                self.socat,
                f"UNIX-LISTEN:{socatPath},fork,mode={modeText},backlog=4096",
                f"TCP:127.0.0.1:{self.tailnet.socks5Port}",
            ],
        )
        self.socatSocks.waitForSocket(socatPath)
        socatAPI = os.path.join(self.workdir, "socat-localapi.sock")
        self.socatLocalAPI = self.startChild(
            "socat-localapi",
            [self.socat, f"UNIX-LISTEN:{socatAPI},fork,mode={modeText},backlog=4096", f"UNIX-CONNECT:{localapi}"],
        )
        self.socatLocalAPI.waitForSocket(socatAPI)
        # For a non-root client, a socat whose connections to tailscaled carry that uid too (su= after the
        # listen), as tsmux's do: tailscaled then sees the same caller on every path, and the added latency
        # compares the relays, not tailscaled's handling of root against another uid.
        for uid in self.otherUids:
            path = os.path.join(self.workdir, f"socat-localapi-{uid}.sock")
            child = self.startChild(
                f"socat-localapi-{uid}",
                [
                    self.socat,
                    f"UNIX-LISTEN:{path},fork,mode={modeText},backlog=4096,su={uid}",
                    f"UNIX-CONNECT:{localapi}",
                ],
            )
            child.waitForSocket(path)
            self.socatLocalAPIAs[uid] = (child, path)

        socks5 = f"tcp:127.0.0.1:{self.tailnet.socks5Port}"
        self.contenders = {
            "a": {"proto": "socks", "connect": f"unix:{self.tsmuxA[1]}", "command": self.tsmuxA[0].argv},
            "b": {"proto": "socks", "connect": f"unix:{self.tsmuxB[1]}", "command": self.tsmuxB[0].argv},
            "g": {"proto": "socks", "connect": f"unix:{self.tsmuxG[1]}", "command": self.tsmuxG[0].argv},
            "c": {"proto": "socks", "connect": socks5},
            "d": {"proto": "tsdial", "connect": f"unix:{localapi}"},
            "e": {"proto": "socks", "connect": f"unix:{socatPath}", "command": self.socatSocks.argv},
            "f": {"proto": "direct", "connect": None},
        }
        for key, (child, path) in self.bare.items():
            self.contenders[key] = {"proto": "socks", "connect": f"unix:{path}", "command": child.argv}
        if self.go is not None:
            self.contenders["h"] = {"proto": "socks", "connect": f"unix:{self.go[1]}", "command": self.go[0].argv}
        if self.tsmuxR is not None:
            self.contenders["r"] = {
                "proto": "socks",
                "connect": f"unix:{self.tsmuxR[1]}",
                "command": self.tsmuxR[0].argv,
                "rules": _rulesfile.RULE_COUNT,
                "config_text": self.rulesConfig,
            }
        for key, contender in self.contenders.items():
            contender["label"] = _report.LABELS[key]
        self.httpPaths = {
            "tailscaled": f"unix:{localapi}",
            "a": f"unix:{self.tsmuxA[1]}",
            "socat": f"unix:{socatAPI}",
        }

    def startChild(self, name: str, argv: list[str], pipe: bool = False, tsmux: bool = False) -> Child:
        stdin = subprocess.PIPE if pipe else subprocess.DEVNULL
        cwd, env = REPO_ROOT, None
        source = self.options.tsmux_snapshot
        if tsmux and source:
            # python -m puts the working directory first on sys.path: run tsmux from its own tree.
            cwd, env = source, childEnvironment()
            env["PYTHONPATH"] = os.pathsep.join([source, env["PYTHONPATH"]])
        child = Child(name, argv, os.path.join(self.workdir, f"{name}.log"), stdin, cwd=cwd, env=env)
        self.children.append(child)
        return child

    def startTsmux(self, name: str, dialer: str, inNamespace: bool) -> tuple[Child, str]:
        path = os.path.join(self.workdir, f"{name}.sock")
        argv = [
            sys.executable,
            "-m",
            "tsmux",
            "--listen",
            path,
            "--localapi",
            self.tailnet.localapi,
            "--dialer",
            dialer,
            "--mode",
            self.mode,
            *self.options.tsmux_args,
        ]
        child = self.startChild(name, [*self.nsenter, *argv] if inNamespace else argv, tsmux=True)
        child.waitForSocket(path)
        return child, path

    def startTsmuxRules(self, name: str) -> tuple[Child, str]:
        """
        Contender (r): tsmux as (a) (LocalAPI dialer, host namespace, same mode), from a config file whose
        one socket has 50 rules, only the last allowing the targets. C{--config} takes no socket flag:
        C{--no-splice} in C{--tsmux-args} becomes C{splice = false}, the rest is passed as it is.
        """
        path = os.path.join(self.workdir, f"{name}.sock")
        configPath = os.path.join(self.workdir, f"{name}.toml")
        extra = [arg for arg in self.options.tsmux_args if arg != "--no-splice"]
        ports = [int(target.rpartition(":")[2]) for target in (self.echoTarget, self.bulkTarget)]
        text = _rulesfile.configText(
            path, self.tailnet.localapi, self.mode, ports, splice="--no-splice" not in self.options.tsmux_args
        )
        with open(configPath, "w") as f:
            f.write(text)
        # The benchmark's own tsmux reads the file as the daemon will: the last rule must decide every target.
        try:
            problem = _rulesfile.checkLastRuleDecides(configPath, ports, [0, *self.otherUids])
        except Exception as e:  # the working tree's tsmux cannot read it: neither will the one under test
            raise RuntimeError(f"{configPath}: {type(e).__name__}: {e}") from e
        if problem is not None:
            raise RuntimeError(f"{configPath}: {problem}")
        self.rulesConfig = text
        argv = [sys.executable, "-m", "tsmux", "--config", configPath, *extra]
        child = self.startChild(name, argv, tsmux=True)
        try:
            child.waitForSocket(path)
        except RuntimeError:
            self.stopChild(child)
            raise
        return child, path

    def ruleLabels(self, offset: int = 0) -> dict[str, int]:
        """
        How many of (r)'s connections each rule decided, from its log lines (C{rule=r#50}) from byte
        C{offset} of its log on.
        """
        if self.tsmuxR is None:
            return {}
        counts: dict[str, int] = {}
        try:
            with open(self.tsmuxR[0].logPath, "rb") as raw:
                raw.seek(offset)
                text = raw.read().decode("utf-8", errors="replace")
            for line in text.splitlines():
                found = _RULE_FIELD.search(line)
                if found:
                    counts[found[1]] = counts.get(found[1], 0) + 1
        except OSError:
            pass
        return counts

    def startBare(self, key: str, name: str) -> tuple[Child, str]:
        """A bare Twisted relay (contender i and its variants), by its key in L{BARE}."""
        dialer, connect, inNamespace = BARE[key]
        path = os.path.join(self.workdir, f"{name}.sock")
        dialerArg = f"localapi:{self.tailnet.localapi}" if dialer == "localapi" else "direct"
        argv = [sys.executable, "-m", "tests.bench._barerelay", "--listen", path, "--mode", self.mode]
        argv += ["--dialer", dialerArg, "--connect", connect]
        child = self.startChild(name, [*self.nsenter, *argv] if inNamespace else argv)
        child.waitForSocket(path)
        return child, path

    def startGo(self, name: str) -> tuple[Child, str]:
        """The Go relay (contender h), inside the namespace: it copies to (c) on 127.0.0.1 there."""
        assert self.goRelay is not None
        path = os.path.join(self.workdir, f"{name}.sock")
        argv = [self.goRelay, path, self.mode, f"127.0.0.1:{self.tailnet.socks5Port}"]
        child = self.startChild(name, [*self.nsenter, *argv])
        child.waitForSocket(path)
        return child, path

    def stopChild(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except OSError:
                pass
        self.children = []
        self.tailnet.stop()

    def checkAlive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} (pid {child.pid}) exited with {child.process.returncode}:\n{child.logTail()}"
                )
        if self.tailnet.tailscaledPid is None or not os.path.exists(f"/proc/{self.tailnet.tailscaledPid}"):
            raise RuntimeError("tailscaled is gone")

    # --- measurements ------------------------------------------------------------------------------

    def cpuPids(self) -> dict[str, tuple[int, bool]]:
        pids = {
            "tsmux_a": (self.tsmuxA[0].pid, False),
            "tsmux_b": (self.tsmuxB[0].pid, False),
            "tsmux_g": (self.tsmuxG[0].pid, False),
            "socat": (self.socatSocks.pid, True),
            "socat_localapi": (self.socatLocalAPI.pid, True),
            "targets": (self.targets.pid, False),
        }
        for uid, (child, _) in self.socatLocalAPIAs.items():
            pids[f"socat_localapi_{uid}"] = (child.pid, True)
        for key, (child, _) in self.bare.items():
            pids[f"bare_{key}"] = (child.pid, False)
        if self.go is not None:
            pids["gorelay"] = (self.go[0].pid, False)
        if self.tsmuxR is not None:
            pids["tsmux_r"] = (self.tsmuxR[0].pid, False)
        if self.tailnet.tailscaledPid is not None:
            pids["tailscaled"] = (self.tailnet.tailscaledPid, False)
        return pids

    def load(self, args: list[str], timeout: float, uid: int = 0) -> dict[str, Any]:
        """
        Run the load generator inside the namespace (as C{uid}, through setpriv, unless 0); its JSON
        answer plus the CPU the servers used.
        """
        pids = self.cpuPids()
        before = {name: cpuSeconds(pid, children) for name, (pid, children) in pids.items()}
        started = time.perf_counter()
        client = [*setprivArgv(uid), self.clientPythons[uid], "-m", "tests.bench._load"]
        try:
            completed = subprocess.run(
                [*self.nsenter, *client, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                env=childEnvironment(),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"load generator timed out after {timeout:g} s"}
        # socat reaps its per-connection children asynchronously: give it a moment.
        time.sleep(0.05)
        after = {name: cpuSeconds(pid, children) for name, (pid, children) in pids.items()}
        lines = completed.stdout.strip().splitlines()
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, ValueError):
            result = {"error": f"load generator exit {completed.returncode}: {completed.stderr.strip()[-2000:]}"}
        result["wall_s"] = time.perf_counter() - started
        result["server_cpu_s"] = {
            name: round(after[name] - before[name], 3)
            for name in pids
            if before[name] is not None and after[name] is not None
        }
        return result

    def contenderArgs(self, key: str, target: str) -> list[str]:
        contender = self.contenders[key]
        args = ["--proto", contender["proto"], "--target", target]
        if contender["connect"] is not None:
            args += ["--connect", contender["connect"]]
        return args

    def record(self, roundIndex: int, workload: str, key: str, result: dict[str, Any]) -> None:
        entry = {"round": roundIndex, "workload": workload, "contender": key, "result": result}
        self.measurements.append(entry)
        if self.options.verbose or "error" in result:
            brief = _report.brief(workload.partition("@")[0], result)
            print(f"bench:   {workload:11} {key:10} {brief}", file=sys.stderr, flush=True)

    def bulk(self, roundIndex: int, key: str, direction: str, size: int) -> None:
        args = ["bulk", *self.contenderArgs(key, self.bulkTarget), "--direction", direction, "--size", str(size)]
        self.record(roundIndex, f"bulk-{direction}", key, self.load(args, timeout=600))

    def rate(self, roundIndex: int, key: str, count: int, uid: int = 0) -> None:
        """The connection rate; with a non-root C{uid}, recorded as workload C{rate@UID}."""
        args = ["rate", *self.contenderArgs(key, self.echoTarget), "--count", str(count)]
        args += ["--concurrency", str(self.options.concurrency)]
        self.record(roundIndex, _report.workloadName("rate", uid), key, self.load(args, timeout=600, uid=uid))

    def held(self, roundIndex: int, key: str, count: int) -> None:
        fresh: tuple[Child, str] | None = None
        subjectPid: int
        # A fresh tailscaled too: Go keeps the heap an earlier workload grew, and its RSS growth would
        # then depend on which contender went before.
        restartStarted = time.monotonic()
        self.tailnet.stopTailscaled()
        self.tailnet.startTailscaled()
        restartSeconds = time.monotonic() - restartStarted
        tailscaledPid = self.tailnet.tailscaledPid
        assert tailscaledPid is not None
        connect = self.contenders[key]["connect"]
        if key in ("a", "b"):
            # A fresh tsmux each time: memory freed by earlier workloads (1 MiB read buffers) would be
            # reused and hide part of the growth.
            fresh = self.startTsmux(f"tsmux-{key}-held", "localapi" if key == "a" else "direct", key == "b")
            subjectPid = fresh[0].pid
            connect = f"unix:{fresh[1]}"
        elif key in BARE:
            fresh = self.startBare(key, f"bare-{key}-held")
            subjectPid = fresh[0].pid
            connect = f"unix:{fresh[1]}"
        else:
            subjectPid = tailscaledPid
        args = ["held", "--proto", self.contenders[key]["proto"], "--target", self.echoTarget]
        args += ["--connect", connect, "--count", str(count), "--concurrency", str(self.options.concurrency)]
        args += ["--pids", f"{subjectPid},{tailscaledPid}"]
        try:
            result = self.load(args, timeout=600)
        finally:
            if fresh is not None:
                self.stopChild(fresh[0])
        result["subject_pid"] = subjectPid
        result["tailscaled_pid"] = tailscaledPid
        result["tailscaled_restart_s"] = round(restartSeconds, 2)
        self.record(roundIndex, "held", key, result)

    def httpPath(self, key: str, uid: int) -> str:
        if key == "socat" and uid in self.socatLocalAPIAs:
            return f"unix:{self.socatLocalAPIAs[uid][1]}"
        return self.httpPaths[key]

    def httpArgs(self, count: int, uid: int = 0) -> list[str]:
        args = ["http", "--count", str(count)]
        for key in HTTP_PATHS:
            args += ["--connect", self.httpPath(key, uid)]
        return args

    def http(self, roundIndex: int, count: int, uid: int = 0) -> None:
        """
        The LocalAPI passthrough: one client process, one keep-alive connection per path, requests
        taking turns between the paths (see L{tests.bench._load}); one measurement recorded per path,
        as workload C{http}, or C{http@UID} with a non-root C{uid}.
        """
        workload = _report.workloadName("http", uid)
        result = self.load(self.httpArgs(count, uid), timeout=600, uid=uid)
        for key in HTTP_PATHS:
            if "error" in result:
                self.record(roundIndex, workload, key, result)
                continue
            entry = dict(result["paths"][self.httpPath(key, uid)])
            entry["interleaved"] = True
            entry["wall_s"] = result["wall_s"]
            self.record(roundIndex, workload, key, entry)

    def warmup(self) -> None:
        """One small pass of everything, not recorded: imports, caches, tailscaled's first dials."""
        if "r" in self.selected:
            self.rulesReady()
        for key in self.selected:
            if "bulk" in self.options.workloads:
                args = ["bulk", *self.contenderArgs(key, self.bulkTarget), "--direction", "down"]
                self.load([*args, "--size", str(16 * MIB)], 120)
            if "rate" in self.options.workloads:
                self.load(["rate", *self.contenderArgs(key, self.echoTarget), "--count", "200"], 120)
        if "http" in self.options.workloads:
            self.load(self.httpArgs(50), 120)
        for uid in self.otherUids:
            # The other uid's first run also proves it can reach every socket: fail early, not in round 1.
            for key in self.otherUidRate:
                result = self.load(["rate", *self.contenderArgs(key, self.echoTarget), "--count", "50"], 120, uid)
                if "error" in result or result.get("errors"):
                    raise RuntimeError(f"warm-up of ({key}) as uid {uid} failed: {_report.brief('rate', result)}")
            if "http" in self.options.workloads:
                result = self.load(self.httpArgs(50, uid), 120, uid)
                if "error" in result:
                    raise RuntimeError(f"warm-up of the LocalAPI passthrough as uid {uid} failed: {result['error']}")

    def rulesReady(self, timeout: float = 20.0) -> None:
        """
        (r) allows the targets only once it has a tailnet view (before that, its tag and login rules fail
        closed): wait until a few connections all go through, and check that rule 50 decided them.
        """
        assert self.tsmuxR is not None
        logPath = self.tsmuxR[0].logPath
        deadline = time.monotonic() + timeout
        while True:
            self.rulesLogOffset = os.path.getsize(logPath)
            result = self.load(["rate", *self.contenderArgs("r", self.echoTarget), "--count", "20"], 60)
            if "error" not in result and not result.get("errors"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"(r) refuses the target after {timeout:g} s: {_report.brief('rate', result)}\n"
                    f"{self.tsmuxR[0].logTail()}"
                )
            time.sleep(0.5)
        labels = self.ruleLabels(self.rulesLogOffset)
        last = f"{_rulesfile.SOCKET_NAME}#{_rulesfile.RULE_COUNT}"
        if set(labels) - {last} or not labels:
            raise RuntimeError(f"(r)'s connections should all be decided by {last}, its log says {labels}")

    def runRounds(self) -> None:
        options = self.options
        self.selected = [key for key in CONTENDERS if key in options.contenders and key in self.contenders]
        self.otherUidRate = [key for key in OTHER_UID_RATE_CONTENDERS if key in self.selected]
        if "rate" not in options.workloads:
            self.otherUidRate = []
        print("bench: warming up", file=sys.stderr, flush=True)
        self.warmup()
        for roundIndex in range(options.rounds):
            started = time.monotonic()

            def rotated(keys: Sequence[str], shift: int = roundIndex) -> list[str]:
                """The round's order: a b c ..., b c ... a, ..., so no contender always goes first."""
                keys = list(keys)
                if not keys:
                    return keys
                shift %= len(keys)
                return keys[shift:] + keys[:shift]

            if "bulk" in options.workloads:
                for direction in ("down", "up"):
                    for key in rotated(self.selected):
                        self.bulk(roundIndex, key, direction, options.size)
                        self.checkAlive()
            if "rate" in options.workloads:
                for key in rotated(self.selected):
                    self.rate(roundIndex, key, options.connections)
                    self.checkAlive()
                for uid in self.otherUids:
                    for key in rotated(self.otherUidRate):
                        self.rate(roundIndex, key, options.connections, uid)
                        self.checkAlive()
            if "held" in options.workloads:
                for key in rotated([k for k in HELD_CONTENDERS if k in self.selected]):
                    self.held(roundIndex, key, options.held)
                    self.checkAlive()
            if "http" in options.workloads:
                for uid in rotated([0, *self.otherUids]):
                    self.http(roundIndex, options.requests, uid)
                    self.checkAlive()
            self.roundLoad.append(os.getloadavg())
            print(
                f"bench: round {roundIndex + 1}/{options.rounds} done in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    # --- profiles ------------------------------------------------------------------------------------

    def profile(self, outdir: str, pyspy: str) -> list[dict[str, Any]]:
        """
        py-spy on tsmux (a) and (b) during one bulk download and one connection-rate run each: raw
        collapsed stacks saved in C{outdir} (flamegraph.pl or speedscope read them) and the top
        functions by own and by total time. Not counted in the table (sampling slows tsmux).
        """
        os.makedirs(outdir, exist_ok=True)
        # Enough connections for a few hundred samples (a run of 2,000 lasts about a second).
        count = str(max(self.options.connections, 8000))
        runs = []
        for key in ("a", "b"):
            if key not in self.selected:
                continue
            pid = (self.tsmuxA if key == "a" else self.tsmuxB)[0].pid
            bulkArgs = ["bulk", *self.contenderArgs(key, self.bulkTarget), "--direction", "down"]
            # At least 2 GiB: a short transfer gives py-spy too few samples.
            bulkArgs += ["--size", str(max(self.options.size, 2048 * MIB))]
            rateArgs = ["rate", *self.contenderArgs(key, self.echoTarget), "--count", count]
            for name, args in ((f"{key}-bulk-down", bulkArgs), (f"{key}-rate", rateArgs)):
                raw = os.path.join(outdir, f"{name}.txt")
                spy = self.startChild(
                    f"py-spy-{name}",
                    [pyspy, "record", "--pid", str(pid), "--rate", "250", "--nolineno", "--format", "raw", "-o", raw],
                )
                time.sleep(1.0)  # attach before the load starts
                result = self.load(args, timeout=600)
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
                try:
                    spy.process.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                self.stopChild(spy)
                entry: dict[str, Any] = {"name": name, "pid": pid, "file": raw, "load": result}
                entry.update(_report.summarizeStacks(raw))
                runs.append(entry)
                print(
                    f"bench: profiled {name}: {entry.get('samples', 0)} samples -> {raw}", file=sys.stderr, flush=True
                )
        return runs


def parseOptions(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="tsmux against tailscaled's SOCKS5, socat and ts-dial, in a private network namespace "
        "with a real tailscaled (needs root). See docs/benchmarks.rst.",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7; --quick: 3); medians over them")
    parser.add_argument("--quick", action="store_true", help="smaller workloads: 64 MiB, 400 connections, ...")
    parser.add_argument("--out", help="where to save the JSON record [default: $XDG_CACHE_HOME/tsmux/bench/run-*.json]")
    parser.add_argument("--size-mib", type=int, help="bulk transfer size (default 512; --quick: 64)")
    parser.add_argument("--connections", type=int, help="connection-rate count (default 2000; --quick: 400)")
    parser.add_argument("--concurrency", type=int, default=50, help="connections in flight (default 50)")
    parser.add_argument("--held", type=int, help="held connections (default 2000; --quick: 1000)")
    parser.add_argument("--requests", type=int, help="LocalAPI requests per run (default 1000; --quick: 300)")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)} (default: all)",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of bulk,rate,held,http (default: all)"
    )
    parser.add_argument(
        "--tsmux-args",
        default="",
        help="more tsmux options for (a) and (b), one string (e.g. '--no-splice'), to compare two settings",
    )
    parser.add_argument(
        "--client-uid",
        default="65534",
        help="also run the connection-rate workload (for (a), (r), (b), (i), (i-direct), (c)) and the LocalAPI "
        "passthrough with the client as these uids (comma-separated; 'none' for root only) [default: 65534]",
    )
    parser.add_argument(
        "--tsmux-from",
        metavar="DIR",
        help="run tsmux from this source tree (e.g. a `git archive` of another commit) instead of the working tree",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not install socat or golang-go with apt-get (socat missing: an error; go missing: (h) skipped)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, profile tsmux (a) and (b) with py-spy during a bulk download and a connection-rate "
        "run; stacks go to DIR",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs and sockets directory")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every measurement as it comes")
    options = parser.parse_args(argv)
    quick = options.quick
    if options.rounds is None:
        options.rounds = 3 if quick else 7
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    options.size = (options.size_mib or (64 if quick else 512)) * MIB
    options.connections = options.connections or (400 if quick else 2000)
    options.held = options.held or (1000 if quick else 2000)
    options.requests = options.requests or (300 if quick else 1000)
    options.tsmux_args = shlex.split(options.tsmux_args)
    if options.tsmux_from:
        options.tsmux_from = os.path.abspath(options.tsmux_from)
        if not os.path.isfile(os.path.join(options.tsmux_from, "tsmux", "__main__.py")):
            parser.error(f"--tsmux-from: no tsmux/__main__.py in {options.tsmux_from}")
    uids = options.client_uid.strip().lower()
    try:
        options.client_uids = [] if uids in ("", "none", "0") else [int(u) for u in uids.split(",") if u.strip()]
    except ValueError:
        parser.error("--client-uid takes comma-separated numeric uids, or 'none'")
    options.client_uids = [u for u in dict.fromkeys(options.client_uids) if u != 0]
    options.contenders = [c.strip() for c in options.contenders.split(",") if c.strip()]
    options.workloads = [w.strip() for w in options.workloads.split(",") if w.strip()]
    for c in options.contenders:
        if c not in CONTENDERS:
            parser.error(f"unknown contender {c!r}")
    for w in options.workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}")
    return options


def main(argv: Sequence[str]) -> int:
    options = parseOptions(argv)
    if os.geteuid() != 0:
        print("bench: needs root (unshare -n, nsenter), like the integration tests: sudo tox -e bench", file=sys.stderr)
        return 2
    binaries = fetchTailscaleBinaries(defaultCacheDir())
    reason = tailnetUnavailableReason()
    if reason is not None:
        print(f"bench: cannot start a private tailnet: {reason}", file=sys.stderr)
        return 2
    socat = ensureSocat(not options.no_install)
    skipped: dict[str, str] = {}
    go: str | None = None
    goBinary = None
    if "h" in options.contenders:
        go, why = findGo(not options.no_install)
        if go is None:
            skipped["h"] = why
    options.client_pythons = {}
    for uid in list(options.client_uids):
        python, why = clientPython(uid) if shutil.which("setpriv") else (None, "setpriv is missing")
        if python is None:
            skipped[f"client uid {uid}"] = why
            options.client_uids.remove(uid)
        else:
            options.client_pythons[uid] = python
    pyspy = None
    if options.profile:
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(pyspy, os.X_OK):
            print("bench: --profile needs py-spy: pip install py-spy", file=sys.stderr)
            return 2
    outPath = options.out or defaultOutPath()

    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tsmux-bench-", dir="/tmp")
    os.chmod(workdir, 0o755)
    options.tsmux_snapshot, tsmuxDigest = snapshotTsmux(options.tsmux_from or REPO_ROOT, workdir)
    if "h" in options.contenders and "h" not in skipped:
        assert go is not None
        goBinary, why = buildGoRelay(go, workdir)
        if goBinary is None:
            skipped["h"] = f"the Go relay did not build: {why}"
    for what, why in skipped.items():
        print(f"bench: skipping {'contender (h), the Go relay' if what == 'h' else what}: {why}", file=sys.stderr)
    bench = Bench(options, workdir, socat, goBinary)
    record: dict[str, Any] = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "command": ["python", "-m", "tests.bench", *argv],
        "parameters": {
            "rounds": options.rounds,
            "quick": options.quick,
            "bulk_bytes": options.size,
            "connections": options.connections,
            "concurrency": options.concurrency,
            "held": options.held,
            "requests": options.requests,
            "contenders": options.contenders,
            "workloads": options.workloads,
            "tsmux_args": options.tsmux_args,
            "tsmux_from": options.tsmux_from or REPO_ROOT,
            "tsmux_sha256": tsmuxDigest,
            "client_uids": options.client_uids,
            "client_pythons": {str(uid): python for uid, python in bench.clientPythons.items()},
            "socket_mode": bench.mode,
            "cpu_clock": "schedstat ns per thread (socat: stat ticks with children)",
            "skipped": skipped,
        },
        "machine": machineInfo(binaries[1], socat, go),
        "git": gitInfo(),
        "tailscale_version": TAILSCALE_VERSION,
    }
    print(
        f"bench: {options.rounds} rounds; bulk {options.size // MIB} MiB, {options.connections} connections, "
        f"{options.held} held, {options.requests} requests; workdir {workdir}",
        file=sys.stderr,
        flush=True,
    )
    busy = cpuBusy()
    record["machine"]["cpu_busy_before_start"] = round(busy, 3)
    if busy > 0.15:
        print(
            f"bench: warning: the CPUs were {busy:.0%} busy before the start: something else is running and the "
            "figures will be noisy (ratios suffer least; the JSON keeps the load averages)",
            file=sys.stderr,
            flush=True,
        )
    failure: BaseException | None = None
    try:
        bench.start()
        skipped.update(bench.skipped)
        record["contenders"] = bench.contenders
        bench.runRounds()
        if pyspy is not None:
            record["profiles"] = bench.profile(os.path.abspath(options.profile), pyspy)
    except (Exception, KeyboardInterrupt) as e:
        failure = e
        print(f"bench: stopped early: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        bench.stop()
    if "r" in record.get("contenders", {}):
        # Which rule decided (r)'s connections, from its log: every one should be the last.
        record["contenders"]["r"]["rule_labels"] = bench.ruleLabels(bench.rulesLogOffset)
    record["measurements"] = bench.measurements
    record["machine"]["loadavg_after_each_round"] = bench.roundLoad
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record["duration_s"] = round(time.monotonic() - clock, 1)
    record["machine"]["loadavg_end"] = os.getloadavg()
    if failure is not None:
        record["failure"] = f"{type(failure).__name__}: {failure}"
    summary = _report.summarize(record)
    record["summary"] = summary
    table = _report.markdown(record, summary)
    if record.get("profiles"):
        table += "\n\n" + _report.profileText(record["profiles"])
    os.makedirs(os.path.dirname(os.path.abspath(outPath)), exist_ok=True)
    with open(outPath, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(table)
    print(f"bench: {record['duration_s']:.0f} s; JSON record: {outPath}", file=sys.stderr)
    if options.keep_workdir or failure is not None:
        print(f"bench: logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failure is not None else 0
