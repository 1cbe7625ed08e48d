"""
Waiting for something to happen, the one way the suite does it: poll a condition until it holds.

A fixed sleep is either too short (the test is flaky on a loaded machine) or too long (the suite
is slow everywhere); polling is neither. Two flavours of the same loop:

    - L{waitUntil}: blocks the calling thread; for process-level tests (C{SynchronousTestCase}
      driving a tsmux child process, or code already running in a thread).
    - L{waitUntilAsync}: returns a L{Deferred} and never blocks, so the reactor keeps running;
      for trial C{TestCase} tests (C{await waitUntilAsync(...)}, or C{yield} it under
      C{inlineCallbacks}).

Both return the condition's first true value (e.g. an accepted socket), and on timeout raise
L{WaitTimeout}, an C{AssertionError} whose message says what was awaited: C{what} is a string, or
a callable giving one (so that it can show the state at the time of the failure).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    # Imported when used, so that helper processes that only block (the tailnet's child) load
    # no Twisted.
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait unless told otherwise: long enough for a loaded CI machine."""

SYNC_INTERVAL = 0.02
"""Seconds between checks in L{waitUntil} (each check may be a /proc read or a log file read)."""

ASYNC_INTERVAL = 0.005
"""Seconds between checks in L{waitUntilAsync} (each check is usually an attribute lookup)."""

Description = str | Callable[[], str]


class WaitTimeout(AssertionError):
    """
    The condition did not hold in time; an C{AssertionError}, so trial and pytest report a failure.
    """


def _describe(what: Description) -> str:
    return what() if callable(what) else what


def _timedOut(timeout: float, what: Description) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:g} s waiting for {_describe(what)}")


def waitUntil(
    condition: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    what: Description = "the condition",
    interval: float = SYNC_INTERVAL,
) -> T:
    """
    Block until C{condition()} returns a true value, and return it.

    Not for a thread the reactor runs in: nothing happens there while this blocks (use
    L{waitUntilAsync}).

    @raise WaitTimeout: after C{timeout} seconds without a true value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timedOut(timeout, what)
        time.sleep(interval)


def waitUntilAsync(
    condition: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    what: Description = "the condition",
    interval: float = ASYNC_INTERVAL,
    reactor: IReactorTime | None = None,
) -> Deferred[T]:
    """
    A L{Deferred} that fires with C{condition()}'s first true value, checked now and then every
    C{interval} seconds with the reactor running; or fails with L{WaitTimeout} after C{timeout}
    seconds, or with whatever C{condition} raised. Cancelling it stops the polling.

    @param reactor: the reactor whose clock drives the polling; the global one by default.
    """
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    clock = reactor
    deadline = time.monotonic() + timeout
    pending: list[Any] = []

    def cancel(d: Deferred[T]) -> None:
        for call in pending:
            if call.active():
                call.cancel()

    result: Deferred[T] = Deferred(cancel)

    def check() -> None:
        pending.clear()
        try:
            value = condition()
        except BaseException:
            result.errback(Failure())
            return
        if value:
            result.callback(value)
        elif time.monotonic() > deadline:
            result.errback(_timedOut(timeout, what))
        else:
            pending.append(clock.callLater(interval, check))

    check()
    return result
