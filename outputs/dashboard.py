"""``erc-stream dashboard``: the live view for supervisors and social-media teams, a Starlette app.

One page (``outputs/static/``: ``dashboard.html``, ``dashboard.js``, ``dashboard.css``; plain HTML and JavaScript,
nothing from a CDN, nothing inline) fed by server-sent events: every second the page gets a snapshot of
:class:`~outputs.live_state.LiveState` — the live conversations ranked by risk (filterable by tenant), the alert
feed with its evidence, per-tenant negative rates, and the stream's health (events/s, the reader's lag, the adapters
and versions in the events). A conversation's timeline comes from ``/api/conversations/{tenant}/{id}``, and then
only what changed: ``?after=<seq>`` (see :mod:`outputs.live_state`).

**Authentication**: bearer tokens. ``dashboard.token`` is the admin token (every tenant; a random one is made at
start when unset — and only then printed, with the URL); ``dashboard.tokens`` are tenant-scoped ones: every endpoint
answers such a request with its tenants' data only, and another tenant's conversation is a 404, as an unknown one.
A request carries its token as ``Authorization: Bearer <token>``, or as the ``erc_token`` cookie that
``GET /?token=<token>`` sets (browsers cannot put headers on an ``EventSource``): HttpOnly, SameSite=Strict, Secure
over HTTPS (or with ``dashboard.cookie_secure``), for ``dashboard.cookie_max_age_s``. Anything else gets 401. Only
``dashboard.auth = false`` turns it off. ``/healthz`` is open (it says only that the page is up).

**Hardening**: every response carries a Content-Security-Policy that allows only the page's own files (no inline
script or style, no framing), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: no-referrer``; the data answers are ``Cache-Control: no-store``. At most
``dashboard.max_streams`` event streams are served at a time (one more: 503).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.auth import token_ok
from core.records import Alert, EmotionEvent
from core.settings import DashboardSettings, Settings
from outputs.follow import Follower, Record
from outputs.live_state import LiveState

log = structlog.get_logger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE = STATIC / "dashboard.html"
COOKIE = "erc_token"
#: Seconds between two snapshots pushed to a page.
PUSH_S = 1.0

#: Only the page's own files: no inline script or style, no other origin, never in a frame.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-frame-options": "DENY", "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer"}


@dataclass(frozen=True)
class Access:
    """What a request may see: every tenant (``tenants`` None, the admin token or auth off) or these."""

    name: str
    tenants: frozenset[str] | None


ADMIN = Access("admin", None)


@dataclass(frozen=True)
class Tokens:
    """The tokens a request may carry: the admin one and the tenant-scoped ones (``dashboard.tokens``)."""

    admin: str
    generated: bool  # made at start (no dashboard.token): the only case where it is printed
    scoped: tuple[tuple[str, Access], ...] = ()

    def access(self, given: str | None) -> Access | None:
        """Whose token ``given`` is (each compared in constant time), None for no one's."""
        found = ADMIN if token_ok(given, self.admin) else None
        for secret, access in self.scoped:
            if token_ok(given, secret):
                found = access
        return found


def resolve_tokens(settings: Settings) -> Tokens | None:
    """The tokens requests must carry: the configured admin token (or a random one when none is) and the scoped
    ones; None with auth off."""
    d = settings.dashboard
    if not d.auth:
        return None
    scoped = tuple((t.token.get_secret_value(), Access(name, frozenset(t.tenants))) for name, t in d.tokens.items())
    if d.token is not None:
        return Tokens(d.token.get_secret_value(), False, scoped)
    return Tokens(secrets.token_urlsafe(24), True, scoped)


