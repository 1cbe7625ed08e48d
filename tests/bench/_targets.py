"""
The benchmark's target servers, run INSIDE the private network namespace (via nsenter)::

    nsenter --net=/proc/HELPER/ns/net -- python -m tests.bench._targets

Prints one JSON line C{{"bulkPort": .., "echoPort": .., "pid": ..}} once both listen on 127.0.0.1,
then serves until its stdin reaches EOF (the orchestrator closes it) or SIGTERM.

    - bulk (one thread per connection, blocking sockets, 1 MiB buffers): the client sends 9 bytes,
      C{b"D"} or C{b"U"} and a big-endian 64-bit size. C{D}: the server sends that many zero bytes.
      C{U}: it reads that many bytes, then answers C{b"OK"} and the 64-bit count. Either way it then
      waits for the client to close: tailscaled's relays do not half-close, so the end of a transfer
      is known by count, never by EOF.
    - echo (asyncio, one event loop): echoes every byte until the client closes. Used for the
      connection rate and for the held connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import sys
import threading

CHUNK = 1024 * 1024
_ZEROS = bytes(CHUNK)
HEADER = struct.Struct("!cQ")


def _recvExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _serveBulk(sock: socket.socket) -> None:
    try:
        kind, size = HEADER.unpack(_recvExactly(sock, HEADER.size))
        if kind == b"D":
            view = memoryview(_ZEROS)
            left = size
            while left >= CHUNK:
                sock.sendall(view)
                left -= CHUNK
            if left:
                sock.sendall(view[:left])
        elif kind == b"U":
            buffer = bytearray(CHUNK)
            left = size
            while left > 0:
                n = sock.recv_into(buffer, min(CHUNK, left))
                if n == 0:
                    raise EOFError
                left -= n
            sock.sendall(b"OK" + struct.pack("!Q", size))
        else:
            return
        # Wait for the client to close: closing first could race the last bytes through a relay.
        while sock.recv(CHUNK):
            pass
    except (OSError, EOFError):
        pass
    finally:
        sock.close()


def _bulkLoop(listener: socket.socket) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serveBulk, args=(sock,), daemon=True).start()


class _Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    bulk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bulk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bulk.bind(("127.0.0.1", 0))
    bulk.listen(64)
    threading.Thread(target=_bulkLoop, args=(bulk,), daemon=True).start()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=4096, reuse_address=True)
    echoPort = echo.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"bulkPort": bulk.getsockname()[1], "echoPort": echoPort, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()

    done = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(None))
    # stdin EOF means the orchestrator went away or wants us to stop.
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: os.read(stdin, 4096) or done.done() or done.set_result(None))
    await done
    echo.close()
    bulk.close()


def main() -> int:
    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
