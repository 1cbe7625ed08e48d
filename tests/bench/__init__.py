"""
tsmux's benchmark: ``python -m tests.bench`` (or ``sudo tox -e bench``).

It measures tsmux against what users run today -- tailscaled's own TCP SOCKS5, socat relaying a Unix
socket to it, and a client speaking ``ts-dial`` to tailscaled's LocalAPI directly -- inside a private
network namespace with a real tailscaled 1.96.4 (the integration tests' harness, L{tests._tailnet}).
See ``docs/benchmarks.rst`` for what is measured and how to read the table.

Modules:
    - L{tests.bench._run}: the orchestrator (host namespace): starts everything, interleaves the
      contenders round by round, prints the table and saves the JSON record.
    - L{tests.bench._load}: the load generator; runs inside the namespace (via nsenter), one process
      per measurement, and prints one JSON line.
    - L{tests.bench._targets}: the loopback target servers (bulk and echo) inside the namespace.
    - L{tests.bench._report}: medians, ratios against the issue's targets, the markdown tables.

Nothing here is named ``test_*``: neither pytest nor trial collects the benchmark.
"""
