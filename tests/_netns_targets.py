"""
Helper process for L{tests.test_sockets_integration}: TCP targets on made-up tailnet addresses, and a
tsmux beside them, all inside a private network namespace that the caller created.

Run it as::

    unshare -n -- python -m tests._netns_targets --address 100.64.0.5 --address fd7a:115c:a1e0::5 \\
        [--port N] --log FILE -- TSMUX_ARGV...

It refuses to run unless its network namespace is not its parent's and holds nothing but loopback,
so nothing tsmux dials can leave the machine. Then it brings C{lo} up, adds every C{--address} to it,
and starts the identifying echo target on C{0.0.0.0} and C{::} (IPv6 only there, so an IPv4-mapped
address reaches the IPv4 socket), at C{--port} (default: one it picks). Each connection first gets
the line C{hello from ADDRESS:PORT\\n} (C{[ADDRESS]:PORT} for IPv6), naming the local address the
client reached, then an echo of what it sends; on the client's EOF the target shuts down its own
side once everything was echoed, then closes.

Then it starts tsmux (C{TSMUX_ARGV}) with its output in C{--log}; tsmux gets PR_SET_PDEATHSIG, so it
never outlives this process. Its Unix sockets are reachable from outside: the filesystem is shared.

What it says, one JSON object per line on stdout:
    - C{{"ready": {"port": PORT, "tsmuxPid": PID}}} once tsmux is started (not yet listening:
      the parent waits for its sockets);
    - or C{{"failed": WHY}}, then it exits 1;
    - C{{"exited": CODE}} when tsmux has exited, whenever that is.

On stdin EOF, SIGTERM or SIGINT it stops tsmux (SIGTERM, then SIGKILL after 10 s), reports its
exit and exits 0.

The same file is also a tiny client program, standard library only, that a parent can run as
another uid by passing its source to C{python -c} (L{clientArgv}); its commands print one JSON line:
    - C{socks5 PATH HOST PORT}: a SOCKS5 CONNECT over the Unix socket C{PATH} (L{socks5Probe});
    - C{connect PATH AUTHORITY}: an HTTP CONNECT (L{connectProbe}).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

STOP_GRACE = 10.0


# --- the client side: probes, runnable as any uid ------------------------------------------------


def _recvLine(sock: socket.socket, limit: int = 4096) -> bytes:
    """Bytes up to and including the first newline (or all until EOF / C{limit})."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _recvExactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks5Request(host: str, port: int) -> bytes:
    """A SOCKS5 CONNECT request: an IPv4 or IPv6 address as such, anything else as a domain name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        encoded = host.encode("idna") if host.isascii() else host.encode()
        return b"\x05\x01\x00\x03" + bytes([len(encoded)]) + encoded + struct.pack("!H", port)
    kind = b"\x01" if address.version == 4 else b"\x04"
    return b"\x05\x01\x00" + kind + address.packed + struct.pack("!H", port)


def socks5Open(path: str, host: str, port: int, timeout: float = 10.0) -> tuple[dict[str, Any], socket.socket | None]:
    """
    Greet (no authentication), ask to CONNECT to C{host}:C{port}, and read what comes back.

    @return: C{{"method": M, "reply": R, "hello": LINE}} (C{method} the server's choice, C{-1} if it
        closed first; C{reply} the reply code or C{None} when there was no request; C{hello} the
        target's first line after a success) and, after a success, the socket (positioned after the
        hello line) for more; else C{None} and the socket is closed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    result: dict[str, Any] = {"method": -1, "reply": None, "hello": ""}
    try:
        sock.connect(path)
        sock.sendall(b"\x05\x01\x00")
        choice = _recvExactly(sock, 2)
        if len(choice) == 2:
            result["method"] = choice[1]
        if choice != b"\x05\x00":
            sock.close()
            return result, None
        sock.sendall(socks5Request(host, port))
        head = _recvExactly(sock, 4)
        if len(head) < 4:
            sock.close()
            return result, None
        result["reply"] = head[1]
        kind = head[3]
        rest = {1: 4, 4: 16}.get(kind)
        if rest is None:
            rest = _recvExactly(sock, 1)[0]
        _recvExactly(sock, rest + 2)
        if head[1] != 0:
            sock.close()
            return result, None
        result["hello"] = _recvLine(sock).decode("utf-8", "replace")
        return result, sock
    except BaseException:
        sock.close()
        raise


