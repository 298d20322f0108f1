"""What the notifier POSTs: one alert, or a summary folding several alerts of one (tenant, rule) group.

A single alert goes as the alert record (``kind: json``) or as Slack text (``kind: slack``), as it always did. A
summary (``"kind": "alert_summary"``) says how many alerts it folds, lists every folded id (``alert_ids``, at most
``notify.summary_max_alerts``) and shows the first ``notify.summary_list`` in detail; its Slack text shows those
and counts the rest.

Slack reads ``<...>`` in a message as a mention (``<!channel>``, ``<@U123>``) or a link (``<https://x|label>``)
and ``&`` as the start of an entity. Every value that came from a chat message or an alert (conversation ids,
tenants, speakers, summaries, labels, rules, ids) is escaped the way Slack asks (``&amp;``, ``&lt;``, ``&gt;``) and
kept on one line, so a display name cannot ping a channel, hide a link or forge a line of the message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import cached_property

from core.records import Alert
from core.settings import NotifyTarget

#: Summary ids: uuid5 of the target and the folded alert ids (the same fold, the same Idempotency-Key).
SUMMARY_NAMESPACE = uuid.UUID("6d0f1a52-93c4-4e07-b1a8-2f5e7c9d3b14")

#: Evidence lines a Slack alert shows.
SLACK_EVIDENCE = 5

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def slack_escape(value: object) -> str:
    """``value`` as Slack shows it literally: ``&``, ``<`` and ``>`` as entities (no mention, link or entity)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _line(value: object) -> str:
    """Escaped, on one line: a newline in a speaker's name must not start a line that looks like the notifier's."""
    return slack_escape(_CONTROL.sub(" ", str(value)))


@dataclass(frozen=True)
class Notification:
    """One POST to one target: a single alert, or a summary of several alerts of one (tenant, rule) group."""

    target: str
    alerts: tuple[Alert, ...]

    @property
    def is_summary(self) -> bool:
        return len(self.alerts) > 1

    @property
    def alert_ids(self) -> list[str]:
        return [a.alert_id for a in self.alerts]

    @cached_property
    def key(self) -> str:
        """Its ``Idempotency-Key``: the alert's id, or the summary's."""
        if not self.is_summary:
            return self.alerts[0].alert_id
        return str(uuid.uuid5(SUMMARY_NAMESPACE, "\x1f".join([self.target, *sorted(self.alert_ids)])))


def render(n: Notification, target: NotifyTarget, *, listed: int) -> dict:
    """The JSON body of ``n`` for ``target`` (``listed``: alerts a summary shows in detail)."""
    if not n.is_summary:
        return payload(n.alerts[0], target)
    return _slack_summary(n, listed) if target.kind == "slack" else _json_summary(n, listed)


def payload(alert: Alert, target: NotifyTarget) -> dict:
    """One alert: the alert record, or Slack text."""
    if target.kind == "slack":
        where = f" in conversation {_line(alert.conversation_id)}" if alert.conversation_id else ""
        lines = [f"*{_line(alert.severity.upper())}* {_line(alert.rule)}{where}"
                 + (f" ({_line(alert.tenant)})" if alert.tenant else ""), _line(alert.summary)]
        lines += [f"> #{e.turn} {_line(e.speaker)}: {_line(e.label)} ({e.probability:.0%})"
                  for e in alert.evidence[:SLACK_EVIDENCE]]
        return {"text": "\n".join(lines)}
    return json.loads(alert.to_bytes())


def _severity(alerts: tuple[Alert, ...]) -> str:
    return "critical" if any(a.severity == "critical" for a in alerts) else "warning"


def _json_summary(n: Notification, listed: int) -> dict:
    first = n.alerts[0]
    raised = sorted(a.raised_at for a in n.alerts)
    return {
        "kind": "alert_summary",
        "summary_id": n.key,
        "tenant": first.tenant,
        "rule": first.rule,
        "severity": _severity(n.alerts),
        "count": len(n.alerts),
        "alert_ids": n.alert_ids,
        "alerts": [{"alert_id": a.alert_id, "conversation_id": a.conversation_id, "severity": a.severity,
                    "summary": a.summary, "raised_at": a.raised_at.isoformat()} for a in n.alerts[:listed]],
        "first_raised_at": raised[0].isoformat(),
        "last_raised_at": raised[-1].isoformat(),
    }


def _slack_summary(n: Notification, listed: int) -> dict:
    first = n.alerts[0]
    tenant = f" ({_line(first.tenant)})" if first.tenant else ""
    lines = [f"*{_severity(n.alerts).upper()}* {_line(first.rule)}{tenant}: {len(n.alerts)} alerts in one summary"]
    for a in n.alerts[:listed]:
        where = f" in conversation {_line(a.conversation_id)}" if a.conversation_id else ""
        lines.append(f"> {_line(a.alert_id)}{where}: {_line(a.summary)}")
    if len(n.alerts) > listed:
        lines.append(f"… and {len(n.alerts) - listed} more (summary {n.key})")
    return {"text": "\n".join(lines)}
