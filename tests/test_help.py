"""
C{tsmux --help}, bad options and shell completion: what a user reads
(issue 12, "Help and errors").
"""

from __future__ import annotations

import io
import os
import pwd
import re
import shutil
import subprocess
import sys

from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tsmux import _cli, _help
from tsmux._completion import bashScript, zshScript
from tsmux._config import DEFAULT_LISTEN
from tsmux._options import Options

from ._tailnet import skipOrFail
from ._tsmuxprocess import REPO_ROOT, childEnvironment, tsmuxCommand, twistdCommand

EXAMPLES = (
    "tsmux --listen /run/tsmux/tsmux.sock",
    "tsmux --config /etc/tsmux/tsmux.toml",
    "tsmux --listen /tmp/tsmux.sock --dialer direct",
)
GROUP_TITLES = ("Listening:", "Ways out:", "Access:", "Limits and timeouts:", "Logging:")


def run(argv: list[str], columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = childEnvironment()
    env["COLUMNS"] = str(columns)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env)


def helpText(width: int = 80) -> str:
    options = Options()
    return options.getSynopsis() + "\n" + options.getUsage(width=width)


def entry(text: str, option: str) -> str:
    """The lines of C{--help} that describe C{option}, joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  (-\w, )?{option}\b(?!-)", line))
    end = start + 1
    while end < len(lines) and lines[end].startswith("   "):
        end += 1
    return " ".join(line.strip() for line in lines[start:end])


class HelpScreenTests(SynchronousTestCase):
    def test_firstScreen(self) -> None:
        """
        The first 25 lines of C{tsmux --help} read on their own: the usage
        forms, the examples, the subcommands, then the first group, whole.
        """
        result = run([*tsmuxCommand(), "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        screen = "\n".join(lines[:25])
        self.assertTrue(lines[0].startswith("Usage: tsmux [--listen PATH]"), lines[0])
        self.assertIn("tsmux --config FILE", screen)
        self.assertIn("tsmux check|status|explain|reload|completion", screen)
        for example in EXAMPLES:
            self.assertIn(example, screen)
        for name, summary in _help.SUBCOMMANDS:
            self.assertRegex(screen, rf"\n  {name} +{re.escape(summary)}\n")
        self.assertIn("\nListening:\n  --listen PATH|ENDPOINT", screen)
        self.assertIn(f"[default: {DEFAULT_LISTEN}]", screen)
        # The 25th line ends an entry: the next one starts an option (or a group).
        self.assertRegex(lines[25], r"^  -")
        for line in lines:
            self.assertLessEqual(len(line), 80, line)

    def test_groupsInOrder(self) -> None:
        text = helpText()
        positions = [text.index(f"\n{title}\n") for title in GROUP_TITLES]
        self.assertEqual(positions, sorted(positions))
        self.assertLess(text.index("\nSubcommands"), positions[0])

    def test_defaultsShown(self) -> None:
        text = helpText()
        for option, default in (
            ("--mode", "0660"),
            ("--localapi", "/var/run/tailscale/tailscaled.sock"),
            ("--dialer", "localapi"),
            ("--dial-self", "refuse"),
            ("--detect-timeout", "15"),
            ("--handshake-timeout", "30"),
            ("--dial-timeout", "10"),
            ("--idle-timeout", "never"),
            ("--half-close-timeout", "300"),
            ("--shutdown-timeout", "30"),
            ("--max-connections-per-uid", "half of --max-connections"),
            ("--log-format", "text"),
            ("--listen", DEFAULT_LISTEN),
        ):
            self.assertIn(f"[default: {default}]", entry(text, option), option)
        self.assertNotIn("[default", entry(text, "--no-splice"))
        self.assertIn("-c, --config FILE", text)
        self.assertIn("-h, --help", text)

    def test_everyOptionInItsGroup(self) -> None:
        """Every option of the daemon is in one of the groups (a new one must be placed), and only those."""
        names = {option.rstrip("=") for option in Options().longOpt}
        grouped = [name for _, members in _help.GROUPS for name in members]
        self.assertEqual(len(grouped), len(set(grouped)))
        self.assertEqual(set(grouped), names)
        self.assertNotIn("\nOptions:\n", helpText())

    def test_subcommandsAreTheCLIs(self) -> None:
        self.assertEqual([name for name, _ in _help.SUBCOMMANDS], list(_cli.SUBCOMMANDS))

    def test_widths(self) -> None:
        for width in (60, 80, 100):
            for line in helpText(width).splitlines():
                self.assertLessEqual(len(line), width, line)

    def test_subcommandHelp(self) -> None:
        """C{tsmux check --help}: its own usage line and options first, no daemon examples."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as caught:
            _cli.main(["check", "--help"])
        self.assertEqual(caught.exception.code, 0)
        text = out.getvalue()
        self.assertTrue(text.startswith("Usage: tsmux check"), text[:200])
        self.assertNotIn("Examples:", text)
        self.assertIn("\nListening:\n", text)


