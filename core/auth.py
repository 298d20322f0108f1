"""Bearer tokens: how the HTTP endpoints (consumer metrics, the dashboard, the notifier's metrics) check a request."""

from __future__ import annotations

import hmac


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``Bearer <token>`` (compared in constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return token_ok(header[len("Bearer "):].strip(), token)


def token_ok(given: str | None, token: str) -> bool:
    """Whether ``given`` is ``token`` (constant time; None never is)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
