"""
Send a line to a target and print the line that comes back.

    python greet.py ENDPOINT [MESSAGE]

ENDPOINT is any Twisted client endpoint description: through tsmux,
tsmux:host=my-server:port=7 (add :path=SOCKET if tsmux does not listen at
/var/run/tailscale/tsmux.sock); without it, tcp:host=my-server:port=7.
"""

import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import react
from twisted.python.failure import Failure


class Greeter(Protocol):
    """Sends one line; the first line of the answer ends the conversation."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.message + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\n" in self.received:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(self.received)


async def main(reactor, description: str, message: str = "hello through tsmux") -> None:
    endpoint = clientFromString(reactor, description)
    try:
        greeter = await connectProtocol(endpoint, Greeter(message.encode()))
    except ConnectError as error:
        # Through tsmux: tsmux.client.ConnectionRefused, HostUnreachable, ...
        raise SystemExit(f"greet.py: {error}") from None
    answer = await greeter.done
    print(answer.decode(errors="replace").partition("\n")[0])


if __name__ == "__main__":
    react(main, sys.argv[1:])
