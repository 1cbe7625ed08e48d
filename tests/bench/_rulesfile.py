"""
Contender (r)'s config file: one socket, like (a)'s, with 50 rules of which only the last lets the
benchmark's targets through.

The first 49 are a mix an operator could write: ACL tags, tailnet logins, IPv4 and IPv6 networks, MagicDNS
names and C{*.suffix} names, allows and denies, most for everyone and some for named callers, most on every
port or on wide ranges (so the port does not settle them and the host is compared, the tailnet view
consulted), none matching 127.0.0.1. The 50th allows C{127.0.0.1} on the target ports. So every connection
of the benchmark is decided by the last rule, after the 49 others were tried: the figure
C{r - a} in the report is the cost of a 50-rule decision per connection (plus what a socket with rules
costs besides: its view of the tailnet, read every 4 s, and its log field and counter).

C{python -m tests.bench._rulesfile [--peers 200] [--seconds 1]} times the decision in-process (for
context, not a test): L{tsmux._rules.RuleSet.decide} and L{tsmux._context.ConnectionContext.decide}
with these rules and a made-up view of that many nodes, in µs per decision.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import tempfile
import timeit
from collections.abc import Callable, Sequence
from typing import Any

RULE_COUNT = 50
SOCKET_NAME = "r"

_TAGS = ("prod", "db", "ci", "web", "monitoring", "build", "staging", "backup", "vpn", "k8s", "gpu", "mail")
_LOGINS = ("alice@example.com", "bob@example.com", "carol@github", "dave@example.org", "erin@example.com")
# Mostly every port or wide ranges: the port settles few of them, the host the rest.
_PORTS = ("*", "443", "1024-65535", "*", "22,80,443", "*", "8000-8999,9090,10000-65535", "5432")
# Callers of every 5th rule (the others are for everyone): other users, and some that include the
# benchmark's clients (root, nobody), so that both skip some rules and try others.
_CALLERS = (
    ["uid:1000", "gid:1000"],
    ["uid:0", "gid:65534"],
    ["gid:100"],
    ["uid:1001", "uid:1002", "uid:65534"],
)


def _destination(index: int, kind: int) -> str:
    ports = _PORTS[(index + kind) % len(_PORTS)]
    if kind == 0:
        return f"tag:{_TAGS[index % len(_TAGS)]}:{ports}"
    if kind == 1:
        return f"{_LOGINS[(index // 5) % len(_LOGINS)]}:{ports}"
    if kind == 2:
        networks = (f"100.{64 + index % 64}.0.0/16", f"10.{index}.0.0/16", f"192.168.{index}.0/24", "172.16.0.0/12")
        network = networks[index % len(networks)]
        return f"[fd7a:115c:a1e0:{index:x}::/64]:{ports}" if index % 7 == 3 else f"{network}:{ports}"
    if kind == 3:
        return f"svc{index}.example.ts.net:{ports}" if index % 2 else f"host{index}:{ports}"
    return f"*.team{index}.internal.example:{ports}"


def benchRules(allowedPorts: Sequence[int], host: str = "127.0.0.1") -> list[dict[str, Any]]:
    """
    The 50 rules, as TOML tables: 49 that do not match C{host} on any port, then
    C{{ allow = ["HOST:PORTS"] }} for C{allowedPorts} (the benchmark's echo and bulk targets).
    """
    rules: list[dict[str, Any]] = []
    for index in range(1, RULE_COUNT):
        if index == 17:
            rules.append({"deny": ["*:25", "*:465", "*:587"]})  # every host, on mail ports only
            continue
        first = index % 5
        destinations = [_destination(index, first)]
        if index % 3 == 0:
            destinations.append(_destination(index, (first + 2) % 5))
        if index % 4 == 0:
            destinations.append(_destination(index, (first + 3) % 5))
        rule: dict[str, Any] = {"deny" if index % 6 == 5 else "allow": destinations}
        if index % 5 == 2:
            rule["callers"] = _CALLERS[(index // 5) % len(_CALLERS)]
        rules.append(rule)
    rules.append({"allow": [f"{host}:{','.join(str(p) for p in sorted(set(allowedPorts)))}"]})
    return rules


def _toml(value: Any) -> str:
    """A TOML value (strings, lists, tables inline); ASCII strings are JSON and TOML alike."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def configText(
    listen: str,
    localapi: str,
    mode: str,
    allowedPorts: Sequence[int],
    splice: bool = True,
) -> str:
    """The file for C{tsmux --config}: one socket as (a)'s flags describe it, with L{benchRules}."""
    lines = [
        f"# tsmux benchmark, contender (r): (a)'s socket with {RULE_COUNT} rules; only the last one allows the",
        "# benchmark's targets, so every connection is decided after the 49 others were tried.",
        "[[socket]]",
        f"name = {_toml(SOCKET_NAME)}",
        f"listen = {_toml(listen)}",
        f"localapi = {_toml(localapi)}",
        'dialer = "localapi"',
        f"mode = {_toml(mode)}",
    ]
    if not splice:
        lines.append("splice = false")
    lines.append("rules = [")
    lines += [f"  {_toml(rule)}," for rule in benchRules(allowedPorts)]
    lines.append("]")
    return "\n".join(lines) + "\n"


def makeView(count: int) -> Any:
    """A made-up tailnet view of C{count} nodes (this one first), with the rules' tags, logins and names."""
    from tsmux._netmap import NetmapView, Peer

    peers = []
    for index in range(count):
        address = ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.101.0.1")) + index)
        address6 = ipaddress.IPv6Address(f"fd7a:115c:a1e0::{index + 1:x}")
        tags = frozenset({f"tag:{_TAGS[index % len(_TAGS)]}"} if index % 3 else set())
        login = None if tags else _LOGINS[index % len(_LOGINS)]
        peers.append(
            Peer(f"node{index}.example.ts.net", f"node{index}", (address, address6), tags, login, isSelf=index == 0)
        )
    return NetmapView(peers, 0.0)


