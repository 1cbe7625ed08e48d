"""
C{tsmux completion bash|zsh}: a shell completion script on stdout, for a
package to install or a shell to source.

Both scripts are generated from the options classes themselves and their
C{compData} (L{twisted.python.usage.Completions}): option names, which take
a value, and what completes it (users, groups, files, a list of choices).
zsh's C{_arguments} specs are Twisted's own (the code behind usage.Options'
hidden C{--_shell-completion}); bash, which Twisted does not do, gets a
small function of the same data.  Nothing runs tsmux while completing.
"""

from __future__ import annotations

import io
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.python import reflect, usage

from ._help import SUBCOMMANDS, usageErrorText

SHELLS = ("bash", "zsh")

SUBCOMMAND_OPTIONS = {
    "check": "tsmux._check.CheckOptions",
    "status": "tsmux._commands.StatusOptions",
    "explain": "tsmux._commands.ExplainOptions",
    "reload": "tsmux._commands.ReloadOptions",
    "completion": "tsmux._completion.CompletionOptions",
}
"""Each subcommand's options class, by name (imported only to write a script)."""

INSTALL = """\
bash: a package installs the script as /usr/share/bash-completion/completions/tsmux:
    tsmux completion bash > /usr/share/bash-completion/completions/tsmux
  or, for one user, in ~/.bashrc:
    source <(tsmux completion bash)

zsh: a package installs it as _tsmux in a directory of $fpath, e.g.
    tsmux completion zsh > /usr/share/zsh/vendor-completions/_tsmux
  (Debian's directory; /usr/share/zsh/site-functions elsewhere), or, for one user,
  in ~/.zshrc after compinit:
    source <(tsmux completion zsh)
"""


class CompletionOptions(usage.Options):
    """C{tsmux completion SHELL}."""

    synopsis = "Usage: tsmux completion bash|zsh"
    longdesc = (
        "Print a completion script for tsmux's options and subcommands: user and group names for --group, "
        "--admin-uid, --admin-gid, --socks-allow-uid and --socks-allow-gid, files for --config, --listen, "
        "--localapi, --socks-auth and --upstream-auth, the choices of --dialer, --dial-self and --log-format."
    )
    compData = usage.Completions(extraActions=[usage.CompleteList(list(SHELLS), descr="shell")])
    shell: str

    def parseArgs(self, shell: str | None = None) -> None:
        if shell not in SHELLS:
            got = "nothing" if shell is None else repr(shell)
            raise usage.UsageError(f"expected a shell, bash or zsh, got {got}")
        self.shell = shell

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if str(error) == "Wrong number of arguments.":
                raise usage.UsageError("expected one shell, bash or zsh") from None
            raise usage.UsageError(usageErrorText(self, error)) from None

    def getUsage(self, width: int | None = None) -> str:
        return "\n" + textwrap.fill(self.longdesc, width or 80, break_on_hyphens=False) + "\n\n" + INSTALL.rstrip("\n")


def main(arguments: list[str]) -> int:
    """C{tsmux completion bash|zsh}: the script on stdout."""
    options = CompletionOptions()
    try:
        options.parseOptions(arguments)
    except usage.UsageError as error:
        sys.stderr.write(f"tsmux completion: {error}\nTry 'tsmux completion --help' for the options.\n")
        return 2
    sys.stdout.write(bashScript() if options.shell == "bash" else zshScript())
    return 0


def _commands() -> list[tuple[str, usage.Options]]:
    """C{("", the daemon's options)}, then each subcommand's."""
    from ._options import Options

    commands: list[tuple[str, usage.Options]] = [("", Options())]
    for name, _ in SUBCOMMANDS:
        commands.append((name, reflect.namedAny(SUBCOMMAND_OPTIONS[name])()))
    return commands


@dataclass(frozen=True)
class _Option:
    names: tuple[str, ...]
    """C{--long} first, then its short forms."""
    takesValue: bool
    action: usage.Completer | None


