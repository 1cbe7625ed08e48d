"""
From a run's raw measurements to medians, to ratios against the issue's targets, to markdown tables.

A ratio is computed within each round (the two contenders ran minutes apart at most, under the same
background load) and the table gives the median of those per-round ratios, with their range.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from tests.bench._rulesfile import RULE_COUNT, SOCKET_NAME

GIB = 1024**3

LABELS = {
    "a": "(a) tsmux, LocalAPI dialer",
    "r": f"(r) tsmux as (a), {RULE_COUNT} rules (the last matches)",
    "b": "(b) tsmux, direct dialer",
    "g": "(g) tsmux, socks5: dialer → (c)",
    "i": "(i) bare Twisted relay, LocalAPI dialer",
    "i-cu": "(i-cu) bare Twisted relay, LocalAPI, connectUNIX",
    "i-direct": "(i-direct) bare Twisted relay, direct dialer",
    "h": "(h) Go relay Unix → (c)",
    "c": "(c) tailscaled SOCKS5 (TCP)",
    "d": "(d) ts-dial to LocalAPI, no tsmux",
    "e": "(e) socat Unix → (c)",
    "f": "(f) no proxy (floor)",
}
ORDER = tuple(LABELS)
HTTP_LABELS = {
    "tailscaled": "tailscaled's LocalAPI socket",
    "a": "through tsmux (a)",
    "socat": "through socat (Unix → LocalAPI)",
}
# Whose CPU a contender's relay costs (see Bench.cpuPids).
RELAY_CPU = {
    "a": "tsmux_a",
    "r": "tsmux_r",
    "b": "tsmux_b",
    "g": "tsmux_g",
    "i": "bare_i",
    "i-cu": "bare_i-cu",
    "i-direct": "bare_i-direct",
    "h": "gorelay",
    "e": "socat",
}
# Contenders whose held-connection RSS is their own process's (the others': tailscaled's).
OWN_RSS = ("a", "b", "i", "i-cu", "i-direct")
CPU_CONN = "cpu_conn_relay_us_per_conn"
CPU_CONN_TS = "cpu_conn_tailscaled_us_per_conn"

# A ratio: (name, (subject, metric) numerator, (subject, metric) denominator[, comparison, goal]).
# A subject is a contender key ("a"), with "@UID" for a run whose client was that uid ("a@65534"), or
# "http:PATH" / "http@UID:PATH" for the LocalAPI passthrough.
Side = tuple[str, str]


def workloadName(base: str, uid: int = 0) -> str:
    """C{rate}, C{http} for the benchmark's own (root) client; C{rate@UID}, C{http@UID} for another uid."""
    return base if uid == 0 else f"{base}@{uid}"


def _who(uid: int | None) -> tuple[str, str]:
    """(subject suffix, label suffix) for a client uid (None: root, the benchmark's own)."""
    return ("", "") if uid is None else (f"@{uid}", f", client uid {uid}")


def targetSpecs(uids: list[int]) -> list[tuple[str, Side, Side, str, float]]:
    """The targets of the setup-path issue, each a ratio to a reference measured in the same round."""
    specs: list[tuple[str, Side, Side, str, float]] = []
    for uid in [None, *uids]:
        sfx, who = _who(uid)
        specs.append(
            (
                f"CPU per SOCKS5 connection, LocalAPI dialer (a)/(i){who}",
                ("a" + sfx, CPU_CONN),
                ("i" + sfx, CPU_CONN),
                "<=",
                1.25,
            )
        )
        specs.append(
            (
                f"CPU per SOCKS5 connection, direct dialer (b)/(i-direct){who}",
                ("b" + sfx, CPU_CONN),
                ("i-direct" + sfx, CPU_CONN),
                "<=",
                1.25,
            )
        )
    for uid in [None, *uids]:
        sfx, who = _who(uid)
        specs.append(
            (
                f"LocalAPI passthrough: added p50, tsmux/socat{who}",
                (f"http{sfx}:a", "added_p50_ms"),
                (f"http{sfx}:socat", "added_p50_ms"),
                "<=",
                2.0,
            )
        )
    specs.append(("Bulk download (a)/(d)", ("a", "download"), ("d", "download"), ">=", 0.85))
    specs.append(("Bulk download (b)/(c)", ("b", "download"), ("c", "download"), ">=", 1.0))
    return specs


