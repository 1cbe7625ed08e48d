"""The config file: every key, every error (all at once, with where), the flag form beside it."""

from __future__ import annotations

import grp
import os
import pwd

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tsmux._config import DialerSpec
from tsmux._configfile import ConfigError, loadConfigFile
from tsmux._options import Options

ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name

EXAMPLE = f"""
# top-level keys are defaults for every socket
localapi = "/var/run/tailscale/tailscaled.sock"
dialer = "localapi"
admins = ["uid:1234", "group:{ROOT_GROUP}"]
max-connections = 500

[[socket]]
name = "web"
listen = "/run/tsmux/web.sock"
mode = "0660"
group = "{ROOT_GROUP}"
offer = ["socks5", "http-connect"]
allow-callers = ["group:{ROOT_GROUP}", "uid:0"]
max-connections = 20
rules = [
  {{ allow = ["tag:prod:443", "db.example.ts.net:5432"], callers = ["user:{ROOT_USER}"] }},
  {{ allow = ["100.64.0.0/10:22", "*.internal.example:*"] }},
  {{ deny = ["*:*"] }},
]

[[socket]]
listen = "/run/tsmux/admin.sock"
mode = "0600"
dialer = "direct"
"""


class ConfigFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(text)
        return path

    def errors(self, text: str) -> list[str]:
        path = self.write(text)
        error = self.assertRaises(ConfigError, loadConfigFile, path)
        return [line.replace(path, "FILE") for line in error.errors]

    def test_example(self) -> None:
        daemon = loadConfigFile(self.write(EXAMPLE))
        self.assertEqual(daemon.summary(), "2 sockets, 3 rules")
        web, admin = daemon.sockets
        self.assertEqual((web.name, admin.name), ("web", "admin"))
        self.assertEqual(web.listen, ("/run/tsmux/web.sock",))
        self.assertEqual(web.mode, 0o660)
        self.assertEqual(admin.mode, 0o600)
        self.assertEqual(web.group, 0)
        self.assertEqual(web.offer, frozenset({"socks5", "http-connect"}))
        self.assertEqual(admin.offer, frozenset({"socks5", "http-connect", "localapi"}))
        self.assertEqual(web.dialer, DialerSpec("localapi"))
        self.assertEqual(admin.dialer, DialerSpec("direct"))
        self.assertIsNotNone(web.allowCallers)
        self.assertIsNone(admin.allowCallers)
        assert web.rules is not None
        self.assertEqual(len(web.rules), 3)
        self.assertEqual(admin.rules, ())
        self.assertEqual(web.socketMaxConnections, 20)
        self.assertIsNone(admin.socketMaxConnections)
        self.assertEqual(daemon.maxConnections, 500)
        self.assertEqual(daemon.adminUids, frozenset({1234}))
        self.assertEqual(daemon.adminGids, frozenset({0}))
        # Process-wide values reach every socket's Config, so a context reads one object.
        self.assertEqual(admin.adminUids, frozenset({1234}))
        self.assertEqual(admin.maxConnections, 500)

    def test_topLevelDefaultsAndOverrides(self) -> None:
        daemon = loadConfigFile(
            self.write(
                "dial-timeout = 3\nidle-timeout = 60.5\nsplice = false\n"
                '[[socket]]\nlisten = "/a/one.sock"\n'
                '[[socket]]\nlisten = "/a/two.sock"\ndial-timeout = 7\n'
            )
        )
        one, two = daemon.sockets
        self.assertEqual((one.dialTimeout, two.dialTimeout), (3.0, 7.0))
        self.assertEqual((one.idleTimeout, two.idleTimeout), (60.5, 60.5))
        self.assertFalse(one.splice)

    def test_topLevelRulesAreEverySocketsDefault(self) -> None:
        daemon = loadConfigFile(
            self.write(
                'rules = [{ deny = ["*:25"] }]\n[[socket]]\nlisten = "/a/one.sock"\n'
                '[[socket]]\nlisten = "/a/two.sock"\nrules = []\n'
            )
        )
        one, two = daemon.sockets
        self.assertEqual(len(one.rules or ()), 1)
        self.assertEqual(two.rules, ())
        self.assertEqual(daemon.summary(), "2 sockets, 1 rule")

    def test_syntaxErrorHasTheLine(self) -> None:
        (line,) = self.errors('[[socket]]\nlisten = "/a.sock"\nmode = 0660 x\n')
        self.assertTrue(line.startswith("FILE:3: "), line)

    def test_everyErrorAtOnceWithLinesAndKeyPaths(self) -> None:
        errors = self.errors(
            'dialr = "direct"\n'
            "[[socket]]\n"
            'listen = "/a/web.sock"\n'
            'mode = "999"\n'
            'offer = ["socks5", "gopher"]\n'
            "rules = [\n"
            '  { allow = ["fd7a:115c:a1e0::1:443"] },\n'
            "]\n"
            "[[socket]]\n"
            'listen = "/a/web.sock"\n'
        )
        text = "\n".join(errors)
        self.assertIn("FILE:1: dialr: unknown key (did you mean 'dialer'?)", text)
        self.assertIn("FILE:4: socket[1].mode:", text)
        self.assertIn("FILE:5: socket[1].offer: 'gopher' is not one of socks5, http-connect, localapi", text)
        self.assertIn("FILE:6: socket[1].rules[1]:", text)
        self.assertIn("bracket", text.lower())
        self.assertIn("socket[2].name: 'web' is already socket[1]'s name", text)
        self.assertIn("FILE:10: socket[2].listen: '/a/web.sock' is already where socket[1] listens", text)
        self.assertEqual(len(errors), 6, text)

    def test_unknownSocketKeySuggests(self) -> None:
        (line,) = self.errors('[[socket]]\nlisten = "/a/x.sock"\nallow-caller = ["*"]\n')
        self.assertEqual(line, "FILE:3: socket[1].allow-caller: unknown key (did you mean 'allow-callers'?)")

    def test_endpointNeedsAName(self) -> None:
        (line,) = self.errors('[[socket]]\nlisten = "tcp:1080:interface=127.0.0.1"\n')
        self.assertIn("socket[1].name: required", line)
        daemon = loadConfigFile(self.write('[[socket]]\nname = "tcp"\nlisten = "tcp:1080:interface=127.0.0.1"\n'))
        self.assertEqual(daemon.sockets[0].name, "tcp")

    def test_noSockets(self) -> None:
        (line,) = self.errors('dialer = "direct"\n')
        self.assertIn("socket: expected at least one [[socket]]", line)

    def test_badValues(self) -> None:
        errors = self.errors(
            "[[socket]]\n"
            'listen = "/a/x.sock"\n'
            "dial-timeout = -1\n"
            'dialer = "carrier-pigeon"\n'
            'dial-self = "maybe"\n'
            'group = "no-such-group-here"\n'
            "splice = 1\n"
            'allow-callers = ["user:no-such-user-here"]\n'
            'localapi = "relative.sock"\n'
            "max-connections = 0\n"
        )
        text = "\n".join(errors)
        self.assertIn("socket[1].dial-timeout: expected a positive number of seconds, got -1", text)
        self.assertIn("socket[1].dialer:", text)
        self.assertIn("socket[1].dial-self: expected one of refuse, direct, got 'maybe'", text)
        self.assertIn("socket[1].group: expected a group name or gid, got 'no-such-group-here' (no such group)", text)
        self.assertIn("socket[1].dialer: expected one of localapi, direct, socks5:ENDPOINT, nc, nc:CLI, got", text)
        self.assertIn("socket[1].splice: expected true or false, got 1", text)
        self.assertIn("socket[1].allow-callers:", text)
        self.assertIn("socket[1].localapi: expected an absolute path", text)
        self.assertIn("socket[1].max-connections: expected a positive whole number, got 0", text)
        self.assertEqual(len(errors), 8, text)

    def test_adminsMayNotBeEveryone(self) -> None:
        (line,) = self.errors('admins = ["*"]\n[[socket]]\nlisten = "/a/x.sock"\n')
        self.assertIn("admins: '*' would make everyone an admin", line)

    def test_unreadableAndNotUTF8(self) -> None:
        error = self.assertRaises(ConfigError, loadConfigFile, "/nonexistent/tsmux.toml")
        self.assertIn("cannot read", error.errors[0])
        path = self.mktemp()
        with open(path, "wb") as file:
            file.write(b'[[socket]]\nlisten = "/a/\xff.sock"\n')
        error = self.assertRaises(ConfigError, loadConfigFile, path)
        self.assertIn("not UTF-8", error.errors[0])