def _options(options: usage.Options) -> tuple[list[_Option], list[usage.Completer]]:
    """An options class's options and its positional arguments' completers, from usage.Options and compData."""
    actions: dict[str, usage.Completer] = {}
    extra: list[usage.Completer] = []
    for cls in reversed(type(options).__mro__):
        data = cls.__dict__.get("compData")
        if data is not None:
            actions.update(data.optActions)
            extra = data.extraActions or extra
    shorts: dict[str, list[str]] = {}
    for alias, long in options.synonyms.items():
        if len(alias) == 1 and alias != long:
            shorts.setdefault(long, []).append(alias)
    result = []
    for entry in sorted(options.longOpt, key=lambda entry: entry.rstrip("=")):
        long = entry.rstrip("=")
        names = (f"--{long}", *(f"-{short}" for short in sorted(shorts.get(long, []))))
        action = actions.get(long)
        result.append(_Option(names, entry.endswith("="), action() if callable(action) else action))
    return result, extra


# bash


def _bashValue(action: usage.Completer | None) -> str:
    """The bash that completes C{$3} for a value: Twisted's completers in bash terms."""
    if isinstance(action, usage.CompleteUsernames):
        return '_tsmux_compgen -u -- "$3"'
    if isinstance(action, usage.CompleteGroups):
        return '_tsmux_compgen -g -- "$3"'
    if isinstance(action, usage.CompleteDirs):
        return '_tsmux_files -d "$3"'
    if isinstance(action, usage.CompleteHostnames):
        return '_tsmux_compgen -A hostname -- "$3"'
    if isinstance(action, (usage.CompleteList, usage.CompleteMultiList)):
        return f'_tsmux_words "{" ".join(action._items)}" "$3"'
    if action is None or isinstance(action, usage.CompleteFiles):
        return '_tsmux_files -f "$3"'  # Twisted's zsh completes files for a value it knows nothing of
    return "COMPREPLY=()"  # a number, a mode: nothing to offer


def _bashCases(commands: list[tuple[str, str]]) -> str:
    """C{case $1 in ...}: one arm per distinct body, for the commands that share it."""
    arms: dict[str, list[str]] = {}
    for command, body in commands:
        arms.setdefault(body, []).append(f'"{command}"' if not command else command)
    lines = ["    case $1 in"]
    for body, names in arms.items():
        lines.append(f"    {' | '.join(names)})")
        lines.append(textwrap.indent(body, " " * 8))
        lines.append("        ;;")
    lines.append("    *) return 1 ;;")
    lines.append("    esac")
    return "\n".join(lines)


