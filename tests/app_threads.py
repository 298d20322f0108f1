"""Running a real StreamApp in a thread for a test, and a one-shot delivery failure to inject into it."""

from __future__ import annotations

import threading
import time

from consumer.app import StreamApp
from consumer.delivery import DeliveryError, Emitter, Offsets


def start(app: StreamApp) -> tuple[threading.Thread, list[BaseException]]:
    """Run an app in a thread; what it raises lands in the returned list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def run_until(app: StreamApp, done, timeout_s: float = 60.0) -> None:
    """Run an app until ``done()`` holds (or the timeout), stop it, and fail on anything it raised."""
    thread, errors = start(app)
    deadline = time.monotonic() + timeout_s
    try:
        while not done() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
    finally:
        app.stop()
        thread.join(30)
    assert not errors, errors
    assert done(), f"timed out: {app.stats}"


class FailOnce:
    """A failing part to inject (``StreamApp(..., emitter=FailOnce(make_emitter(settings)))``): the real emitter,
    except that the first batch fails after its outputs were sent, before its commit."""

    def __init__(self, inner: Emitter) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.fired = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def finish(self, offsets: Offsets, consumer) -> None:
        if not self.fired:
            self.fired += 1
            raise DeliveryError("injected: broker lost after send")
        self.inner.finish(offsets, consumer)