def infoSpecs(uids: list[int]) -> list[tuple[str, Side, Side]]:
    specs: list[tuple[str, Side, Side]] = []
    for uid in [None, *uids]:
        sfx, who = _who(uid)
        specs.append(
            (f"CPU per connection (a) / tailscaled's in (c){who}", ("a" + sfx, CPU_CONN), ("c" + sfx, CPU_CONN_TS))
        )
        specs.append(
            (f"CPU per connection (b) / tailscaled's in (c){who}", ("b" + sfx, CPU_CONN), ("c" + sfx, CPU_CONN_TS))
        )
        specs.append(
            (f"CPU per connection (i) / tailscaled's in (c){who}", ("i" + sfx, CPU_CONN), ("c" + sfx, CPU_CONN_TS))
        )
        specs.append(
            (
                f"CPU per connection (i-direct) / tailscaled's in (c){who}",
                ("i-direct" + sfx, CPU_CONN),
                ("c" + sfx, CPU_CONN_TS),
            )
        )
    for uid in uids:
        sfx, _ = _who(uid)
        specs.append((f"CPU per connection (a), client uid {uid} / root", ("a" + sfx, CPU_CONN), ("a", CPU_CONN)))
        specs.append((f"CPU per connection (b), client uid {uid} / root", ("b" + sfx, CPU_CONN), ("b", CPU_CONN)))
    specs += [
        ("CPU per connection (i-cu) connectUNIX / (i) adopted", ("i-cu", CPU_CONN), ("i", CPU_CONN)),
        ("CPU per connection (h) Go relay / tailscaled's in (c)", ("h", CPU_CONN), ("c", CPU_CONN_TS)),
        ("Connections/s (h)/(a)", ("h", "conn_s"), ("a", "conn_s")),
        ("Connections/s (h)/(b)", ("h", "conn_s"), ("b", "conn_s")),
        ("Connections/s (i)/(a)", ("i", "conn_s"), ("a", "conn_s")),
        ("Connections/s (a)/(c)", ("a", "conn_s"), ("c", "conn_s")),
        ("Connections/s (b)/(c)", ("b", "conn_s"), ("c", "conn_s")),
        ("Connections/s (h)/(c)", ("h", "conn_s"), ("c", "conn_s")),
        ("Connections/s (a)/(d)", ("a", "conn_s"), ("d", "conn_s")),
        (f"Connections/s (r) {RULE_COUNT} rules / (a)", ("r", "conn_s"), ("a", "conn_s")),
        (f"Bulk download (r) {RULE_COUNT} rules / (a)", ("r", "download"), ("a", "download")),
        ("p50 connection latency (a)/(c)", ("a", "p50_ms"), ("c", "p50_ms")),
        ("p99 connection latency (a)/(c)", ("a", "p99_ms"), ("c", "p99_ms")),
        ("Bulk download (a)/(e)", ("a", "download"), ("e", "download")),
        ("Bulk download (h)/(c)", ("h", "download"), ("c", "download")),
        ("Bulk download (i)/(d)", ("i", "download"), ("d", "download")),
        ("Bulk upload (a)/(d)", ("a", "upload"), ("d", "upload")),
        ("Bulk upload (a)/(e)", ("a", "upload"), ("e", "upload")),
        ("Bulk upload (b)/(c)", ("b", "upload"), ("c", "upload")),
    ]
    return specs


