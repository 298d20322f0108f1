"""Waiting in a test for something another thread or process does: poll the condition itself, with a deadline.

A fixed ``time.sleep`` before checking races what it waits for (a slow machine misses it, a fast one wastes
the time); :func:`wait_for` returns as soon as the condition holds and fails with what it waited for, and the
state it saw, once the deadline passes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], *, timeout_s: float, what: str,
             state: Callable[[], object] | None = None, thread: threading.Thread | None = None,
             interval_s: float = 0.05) -> None:
    """Until ``condition()`` is truthy; an AssertionError naming ``what`` (and ``state()``, the thing to look at
    when it fails) after ``timeout_s``, or at once when ``thread`` (the one that should make it hold) has ended."""
    def seen() -> str:
        return f"; {state()}" if state is not None else ""

    deadline = time.monotonic() + timeout_s
    while not condition():
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"{thread.name} ended before {what}{seen()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{seen()}")
        time.sleep(interval_s)
