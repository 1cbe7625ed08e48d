"""twistd plugin: C{twistd -n tsmux --listen ... --localapi ...}."""

from twisted.application.service import ServiceMaker

tsmux = ServiceMaker(
    "tsmux",
    "tsmux._service",
    "SOCKS5 and tailscaled's LocalAPI on one Unix socket.",
    "tsmux",
)