def page_url(host: str, port: int, tokens: Tokens | None) -> str:
    """The page's address as printed at start; with ``?token=`` only when the token was made at start (a configured
    one is the operator's to hand out: never printed, logged or written to the ready file)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    token = tokens.admin if tokens is not None and tokens.generated else None
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _bearer(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    return header[len("Bearer "):].strip()


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response (and ``Cache-Control: no-store`` outside ``/static/``): an
    ASGI wrapper around the whole app, so 401s, 404s, 503s and errors carry them too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static and "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, with_headers)


class Auth:
    """Lets a request through with a known token (as a header or the cookie), noting its :class:`Access` in
    ``request.state.access``; ``/?token=`` sets the cookie; anything else is a 401."""

    def __init__(self, app: ASGIApp, tokens: Tokens | None, settings: DashboardSettings) -> None:
        self.app = app
        self.tokens = tokens
        self.max_age = settings.cookie_max_age_s
        self.force_secure = settings.cookie_secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.tokens is None:
            state["access"] = ADMIN
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.url.path == "/healthz":
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if request.url.path == "/" and given is not None and (access := self.tokens.access(given)) is not None:
            response: Response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
            response.set_cookie(COOKIE, given, max_age=self.max_age, path="/", httponly=True, samesite="strict",
                                secure=self.force_secure or request.url.scheme == "https")
            log.info("dashboard login", token=access.name)
            await response(scope, receive, send)
            return
        access = (self.tokens.access(_bearer(request.headers.get("authorization")))
                  or self.tokens.access(request.cookies.get(COOKIE)))
        if access is None:
            response = JSONResponse(
                {"error": "unauthorized: send Authorization: Bearer <token>, or open /?token=<token>"},
                status_code=401, headers={"WWW-Authenticate": 'Bearer realm="erc-stream dashboard"'})
            await response(scope, receive, send)
            return
        state["access"] = access
        await self.app(scope, receive, send)


class _Streams:
    """Counts the open event streams, refusing one beyond ``limit`` (each holds a task and a snapshot a second)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def enter(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1  # no await between the check and this: the event loop cannot interleave another
        return True

    def leave(self) -> None:
        self.open -= 1


class _CountedStream(StreamingResponse):
    """A streaming response that gives its slot back however it ends (finished, client gone, cancelled)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def make_app(state: LiveState, tokens: Tokens | None, settings: DashboardSettings | None = None, *,
             lag: Callable[[], int | None] = lambda: None) -> ASGIApp:
    """The web app over ``state`` (``lag()``: the reader's lag, read at each snapshot)."""
    settings = settings or DashboardSettings()
    page_html = PAGE.read_text(encoding="utf-8")
    streams = _Streams(settings.max_streams)

    def access(request: Request) -> Access:
        return request.state.access

    def snapshot(request: Request) -> dict[str, Any]:
        state.lag = lag()
        tenant = request.query_params.get("tenant") or None
        return state.snapshot(tenant=tenant, allowed=access(request).tenants)

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html)

    async def api_state(request: Request) -> Response:
        return JSONResponse(snapshot(request))

    async def api_conversation(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        raw_after = request.query_params.get("after")
        try:
            after = int(raw_after) if raw_after is not None else None
        except ValueError:
            return JSONResponse({"error": "after: a number (the seq of the newest change the page has)"}, 400)
        found = state.conversation(None if tenant == "-" else tenant, request.path_params["conversation_id"],
                                   after=after, allowed=access(request).tenants)
        return JSONResponse(found) if found is not None else JSONResponse({"error": "unknown conversation"}, 404)

    async def stream(request: Request) -> Response:
        if not streams.enter():
            return JSONResponse(
                {"error": f"too many live pages: this dashboard serves {streams.limit} event streams at a time "
                          "(ERC_DASHBOARD__MAX_STREAMS); close another page or try again shortly"},
                status_code=503, headers={"Retry-After": "10"})

        async def events():
            while not await request.is_disconnected():
                yield f"data: {json.dumps(snapshot(request))}\n\n"
                await asyncio.sleep(PUSH_S)

        return _CountedStream(events(), media_type="text/event-stream", release=streams.leave,
                              headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    app = Starlette(routes=[Route("/", page), Route("/api/state", api_state), Route("/api/events", stream),
                            Route("/api/conversations/{tenant}/{conversation_id:path}", api_conversation),
                            Route("/healthz", healthz), Mount("/static", StaticFiles(directory=STATIC))])
    return SecurityHeaders(Auth(app, tokens, settings))


class Dashboard:
    """The page and its reader: a follower thread filling the state, uvicorn serving the app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = resolve_tokens(settings)
        self.state = LiveState(settings)
        k = settings.kafka
        topics = [k.output_topic, k.alerts_topic] + ([k.input_topic] if settings.dashboard.show_texts else [])
        self.follower = Follower(settings, group_id=settings.dashboard.group_id, topics=topics, handle=self._add,
                                 client="dashboard")
        self.app = make_app(self.state, self.tokens, settings.dashboard, lag=lambda: self.follower.last_lag)
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
        return page_url(self.settings.dashboard.host, port, self.tokens)

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
                t = self.tokens
                log.info("dashboard", url=self.url(port).split("?")[0],
                         auth="off" if t is None else "generated token" if t.generated else "configured token",
                         scoped_tokens=len(t.scoped) if t else 0)
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
