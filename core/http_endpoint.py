"""The HTTP endpoint every long-running erc-stream process serves (the consumer, the notifier): ``/metrics`` in the
Prometheus text format, ``/healthz`` (liveness) and ``/readyz`` (readiness), in a daemon thread.

It knows nothing of what it serves: a :class:`Scraped` object gives the exposition and the time of its loop's last
beat, a ``ready()`` callable says whether the process is ready, and why.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.auth import bearer_ok

log = structlog.get_logger(__name__)


class Scraped(Protocol):
    """What the endpoint serves: the metrics' exposition, and the monotonic time the main loop last beat."""

    last_beat: float

    def exposition(self) -> bytes: ...


class HealthServer:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_http_server(
    metrics: Scraped,
    *,
    host: str,
    port: int,
    liveness_timeout_s: float,
    ready: Callable[[], tuple[bool, dict[str, object]]],
    token: str | None = None,
) -> HealthServer:
    """Serve the endpoints in a daemon thread. ``ready()`` says whether the consumer is ready, and why; with a
    ``token``, /metrics needs ``Authorization: Bearer <token>`` (401 otherwise)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if token is not None and not bearer_ok(self.headers.get("Authorization"), token):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="erc-stream"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                age = time.monotonic() - metrics.last_beat
                ok = age <= liveness_timeout_s
                self._json(200 if ok else 503, {"alive": ok, "loop_age_s": round(age, 3)})
            elif path == "/readyz":
                try:
                    ok, detail = ready()
                except Exception as e:  # noqa: BLE001 - a probe answers, it never raises
                    ok, detail = False, {"error": repr(e)}
                self._json(200 if ok else 503, {"ready": ok, **detail})
            else:
                self._send(404, b"not found\n", "text/plain")

        def _json(self, code: int, body: dict[str, object]) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not log lines
            return

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    server = HealthServer(httpd, thread)
    log.info("metrics endpoint", url=server.url, paths=["/metrics", "/healthz", "/readyz"])
    return server
