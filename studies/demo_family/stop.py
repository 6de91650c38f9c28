"""Ctrl-C and SIGTERM during a family build, delivered even when Python swallows the exception.

A signal handler's exception is raised in whatever Python code the main thread runs at that
moment; when that is a garbage-collector callback (hypothesis installs one) or a
``__del__``, Python prints "Exception ignored" and carries on, and an endless build would
never stop. So the handlers also record the signal, and :func:`raise_if_stopped`, called
between training steps and before the result is published, raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class BuildTerminated(SystemExit):
    """SIGTERM during a build: unwinds like Ctrl-C, so the temp folder and lock go."""


_received: list[int] = []  # signals received inside stop_on_signals (main thread only)


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else BuildTerminated(128 + signum)


def raise_if_stopped() -> None:
    """Raise the interrupt a handler recorded but could not deliver (see the module docstring)."""
    if _received:
        raise _exception(_received[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> BuildTerminated for the block, recorded too.

    Main thread only; a signal the process ignores (a background job's SIGINT) or handles
    in its own way stays as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _received.append(signum)
        raise _exception(signum)

    previous = {
        signum: signal.getsignal(signum)
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
        if signal.getsignal(signum) is default
    }
    for signum in previous:
        signal.signal(signum, handler)
    _received.clear()
    try:
        yield
    finally:
        _received.clear()
        for signum, old in previous.items():
            signal.signal(signum, old)
