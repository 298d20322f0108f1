"""The dashboard's HTTP surface, served by a real uvicorn over a filled :class:`LiveState` (no broker needed):
security headers on every answer, the login cookie, tenant-scoped tokens on every endpoint, the cap on event
streams, incremental timelines, and which token is ever printed."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from core.records import Alert, AlertEvidence, ChatMessage
from core.settings import Settings
from erc_stream.cli import main
from outputs.dashboard import CSP, PAGE, STATIC, make_app, page_url, resolve_tokens
from outputs.live_state import LiveState
from tests.outputs.test_live_state import NOW, _event

ADMIN = "admin-token-8d2e41"
ACME = "acme-supervisors-token-5b7c"
SCOPED = {"acme-sup": {"token": ACME, "tenants": ["acme"]}}


def _settings(**dashboard: object) -> Settings:
    return Settings().with_overrides(dashboard={"token": ADMIN, "tokens": SCOPED, "show_texts": True, **dashboard})


def _filled(settings: Settings) -> LiveState:
    state = LiveState(settings)
    for t, label in enumerate(["neutral", "angry", "angry"]):
        state.add_event(_event("acme-1", t, label))
    for t in range(4):
        state.add_event(_event("beta-1", t, "angry", tenant="beta"))
    state.add_event(_event("nobody-1", 0, "sad", tenant=None))
    for tenant, conv in (("acme", "acme-1"), ("beta", "beta-1"), (None, "nobody-1")):
        state.add_alert(Alert(alert_id=f"alert-{conv}", rule="negative_streak", summary=f"streak in {conv}",
                              conversation_id=conv, tenant=tenant, trigger_message_id=f"{conv}:0", label_set="meld",
                              model="m", evidence=[AlertEvidence(message_id=f"{conv}:0", conversation_id=conv, turn=0,
                                                                 speaker="Dana", label="angry", probability=0.7)]))
    return state


@contextlib.contextmanager
def _serving(settings: Settings, state: LiveState | None = None) -> Iterator[str]:
    """The app on a free port of 127.0.0.1, in a thread; its base URL."""
    app = make_app(state or _filled(settings), resolve_tokens(settings), settings.dashboard)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _first_event(client: httpx.Client, url: str, headers: dict[str, str]) -> dict:
    with client.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[len("data: "):])
    raise AssertionError("no event")


def _assert_hardened(r: httpx.Response) -> None:
    h = r.headers
    assert h["content-security-policy"] == CSP, r.url
    assert (h["x-frame-options"], h["x-content-type-options"], h["referrer-policy"]) == ("DENY", "nosniff",
                                                                                         "no-referrer"), r.url


def test_every_answer_carries_the_security_headers_and_the_page_has_nothing_inline() -> None:
    assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
    html = PAGE.read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and not re.search(r"\sstyle=", html), "inline style"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert {"dashboard.js", "dashboard.css"} <= {p.name for p in STATIC.iterdir()}

    with _serving(_settings()) as base, httpx.Client(base_url=base, timeout=5) as c:
        answers = {
            "page": c.get("/", headers=_bearer(ADMIN)), "api": c.get("/api/state", headers=_bearer(ADMIN)),
            "script": c.get("/static/dashboard.js", headers=_bearer(ADMIN)),
            "style": c.get("/static/dashboard.css", headers=_bearer(ADMIN)),
            "timeline": c.get("/api/conversations/acme/acme-1", headers=_bearer(ADMIN)),
            "health": c.get("/healthz"), "refused": c.get("/api/state"),
            "unknown": c.get("/api/conversations/acme/nope", headers=_bearer(ADMIN)),
            "login": c.get("/", params={"token": ADMIN}),
        }
        codes = {name: r.status_code for name, r in answers.items()}
        assert codes == {"page": 200, "api": 200, "script": 200, "style": 200, "timeline": 200, "health": 200,
                         "refused": 401, "unknown": 404, "login": 303}
        for r in answers.values():
            _assert_hardened(r)
        assert answers["script"].headers["content-type"].startswith("text/javascript")
        assert answers["style"].headers["content-type"].startswith("text/css")
        assert answers["api"].headers["cache-control"] == "no-store"
        assert '<script src="/static/dashboard.js"' in answers["page"].text
        with c.stream("GET", "/api/events", headers=_bearer(ADMIN)) as stream:
            _assert_hardened(stream)


def test_the_login_cookie_is_httponly_strict_secure_over_tls_and_expires() -> None:
    with _serving(_settings(cookie_max_age_s=3600)) as base, httpx.Client(base_url=base, timeout=5) as c:
        plain = c.get("/", params={"token": ACME}).headers["set-cookie"]
        assert plain.startswith(f"erc_token={ACME};") and "HttpOnly" in plain and "SameSite=strict" in plain
        assert "Max-Age=3600" in plain and "Secure" not in plain  # plain HTTP on 127.0.0.1: a browser would drop it
        # behind a TLS-terminating proxy on this host (uvicorn trusts X-Forwarded-Proto from 127.0.0.1)
        tls = c.get("/", params={"token": ACME}, headers={"X-Forwarded-Proto": "https"}).headers["set-cookie"]
        assert "Secure" in tls and "HttpOnly" in tls
        c.cookies.clear()
        assert c.get("/", params={"token": "wrong-token-000000"}).status_code == 401
    with _serving(_settings(cookie_secure=True)) as base, httpx.Client(base_url=base, timeout=5) as c:
        assert "Secure" in c.get("/", params={"token": ADMIN}).headers["set-cookie"]


def test_a_scoped_token_sees_only_its_tenants_everywhere() -> None:
    with _serving(_settings()) as base, httpx.Client(base_url=base, timeout=5) as c:
        admin = c.get("/api/state", headers=_bearer(ADMIN)).json()
        assert {x["conversation_id"] for x in admin["conversations"]} == {"acme-1", "beta-1", "nobody-1"}
        assert admin["tenants"] == ["acme", "beta"] and admin["health"]["events"] == 8
        assert admin["health"]["alerts"] == 3 and set(admin["negative_rate"]) == {"acme", "beta", "None"}

        for how in ({"headers": _bearer(ACME)}, {"headers": {"Cookie": f"erc_token={ACME}"}}):
            mine = c.get("/api/state", **how).json()
            assert [x["conversation_id"] for x in mine["conversations"]] == ["acme-1"]
            assert [a["alert_id"] for a in mine["alerts"]] == ["alert-acme-1"]
            assert set(mine["negative_rate"]) == {"acme"} and mine["tenants"] == ["acme"]
            assert (mine["health"]["events"], mine["health"]["alerts"]) == (3, 1)
        # the tenant filter cannot widen a scope
        other = c.get("/api/state", params={"tenant": "beta"}, headers=_bearer(ACME)).json()
        assert other["conversations"] == [] and other["alerts"] == [] and other["negative_rate"] == {}
        # another tenant's conversation, or one without a tenant: as unknown as one that does not exist
        unknown = c.get("/api/conversations/acme/no-such-conversation", headers=_bearer(ACME))
        for path in ("/api/conversations/beta/beta-1", "/api/conversations/-/nobody-1"):
            r = c.get(path, headers=_bearer(ACME))
            assert (r.status_code, r.json()) == (404, unknown.json()), path
            assert c.get(path, headers=_bearer(ADMIN)).status_code == 200
        assert c.get("/api/conversations/acme/acme-1", headers=_bearer(ACME)).json()["tenant"] == "acme"
        # the live stream too
        pushed = _first_event(c, "/api/events", _bearer(ACME))
        assert [x["conversation_id"] for x in pushed["conversations"]] == ["acme-1"]
        assert {a["tenant"] for a in pushed["alerts"]} == {"acme"} and pushed["health"]["events"] == 3


def test_event_streams_are_capped_and_a_closed_one_frees_its_place() -> None:
    with _serving(_settings(max_streams=2)) as base, httpx.Client(base_url=base, timeout=5) as c:
        with contextlib.ExitStack() as open_streams:
            readers = []  # kept: a line iterator that is dropped closes its stream
            for _ in range(2):
                r = open_streams.enter_context(c.stream("GET", "/api/events", headers=_bearer(ADMIN)))
                assert r.status_code == 200
                readers.append(r.iter_lines())
                assert next(readers[-1]).startswith("data: ")
            refused = c.get("/api/events", headers=_bearer(ADMIN))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
            assert "too many live pages" in refused.json()["error"] and "MAX_STREAMS" in refused.json()["error"]
            _assert_hardened(refused)
            assert c.get("/api/state", headers=_bearer(ADMIN)).status_code == 200  # the rest still answers
        deadline = time.monotonic() + 10  # the server notices the closed ones within a push interval
        while time.monotonic() < deadline:
            with c.stream("GET", "/api/events", headers=_bearer(ADMIN)) as r:
                if r.status_code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("a stream's place was not given back after it closed")


def test_a_timeline_is_fetched_incrementally() -> None:
    settings = _settings()
    state = _filled(settings)
    with _serving(settings, state) as base, httpx.Client(base_url=base, timeout=5) as c:
        full = c.get("/api/conversations/acme/acme-1", headers=_bearer(ACME)).json()
        assert [t["turn"] for t in full["turns"]] == [0, 1, 2] and full["kept"] == 3
        nothing = c.get("/api/conversations/acme/acme-1", params={"after": full["seq"]}, headers=_bearer(ACME))
        assert nothing.json()["turns"] == [] and nothing.json()["seq"] == full["seq"]
        state.add_event(_event("acme-1", 3, "angry"))
        more = c.get("/api/conversations/acme/acme-1", params={"after": full["seq"]}, headers=_bearer(ACME)).json()
        assert [t["turn"] for t in more["turns"]] == [3] and more["kept"] == 4 and more["seq"] > full["seq"]
        # a text that comes after its event changes that turn: it is sent again, under its first id
        state.add_message(ChatMessage(message_id="acme-1:3", conversation_id="acme-1", turn=3, speaker="Dana",
                                      text="still waiting", sent_at=NOW, tenant="acme"))
        text = c.get("/api/conversations/acme/acme-1", params={"after": more["seq"]}, headers=_bearer(ACME)).json()
        assert [(t["id"], t["text"]) for t in text["turns"]] == [(more["turns"][0]["id"], "still waiting")]
        bad = c.get("/api/conversations/acme/acme-1", params={"after": "x"}, headers=_bearer(ACME))
        assert bad.status_code == 400


def test_only_a_generated_token_is_printed_and_config_masks_the_scoped_ones() -> None:
    configured = resolve_tokens(_settings())
    assert configured is not None and not configured.generated
    assert page_url("0.0.0.0", 8090, configured) == "http://127.0.0.1:8090/"
    made = resolve_tokens(Settings().with_overrides(dashboard={"tokens": SCOPED}))
    assert made is not None and made.generated and len(made.admin) >= 24
    assert page_url("127.0.0.1", 8090, made) == f"http://127.0.0.1:8090/?token={made.admin}"
    assert page_url("127.0.0.1", 8090, None) == "http://127.0.0.1:8090/"

    result = CliRunner().invoke(main, ["config"], env={"ERC_DASHBOARD__TOKEN": ADMIN,
                                                       "ERC_DASHBOARD__TOKENS": json.dumps(SCOPED)})
    assert result.exit_code == 0, result.output
    assert ADMIN not in result.output and ACME not in result.output
    shown = json.loads(result.output)["dashboard"]
    assert shown["tokens"] == {"acme-sup": {"token": "**********", "tenants": ["acme"]}}


def test_scoped_tokens_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match="16 characters") as short:
        Settings().with_overrides(dashboard={"tokens": {"x": {"token": "short-one", "tenants": ["acme"]}}})
    assert "short-one" not in str(short.value)  # the error does not echo the secret
    with pytest.raises(ValueError, match="its own secret") as same:
        Settings().with_overrides(dashboard={"token": ACME, "tokens": SCOPED})
    assert ACME not in str(same.value)
    with pytest.raises(ValueError):
        Settings().with_overrides(dashboard={"tokens": {"x": {"token": ACME, "tenants": []}}})
