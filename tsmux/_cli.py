"""The C{tsmux} console script: the twistd plugin's options, run in the foreground."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.logger import globalLogBeginner, jsonFileLogObserver, textFileLogObserver
from twisted.python import usage

from ._listen import StartupError
from ._service import Options, buildService


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run tsmux until SIGINT/SIGTERM.  Bad options and startup problems are
    one line on stderr (status 2 and 1), never a traceback.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    options = Options()
    try:
        options.parseOptions(arguments)
    except usage.UsageError as error:
        sys.stderr.write(f"tsmux: {error}\nTry 'tsmux --help' for the options.\n")
        raise SystemExit(2) from None

    from twisted.internet import reactor

    config = options.toConfig()
    observer = jsonFileLogObserver(sys.stderr) if config.logFormat == "json" else textFileLogObserver(sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        tsmux = buildService(config, reactor)
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
    reactor.run()
    if failed:
        sys.stderr.write(f"tsmux: {failed[0]}\n")
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()


def jsonLogObserver() -> object:
    """
    For twistd: C{twistd --logger=tsmux.jsonLogObserver -n tsmux ...} logs one
    JSON object per line to stdout, as C{tsmux --log-format json} does to stderr.
    """
    return jsonFileLogObserver(sys.stdout)
