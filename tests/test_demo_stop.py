"""A Ctrl-C that lands where Python swallows exceptions still stops a family build.

CI under load once lost the KeyboardInterrupt of ``test_an_interrupted_rebuild_...[ctrl-c]``
inside hypothesis's garbage-collector callback ("Exception ignored in ... gc_callback"),
and the endless build ran into the 900 s timeout.
"""

from __future__ import annotations

import signal
import sys

import pytest

from studies.demo_family.stop import BuildTerminated, raise_if_stopped, stop_on_signals


class _SignalsInDel:
    """Raises a signal from ``__del__``, where Python reports and drops any exception."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        signal.raise_signal(self.signum)
        for _ in range(10_000):  # the Python-level handler runs at the next bytecode check: here
            pass


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, BuildTerminated)])
def test_a_swallowed_interrupt_is_raised_at_the_next_check(
    signum: int, raised: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: swallowed.append(info.exc_value))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Ray's driver installs its own
    try:
        with stop_on_signals():
            obj = _SignalsInDel(signum)
            del obj  # the handler's exception is swallowed here ...
            assert [type(e) for e in swallowed] == [raised]
            with pytest.raises(raised):
                raise_if_stopped()  # ... and delivered here
        raise_if_stopped()  # outside the block nothing is pending
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def test_signals_the_process_ignores_stay_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