def _ok(result: dict[str, Any] | None) -> bool:
    return result is not None and "error" not in result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _perConnKiB(result: dict[str, Any], pid: Any) -> float | None:
    try:
        before = result["rss_before_kib"][str(pid)]
        held = result["rss_held_kib"][str(pid)]
        count = result["held"]
    except KeyError:
        return None
    if before is None or held is None or not count:
        return None
    return (held - before) / count


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Per-round metric values, their medians, the targets and the CPU cost, as one JSON-able dict."""
    rounds = record["parameters"]["rounds"]
    uids = [int(u) for u in record["parameters"].get("client_uids", [])]
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    for m in record.get("measurements", []):
        found[(m["workload"], m["contender"], m["round"])] = m["result"]

    # metrics[subject][metric] = [value per round, None where missing]
    metrics: dict[str, dict[str, list[float | None]]] = {}

    def put(subject: str, metric: str, r: int, value: float | None) -> None:
        metrics.setdefault(subject, {}).setdefault(metric, [None] * rounds)[r] = value

    for (workload, contender, r), result in found.items():
        if not _ok(result):
            continue
        base, _, uid = workload.partition("@")
        sfx = f"@{uid}" if uid else ""
        if base == "bulk-down":
            put(contender, "download", r, result["mib_s"])
        elif base == "bulk-up":
            put(contender, "upload", r, result["mib_s"])
        elif base == "rate":
            subject = contender + sfx
            if result.get("ok"):
                put(subject, "conn_s", r, result["conn_s"])
                put(subject, "p50_ms", r, result["p50_ms"])
                put(subject, "p99_ms", r, result["p99_ms"])
            put(subject, "conn_errors", r, result.get("errors", 0))
        elif base == "held":
            put(contender, "held_kib_per_conn", r, _perConnKiB(result, result.get("subject_pid")))
            if contender in OWN_RSS:
                put(contender, "tailscaled_kib_per_conn", r, _perConnKiB(result, result.get("tailscaled_pid")))
            put(contender, "held_errors", r, result.get("errors", 0))
        elif base == "http":
            subject = f"http{sfx}:{contender}"
            put(subject, "req_s", r, result["req_s"])
            put(subject, "p50_ms", r, result["p50_ms"])
            put(subject, "p99_ms", r, result["p99_ms"])

    # Passthrough: added p50 per round, against tailscaled's own socket (by the same client uid).
    for uid in [None, *uids]:
        sfx, _ = _who(uid)
        for path in ("a", "socat"):
            for r in range(rounds):
                own = metrics.get(f"http{sfx}:{path}", {}).get("p50_ms", [None] * rounds)[r]
                base = metrics.get(f"http{sfx}:tailscaled", {}).get("p50_ms", [None] * rounds)[r]
                if own is not None and base is not None:
                    put(f"http{sfx}:{path}", "added_p50_ms", r, own - base)

    # CPU: seconds per GiB moved in bulk download, microseconds per connection in the rate workload.
    for (workload, contender, r), result in found.items():
        base, _, uid = workload.partition("@")
        if not _ok(result) or base not in ("bulk-down", "rate"):
            continue
        subject = contender + (f"@{uid}" if uid else "")
        cpu = result.get("server_cpu_s", {})
        if base == "bulk-down":
            scale, suffix = GIB / result["bytes"], "s_per_gib"
        else:
            if not result.get("ok"):
                continue
            scale, suffix = 1e6 / result["ok"], "us_per_conn"
        prefix = "cpu_down_" if base == "bulk-down" else "cpu_conn_"
        if contender in RELAY_CPU and RELAY_CPU[contender] in cpu:
            put(subject, prefix + "relay_" + suffix, r, cpu[RELAY_CPU[contender]] * scale)
        if "tailscaled" in cpu:
            put(subject, prefix + "tailscaled_" + suffix, r, cpu["tailscaled"] * scale)
        if "targets" in cpu:
            put(subject, prefix + "target_" + suffix, r, cpu["targets"] * scale)
        if "client_cpu_s" in result:
            put(subject, prefix + "client_" + suffix, r, result["client_cpu_s"] * scale)

    medians = {
        subject: {metric: _median([v for v in values if v is not None]) for metric, values in byMetric.items()}
        for subject, byMetric in metrics.items()
    }

    def ratios(num: Side, den: Side) -> list[float]:
        """Per-round ratios; a round without a positive denominator (an added latency can be ≤ 0) is left out."""
        a = metrics.get(num[0], {}).get(num[1], [])
        b = metrics.get(den[0], {}).get(den[1], [])
        return [x / y for x, y in zip(a, b, strict=False) if x is not None and y is not None and y > 0]

    def target(name: str, op: str, threshold: float, values: list[float], unit: str) -> dict[str, Any]:
        median = _median(values)
        met = None if median is None else (median >= threshold if op == ">=" else median <= threshold)
        return {
            "name": name,
            "goal": f"{op.replace('>=', '≥').replace('<=', '≤')} {threshold:g}{unit}",
            "per_round": values,
            "median": median,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "unit": unit,
            "met": met,
        }

    targets = [target(name, op, goal, ratios(num, den), "×") for name, num, den, op, goal in targetSpecs(uids)]
    heldValues = [v for v in metrics.get("a", {}).get("held_kib_per_conn", []) if v is not None]
    targets.append(target("tsmux (a) RSS per held relayed connection", "<=", 4, heldValues, " KiB"))
    info = []
    for name, num, den in infoSpecs(uids):
        values = ratios(num, den)
        if values:
            info.append({"name": name, "per_round": values, "median": _median(values)})
    return {
        "per_round": metrics,
        "medians": medians,
        "targets": targets,
        "info_ratios": info,
        "rule_cost": ruleCost(metrics, medians, uids, ratios),
    }


def ruleCost(
    metrics: dict[str, dict[str, list[float | None]]],
    medians: dict[str, dict[str, float | None]],
    uids: list[int],
    ratios: Callable[[Side, Side], list[float]],
) -> list[dict[str, Any]]:
    """
    The cost of a decision by (r)'s 50 rules, per connection: tsmux's CPU per connection in (r) minus
    in (a), per round (both ran in the same round, seconds apart), and its median and range; r/a the same
    way; with the medians of (r) and (a) themselves. One entry per client uid that has both.
    """
    cost = []
    for uid in [None, *uids]:
        sfx, _ = _who(uid)
        r = metrics.get("r" + sfx, {}).get(CPU_CONN, [])
        a = metrics.get("a" + sfx, {}).get(CPU_CONN, [])
        differences = [x - y for x, y in zip(r, a, strict=False) if x is not None and y is not None]
        if not differences:
            continue
        ratio = ratios(("r" + sfx, CPU_CONN), ("a" + sfx, CPU_CONN))
        cost.append(
            {
                "uid": 0 if uid is None else uid,
                "rules": RULE_COUNT,
                "r_us_per_conn": medians.get("r" + sfx, {}).get(CPU_CONN),
                "a_us_per_conn": medians.get("a" + sfx, {}).get(CPU_CONN),
                "difference_us_per_round": differences,
                "difference_us": _median(differences),
                "difference_min": min(differences),
                "difference_max": max(differences),
                "ratio_per_round": ratio,
                "ratio": _median(ratio),
                "ratio_min": min(ratio) if ratio else None,
                "ratio_max": max(ratio) if ratio else None,
            }
        )
    return cost


def ruleCostLines(summary: dict[str, Any], ruleLabels: dict[str, int] | None = None) -> list[str]:
    """
    C{rule decision (50 rules, last one matches): +X µs CPU per connection (r/a = 1.0Y)}, for each client
    uid, and what (r)'s own figures and the per-round ranges were.
    """
    out = []
    for c in summary.get("rule_cost", []):
        who = "" if not c["uid"] else f", client uid {c['uid']}"
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.2f}"
        out.append(
            f"rule decision ({c['rules']} rules, last one matches){who}: {c['difference_us']:+.0f} µs CPU per "
            f"connection (r/a = {ratio})"
        )
        spread = (
            ""
            if c["ratio_min"] is None
            else f", r/a {c['ratio_min']:.2f} – {c['ratio_max']:.2f} over {len(c['ratio_per_round'])} rounds"
        )
        out.append(
            f"    tsmux CPU per connection: (r) {_fmt(c['r_us_per_conn'])} µs, (a) {_fmt(c['a_us_per_conn'])} µs "
            f"(medians); r − a per round {c['difference_min']:+.0f} – {c['difference_max']:+.0f} µs{spread}"
        )
    if ruleLabels is not None:
        last = f"{SOCKET_NAME}#{RULE_COUNT}"
        others = {label: n for label, n in ruleLabels.items() if label != last}
        if others:
            out.append(f"**(r)'s connections were not all decided by {last}**: {ruleLabels}")
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def brief(workload: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error']}"
    if workload.startswith("bulk"):
        return f"{result['mib_s']:.0f} MiB/s"
    if workload == "rate":
        return (
            f"{result['conn_s']:.0f} conn/s, p50 {result.get('p50_ms', 0):.2f} ms, "
            f"p99 {result.get('p99_ms', 0):.2f} ms, {result['errors']} errors"
        )
    if workload == "held":
        return (
            f"held {result['held']}, RSS KiB {result['rss_before_kib']} -> {result['rss_held_kib']}, "
            f"{result['errors']} errors"
        )
    if workload == "http":
        return f"{result['req_s']:.0f} req/s, p50 {result['p50_ms']:.3f} ms"
    return ""


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(record: dict[str, Any], summary: dict[str, Any]) -> str:
    p = record["parameters"]
    machine = record.get("machine", {})
    medians: dict[str, dict[str, float | None]] = summary["medians"]
    uids = [int(u) for u in p.get("client_uids", [])]
    out: list[str] = []
    out.append(
        f"tsmux benchmark, {record['started'][:10]}, commit {record.get('git', {}).get('describe', '?')}, "
        f"{machine.get('cpus', '?')} × {machine.get('cpu', '?')}, Python {machine.get('python', '?')}, "
        f"Twisted {machine.get('twisted', '?')}, tailscaled {machine.get('tailscaled', '?')}"
    )
    out.append(
        f"Medians of {p['rounds']} interleaved rounds; bulk {p['bulk_bytes'] // 1048576} MiB over one connection; "
        f"{p['connections']} connections at concurrency {p['concurrency']}; {p['held']} held connections; "
        f"{p['requests']} LocalAPI requests on one keep-alive connection. Run took {record.get('duration_s', 0):.0f} s."
    )
    if uids:
        out.append(
            "Connection rate and LocalAPI passthrough also with the client as uid "
            + ", ".join(str(u) for u in uids)
            + "; every other figure with the client as root."
        )
    tsmuxFrom = p.get("tsmux_from")
    if tsmuxFrom and record.get("git", {}).get("root") not in (None, tsmuxFrom):
        out.append(f"tsmux run from {tsmuxFrom}, not the working tree.")
    for what, why in p.get("skipped", {}).items():
        out.append(f"Skipped {f'({what})' if what in LABELS else what}: {why}")
    if record.get("failure"):
        out.append(f"**The run stopped early: {record['failure']}**")
    out.append("")

    def m(subject: str, metric: str) -> float | None:
        return medians.get(subject, {}).get(metric)

    rows = []
    for key in ORDER:
        if key not in medians:
            continue
        errors = m(key, "conn_errors")
        conn = _fmt(m(key, "conn_s"))
        if errors:
            conn += f" ({errors:.0f} err)"
        kib = m(key, "held_kib_per_conn")
        rows.append(
            [
                LABELS[key],
                _fmt(m(key, "download")),
                _fmt(m(key, "upload")),
                conn,
                _fmt(m(key, "p50_ms"), 2),
                _fmt(m(key, "p99_ms"), 2),
                _fmt(kib, 1) + (" (tailscaled)" if key not in OWN_RSS and kib is not None else ""),
            ]
        )
    out += _table(
        ["contender", "download MiB/s", "upload MiB/s", "conn/s", "p50 ms", "p99 ms", "RSS KiB/held conn"],
        rows,
        "lrrrrrr",
    )
    out.append("")

    for uid in uids:
        rows = []
        for key in ORDER:
            subject = f"{key}@{uid}"
            if subject not in medians:
                continue
            errors = m(subject, "conn_errors")
            conn = _fmt(m(subject, "conn_s"))
            if errors:
                conn += f" ({errors:.0f} err)"
            rows.append(
                [
                    LABELS[key],
                    conn,
                    _fmt(m(subject, "p50_ms"), 2),
                    _fmt(m(subject, "p99_ms"), 2),
                    _fmt(m(subject, CPU_CONN)) if key in RELAY_CPU else "",
                    _fmt(m(subject, CPU_CONN_TS)),
                ]
            )
        if rows:
            out += _table(
                [f"client as uid {uid}", "conn/s", "p50 ms", "p99 ms", "relay CPU µs/conn", "tailscaled µs/conn"],
                rows,
                "lrrrrr",
            )
            out.append("")

    rows = []
    for uid in [None, *uids]:
        sfx, who = _who(uid)
        for key in ("tailscaled", "a", "socat"):
            name = f"http{sfx}:{key}"
            if name not in medians:
                continue
            rows.append(
                [
                    (f"through socat connecting as uid {uid}" if key == "socat" and uid else HTTP_LABELS[key]) + who,
                    _fmt(m(name, "req_s")),
                    _fmt(m(name, "p50_ms"), 3),
                    _fmt(m(name, "p99_ms"), 3),
                    "–" if key == "tailscaled" else _fmt(m(name, "added_p50_ms"), 3),
                ]
            )
    if rows:
        out += _table(
            ["GET /localapi/v0/status", "requests/s", "p50 ms", "p99 ms", "added p50 ms"],
            rows,
            "lrrrr",
        )
        out.append("")

    rows = []
    for t in summary["targets"]:
        digits = 3 if t["unit"] == " ms" else (1 if t["unit"] == " KiB" else 2)
        measured = "–" if t["median"] is None else f"{t['median']:.{digits}f}{t['unit']}"
        spread = "–" if t["min"] is None else f"{t['min']:.{digits}f} – {t['max']:.{digits}f}"
        status = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        rows.append([t["name"], t["goal"], measured, spread, status])
    out += _table(["target (issue 10)", "goal", "median", "range over rounds", "status"], rows, "llrrl")
    out.append("")

    rows = []
    for i in summary["info_ratios"]:
        if i["median"] is not None:
            rows.append([i["name"], f"{i['median']:.2f}×"])
    for key in ("b", "i"):
        kib = m(key, "held_kib_per_conn")
        if kib is not None:
            rows.append([f"{LABELS[key]}: RSS per held relayed connection", f"{kib:.1f} KiB"])
    kibTs = m("a", "tailscaled_kib_per_conn")
    if kibTs is not None:
        rows.append(["tailscaled RSS per connection held through (a)", f"{kibTs:.1f} KiB"])
    if rows:
        out += _table(["other ratios (for reference)", "median"], rows, "lr")
        out.append("")

    rows = []
    for key in ORDER:
        if key not in medians:
            continue
        rows.append(
            [
                LABELS[key],
                _fmt(m(key, "cpu_down_relay_s_per_gib"), 2) if key in RELAY_CPU else "",
                _fmt(m(key, "cpu_down_tailscaled_s_per_gib"), 2),
                _fmt(m(key, "cpu_down_client_s_per_gib"), 2),
                _fmt(m(key, CPU_CONN)) if key in RELAY_CPU else "",
                _fmt(m(key, CPU_CONN_TS)),
            ]
        )
    out += _table(
        [
            "CPU cost",
            "download: relay s/GiB",
            "tailscaled s/GiB",
            "client s/GiB",
            "per connection: relay µs",
            "tailscaled µs",
        ],
        rows,
        "lrrrrr",
    )
    costLines = ruleCostLines(summary, record.get("contenders", {}).get("r", {}).get("rule_labels"))
    if costLines:
        out.append("")
        out += costLines
    return "\n".join(out)


# The event loop's own frames, under every sample: left out of "by total time", which would
# otherwise start with a dozen rows at 100 %.
_TRUNK = (
    "<module> ",
    "_run_code ",
    "_run_module_as_main ",
    "main (tsmux/_cli.py)",
    "ReactorBase.run ",
    "ReactorBase.mainLoop ",
    "EPollReactor.doPoll ",
    "callWithLogger ",
    "callWithContext ",
    "ContextTracker.callWithContext ",
    "ThreadedContextTracker.callWithContext ",
    "_PollLikeMixin._doReadOrWrite ",
)


def summarizeStacks(path: str, top: int = 15) -> dict[str, Any]:
    """
    Top functions of a py-spy raw file (C{frame;frame;... count} per line, root first): by own time
    (the leaf frame) and by total time (anywhere in the stack, once per stack).
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                samples += n
                frames = [frame.strip() for frame in stack.split(";") if frame.strip()]
                # The first frame is the process/thread name py-spy adds.
                frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
                if not frames:
                    continue
                own[frames[-1]] = own.get(frames[-1], 0) + n
                for frame in set(frames):
                    if not frame.startswith(_TRUNK):
                        total[frame] = total.get(frame, 0) + n
    except OSError as e:
        return {"samples": 0, "error": str(e)}

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[name, count, round(100 * count / samples, 1)] for name, count in best]

    return {"samples": samples, "top_own": ranked(own), "top_total": ranked(total)}


def profileText(profiles: list[dict[str, Any]], top: int = 12) -> str:
    """The profiles' top functions by own and by total time, as markdown."""
    out: list[str] = []
    for p in profiles:
        workload = "bulk" if "bulk" in p["name"] else "rate"
        load = brief(workload, p.get("load", {}))
        out.append(f"py-spy, tsmux during {p['name']} ({p.get('samples', 0)} samples at 250 Hz; {load}):")
        out.append("")
        own = p.get("top_own", [])[:top]
        total = p.get("top_total", [])[:top]
        rows = []
        for i in range(max(len(own), len(total))):
            row = []
            for ranked in (own, total):
                row += [ranked[i][0], f"{ranked[i][2]:.1f} %"] if i < len(ranked) else ["", ""]
            rows.append(row)
        out += _table(["function, by own time", "share", "function, by total time", "share"], rows, "lrlr")
        out.append("")
    return "\n".join(out).rstrip()
