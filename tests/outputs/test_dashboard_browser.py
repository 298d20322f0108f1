"""The dashboard in a real browser (Debian's chromium driven by Playwright), fed by the real broker: events appear
on the page within seconds, a timeline grows by the new turns only, an alert appears in the feed with its evidence,
requests without the token are refused, the page runs under its Content-Security-Policy without a violation, and a
tenant-scoped token's page shows only its tenant's conversations."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.records import Alert, AlertEvidence
from core.settings import Settings
from outputs.dashboard import CSP, Dashboard
from tests.kafka_helpers import produce_raw
from tests.outputs.test_live_state import _event

TOKEN = "test-token-3f9c"
ACME_TOKEN = "acme-only-token-6a1f0e"
HARDENING = {"content-security-policy": CSP, "x-frame-options": "DENY", "x-content-type-options": "nosniff",
             "referrer-policy": "no-referrer"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (`make setup` installs it where apt-get can)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def dashboard(settings: Settings):
    settings = settings.with_overrides(dashboard={
        "port": 0, "token": TOKEN, "group_id": f"{settings.kafka.group_id}-ui",
        "tokens": {"acme-supervisors": {"token": ACME_TOKEN, "tenants": ["acme"]}}})
    board = Dashboard(settings)
    ready: list[str] = []
    thread = threading.Thread(target=board.serve, kwargs={"on_ready": ready.append}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready, "the dashboard did not start"
    yield settings, ready[0]
    board.stop()
    thread.join(15)


def test_live_events_and_alerts_appear_and_the_token_is_required(dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    settings, url = dashboard
    assert "token" not in url  # a configured token is never printed
    base = url.rstrip("/")
    # no token, a wrong one: refused (the page, its API and its stream)
    for path in ("/", "/api/state", "/api/events", "/api/conversations/acme/call-1"):
        assert httpx.get(base + path, timeout=5).status_code == 401, path
        assert httpx.get(base + path, headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
    assert httpx.get(base + "/?token=nope", timeout=5).status_code == 401
    assert httpx.get(base + "/api/state", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 200
    assert httpx.get(base + "/healthz", timeout=5).status_code == 200

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            anonymous = browser.new_page()
            assert anonymous.goto(base + "/").status == 401
            page = browser.new_page()
            blocked: list[str] = []  # what the Content-Security-Policy refused (an inline script or style would be)
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            timeline_requests: list[str] = []
            page.on("request", lambda r: timeline_requests.append(r.url) if "/api/conversations/" in r.url else None)
            response = page.goto(f"{base}/?token={TOKEN}")  # sets the cookie, then loads without it in the address
            assert "token" not in page.url
            assert response is not None and response.status == 200
            for name, value in HARDENING.items():  # the page, its script and style, its API
                assert response.headers[name] == value, name
                for path in ("/static/dashboard.js", "/static/dashboard.css", "/api/state"):
                    assert page.request.get(base + path).headers[name] == value, (path, name)
            expect(page.locator("h1")).to_have_text("erc-stream · live conversations")

            # Events produced now, while the page is open: they appear within seconds.
            turns = ["neutral", "angry", "angry", "angry"]
            produce_raw(settings, settings.kafka.output_topic,
                        [(b"call-1", _event("call-1", t, label).to_bytes()) for t, label in enumerate(turns)]
                        + [(b"chat-9", _event("chat-9", 0, "joyful", tenant="beta").to_bytes())])
            row = page.locator('tr.conv[data-key="acme/call-1"]')
            expect(row).to_be_visible(timeout=10_000)
            expect(row.locator("td.risk")).to_have_text("3")
            expect(page.locator("tr.conv").first).to_have_attribute("data-key", "acme/call-1")  # the riskiest first
            expect(page.locator("#events")).to_have_text("5", timeout=10_000)
            expect(page.locator("#adapters")).to_contain_text("meld-smollm2-lora@abc123")

            row.click()
            expect(page.locator("#timeline .turn")).to_have_count(4, timeout=5_000)
            expect(page.locator("#timeline .turn.negative")).to_have_count(3)
            expect(page.locator("#timeline .turn").last).to_contain_text("angry")
            # a new turn: the page asks for what changed since its newest, and appends it
            produce_raw(settings, settings.kafka.output_topic, [(b"call-1", _event("call-1", 4, "sad").to_bytes())])
            expect(page.locator("#timeline .turn")).to_have_count(5, timeout=10_000)
            expect(page.locator("#timeline .turn").last).to_contain_text("sad")
            assert "after=" not in timeline_requests[0] and timeline_requests[1:]
            assert all("after=" in u for u in timeline_requests[1:]), timeline_requests

            alert = Alert(alert_id="alert-1", rule="negative_streak", severity="critical",
                          summary="3 negative turns in a row by the customer", conversation_id="call-1",
                          tenant="acme", trigger_message_id="call-1:3", label_set="meld", model="smollm2-135m",
                          evidence=[AlertEvidence(message_id=f"call-1:{t}", conversation_id="call-1", turn=t,
                                                  speaker="Dana", label="angry", probability=0.82)
                                    for t in (1, 2, 3)])
            produce_raw(settings, settings.kafka.alerts_topic, [(b"call-1", alert.to_bytes())] * 2)  # and a copy
            feed = page.locator('[data-alert="alert-1"]')
            expect(feed).to_be_visible(timeout=10_000)
            expect(feed).to_contain_text("3 negative turns in a row by the customer")
            expect(feed.locator(".evidence-item")).to_have_count(3)
            expect(feed.locator(".evidence-item").first).to_contain_text("#1 Dana: angry 82 %")
            expect(page.locator("#alerts")).to_have_text("1")  # the copy is dropped

            page.select_option("#tenant", "beta")  # the tenant filter
            expect(page.locator("tr.conv")).to_have_count(1, timeout=5_000)
            expect(page.locator("tr.conv").first).to_have_attribute("data-key", "beta/chat-9")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert not blocked, blocked
        finally:
            browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_a_tenant_scoped_token_sees_only_its_tenant(dashboard) -> None:
    from playwright.sync_api import expect, sync_playwright

    settings, url = dashboard
    base = url.rstrip("/")
    produce_raw(settings, settings.kafka.output_topic,
                [(f"acme-{i}".encode(), _event(f"acme-{i}", 0, "angry").to_bytes()) for i in range(2)]
                + [(f"beta-{i}".encode(), _event(f"beta-{i}", t, "angry", tenant="beta").to_bytes())
                   for i in range(3) for t in range(3)]  # riskier than acme's: first on an admin's page
                + [(b"nobody", _event("nobody", 0, "sad", tenant=None).to_bytes())])
    alert = Alert(alert_id="beta-alert", rule="negative_streak", summary="beta's streak", conversation_id="beta-0",
                  tenant="beta", trigger_message_id="beta-0:2", label_set="meld", model="smollm2-135m",
                  evidence=[AlertEvidence(message_id="beta-0:2", conversation_id="beta-0", turn=2, speaker="Dana",
                                          label="angry", probability=0.9)])
    produce_raw(settings, settings.kafka.alerts_topic, [(b"beta-0", alert.to_bytes())])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            admin = browser.new_context().new_page()
            admin.goto(f"{base}/?token={TOKEN}")
            expect(admin.locator("tr.conv")).to_have_count(6, timeout=15_000)  # every tenant's, once all are in
            expect(admin.locator('[data-alert="beta-alert"]')).to_be_visible(timeout=10_000)

            page = browser.new_context().new_page()  # its own cookie jar: the scoped token's cookie
            page.goto(f"{base}/?token={ACME_TOKEN}")
            expect(page.locator("#events")).to_have_text("2", timeout=15_000)  # acme's events only
            rows = page.locator("tr.conv")
            expect(rows).to_have_count(2)
            assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.key)")) == ["acme/acme-0", "acme/acme-1"]
            assert page.locator("#tenant option").evaluate_all("os => os.map(o => o.value)") == ["", "acme"]
            expect(page.locator("#alert-feed")).to_contain_text("No alert yet.")
            assert "beta" not in page.locator("#rates").inner_text()
            # another tenant's conversation, asked for from the page itself: as unknown as a missing one
            status = "(p) => fetch(p, {credentials: 'same-origin'}).then(r => r.status)"
            assert page.evaluate(status, "/api/conversations/beta/beta-0") == 404
            assert page.evaluate(status, "/api/conversations/-/nobody") == 404
            assert page.evaluate(status, "/api/conversations/acme/acme-0") == 200
            assert admin.evaluate(status, "/api/conversations/beta/beta-0") == 200
            time.sleep(1.5)  # a few more pushes: still only acme's
            expect(rows).to_have_count(2)
            expect(page.locator("#events")).to_have_text("2")
        finally:
            browser.close()
