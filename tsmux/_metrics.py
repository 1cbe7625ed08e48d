"""
What tsmux counts, and the Prometheus text it serves at C{/tsmux/v0/metrics}.

Plain counters fed from each connection's record (its typed outcome) when it ends
(and dial latencies when dials finish): no dependency beyond Twisted, and
nothing per byte in the data path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Final

from ._record import ConnectionRecord, Outcome

DIAL_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.connections: Counter[tuple[str, str]] = Counter()
        self.bytesFromClients: Counter[str] = Counter()
        self.bytesToClients: Counter[str] = Counter()
        self.policyRefusals: Counter[str] = Counter()
        self.dialBuckets = [0] * len(DIAL_BUCKETS)
        self.dialCount = 0
        self.dialSum = 0.0
        self.dialErrors: Counter[str] = Counter()
        self.limitRefusals = 0
        self.ruleDecisions: Counter[tuple[str, str, str]] = Counter()

    def ruleDecided(self, socket: str, rule: str, verdict: str) -> None:
        """A socket's rules decided a dial: counted per socket, rule and verdict."""
        self.ruleDecisions[(socket, rule, verdict)] += 1

    def connectionEnded(self, record: ConnectionRecord) -> None:
        protocol = record.protocol
        assert record.outcome is not None
        outcome = Outcome.CUT_AT_SHUTDOWN.value if record.cutAtShutdown else record.outcome.value
        self.connections[(protocol, outcome)] += 1
        self.bytesFromClients[protocol] += record.bytesFromClient
        self.bytesToClients[protocol] += record.bytesToClient
        if record.outcome is Outcome.REFUSED:
            self.policyRefusals[protocol] += 1

    def dialEnded(self, seconds: float, errorKind: str | None) -> None:
        self.dialCount += 1
        self.dialSum += seconds
        # Counted in the first bucket that holds it; render() makes them cumulative.
        index = bisect_left(DIAL_BUCKETS, seconds)
        if index < len(DIAL_BUCKETS):
            self.dialBuckets[index] += 1
        if errorKind is not None:
            self.dialErrors[errorKind] += 1

    def render(
        self, openConnections: int, localapiReachable: bool | None, openBySocket: dict[str, int] | None = None
    ) -> bytes:
        lines = [
            "# HELP tsmux_connections_total Client connections ended, by protocol and outcome.",
            "# TYPE tsmux_connections_total counter",
        ]
        for (protocol, outcome), count in sorted(self.connections.items()):
            lines.append(
                f'tsmux_connections_total{{protocol="{_escape(protocol)}",outcome="{_escape(outcome)}"}} {count}'
            )
        lines += [
            "# HELP tsmux_open_connections Client connections open now.",
            "# TYPE tsmux_open_connections gauge",
            f"tsmux_open_connections {openConnections}",
            "# HELP tsmux_socket_open_connections Client connections open now, by socket.",
            "# TYPE tsmux_socket_open_connections gauge",
        ]
        for socket, count in sorted((openBySocket or {}).items()):
            lines.append(f'tsmux_socket_open_connections{{socket="{_escape(socket)}"}} {count}')
        lines += [
            "# HELP tsmux_rule_decisions_total Dials decided by a socket's rules, by socket, rule and verdict "
            "(allow, deny, no-netmap: failed closed without a tailnet view).",
            "# TYPE tsmux_rule_decisions_total counter",
        ]
        for (socket, rule, verdict), count in sorted(self.ruleDecisions.items()):
            lines.append(
                f'tsmux_rule_decisions_total{{socket="{_escape(socket)}",rule="{_escape(rule)}",'
                f'verdict="{_escape(verdict)}"}} {count}'
            )
        lines += [
            "# HELP tsmux_client_bytes_received_total Bytes received from clients (ended connections).",
            "# TYPE tsmux_client_bytes_received_total counter",
        ]
        for protocol, count in sorted(self.bytesFromClients.items()):
            lines.append(f'tsmux_client_bytes_received_total{{protocol="{_escape(protocol)}"}} {count}')
        lines += [
            "# HELP tsmux_client_bytes_sent_total Bytes sent to clients (ended connections).",
            "# TYPE tsmux_client_bytes_sent_total counter",
        ]
        for protocol, count in sorted(self.bytesToClients.items()):
            lines.append(f'tsmux_client_bytes_sent_total{{protocol="{_escape(protocol)}"}} {count}')
        lines += [
            "# HELP tsmux_policy_refusals_total Connections refused by tsmux's rules (allow-lists, passwords, "
            "LocalAPI dial filter, /tsmux/ for admins only).",
            "# TYPE tsmux_policy_refusals_total counter",
        ]
        for protocol, count in sorted(self.policyRefusals.items()):
            lines.append(f'tsmux_policy_refusals_total{{protocol="{_escape(protocol)}"}} {count}')
        lines += [
            "# HELP tsmux_limit_refusals_total Connections closed at accept by the connection limits (not logged "
            "one by one).",
            "# TYPE tsmux_limit_refusals_total counter",
            f"tsmux_limit_refusals_total {self.limitRefusals}",
            "# HELP tsmux_dial_seconds Time from request to a connected or failed way out.",
            "# TYPE tsmux_dial_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(DIAL_BUCKETS, self.dialBuckets, strict=True):
            cumulative += count
            lines.append(f'tsmux_dial_seconds_bucket{{le="{bound:g}"}} {cumulative}')
        lines += [
            f'tsmux_dial_seconds_bucket{{le="+Inf"}} {self.dialCount}',
            f"tsmux_dial_seconds_sum {self.dialSum:.6f}",
            f"tsmux_dial_seconds_count {self.dialCount}",
            "# HELP tsmux_dial_errors_total Failed dials, by kind.",
            "# TYPE tsmux_dial_errors_total counter",
        ]
        for kind, count in sorted(self.dialErrors.items()):
            lines.append(f'tsmux_dial_errors_total{{kind="{_escape(kind)}"}} {count}')
        lines += [
            "# HELP tsmux_localapi_reachable Whether tailscaled's LocalAPI answered last time (1/0; absent: unknown).",
            "# TYPE tsmux_localapi_reachable gauge",
        ]
        if localapiReachable is not None:
            lines.append(f"tsmux_localapi_reachable {int(localapiReachable)}")
        return ("\n".join(lines) + "\n").encode("utf-8")
