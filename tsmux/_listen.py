"""
Listening addresses: an absolute path is a Unix socket that tsmux manages
(mode, stale sockets, removal on shutdown); anything else is a Twisted
server endpoint description.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._twistedprivate import adoptSystemdUnixPort, systemdInheritedDescriptors

log = Logger()

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


class StartupError(Exception):
    """tsmux cannot start; the message is one line meant for the operator."""


def defaultBacklog() -> int:
    """
    The kernel's maximum accept queue, as Go servers (tailscaled too) use:
    Twisted's default of 50 makes clients fail under a burst of connects.
    """
    try:
        with open(SOMAXCONN_PATH) as f:
            return max(int(f.read().strip()), 1)
    except (OSError, ValueError):
        return socket.SOMAXCONN


def prepareSocketPath(path: str) -> None:
    """
    Make C{path} free for a new socket, or explain why it cannot be.

    A socket file that nobody answers on is stale (a crashed tsmux, a
    container restart) and is removed; a live server there is never touched.
    """
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        raise StartupError(f"cannot listen on {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"cannot listen on {path}: directory {directory} is not writable")
    if len(os.fsencode(path)) > 107:
        raise StartupError(f"cannot listen on {path}: a Unix socket path is at most 107 bytes")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(
                f"cannot listen on {path}: cannot tell whether it is in use ({error.strerror})"
            ) from None
    else:
        raise StartupError(f"cannot listen on {path}: another server is already listening there")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise StartupError(f"cannot listen on {path}: cannot remove the stale socket ({error.strerror})") from None
    log.info("removed a stale socket at {path} (nothing was listening)", path=path)


def listenOnPath(
    reactor: Any, path: str, factory: IProtocolFactory, mode: int, backlog: int, group: int | None = None
) -> IListeningPort:
    """
    Listen on a Unix socket at C{path} that never has a wider mode than
    C{mode}, not even between bind and chmod: the umask is tightened around
    the bind (the reactor runs no other thread that creates files meanwhile).
    """
    # With a group to set, only the owner may connect until the group is right.
    bindMode = mode if group is None else mode & 0o700
    previous = os.umask(0o777 & ~bindMode)
    try:
        port = reactor.listenUNIX(path, factory, backlog=backlog, mode=bindMode, wantPID=False)
    except Exception as error:
        raise StartupError(f"cannot listen on {path}: {error}") from error
    finally:
        os.umask(previous)
    if group is not None:
        try:
            os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as error:
            port.stopListening()
            raise StartupError(f"cannot give {path} group {group}: {error.strerror}") from None
    return port


def withBacklog(description: str, backlog: int) -> str:
    """Add C{backlog=} to C{unix:} and C{tcp:} descriptions that lack one."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("unix", "tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def listenOnDescription(reactor: Any, description: str, factory: IProtocolFactory, backlog: int) -> IListeningPort:
    """
    Listen on a server endpoint description.  Every endpoint tsmux expects
    (unix, tcp, systemd) listens synchronously, so errors surface at start.
    """
    try:
        endpoint = serverFromString(reactor, withBacklog(description, backlog))
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise StartupError(f"bad --listen {description!r}: {error}") from error
    outcome: list[Any] = []
    listening: defer.Deferred[IListeningPort] = endpoint.listen(factory)
    listening.addBoth(outcome.append)
    if not outcome:
        raise StartupError(f"--listen {description!r} did not start listening at once")
    (result,) = outcome
    if isinstance(result, Failure):
        raise StartupError(f"cannot listen on {description}: {result.getErrorMessage()}")
    return result


def _systemdArguments(description: str) -> dict[str, str]:
    arguments = {}
    for part in description.split(":")[1:]:
        key, equals, value = part.partition("=")
        if not equals:
            raise StartupError(f"bad --listen {description!r}: expected key=value after systemd:")
        arguments[key] = value
    return arguments


def listenOnSystemd(reactor: Any, description: str, factory: IProtocolFactory) -> IListeningPort:
    """
    Adopt a socket systemd passed (socket activation): C{systemd:domain=UNIX:index=N}
    or C{systemd:domain=UNIX:name=NAME} (C{FileDescriptorName=} in the unit).
    Other domains are left to Twisted's own C{systemd:} endpoint.
    """
    arguments = _systemdArguments(description)
    if arguments.get("domain", "").upper() != "UNIX":
        return listenOnDescription(reactor, description, factory, backlog=0)
    inherited = systemdInheritedDescriptors()
    descriptors = inherited.inheritedDescriptors()
    if not descriptors:
        raise StartupError(
            f"--listen {description}: systemd passed no sockets "
            "(LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES must all be set for this process)"
        )
    try:
        if "name" in arguments:
            fd = inherited.inheritedNamedDescriptors()[arguments["name"]]
        else:
            fd = descriptors[int(arguments.get("index", "0"))]
    except (KeyError, IndexError, ValueError):
        names = ", ".join(inherited.inheritedNamedDescriptors()) or "none"
        raise StartupError(
            f"--listen {description}: no such socket from systemd ({len(descriptors)} passed; names: {names})"
        ) from None
    os.set_blocking(fd, False)
    port, path = adoptSystemdUnixPort(reactor, fd, factory)
    if path and not path.startswith(b"\0"):
        port.mode = stat.S_IMODE(os.stat(path).st_mode)  # type: ignore[attr-defined]  # keep the unit's SocketMode
    port.startListening()
    os.close(fd)  # the port holds its own duplicate
    return port


def notifySystemd(message: str) -> bool:
    """
    sd_notify(3) without libsystemd: send C{message} (e.g. C{READY=1}) to
    C{$NOTIFY_SOCKET} if systemd set one.  @return: whether it was sent.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.connect(target)
        notify.sendall(message.encode())
    except OSError as error:
        log.warn("cannot notify systemd at {target}: {error}", target=target, error=error)
        return False
    finally:
        notify.close()
    return True
