"""
C{tsmux --help} and the wording of bad options.

usage.Options prints one flat, alphabetical list; tsmux's help starts with
its usage forms, examples and subcommands, then the options by group, each
with its default, so that its first screen reads well on its own.  The
same help serves C{twistd tsmux --help}, with twistd's usage line and
examples.  Bad options are one line that names the option and the form it
expects, never Twisted's or getopt's wording.
"""

from __future__ import annotations

import difflib
import getopt
import shutil
import sys
import textwrap
from typing import Any, NoReturn

from twisted.python import usage

from ._config import DEFAULT_LISTEN

SUBCOMMANDS = (
    ("check", "validate a configuration and the host"),
    ("status", "ask a running tsmux for a summary"),
    ("explain", "which rule would decide a connection"),
    ("reload", "re-read the config file of a running tsmux"),
    ("completion", "print a shell completion script (bash or zsh)"),
)
"""C{tsmux SUBCOMMAND}, one line each (L{tsmux._cli.SUBCOMMANDS} runs them)."""

EXAMPLES = (
    ("--listen /run/tsmux/tsmux.sock", "beside tailscaled"),
    ("--config /etc/tsmux/tsmux.toml", "with a config file"),
    ("--listen /tmp/tsmux.sock --dialer direct", "trying it without tailscaled"),
)

GROUPS = (
    ("Listening", ("listen", "config", "mode", "group", "backlog")),
    ("Ways out", ("dialer", "localapi", "dial-self", "upstream-auth", "no-splice")),
    ("Access", ("socks-allow-uid", "socks-allow-gid", "admin-uid", "admin-gid", "socks-auth")),
    (
        "Limits and timeouts",
        (
            "max-connections",
            "max-connections-per-uid",
            "detect-timeout",
            "handshake-timeout",
            "dial-timeout",
            "idle-timeout",
            "half-close-timeout",
            "shutdown-timeout",
        ),
    ),
    ("Logging", ("log-format",)),
    ("Other", ("help", "version", "operator-refresh")),
)
"""The option groups of C{--help}, in order; options in none of them (a subcommand's own) come first."""

METAVARS = {
    "listen": "PATH|ENDPOINT",
    "config": "FILE",
    "mode": "OCTAL",
    "group": "GROUP",
    "backlog": "N",
    "dialer": "DIALER",
    "localapi": "PATH",
    "dial-self": "refuse|direct",
    "upstream-auth": "FILE",
    "socks-auth": "FILE",
    "socks-allow-uid": "USER",
    "socks-allow-gid": "GROUP",
    "admin-uid": "USER",
    "admin-gid": "GROUP",
    "max-connections": "N",
    "max-connections-per-uid": "N",
    "log-format": "text|json",
}
"""What an option's value looks like in C{--help}; C{SECONDS} for the C{*-timeout} options."""

DEFAULTS = {
    "listen": DEFAULT_LISTEN,
    "config": "none, the flags describe one socket",
    "group": "the primary group of tsmux's user",
    "backlog": "the kernel's maximum, net.core.somaxconn",
    "upstream-auth": "none",
    "socks-auth": "none, no password is asked",
    "socks-allow-uid": "with neither this nor --socks-allow-gid, anyone who can open the socket",
    "socks-allow-gid": "none",
    "admin-uid": "uid 0 and tsmux's own uid",
    "admin-gid": "none",
    "max-connections": "what the descriptor limit carries, about 1 per 6 descriptors (tsmux raises its "
    "soft RLIMIT_NOFILE to the hard limit at start)",
    "max-connections-per-uid": "half of --max-connections",
    "idle-timeout": "never",
}
"""The default shown for options whose default is not a value (C{None}, or an C{opt_} method's)."""

NO_DEFAULT = frozenset({"operator-refresh"})
"""Options that take a value but show no default (flags never do)."""

COLUMN = 28
"""Where option descriptions start in C{--help} (less on a narrow terminal)."""


def _isDaemon(options: usage.Options) -> bool:
    """The daemon's own options (C{tsmux}, C{twistd tsmux}), not a subcommand's that reuse them (C{tsmux check})."""
    return options.parent is not None or bool(getattr(options, "isDaemon", False))


def _width(width: int | None) -> int:
    if not width:
        width = shutil.get_terminal_size((80, 24)).columns
    return max(60, min(width, 100))


def synopsis(options: usage.Options) -> str:
    """The usage line(s): the common forms for C{tsmux}, one line under twistd."""
    if options.parent is not None:
        # One line: twistd's usage, the plugin's name, then tsmux's part, without a second "Usage:".
        return f"{options.parent.getSynopsis()} {options.parent.subCommand} [options]"
    if not _isDaemon(options):
        return str(getattr(options, "synopsis", "Usage: tsmux [options]"))
    forms = (
        "tsmux [--listen PATH]... [options]",
        "tsmux --config FILE [--log-format text|json]",
        f"tsmux {'|'.join(name for name, _ in SUBCOMMANDS)} ...",
        "twistd [twistd options] tsmux [options]",
    )
    return "Usage: " + "\n       ".join(forms)


def usageText(options: usage.Options, width: int | None = None) -> str:
    """Everything C{--help} prints after the usage line(s)."""
    width = _width(width)
    parts = []
    longdesc = getattr(options, "longdesc", None)
    if longdesc:
        parts.append(textwrap.fill(longdesc, width))
    if _isDaemon(options):
        command = "tsmux" if options.parent is None else "twistd -n tsmux"
        parts.append(_examples(command, width))
        if options.parent is None:
            parts.append(_subcommands())
    parts.extend(_groups(options, width))
    return "\n" + "\n\n".join(parts)


