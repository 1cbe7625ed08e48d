"""The C{tsmux} console script: the twistd plugin's options, run in the foreground."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import FileLogObserver, eventAsJSON, formatEventAsClassicLogText, formatTime, globalLogBeginner

from ._configfile import ConfigError
from ._help import parseOrExit
from ._listen import StartupError
from ._options import Options
from ._service import buildService


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run tsmux until SIGINT/SIGTERM.  Bad options and startup problems are
    one line on stderr (status 2 and 1), never a traceback.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments and arguments[0] in SUBCOMMANDS:
        try:
            status = SUBCOMMANDS[arguments[0]](arguments[1:])
            sys.stdout.flush()
        except BrokenPipeError:
            # Its reader left (tsmux check | head): no traceback, and none at exit either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status = 1
        raise SystemExit(status)
    options = parseOrExit(Options(), arguments)
    try:
        daemon = options.toDaemonConfig()
    except ConfigError as error:
        sys.stderr.write("".join(f"tsmux: {line}\n" for line in error.errors))
        raise SystemExit(1) from None

    from twisted.internet import reactor

    observer = _jsonLines(sys.stderr) if daemon.logFormat == "json" else _textLines(sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        tsmux = buildService(daemon, reactor, handleSignals=True)
    except StartupError as error:
        sys.stderr.write(f"tsmux: {error}\n")
        raise SystemExit(1) from None

    failed: list[StartupError] = []

    def start() -> None:
        # Listen once the reactor runs: its SIGTERM handler is in place by then, so a
        # socket that exists can always be removed by a clean shutdown.
        try:
            tsmux.privilegedStartService()
            tsmux.startService()
        except StartupError as error:
            failed.append(error)
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", tsmux.stopService)

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(_handleSignals, reactor, tsmux)
    reactor.run()
    if failed:
        sys.stderr.write(f"tsmux: {failed[0]}\n")
        raise SystemExit(1)


def _check(arguments: list[str]) -> int:
    from ._check import main as checkMain

    return checkMain(arguments)


def _status(arguments: list[str]) -> int:
    from ._commands import status

    return status(arguments)


def _explain(arguments: list[str]) -> int:
    from ._commands import explain

    return explain(arguments)


def _reload(arguments: list[str]) -> int:
    from ._commands import reload

    return reload(arguments)


def _completion(arguments: list[str]) -> int:
    from ._completion import main as completionMain

    return completionMain(arguments)


SUBCOMMANDS = {
    "check": _check,
    "status": _status,
    "explain": _explain,
    "reload": _reload,
    "completion": _completion,
}
"""C{tsmux SUBCOMMAND ...}; C{tsmux} alone (or with options) runs the daemon."""


if __name__ == "__main__":  # pragma: no cover
    main()


class _ClassicFormat:
    """
    Twisted's classic text format, made cheap for the line every connection
    logs: that line is already formatted (L{tsmux._record}), and the
    timestamp is formatted once a second instead of per event.  Everything
    else goes through Twisted's own formatter, unchanged.
    """

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def __call__(self, event: dict[str, Any]) -> str | None:
        line = event.get("line")
        if line is None or event.get("log_namespace") != "tsmux.connection":
            return formatEventAsClassicLogText(event)
        when = event["log_time"]
        if int(when) != self._second:
            self._second = int(when)
            self._stamp = formatTime(when)
        return f"{self._stamp} [tsmux.connection#info] {line}\n"


def _textLines(stream: Any) -> FileLogObserver:
    """Text lines as Twisted writes them (C{textFileLogObserver}), with the connection lines cheaper."""
    return FileLogObserver(stream, _ClassicFormat())


def _jsonLines(stream: Any) -> FileLogObserver:
    """One JSON object per line (Twisted's own JSON observer adds RS bytes for json-seq)."""
    return FileLogObserver(stream, lambda event: eventAsJSON(event) + "\n")


def jsonLogObserver() -> FileLogObserver:
    """
    For twistd: C{twistd --logger=tsmux.jsonLogObserver -n tsmux ...} logs one
    JSON object per line to stdout, as C{tsmux --log-format json} does to stderr.
    """
    return _jsonLines(sys.stdout)


def _stopQuietly(reactor: Any) -> None:
    """Stop the reactor unless it is already stopping (e.g. a failed start)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _handleSignals(reactor: Any, tsmux: Any) -> None:
    """
    The first SIGTERM/SIGINT stops gracefully (open connections get
    --shutdown-timeout); a second one cuts them at once.
    """
    stopping = False

    def onSignal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            reactor.callFromThread(_stopQuietly, reactor)
        else:
            reactor.callFromThread(tsmux.cutNow)

    signal.signal(signal.SIGTERM, onSignal)
    signal.signal(signal.SIGINT, onSignal)
