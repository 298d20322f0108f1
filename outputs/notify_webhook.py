"""One POST to a webhook, safe against the receiver: whatever it answers, the notifier reads at most
``MAX_BODY_BYTES`` of it (raw, undecoded: a compressed body cannot inflate), and no error text it returns names the
target's URL or token (a Slack webhook URL is its own credential; logs and dead letters name the target).

A ``Retry-After`` on 429 and 503, in seconds or as an HTTP date, is handed back for the caller to wait on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

from core.settings import NotifyTarget

#: The most of a response body read (for the failure's reason); the rest is never read.
MAX_BODY_BYTES = 4096
#: Status codes worth another try besides 5xx (the rest of 4xx is a refusal).
RETRY_STATUS = frozenset({408, 425, 429})
#: Status codes whose Retry-After is honoured.
RETRY_AFTER_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    reason: str = ""  # why not (scrubbed of the target's URL and token)
    final: bool = False  # a refusal: no retry
    retry_after_s: float | None = None  # what the target asked to wait
    label: str = ""  # the failure's metric label: a status code or an exception's class


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date; None when absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def scrub(text: str, target: NotifyTarget) -> str:
    """``text`` without the target's URL, its path and query (where webhooks keep their credential) and token."""
    url = target.url.get_secret_value()
    parts = urlsplit(url)
    secrets = [url, parts.netloc + parts.path, parts.query, parts.path if len(parts.path) > 1 else ""]
    if target.token is not None:
        secrets.append(target.token.get_secret_value())
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


def headers(target: NotifyTarget, key: str, kind: str) -> dict[str, str]:
    out = {"Idempotency-Key": key, "Content-Type": "application/json", "Accept-Encoding": "identity",
           "X-ERC-Notification": kind, "User-Agent": "erc-stream-notify"}
    if target.token is not None:
        out["Authorization"] = f"Bearer {target.token.get_secret_value()}"
    return out


def post(client: httpx.Client, target: NotifyTarget, body: dict, head: dict[str, str], *, timeout_s: float) -> Outcome:
    """POST ``body`` to ``target``: delivered (2xx), or why not and whether to try again."""
    try:
        with client.stream("POST", target.url.get_secret_value(), content=json.dumps(body).encode(),
                           headers=head) as r:
            if r.is_success:
                return Outcome(True)
            text = _head(r, timeout_s)
    except httpx.HTTPError as e:  # timeouts, refused connections, protocol errors: worth another try
        return Outcome(False, scrub(f"{type(e).__name__}: {e}", target), label=type(e).__name__)
    except httpx.InvalidURL as e:  # will not get better
        return Outcome(False, scrub(f"InvalidURL: {e}", target), final=True, label="InvalidURL")
    status = r.status_code
    wait = retry_after(r.headers.get("Retry-After")) if status in RETRY_AFTER_STATUS else None
    reason = scrub(f"HTTP {status}: {text[:200]}", target)
    final = status < 500 and status not in RETRY_STATUS
    return Outcome(False, reason, final=final, retry_after_s=wait, label=str(status))


def _head(r: httpx.Response, timeout_s: float) -> str:
    """The start of an error body: at most MAX_BODY_BYTES, read for at most ``timeout_s``."""
    got = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        for chunk in r.iter_raw(1024):
            got += chunk
            if len(got) >= MAX_BODY_BYTES or time.monotonic() > deadline:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    return bytes(got[:MAX_BODY_BYTES]).decode("utf-8", "replace")
