"""One mapping from failures to SOCKS5 reply codes."""

from __future__ import annotations

import errno

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tsmux._errors import DialError, dialErrorFromFailure, dialErrorFromLocalAPI, failureReason
from tsmux._socks5 import Reply


class FailureMappingTests(SynchronousTestCase):
    def test_twistedErrors(self) -> None:
        cases = [
            (error.ConnectionRefusedError(), Reply.CONNECTION_REFUSED),
            (error.DNSLookupError("nope.example"), Reply.HOST_UNREACHABLE),
            (error.NoRouteError(), Reply.NETWORK_UNREACHABLE),
            (error.TimeoutError(), Reply.TTL_EXPIRED),
            (defer.TimeoutError(), Reply.TTL_EXPIRED),
            (error.ConnectError(osError=errno.EHOSTUNREACH), Reply.HOST_UNREACHABLE),
            (OSError(errno.ENETUNREACH, "Network is unreachable"), Reply.NETWORK_UNREACHABLE),
            (ValueError("odd"), Reply.GENERAL_FAILURE),
        ]
        for value, reply in cases:
            self.assertEqual(dialErrorFromFailure(Failure(value)).reply, reply, value)

    def test_dialErrorsPassThrough(self) -> None:
        original = DialError("x")
        self.assertIs(dialErrorFromFailure(Failure(original)), original)

    def test_reasonPrefersTheOSWords(self) -> None:
        self.assertEqual(failureReason(Failure(error.ConnectError(osError=errno.ENOENT))), "No such file or directory")

    def test_localAPIStatuses(self) -> None:
        self.assertEqual(dialErrorFromLocalAPI(403, "invalid localapi request").reply, Reply.NOT_ALLOWED)
        self.assertEqual(dialErrorFromLocalAPI(502, "").reply, Reply.GENERAL_FAILURE)
        self.assertEqual(dialErrorFromLocalAPI(502, "").reason, "tailscaled: 502 HTTP 502")

    def test_failedLookupIsHostUnreachable(self) -> None:
        body = "dial failure: lookup nas.example on 100.100.100.100:53: dial udp: network is unreachable"
        self.assertEqual(dialErrorFromLocalAPI(502, body).reply, Reply.HOST_UNREACHABLE)
