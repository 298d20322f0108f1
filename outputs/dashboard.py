"""``erc-stream dashboard``: the live view for supervisors and social-media teams, a Starlette app.

One page (``outputs/static/dashboard.html``, plain HTML and JavaScript, nothing from a CDN) fed by server-sent
events: every second the page gets a snapshot of :class:`~outputs.live_state.LiveState` — the live conversations
ranked by risk (filterable by tenant), the alert feed with its evidence, per-tenant negative rates, and the
stream's health (events/s, the reader's lag, the adapters and versions in the events). A conversation's timeline
comes from ``/api/conversations/{tenant}/{id}``.

Authentication: a bearer token (``dashboard.token``; a random one is made at start when unset, and printed with
the URL). A request carries it as ``Authorization: Bearer <token>``, or as the ``erc_token`` cookie that
``GET /?token=<token>`` sets (browsers cannot put headers on an ``EventSource``). Anything else gets 401. Only
``dashboard.auth = false`` turns it off. ``/healthz`` is open (it says only that the page is up).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from core.auth import bearer_ok, token_ok
from core.records import Alert, EmotionEvent
from core.settings import Settings
from outputs.follow import Follower, Record
from outputs.live_state import LiveState

log = structlog.get_logger(__name__)

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"
COOKIE = "erc_token"
#: Seconds between two snapshots pushed to a page.
PUSH_S = 1.0


def resolve_token(settings: Settings) -> str | None:
    """The token requests must carry: the configured one, a random one when none is, None with auth off."""
    d = settings.dashboard
    if not d.auth:
        return None
    return d.token.get_secret_value() if d.token else secrets.token_urlsafe(24)


class _Auth(BaseHTTPMiddleware):
    def __init__(self, app, token: str | None) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        if self.token is None or request.url.path == "/healthz":
            return await call_next(request)
        if request.url.path == "/" and token_ok(request.query_params.get("token"), self.token):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar and the history
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return response
        if bearer_ok(request.headers.get("authorization"), self.token) or token_ok(request.cookies.get(COOKIE),
                                                                                   self.token):
            return await call_next(request)
        return JSONResponse({"error": "unauthorized: send Authorization: Bearer <token>, or open /?token=<token>"},
                            status_code=401, headers={"WWW-Authenticate": 'Bearer realm="erc-stream dashboard"'})


def make_app(state: LiveState, token: str | None, *, lag=lambda: None) -> Starlette:
    """The web app over ``state`` (``lag()``: the reader's lag, read at each snapshot)."""

    def snapshot(request: Request) -> dict[str, Any]:
        state.lag = lag()
        tenant = request.query_params.get("tenant") or None
        return state.snapshot(tenant=tenant)

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def api_state(request: Request) -> Response:
        return JSONResponse(snapshot(request))

    async def api_conversation(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        found = state.conversation(None if tenant == "-" else tenant, request.path_params["conversation_id"])
        return JSONResponse(found) if found is not None else JSONResponse({"error": "unknown conversation"}, 404)

    async def stream(request: Request) -> Response:
        async def events():
            while not await request.is_disconnected():
                yield f"data: {json.dumps(snapshot(request))}\n\n"
                await asyncio.sleep(PUSH_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    return Starlette(
        routes=[Route("/", page), Route("/api/state", api_state), Route("/api/events", stream),
                Route("/api/conversations/{tenant}/{conversation_id:path}", api_conversation),
                Route("/healthz", healthz)],
        middleware=[Middleware(_Auth, token=token)],
    )


class Dashboard:
    """The page and its reader: a follower thread filling the state, uvicorn serving the app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.token = resolve_token(settings)
        self.state = LiveState(settings)
        k = settings.kafka
        topics = [k.output_topic, k.alerts_topic] + ([k.input_topic] if settings.dashboard.show_texts else [])
        self.follower = Follower(settings, group_id=settings.dashboard.group_id, topics=topics, handle=self._add,
                                 client="dashboard")
        self.app = make_app(self.state, self.token, lag=lambda: self.follower.last_lag)
        self._stop = threading.Event()
        self._server = None
        self._thread = threading.Thread(target=self._follow, name="dashboard-follower", daemon=True)

    def _add(self, record: Record) -> None:
        if isinstance(record, EmotionEvent):
            self.state.add_event(record)
        elif isinstance(record, Alert):
            self.state.add_alert(record)
        else:
            self.state.add_message(record)

    def _follow(self) -> None:
        try:
            self.follower.run(self._stop)
        finally:
            self.follower.close()

    def url(self, port: int) -> str:
        host = self.settings.dashboard.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def serve(self, *, on_ready=None) -> None:
        """Run until stopped (SIGINT/SIGTERM, or :meth:`stop`); ``on_ready(url)`` once it listens."""
        import uvicorn

        self._thread.start()
        d = self.settings.dashboard
        config = uvicorn.Config(self.app, host=d.host, port=d.port, log_level="warning", lifespan="off")
        server = self._server = uvicorn.Server(config)

        async def main() -> None:
            serving = asyncio.create_task(server.serve())
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if server.started:
                port = server.servers[0].sockets[0].getsockname()[1]
                log.info("dashboard", url=self.url(port).split("?")[0], auth=self.token is not None)
                if on_ready:
                    on_ready(self.url(port))
            await serving

        try:
            asyncio.run(main())
        finally:
            self._stop.set()
            self._thread.join(10)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._stop.set()
