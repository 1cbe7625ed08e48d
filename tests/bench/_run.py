"""
The benchmark's orchestrator: ``python -m tests.bench [--rounds N] [--quick] [--out FILE.json]``.

Runs as root in the host namespace. It starts a private tailnet (L{tests._tailnet.PrivateTailnet}: a
real tailscaled 1.96.4 in a network namespace of its own, with C{--no-logs-no-support} and
C{--socks5-server=127.0.0.1:PORT}), then, inside that namespace through nsenter, the target servers
(L{tests.bench._targets}), then the contenders:

    - (a) tsmux, C{--dialer localapi}, on a Unix socket; run in the host namespace: it reaches
      tailscaled only through the LocalAPI socket, as in production;
    - (b) tsmux, C{--dialer direct}; run inside the namespace (nsenter), so its direct dials reach
      the targets on the namespace's loopback; its Unix socket is reachable from anywhere;
    - (c) tailscaled's own SOCKS5 on 127.0.0.1:PORT inside the namespace;
    - (d) no relay: the client speaks C{ts-dial} to tailscaled's LocalAPI itself;
    - (e) socat relaying a Unix socket to (c) (inside the namespace: it must reach (c));
    - (g) tsmux, C{--dialer socks5:tcp:...} chained to (c); inside the namespace, like (b);
    - (f) no proxy: the client connects to the target directly (the floor, and the proof that the
      load generator is not the bottleneck).

The load generator (L{tests.bench._load}) always runs inside the namespace, one process per
measurement, so every contender is driven by the same client from the same place. Rounds interleave
the contenders (the order rotates each round) and every figure in the table is a median over rounds;
ratios are computed within a round, then their median is taken.

Every process started here is stopped by its pid at the end (and gets PR_SET_PDEATHSIG, so none
outlives a crashed run).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
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
from tests.bench import _report

MIB = 1024 * 1024
CONTENDERS = ("a", "b", "g", "c", "d", "e", "f")
WORKLOADS = ("bulk", "rate", "held", "http")
HELD_CONTENDERS = ("a", "b", "c", "d")
HTTP_PATHS = ("tailscaled", "a", "socat")


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

    def __init__(self, name: str, argv: list[str], logPath: str, stdin: int | None = subprocess.DEVNULL) -> None:
        self.name = name
        self.argv = argv
        self.logPath = logPath
        self._log: IO[bytes] = open(logPath, "ab")
        self.process = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE if stdin == subprocess.PIPE else self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=childEnvironment(),
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


def machineInfo(tailscaled: str, socat: str) -> dict[str, Any]:
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
        "loadavg_start": os.getloadavg(),
    }


def gitInfo() -> dict[str, Any]:
    return {
        "commit": _run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"]).strip(),
        "describe": _run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"]).strip(),
        "dirty_files": [line[3:] for line in _run(["git", "-C", REPO_ROOT, "status", "--porcelain"]).splitlines()],
    }


def defaultOutPath() -> str:
    cacheHome = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(cacheHome, "tsmux", "bench", f"run-{stamp}.json")


class Bench:
    def __init__(self, options: argparse.Namespace, workdir: str, socat: str) -> None:
        self.options = options
        self.workdir = workdir
        self.socat = socat
        self.children: list[Child] = []
        self.tailnet = PrivateTailnet(os.path.join(workdir, "tailnet"))
        self.nsenter: list[str] = []
        self.contenders: dict[str, dict[str, Any]] = {}
        self.measurements: list[dict[str, Any]] = []
        self.roundLoad: list[tuple[float, float, float]] = []

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
        socatPath = os.path.join(self.workdir, "socat-socks.sock")
        self.socatSocks = self.startChild(
            "socat-socks",
            [
                *self.nsenter,
                self.socat,
                f"UNIX-LISTEN:{socatPath},fork,mode=600,backlog=4096",
                f"TCP:127.0.0.1:{self.tailnet.socks5Port}",
            ],
        )
        self.socatSocks.waitForSocket(socatPath)
        socatAPI = os.path.join(self.workdir, "socat-localapi.sock")
        self.socatLocalAPI = self.startChild(
            "socat-localapi",
            [self.socat, f"UNIX-LISTEN:{socatAPI},fork,mode=600,backlog=4096", f"UNIX-CONNECT:{localapi}"],
        )
        self.socatLocalAPI.waitForSocket(socatAPI)

        socks5 = f"tcp:127.0.0.1:{self.tailnet.socks5Port}"
        self.contenders = {
            "a": {"proto": "socks", "connect": f"unix:{self.tsmuxA[1]}"},
            "b": {"proto": "socks", "connect": f"unix:{self.tsmuxB[1]}"},
            "g": {"proto": "socks", "connect": f"unix:{self.tsmuxG[1]}"},
            "c": {"proto": "socks", "connect": socks5},
            "d": {"proto": "tsdial", "connect": f"unix:{localapi}"},
            "e": {"proto": "socks", "connect": f"unix:{socatPath}"},
            "f": {"proto": "direct", "connect": None},
        }
        for key, contender in self.contenders.items():
            contender["label"] = _report.LABELS[key]
        self.contenders["a"]["command"] = self.tsmuxA[0].argv
        self.contenders["b"]["command"] = self.tsmuxB[0].argv
        self.contenders["g"]["command"] = self.tsmuxG[0].argv
        self.contenders["e"]["command"] = self.socatSocks.argv
        self.httpPaths = {
            "tailscaled": f"unix:{localapi}",
            "a": f"unix:{self.tsmuxA[1]}",
            "socat": f"unix:{socatAPI}",
        }

    def startChild(self, name: str, argv: list[str], pipe: bool = False) -> Child:
        stdin = subprocess.PIPE if pipe else subprocess.DEVNULL
        child = Child(name, argv, os.path.join(self.workdir, f"{name}.log"), stdin)
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
            "0600",
            *self.options.tsmux_args,
        ]
        child = self.startChild(name, [*self.nsenter, *argv] if inNamespace else argv)
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
        if self.tailnet.tailscaledPid is not None:
            pids["tailscaled"] = (self.tailnet.tailscaledPid, False)
        return pids

    def load(self, args: list[str], timeout: float) -> dict[str, Any]:
        """Run the load generator inside the namespace; its JSON answer plus the CPU the servers used."""
        pids = self.cpuPids()
        before = {name: cpuSeconds(pid, children) for name, (pid, children) in pids.items()}
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                [*self.nsenter, sys.executable, "-m", "tests.bench._load", *args],
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
            print(f"bench:   {workload:9} {key:10} {_report.brief(workload, result)}", file=sys.stderr, flush=True)

    def bulk(self, roundIndex: int, key: str, direction: str, size: int) -> None:
        args = ["bulk", *self.contenderArgs(key, self.bulkTarget), "--direction", direction, "--size", str(size)]
        self.record(roundIndex, f"bulk-{direction}", key, self.load(args, timeout=600))

    def rate(self, roundIndex: int, key: str, count: int) -> None:
        args = ["rate", *self.contenderArgs(key, self.echoTarget), "--count", str(count)]
        args += ["--concurrency", str(self.options.concurrency)]
        self.record(roundIndex, "rate", key, self.load(args, timeout=600))

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

    def http(self, roundIndex: int, key: str, count: int) -> None:
        args = ["http", "--connect", self.httpPaths[key], "--count", str(count)]
        self.record(roundIndex, "http", key, self.load(args, timeout=600))

    def warmup(self) -> None:
        """One small pass of everything, not recorded: imports, caches, tailscaled's first dials."""
        for key in self.selected:
            if "bulk" in self.options.workloads:
                args = ["bulk", *self.contenderArgs(key, self.bulkTarget), "--direction", "down"]
                self.load([*args, "--size", str(16 * MIB)], 120)
            if "rate" in self.options.workloads:
                self.load(["rate", *self.contenderArgs(key, self.echoTarget), "--count", "200"], 120)
        if "http" in self.options.workloads:
            for key in HTTP_PATHS:
                self.load(["http", "--connect", self.httpPaths[key], "--count", "50"], 120)

    def runRounds(self) -> None:
        options = self.options
        self.selected = [key for key in CONTENDERS if key in options.contenders]
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
            if "held" in options.workloads:
                for key in rotated([k for k in HELD_CONTENDERS if k in self.selected]):
                    self.held(roundIndex, key, options.held)
                    self.checkAlive()
            if "http" in options.workloads:
                for key in rotated(HTTP_PATHS):
                    self.http(roundIndex, key, options.requests)
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
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset of a,b,g,c,d,e,f (default: all)"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of bulk,rate,held,http (default: all)"
    )
    parser.add_argument(
        "--tsmux-args",
        default="",
        help="more tsmux options for (a) and (b), one string (e.g. '--no-splice'), to compare two settings",
    )
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing socat with apt-get")
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
    bench = Bench(options, workdir, socat)
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
        },
        "machine": machineInfo(binaries[1], socat),
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
        record["contenders"] = bench.contenders
        bench.runRounds()
        if pyspy is not None:
            record["profiles"] = bench.profile(os.path.abspath(options.profile), pyspy)
    except (Exception, KeyboardInterrupt) as e:
        failure = e
        print(f"bench: stopped early: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        bench.stop()
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