def socks5Probe(path: str, host: str, port: int, timeout: float = 10.0) -> dict[str, Any]:
    """L{socks5Open}, then close at once."""
    result, sock = socks5Open(path, host, port, timeout)
    if sock is not None:
        sock.close()
    return result


def connectProbe(path: str, authority: str, timeout: float = 10.0) -> dict[str, Any]:
    """
    An HTTP CONNECT over the Unix socket C{path}: C{{"status": CODE, "body": TEXT, "hello": LINE}}
    (C{hello} after a 200: the target's first line; C{body} otherwise: tsmux's explanation).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        fields = lines[0].split(" ", 2)
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -1
        result: dict[str, Any] = {"status": status, "body": "", "hello": ""}
        if status == 200:
            result["hello"] = _recvLine(sock).decode("utf-8", "replace")
        else:
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    length = int(value.strip())
            result["body"] = _recvExactly(sock, length).decode("utf-8", "replace")
        return result


def clientArgv(command: str, *args: str) -> list[str]:
    """C{["-c", SOURCE, command, *args]}: put a Python interpreter (and setpriv) in front."""
    with open(__file__, encoding="utf-8") as source:
        return ["-c", source.read(), command, *args]


# --- the namespace side: targets and tsmux -------------------------------------------------------


class _HelloEchoHandler(socketserver.BaseRequestHandler):
    """Names the local address reached, then echoes; answers EOF with EOF after the last echo."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        host, port = sock.getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock.sendall(f"hello from {where}\n".encode())
            while True:
                data = sock.recv(65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    break
                sock.sendall(data)
        except OSError:
            pass


class _Server4(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _Server6(_Server4):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # IPv6 only: IPv4 (and IPv4-mapped) connections reach the IPv4 socket on the same port.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class _Terminate(BaseException):
    """From the SIGTERM handler: leave the stdin loop (a BaseException, so nothing swallows it)."""


def _onSignal(signum: int, frame: object) -> None:
    raise _Terminate()


_say = threading.Lock()


def _tell(message: dict[str, Any]) -> None:
    with _say:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def _addAddresses(addresses: list[str]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for text in addresses:
        address = ipaddress.ip_address(text)
        if address.version == 4:
            subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        else:
            subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"], check=True)


def _serve(server: socketserver.BaseServer) -> None:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()


def _stopProcess(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(argv: list[str]) -> int:
    """The namespace side: see the module's docstring."""
    # Imported here: the client commands above run as other uids, from source, without the tests package.
    from tests._netns_tailnet import _ensurePrivateNamespace, _makePdeathsig

    if "--" not in argv:
        _tell({"failed": "usage: --address A ... --log FILE -- TSMUX_ARGV..."})
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m tests._netns_targets")
    parser.add_argument("--address", action="append", default=[])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    options = parser.parse_args(argv[:split])
    tsmuxArgv = argv[split + 1 :]

    signal.signal(signal.SIGTERM, _onSignal)
    signal.signal(signal.SIGINT, _onSignal)
    servers: list[socketserver.BaseServer] = []
    tsmux: subprocess.Popen[bytes] | None = None
    watcher: threading.Thread | None = None
    log: IO[bytes] | None = None
    try:
        try:
            _ensurePrivateNamespace()
            _addAddresses(options.address)
            server4 = _Server4(("0.0.0.0", options.port), _HelloEchoHandler)
            servers.append(server4)
            port = server4.server_address[1]
            server6 = _Server6(("::", port), _HelloEchoHandler)
            servers.append(server6)
            for server in servers:
                _serve(server)
            log = open(options.log, "ab")
            tsmux = subprocess.Popen(
                tsmuxArgv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_makePdeathsig()
            )
        except (Exception, SystemExit) as e:
            _tell({"failed": str(e) or repr(e)})
            return 1
        started = tsmux

        def watch() -> None:
            _tell({"exited": started.wait()})

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _tell({"ready": {"port": port, "tsmuxPid": tsmux.pid}})
        for _ in sys.stdin:
            pass
    except (_Terminate, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if tsmux is not None:
            _stopProcess(tsmux)
            if watcher is not None:
                watcher.join(5)  # it reports the exit
        for server in servers:
            server.shutdown()
            server.server_close()
        if log is not None:
            log.close()
    return 0


_CLIENT_COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "socks5": lambda path, host, port: socks5Probe(path, host, int(port)),
    "connect": lambda path, authority: connectProbe(path, authority),
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in _CLIENT_COMMANDS:
        print(json.dumps(_CLIENT_COMMANDS[argv[0]](*argv[1:])), flush=True)
        return 0
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
