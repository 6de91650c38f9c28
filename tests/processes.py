"""Helpers for tests that start the CLI in a subprocess and stop it as a user would."""

import signal


def ctrl_c_works() -> None:
    """``preexec_fn`` for a child the test will Ctrl-C (SIGINT).

    A shell starts background jobs with SIGINT ignored, and children inherit that: a suite
    run as ``bash .ci/run &`` would otherwise see every SIGINT test hang. Python turns a
    default SIGINT into KeyboardInterrupt, as in a terminal.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