class BadOptionTests(SynchronousTestCase):
    def parseError(self, *argv: str) -> str:
        error = self.assertRaises(usage.UsageError, Options().parseOptions, list(argv))
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertNotIn("Parameter type enforcement", message)
        self.assertNotIn("getopt", message)
        return message

    def test_valuesNameTheOptionAndTheForm(self) -> None:
        for argv, expected in (
            (["--dial-timeout", "-1"], "--dial-timeout: expected a positive number of seconds, got '-1'"),
            (["--detect-timeout=soon"], "--detect-timeout: expected a positive number of seconds, got 'soon'"),
            (["--idle-timeout", "1e12"], "--idle-timeout: expected a number of seconds below one year"),
            (["--mode", "999"], "--mode: expected an octal mode from 0000 to 0777 (like 0660), got '999'"),
            (["--max-connections", "0"], "--max-connections: expected a positive whole number, got '0'"),
            (["--backlog", "lots"], "--backlog: expected a positive whole number, got 'lots'"),
            (["--dialer", "pigeon"], "--dialer: expected localapi, direct, socks5:ENDPOINT, nc or nc:CLI, got"),
            (["--dial-self", "maybe"], "--dial-self: expected refuse or direct, got 'maybe'"),
            (["--log-format", "xml"], "--log-format: expected text or json, got 'xml'"),
            (["--localapi", "tailscaled.sock"], "--localapi: expected an absolute path, got 'tailscaled.sock'"),
            (["--admin-uid", "no-such-user-here"], "--admin-uid: expected a user name or uid, got"),
            (["--socks-allow-gid", "no-such-group-here"], "--socks-allow-gid: expected a group name or gid, got"),
            (["--group", "no-such-group-here"], "(no such group)"),
        ):
            message = self.parseError(*argv)
            self.assertIn(expected, message)
            self.assertTrue(message.startswith(argv[0].split("=")[0] + ":"), message)

    def test_relativeListen(self) -> None:
        """A relative path (no leading "/", no ":") is not taken for an endpoint: use an absolute path."""
        message = self.parseError("--listen", "tsmux.sock")
        self.assertIn("--listen: expected an absolute path, got the relative path 'tsmux.sock'", message)
        self.assertIn(os.path.join(os.getcwd(), "tsmux.sock"), message)
        self.assertIn("relative path", self.parseError("--listen", "./run/tsmux.sock"))
        options = Options()
        options.parseOptions(["--listen", "/run/a.sock", "--listen", "unix:b.sock", "--listen", "tcp:0"])
        self.assertEqual(options["listen"], ["/run/a.sock", "unix:b.sock", "tcp:0"])

    def test_getoptWording(self) -> None:
        self.assertEqual(self.parseError("--frobnicate"), "unknown option --frobnicate")
        self.assertEqual(
            self.parseError("--dial-timout", "3"), "unknown option --dial-timout (did you mean --dial-timeout?)"
        )
        self.assertEqual(self.parseError("-x"), "unknown option -x")
        self.assertEqual(self.parseError("--dial-timeout"), "--dial-timeout: expected SECONDS, got nothing")
        self.assertEqual(self.parseError("--no-splice=yes"), "--no-splice takes no value")
        self.assertEqual(
            self.parseError("--dial", "3"), "--dial is ambiguous: --dial-self, --dial-timeout or --dialer?"
        )

    def test_arguments(self) -> None:
        self.assertIn("did you mean 'tsmux status'?", self.parseError("stauts"))
        self.assertIn("a subcommand comes first", self.parseError("--dialer", "direct", "check"))

    def test_consoleScript(self) -> None:
        """C{tsmux} prints the one line and a pointer to --help, status 2 (in-process: main())."""
        for argv, first in (
            (["--dial-timeout", "-1"], "tsmux: --dial-timeout: expected a positive number of seconds, got '-1'"),
            (["--frobnicate"], "tsmux: unknown option --frobnicate"),
            (["--listen", "x.sock"], "tsmux: --listen: expected an absolute path, got the relative path 'x.sock'"),
            (["check", "--mode", "9"], "tsmux check: --mode: expected an octal mode"),
        ):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as caught:
                _cli.main(argv)
            self.assertEqual(caught.exception.code, 2)
            lines = err.getvalue().splitlines()
            self.assertEqual(len(lines), 2, lines)
            self.assertTrue(lines[0].startswith(first), lines[0])
            self.assertRegex(lines[1], r"^Try 'tsmux (check )?--help' for the options\.$")

    def test_consoleScriptProcess(self) -> None:
        result = run([*tsmuxCommand(), "--frobnicate"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr.splitlines(), ["tsmux: unknown option --frobnicate", "Try 'tsmux --help' for the options."]
        )


class TwistdTests(SynchronousTestCase):
    """C{twistd -n tsmux}: the plugin reports its own bad options; twistd would print every option first."""

    def assertShortError(self, result: subprocess.CompletedProcess[str], first: str) -> None:
        output = (result.stdout + result.stderr).strip().splitlines()
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertLessEqual(len(output), 3, output)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(lines[0], first)
        self.assertEqual(lines[1], "Try 'twistd tsmux --help' for the options.")
        self.assertNotIn("Usage:", result.stdout + result.stderr)
        self.assertNotIn("Parameter type enforcement", result.stderr)

    def test_badValue(self) -> None:
        result = run([*twistdCommand(), "--dial-timeout", "-1"])
        self.assertShortError(result, "tsmux: --dial-timeout: expected a positive number of seconds, got '-1'")

    def test_unknownOption(self) -> None:
        self.assertShortError(run([*twistdCommand(), "--frobnicate"]), "tsmux: unknown option --frobnicate")

    def test_relativeListen(self) -> None:
        result = run([*twistdCommand(), "--listen", "tsmux.sock"])
        self.assertShortError(
            result,
            "tsmux: --listen: expected an absolute path, got the relative path 'tsmux.sock' "
            f"(use {os.path.join(REPO_ROOT, 'tsmux.sock')})",
        )

    def test_help(self) -> None:
        """One usage line (twistd's and the plugin's together), examples for twistd, the groups."""
        result = run([*twistdCommand(), "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual([line for line in lines if "Usage:" in line], [lines[0]])
        self.assertRegex(lines[0], r"^Usage: \S+ \[options\] tsmux \[options\]$")
        self.assertIn("twistd -n tsmux --listen /run/tsmux/tsmux.sock", result.stdout)
        self.assertNotIn("Subcommands", result.stdout)
        for line in lines:
            self.assertLessEqual(len(line), 80, line)
        for title in GROUP_TITLES:
            self.assertIn(f"\n{title}\n", result.stdout)


class BashCompletionTests(SynchronousTestCase):
    def setUp(self) -> None:
        if shutil.which("bash") is None:
            raise SkipTest("needs bash")
        self.script = self.mktemp()
        with open(self.script, "w") as f:
            f.write(bashScript())

    def complete(self, *words: str) -> list[str]:
        """What C{_tsmux} offers for the last of C{words}, as bash would call it."""
        quoted = " ".join("'" + word.replace("'", "'\\''") + "'" for word in words)
        program = (
            f'source "$1" && COMP_WORDS=({quoted}) && COMP_CWORD={len(words) - 1} && _tsmux && '
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        result = subprocess.run(
            ["bash", "--norc", "--noprofile", "-c", program, "bash", self.script],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        return [line for line in result.stdout.splitlines() if line]

    def test_syntax(self) -> None:
        result = subprocess.run(["bash", "-n", self.script], capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_userNames(self) -> None:
        name = pwd.getpwuid(os.getuid()).pw_name
        self.assertIn(name, self.complete("tsmux", "--admin-uid", name[:2]))
        self.assertIn(name, self.complete("tsmux", "--socks-allow-uid", "=", name[:2]))
        self.assertIn("root", self.complete("tsmux", "--admin-uid", "="))
        self.assertIn("root", self.complete("tsmux", "check", "--admin-uid", "ro"))

    def test_groupNames(self) -> None:
        for option in ("--group", "--admin-gid", "--socks-allow-gid"):
            self.assertIn("root", self.complete("tsmux", option, "ro"))

    def test_files(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        open(os.path.join(directory, "tsmux.toml"), "w").close()
        for option in ("--config", "-c", "--socks-auth", "--upstream-auth", "--localapi"):
            self.assertEqual(self.complete("tsmux", option, os.path.join(directory, "ts")), [f"{directory}/tsmux.toml"])

    def test_choices(self) -> None:
        self.assertEqual(self.complete("tsmux", "--dialer", "d"), ["direct"])
        self.assertEqual(self.complete("tsmux", "--dialer", "so"), ["socks5:"])
        self.assertEqual(self.complete("tsmux", "--dial-self", ""), ["refuse", "direct"])
        self.assertEqual(self.complete("tsmux", "--log-format", "j"), ["json"])
        self.assertEqual(self.complete("tsmux", "--dial-timeout", ""), [])

    def test_optionsAndSubcommands(self) -> None:
        self.assertEqual(self.complete("tsmux", ""), [name for name, _ in _help.SUBCOMMANDS])
        self.assertEqual(self.complete("tsmux", "ch"), ["check"])
        self.assertEqual(self.complete("tsmux", "--adm"), ["--admin-gid", "--admin-uid"])
        self.assertEqual(self.complete("tsmux", "--listen", "/x", "--no-s"), ["--no-splice"])
        self.assertEqual(self.complete("tsmux", "completion", ""), ["bash", "zsh"])
        self.assertIn("--socket", self.complete("tsmux", "status", "--s"))
        self.assertEqual(self.complete("tsmux", "--listen", "/x", ""), [])

    def test_printedByTheCommand(self) -> None:
        result = run([*tsmuxCommand(), "completion", "bash"])
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, bashScript())
        self.assertIn("complete -F _tsmux tsmux", result.stdout)


class ZshCompletionTests(SynchronousTestCase):
    def test_generated(self) -> None:
        script = zshScript()
        self.assertTrue(script.startswith("#compdef tsmux\n"))
        for spec in (
            "*--admin-uid=[",
            ":_users",
            "*--socks-allow-gid=[",
            ":_groups",
            ":dialer:(localapi direct nc socks5\\: nc\\:)",  # colons escaped for _arguments
            ":dial-self:(refuse direct)",
            ":log-format:(text json)",
            "*--listen=[Where to listen]",
            ":shell:(bash zsh)",
        ):
            self.assertIn(spec, script)
        for name, _ in _help.SUBCOMMANDS:
            self.assertIn(f"'{name}:", script)
            self.assertRegex(script, rf"\n        {name}\) _tsmux_\w+ ;;\n")

    def test_syntax(self) -> None:
        if shutil.which("zsh") is None:
            skipOrFail("zsh is not installed (.ci/run installs it)")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(zshScript())
        result = subprocess.run(["zsh", "-n", path], capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_completes(self) -> None:
        """In an interactive zsh (under zpty) with the script on $fpath: users, groups, subcommands, choices."""
        if shutil.which("zsh") is None:
            skipOrFail("zsh is not installed (.ci/run installs it)")
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "_tsmux"), "w") as f:
            f.write(zshScript())
        cases = (
            ("tsmux --admin-uid ro", "tsmux --admin-uid root"),
            ("tsmux --socks-allow-gid ro", "tsmux --socks-allow-gid root"),
            ("tsmux comp", "tsmux completion"),
            ("tsmux completion z", "tsmux completion zsh"),
            ("tsmux --dialer dir", "tsmux --dialer direct"),
            ("tsmux check --socks-allow-u", "tsmux check --socks-allow-uid"),
        )
        driver = """
            zmodload zsh/zpty
            zpty -b z 'zsh -f -i'
            zpty -w z "fpath=($1 \\$fpath); autoload -U compinit; compinit -u -d $1/zcompdump; tsmux() { :; }"
            shift
            while (( $# )); do
                zpty -w -n z "$1"$'\\t'
                all= found=
                for i in {1..100}; do
                    zpty -r -t z out && all+=$out
                    [[ $all == *"$2"* ]] && { found=1; break }
                    sleep 0.1
                done
                if [[ -n $found ]]; then print -r -- "ok: $1"; else print -r -- "missing: $2 in ${(q+)all}"; fi
                zpty -w -n z $'\\C-u'
                shift 2
            done
            zpty -d z
        """
        argv = ["zsh", "-f", "-c", driver, "zsh", directory, *(word for case in cases for word in case)]
        env = {**os.environ, "HOME": directory}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(result.stdout.splitlines(), [f"ok: {typed}" for typed, _ in cases], result.stderr)

    def test_twistedsOwnMachinery(self) -> None:
        """C{--_shell-completion}, which Twisted's zsh stub (C{twistd tsmux}) calls, uses the same data."""
        out = io.BytesIO()
        options = Options()
        options._shellCompFile = out
        with self.assertRaises(SystemExit):
            options.parseOptions(["--admin-uid", "", "--_shell-completion", "zsh:3"])
        self.assertIn(b":_users", out.getvalue())

    def test_printedByTheCommand(self) -> None:
        result = run([*tsmuxCommand(), "completion", "zsh"])
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, zshScript())

    def test_badShell(self) -> None:
        for argv, message in (
            ([], "tsmux completion: expected a shell, bash or zsh, got nothing"),
            (["fish"], "tsmux completion: expected a shell, bash or zsh, got 'fish'"),
        ):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as caught:
                _cli.main(["completion", *argv])
            self.assertEqual(caught.exception.code, 2)
            self.assertEqual(err.getvalue().splitlines(), [message, "Try 'tsmux completion --help' for the options."])
