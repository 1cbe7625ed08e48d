"""
Reloading the config file, with a memory reactor: sockets matched by name,
added, removed, re-created or updated; a broken file or one that cannot be
applied changes nothing; connections on a replaced context drain.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tsmux._configfile import loadConfigFile
from tsmux._service import TsmuxService

from ._fakes import CallerTransport, TestCaseMixinBase, capturedEvents
from ._tsmuxprocess import shortDir


class ReloadMixin(TestCaseMixinBase):
    def setUp(self) -> None:
        # Short: trial's temporary directories are too deep for a Unix socket's path.
        self.directory = shortDir(self)
        self.file = os.path.join(self.directory, "tsmux.toml")
        self.reactor = MemoryReactorClock()
        self.events = capturedEvents(self)

    def write(self, *sockets: str, top: str = 'dialer = "direct"\n') -> None:
        text = top + "".join(f"[[socket]]\n{body}\n" for body in sockets)
        with open(self.file, "w") as file:
            file.write(text)

    def sock(self, name: str, extra: str = "") -> str:
        return f'listen = "{self.directory}/{name}.sock"\n{extra}'

    def start(self) -> TsmuxService:
        service = TsmuxService(loadConfigFile(self.file), self.reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def reload(self, service: TsmuxService) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        service.reload().addCallback(results.append)
        (result,) = results
        return result

    def listening(self) -> list[str]:
        return sorted(os.path.basename(path) for path, *_ in self.reactor.unixServers)


class ReloadTests(ReloadMixin, SynchronousTestCase):
    def test_addRemoveRecreateUpdate(self) -> None:
        self.write(self.sock("keep"), self.sock("gone"), self.sock("mode"), self.sock("rules"))
        service = self.start()
        self.assertEqual(list(service.listeners), ["keep", "gone", "mode", "rules"])
        oldRules = service.listeners["rules"].context
        gone = service.listeners["gone"].context
        self.write(
            self.sock("keep"),
            self.sock("mode", 'mode = "0600"'),
            self.sock("rules", 'rules = [{ deny = ["*:25"] }]'),
            self.sock("new"),
        )
        result = self.reload(service)
        self.assertTrue(result["reloaded"], result)
        self.assertEqual(
            (result["added"], result["removed"], result["re-created"], result["updated"]),
            (["new"], ["gone"], ["mode"], ["rules"]),
        )
        self.assertEqual(list(service.listeners), ["keep", "mode", "rules", "new"])
        self.assertEqual(
            result["summary"], "4 sockets, 1 rule; added new; removed gone; re-created mode; updated rules"
        )
        # The updated socket keeps its port; its factory builds connections with the new context.
        listener = service.listeners["rules"]
        self.assertIsNot(listener.context, oldRules)
        self.assertIs(listener.factory.context, listener.context)
        self.assertFalse(oldRules.accepting)
        self.assertFalse(gone.accepting)
        self.assertEqual(listener.context.ruleSet.count if listener.context.ruleSet else None, 1)
        (line,) = [e for e in self.events if "reloaded" in e.get("log_format", "")]
        self.assertIn("added new", line["summary"])

    def test_drainingContextLetGoWhenItsLastConnectionEnds(self) -> None:
        self.write(self.sock("a"))
        service = self.start()
        old = service.listeners["a"].context
        transport = CallerTransport(1000)
        protocol = service.listeners["a"].factory.buildProtocol(None)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.write(self.sock("a", 'offer = ["socks5"]'))
        self.assertEqual(self.reload(service)["updated"], ["a"])
        self.assertIn(old, service.shared.contexts)
        self.reactor.advance(1.1)
        self.assertIn(old, service.shared.contexts, "still has a connection")
        self.assertEqual(service.shared.openBySocket["a"], 1, "counted for the socket across the reload")
        from ._fakes import DONE

        protocol.connectionLost(DONE)
        self.reactor.advance(1.1)
        self.assertNotIn(old, service.shared.contexts)

    def test_brokenFileChangesNothing(self) -> None:
        self.write(self.sock("a", 'rules = [{ deny = ["*:25"] }]'))
        service = self.start()
        before = service.listeners["a"].context
        with open(self.file, "a") as file:
            file.write('dialr = "direct"\n')
        result = self.reload(service)
        self.assertFalse(result["reloaded"])
        self.assertIn("dialr: unknown key (did you mean 'dialer'?)", result["error"])
        self.assertIs(service.listeners["a"].context, before)
        errors = [e for e in self.events if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{self.file}:", errors[0]["errors"])

    def test_pathHeldByAnotherServerChangesNothing(self) -> None:
        self.write(self.sock("a"))
        service = self.start()
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(held.close)
        held.bind(f"{self.directory}/b.sock")
        held.listen(1)
        self.write(self.sock("a", 'offer = ["socks5"]'), self.sock("b"))
        result = self.reload(service)
        self.assertFalse(result["reloaded"])
        self.assertIn("another server is already listening", result["error"])
        self.assertEqual(list(service.listeners), ["a"])
        self.assertEqual(service.listeners["a"].config.offer, frozenset({"socks5", "http-connect", "localapi"}))

    def test_flagFormHasNothingToReload(self) -> None:
        from tsmux._config import Config

        service = TsmuxService(Config(listen=(f"{self.directory}/x.sock",), dialer=_direct()), self.reactor)
        result = self.reload(service)
        self.assertFalse(result["reloaded"])
        self.assertIn("no config file", result["error"])


def _direct() -> Any:
    from tsmux._config import DialerSpec

    return DialerSpec("direct")


class ReloadsTakeTurnsTests(ReloadMixin, SynchronousTestCase):
    def test_twoReloadsAtOnceTakeTurns(self) -> None:
        from twisted.internet.defer import Deferred

        self.write(self.sock("a"), self.sock("b"))
        service = self.start()
        stopping: Deferred[None] = Deferred()
        listener = service.listeners["a"]
        realStop = listener.stopListening

        def slowStop() -> Deferred[None]:
            realStop()
            return stopping

        listener.stopListening = slowStop  # type: ignore[method-assign]
        self.write(self.sock("b"))
        results: list[dict[str, Any]] = []
        service.reload().addCallback(results.append)
        service.reload().addCallback(results.append)
        self.assertEqual(results, [])
        stopping.callback(None)
        # The second ran after the first had applied everything (its result may be delivered first).
        self.assertEqual(
            sorted(r["summary"] for r in results),
            ["1 socket, 0 rules; nothing changed", "1 socket, 0 rules; removed a"],
        )
        self.assertEqual(list(service.listeners), ["b"])


class PasswordFilesTests(ReloadMixin, SynchronousTestCase):
    def test_aChangedPasswordFileIsReadAgain(self) -> None:
        """The file's path is the same, its contents are not: the socket is rebuilt, the old password gone."""
        secrets = os.path.join(self.directory, "socks.auth")
        with open(secrets, "w") as file:
            file.write("alice:oldpass\n")
        os.chmod(secrets, 0o600)
        self.write(self.sock("a", f'socks-auth = "{secrets}"'))
        service = self.start()
        credentials = service.listeners["a"].context.credentials
        assert credentials is not None
        self.assertTrue(credentials.check(b"alice", b"oldpass"))
        self.assertEqual(self.reload(service)["summary"], "1 socket, 0 rules; nothing changed")
        with open(secrets, "w") as file:
            file.write("alice:newpass\n")
        self.assertEqual(self.reload(service)["updated"], ["a"])
        credentials = service.listeners["a"].context.credentials
        assert credentials is not None
        self.assertFalse(credentials.check(b"alice", b"oldpass"))
        self.assertTrue(credentials.check(b"alice", b"newpass"))
        self.assertEqual(self.reload(service)["summary"], "1 socket, 0 rules; nothing changed", "read once more, same")
