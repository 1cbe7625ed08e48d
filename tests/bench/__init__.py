"""
tsmux's benchmark: ``python -m tests.bench`` (or ``sudo tox -e bench``).

It measures tsmux against what users run today -- tailscaled's own TCP SOCKS5, socat or a small Go relay
putting a Unix socket in front of it, and a client speaking ``ts-dial`` to tailscaled's LocalAPI
directly -- and against a bare Twisted relay, inside a private network namespace with a real tailscaled
1.96.4 (the integration tests' harness, L{tests._tailnet}).
See ``docs/benchmarks.rst`` for what is measured and how to read the table.

Modules:
    - L{tests.bench._run}: the orchestrator (host namespace): starts everything, interleaves the
      contenders round by round, prints the table and saves the JSON record.
    - L{tests.bench._load}: the load generator; runs inside the namespace (via nsenter), one process
      per measurement, and prints one JSON line.
    - L{tests.bench._targets}: the loopback target servers (bulk and echo) inside the namespace.
    - L{tests.bench._barerelay}: contender (i), a bare Twisted SOCKS5 relay (no log, credentials, timers
      or limits), the reference for what tsmux's own work costs over Twisted's.
    - C{gorelay.go}: contender (h), the Go relay users deploy instead of tsmux (a Unix socket copied to
      tailscaled's TCP SOCKS5), built at run time with Debian's golang-go into the run's work directory.
    - L{tests.bench._rulesfile}: contender (r)'s config file, (a)'s socket with 50 rules of which only the
      last lets the targets through (the cost of a rule decision per connection is r - a); run as
      C{python -m tests.bench._rulesfile}, it times that decision in-process.
    - L{tests.bench._report}: medians, ratios against the issue's targets, the markdown tables.

Nothing here is named ``test_*``: neither pytest nor trial collects the benchmark.
"""
