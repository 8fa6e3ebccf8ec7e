"""A per-call wall-clock limit for tests of code that used to hang (SIGALRM, main thread)."""

import signal
from contextlib import contextmanager


class Hang(BaseException):
    """Raised when the limit passes; a BaseException so that no ``except Exception`` swallows it."""


@contextmanager
def deadline(seconds: float):
    def _fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