def checkLastRuleDecides(path: str, ports: Sequence[int], uids: Sequence[int]) -> str | None:
    """
    Read C{path} as tsmux does and decide the benchmark's targets for each uid (with a made-up view):
    C{None} when the last rule decides them all, else what decided instead.
    """
    from tsmux._configfile import loadConfigFile
    from tsmux._peercred import PeerCredentials
    from tsmux._rules import RuleSet, parseTarget

    config = loadConfigFile(path).sockets[0]
    assert config.rules is not None
    ruleSet = RuleSet(config.name, config.rules)
    view = makeView(200)
    last = f"{config.name}#{RULE_COUNT}"
    for uid in uids:
        peer = PeerCredentials(os.getpid(), uid, uid, frozenset())
        for port in ports:
            decision = ruleSet.decide(peer, parseTarget("127.0.0.1", port), view)
            if decision.label != last or not decision.allowed:
                return f"127.0.0.1:{port} for uid {uid} is decided by {decision.label} ({decision.reason}), not {last}"
    return None


def timeDecisions(peers: int = 200, seconds: float = 1.0) -> list[tuple[str, float, float]]:
    """
    In-process, µs per decision (best and median of the repeats), with L{benchRules} and a made-up view
    of C{peers} nodes: the benchmark's target (decided by rule 50); a node's name that no rule allows (all
    50 tried against the node's facts, denied at C{r#end}); and the benchmark's target through
    L{ConnectionContext.decide} on that socket, on a socket from a file without rules, and on a
    flag-form socket (no rule set: contender a).
    """
    from dataclasses import replace

    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from tsmux._configfile import loadConfigFile
    from tsmux._context import ConnectionContext
    from tsmux._netmap import NetmapWatcher
    from tsmux._peercred import PeerCredentials
    from tsmux._record import ConnectionRecord
    from tsmux._rules import RuleSet, parseTarget

    port = 40000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rules.toml")
        with open(path, "w") as f:
            f.write(configText(os.path.join(tmp, "r.sock"), "/run/tailscaled.sock", "0600", [port, port + 1]))
        config = loadConfigFile(path).sockets[0]
    assert config.rules is not None
    view = makeView(peers)
    clock = Clock()
    watcher = NetmapWatcher(clock, lambda: Deferred())
    watcher.lastView = view  # fetched at 0 on a clock at 0: fresh

    class LocalAPI:
        path = "/run/tailscaled.sock"

    def context(rules: Any) -> ConnectionContext:
        return ConnectionContext(clock, replace(config, rules=rules), None, LocalAPI(), netmap=watcher)  # type: ignore[arg-type]

    peer = PeerCredentials(os.getpid(), 0, 0, frozenset())
    record = ConnectionRecord(clock, peer)
    ruleSet = RuleSet(config.name, config.rules)
    target = parseTarget("127.0.0.1", port)
    assert ruleSet.decide(peer, target, view).label == f"{SOCKET_NAME}#{RULE_COUNT}"
    withRules, noRules, flagForm = context(config.rules), context(()), context(None)
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"RuleSet.decide, 127.0.0.1:{port}, decided by rule {RULE_COUNT}", lambda: ruleSet.decide(peer, target, view))
    ]
    end = f"{SOCKET_NAME}#end"
    for node in view.peers:
        tied = parseTarget(node.hostName, port)
        if ruleSet.decide(peer, tied, view).label == end:
            cases.append(
                (
                    f"RuleSet.decide, {node.hostName}:{port} (a node of the view), all rules tried, denied at the end",
                    lambda tied=tied: ruleSet.decide(peer, tied, view),
                )
            )
            break
    cases += [
        (
            f"ConnectionContext.decide, 127.0.0.1:{port}, {RULE_COUNT} rules",
            lambda: withRules.decide(record, "127.0.0.1", port),
        ),
        (
            "ConnectionContext.decide, socket from a file without rules",
            lambda: noRules.decide(record, "127.0.0.1", port),
        ),
        (
            "ConnectionContext.decide, flag-form socket (no rule set)",
            lambda: flagForm.decide(record, "127.0.0.1", port),
        ),
    ]
    # The cases take turns, repeat after repeat, so that they share the machine's background load.
    timers = [timeit.Timer(call) for _, call in cases]
    numbers = [timer.autorange()[0] for timer in timers]
    samples: list[list[float]] = [[] for _ in timers]
    for _ in range(max(5, round(seconds / 0.2))):
        for timer, number, found in zip(timers, numbers, samples, strict=True):
            found.append(timer.timeit(number) / number * 1e6)
    results = []
    for (caseName, _), found in zip(cases, samples, strict=True):
        found.sort()
        results.append((caseName, found[0], found[len(found) // 2]))
    return results


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench._rulesfile",
        description="Time one rule decision in-process with contender (r)'s 50 rules (for context, not a test).",
    )
    parser.add_argument("--peers", type=int, default=200, help="nodes in the made-up tailnet view (default 200)")
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long to time each case (default 1)")
    parser.add_argument("--print-config", action="store_true", help="print the config file (ports 40000,40001)")
    options = parser.parse_args(argv)
    if options.print_config:
        sys.stdout.write(configText("/tmp/tsmux-r.sock", "/run/tailscale/tailscaled.sock", "0600", [40000, 40001]))
        return 0
    print(f"{RULE_COUNT} rules, a view of {options.peers} nodes, Python {sys.version.split()[0]}")
    print("   best  median  µs per decision")
    for name, best, median in timeDecisions(options.peers, options.seconds):
        print(f"{best:7.2f} {median:7.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