class FlagsAndFileTests(SynchronousTestCase):
    def test_flagFormIsOneSocketNamedAfterItsPath(self) -> None:
        options = Options()
        options.parseOptions(["--listen", "/run/tsmux/box.sock", "--dialer", "direct"])
        daemon = options.toDaemonConfig()
        (socket,) = daemon.sockets
        self.assertEqual(socket.name, "box")
        self.assertIsNone(socket.rules)
        self.assertIsNone(daemon.configFile)

    def test_configWithSocketFlagsIsOneLineError(self) -> None:
        for flags in (
            ["--listen", "/a.sock"],
            ["--mode", "0600"],
            ["--dialer", "direct"],
            ["--no-splice"],
            ["--mode", "0660"],  # the default's value, given: still a socket flag
            ["--dial-t", "10"],  # an abbreviation, as getopt takes it
        ):
            options = Options()
            error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", "/x.toml", *flags])
            self.assertIn(flags[0], str(error))
            self.assertNotIn("\n", str(error))

    def test_configWithLogFormat(self) -> None:
        path = self.mktemp()
        with open(path, "w") as file:
            file.write('[[socket]]\nlisten = "/a/x.sock"\n')
        options = Options()
        options.parseOptions(["--config", path, "--log-format", "json"])
        daemon = options.toDaemonConfig()
        self.assertEqual(daemon.logFormat, "json")
        self.assertEqual(daemon.configFile, path)
        self.assertEqual(daemon.sockets[0].logFormat, "json")

    def test_defaultMeansNoSocketFlags(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.socketFlagsGiven(), [])
        self.assertTrue(os.path.isabs(options.toConfig().listen[0]))


class FlagNamesInTheFileTests(SynchronousTestCase):
    def test_flagNamesSayWhatToWriteInstead(self) -> None:
        path = self.mktemp()
        with open(path, "w") as file:
            file.write('socks-allow-uid = [0]\n[[socket]]\nlisten = "/a/x.sock"\nno-splice = true\n')
        error = self.assertRaises(ConfigError, loadConfigFile, path)
        text = "\n".join(error.errors)
        self.assertIn("socks-allow-uid: unknown key (a flag; in a file: allow-callers, or rules with callers", text)
        self.assertIn("socket[1].no-splice: unknown key (a flag; in a file: splice = false)", text)