def _examples(command: str, width: int) -> str:
    lines = ["Examples:"]
    commands = [f"{command} {arguments}" for arguments, _ in EXAMPLES]
    column = max(len(line) for line in commands) + 2
    besides = all(2 + column + 2 + len(comment) <= width for _, comment in EXAMPLES)
    for line, (_, comment) in zip(commands, EXAMPLES, strict=True):
        if besides:
            lines.append(f"  {line.ljust(column)}# {comment}")
        else:
            lines.extend((f"  # {comment}", f"  {line}"))
    return "\n".join(lines)


def _subcommands() -> str:
    lines = ["Subcommands (tsmux SUBCOMMAND --help for theirs):"]
    column = max(len(name) for name, _ in SUBCOMMANDS) + 2
    lines.extend(f"  {name.ljust(column)}{summary}" for name, summary in SUBCOMMANDS)
    return "\n".join(lines)


def _groups(options: usage.Options, width: int) -> list[str]:
    takesValue = {name.rstrip("="): name.endswith("=") for name in options.longOpt}
    shorts = {long: short for short, long in options.synonyms.items() if len(short) == 1 and short != long}
    grouped = {name for _, names in GROUPS for name in names}
    # A subcommand's own options (tsmux check --strict) come first.
    rest = tuple(sorted(name for name in takesValue if name not in grouped))
    blocks = []
    for title, names in (("Options", rest), *GROUPS):
        entries = [
            _entry(options, name, takesValue[name], shorts.get(name), width) for name in names if name in takesValue
        ]
        if entries:
            blocks.append(f"{title}:\n" + "\n".join(entries))
    return blocks


def _entry(options: usage.Options, name: str, takesValue: bool, short: str | None, width: int) -> str:
    label = f"--{name}"
    if short:
        label = f"-{short}, {label}"
    if takesValue:
        label += " " + METAVARS.get(name, "SECONDS" if name.endswith(("-timeout", "-refresh")) else "VALUE")
    label = "  " + label
    text = " ".join(str(options.docs.get(name) or "").split())
    column = min(COLUMN, width * 3 // 8)
    lines = textwrap.wrap(text, width - column, break_on_hyphens=False, break_long_words=False) or [""]
    default = DEFAULTS.get(name, options.defaults.get(name)) if takesValue and name not in NO_DEFAULT else None
    if default is not None:
        # The default at the end, on a line of its own unless it fits whole on the last one.
        shown = f"[default: {default}]"
        if len(lines[-1]) + 1 + len(shown) <= width - column:
            lines[-1] += " " + shown
        else:
            lines.extend(textwrap.wrap(shown, width - column, break_on_hyphens=False, break_long_words=False))
    if len(label) + 2 > column:
        head = [label]
    else:
        head = [label.ljust(column) + lines.pop(0)]
    return "\n".join(head + [" " * column + line for line in lines])


def usageErrorText(options: usage.Options, error: usage.UsageError) -> str:
    """
    One line for a bad command line: getopt's wording (C{option --x not
    recognized}) turned into tsmux's; tsmux's own messages unchanged.
    """
    cause = error.__context__
    if not isinstance(cause, getopt.GetoptError):
        return str(error)
    name, message = cause.opt, cause.msg
    long = options.synonyms.get(name, name)
    dashes = "-" if len(name) == 1 else "--"
    longNames = sorted(option.rstrip("=") for option in options.longOpt)
    if "not recognized" in message:
        close = difflib.get_close_matches(name, longNames, n=1)
        hint = f" (did you mean --{close[0]}?)" if close and len(name) > 1 else ""
        return f"unknown option {dashes}{name}{hint}"
    if "requires argument" in message:
        metavar = METAVARS.get(long, "SECONDS" if long.endswith(("-timeout", "-refresh")) else "a value")
        return f"{dashes}{name}: expected {metavar}, got nothing"
    if "must not have an argument" in message:
        return f"--{name} takes no value"
    if "not a unique prefix" in message:
        candidates = [f"--{option}" for option in longNames if option.startswith(name)]
        return f"--{name} is ambiguous: {', '.join(candidates[:-1])} or {candidates[-1]}?"
    return str(error)


def unexpectedArgument(options: usage.Options, argument: str) -> str:
    """A word that is not an option; for C{tsmux}, a subcommand comes first."""
    if options.parent is not None or not _isDaemon(options):
        return f"unexpected argument {argument!r}"
    names = [name for name, _ in SUBCOMMANDS]
    if argument in names:
        return f"unexpected argument {argument!r}: a subcommand comes first (tsmux {argument} [options])"
    close = difflib.get_close_matches(argument, names, n=1)
    hint = f" (did you mean 'tsmux {close[0]}'?)" if close else ""
    return f"unexpected argument {argument!r}: tsmux takes options, or a subcommand first{hint}"


def reportUsageError(message: str, command: str) -> NoReturn:
    """What C{tsmux} prints for a bad option (L{parseOrExit}), for twistd: one line, a pointer, status 2."""
    sys.stderr.write(f"tsmux: {message}\nTry '{command} --help' for the options.\n")
    sys.stderr.flush()
    raise SystemExit(2)


def parseOrExit(options: usage.Options, arguments: list[str], command: str = "tsmux") -> Any:
    """Parse C{arguments} into C{options}, or one line on stderr (and a pointer to C{--help}) and status 2."""
    try:
        options.parseOptions(arguments)
    except usage.UsageError as error:
        sys.stderr.write(f"{command}: {error}\nTry '{command} --help' for the options.\n")
        raise SystemExit(2) from None
    return options