def bashScript() -> str:
    """The bash completion script: C{complete -F _tsmux tsmux}."""
    from ._version import __version__

    options, values, arguments = [], [], []
    for command, parsed in _commands():
        described, extra = _options(parsed)
        options.append((command, f'_tsmux_words "{" ".join(n for o in described for n in o.names[:1])}" "$2"'))
        byCode: dict[str, list[str]] = {}
        for option in described:
            if option.takesValue:
                byCode.setdefault(_bashValue(option.action), []).extend(option.names)
        arms = [f"{' | '.join(names)}) {code} ;;" for code, names in byCode.items()]
        values.append((command, "\n".join(["case $2 in", *arms, "*) return 1 ;;", "esac"]) if arms else "return 1"))
        if extra:
            arguments.append((command, _bashValue(extra[0]).replace('"$3"', '"$2"')))
    names = " ".join(name for name, _ in SUBCOMMANDS)
    return f"""\
# bash completion for tsmux {__version__}, written by `tsmux completion bash`.
# Install it as /usr/share/bash-completion/completions/tsmux, or `source <(tsmux completion bash)`.

_tsmux_compgen() {{
    mapfile -t COMPREPLY < <(compgen "$@")
}}

_tsmux_words() {{
    _tsmux_compgen -W "$1" -- "$2"
    # "socks5:" is the start of a value: no space after it.
    if [[ ${{#COMPREPLY[@]}} == 1 && ${{COMPREPLY[0]}} == *: ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}}

_tsmux_files() {{
    compopt -o filenames 2>/dev/null
    _tsmux_compgen "$1" -- "$2"
}}

# _tsmux_options COMMAND WORD: COMMAND's options ("" is tsmux itself).
_tsmux_options() {{
{_bashCases(options)}
}}

# _tsmux_value COMMAND OPTION WORD: the values OPTION takes; status 1 if it takes none.
_tsmux_value() {{
{_bashCases(values)}
    return 0
}}

# _tsmux_argument COMMAND WORD: what COMMAND takes besides options.
_tsmux_argument() {{
{_bashCases(arguments) if arguments else "    return 1"}
}}

_tsmux() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev="" option command=""
    (( COMP_CWORD > 0 )) && prev=${{COMP_WORDS[COMP_CWORD-1]}}
    COMPREPLY=()
    if (( COMP_CWORD > 1 )); then
        case ${{COMP_WORDS[1]}} in
        {names.replace(" ", " | ")}) command=${{COMP_WORDS[1]}} ;;
        esac
    fi
    # A value: "--option VALUE", or "--option=VALUE", which bash splits at "=" (COMP_WORDBREAKS).
    if [[ $cur == "=" ]]; then
        option=$prev cur=""
    elif [[ $prev == "=" ]] && (( COMP_CWORD > 1 )); then
        option=${{COMP_WORDS[COMP_CWORD-2]}}
    else
        option=$prev
    fi
    if [[ $option == -* ]] && _tsmux_value "$command" "$option" "$cur"; then
        return 0
    fi
    if [[ $cur == -* ]]; then
        _tsmux_options "$command" "$cur"
    elif (( COMP_CWORD == 1 )); then
        _tsmux_words "{names}" "$cur"
    else
        _tsmux_argument "$command" "$cur"
    fi
    return 0
}}

complete -F _tsmux tsmux
"""


# zsh


def _zshArguments(options: usage.Options) -> str:
    """Twisted's C{_arguments} call for an options class (what C{--_shell-completion zsh} writes)."""
    from twisted.python._shellcomp import ZshArgumentsGenerator

    out = io.BytesIO()
    ZshArgumentsGenerator(options, "tsmux", out).write()
    lines = out.getvalue().decode("utf-8").splitlines()
    # Drop its "#compdef" header: this is the body of a function.
    while lines and (not lines[0] or lines[0].startswith("#compdef")):
        lines.pop(0)
    return "\n".join(lines[:1] + ["    " + line for line in lines[1:]])


def zshScript() -> str:
    """The zsh completion function C{_tsmux}, for C{$fpath} or C{source}."""
    from ._version import __version__

    functions: dict[str, str] = {}
    dispatch = []
    for command, parsed in _commands():
        body = _zshArguments(parsed)
        name = functions.setdefault(body, f"_tsmux_{command or 'daemon'}")
        if command:
            dispatch.append(f"        {command}) {name} ;;")
    definitions = "\n\n".join(f"{name}() {{\n    {body}\n}}" for body, name in functions.items())
    described = "\n".join(f"        {_zshQuote(f'{name}:{summary}')}" for name, summary in SUBCOMMANDS)
    names = " | ".join(name for name, _ in SUBCOMMANDS)
    newline = "\n"
    return f"""\
#compdef tsmux
# zsh completion for tsmux {__version__}, written by `tsmux completion zsh`.
# Install it as _tsmux in a directory of $fpath, or `source <(tsmux completion zsh)` after compinit.

{definitions}

_tsmux() {{
    local -a subcommands
    subcommands=(
{described}
    )
    if (( CURRENT == 2 )) && [[ $PREFIX != -* ]]; then
        _describe -t subcommands 'tsmux subcommand' subcommands
        return
    fi
    case $words[2] in
    {names})
        local command=$words[2]
        shift words
        (( CURRENT-- ))
        case $command in
{newline.join(dispatch)}
        esac
        ;;
    *) _tsmux_daemon ;;
    esac
}}

if [[ $funcstack[1] == _tsmux ]]; then
    _tsmux "$@"
else
    compdef _tsmux tsmux
fi
"""


def _zshQuote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
