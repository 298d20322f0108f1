"""A local HTTP receiver for the notifier's tests: records every request, and fails on cue."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Serves ``/<target>`` on 127.0.0.1. ``fail[target]`` is a list of statuses answered to that target's first
    requests, in order (then 200); ``down_until[target]`` (a ``time.monotonic()`` deadline) answers 503 to every
    request until then; ``retry_after[target]`` is the ``Retry-After`` header of that target's 429s and 503s
    (default: "0" on 429, none on 503); ``refuse(target, body) -> int | None`` answers a final status for some
    alerts. ``received[target]`` holds the accepted requests' JSON bodies and ``Idempotency-Key`` headers, and
    ``received_at[target]`` when each came (``time.monotonic()``); ``requested_at[target]`` holds every request's
    time; ``on_accept(target, n)`` is called after a target's n-th accepted request (a test stops a client there)."""

    def __init__(self) -> None:
        self.fail: dict[str, list[int]] = defaultdict(list)
        self.refuse = lambda target, body: None
        self.received: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self.attempts: dict[str, int] = defaultdict(int)
        self.down_until: dict[str, float] = {}
        self.retry_after: dict[str, str] = {}
        self.received_at: dict[str, list[float]] = defaultdict(list)
        self.requested_at: dict[str, list[float]] = defaultdict(list)
        self.on_accept = lambda target, n: None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                target = self.path.strip("/")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with receiver._lock:
                    now = time.monotonic()
                    receiver.attempts[target] += 1
                    receiver.requested_at[target].append(now)
                    status = receiver.fail[target].pop(0) if receiver.fail[target] else None
                    if status is None and now < receiver.down_until.get(target, 0.0):
                        status = 503
                    if status is None:
                        status = receiver.refuse(target, body) or 200
                    if status == 200:
                        receiver.received[target].append((self.headers.get("Idempotency-Key", ""), body))
                        receiver.received_at[target].append(now)
                        receiver.on_accept(target, len(receiver.received[target]))
                self.send_response(status)
                wait = receiver.retry_after.get(target, "0" if status == 429 else None)
                if status in (429, 503) and wait is not None:
                    self.send_header("Retry-After", wait)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{target}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
