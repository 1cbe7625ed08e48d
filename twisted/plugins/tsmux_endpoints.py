"""
The C{tsmux:} client endpoint string, so any Twisted program can write
C{clientFromString(reactor, "tsmux:host=peer:port=22")}.

tsmux itself is imported only when a C{tsmux:} string is parsed: plugin
discovery imports this module in every program that looks for parsers.
"""

from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint, IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class TsmuxEndpointParser:
    """C{tsmux:host=H:port=P[:path=SOCKET][:timeout=S][:credentials=FILE]}."""

    prefix = "tsmux"

    def parseStreamClient(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamClientEndpoint:
        from tsmux._client import endpointFromString

        return endpointFromString(reactor, *args, **kwargs)


tsmuxEndpointParser = TsmuxEndpointParser()
