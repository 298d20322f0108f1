"""What the supervisors' page shows, kept in memory from the emotion and alert topics.

Fed one record at a time (events deduped by ``event_id``, alerts by ``alert_id``, before they get here), read
by the web handlers as JSON snapshots. A conversation's **risk** orders the list: its current negative streak
first (consecutive negative turns up to its latest), then its negative share over its last
``dashboard.recent_turns`` turns. Events carry no text: with ``dashboard.show_texts`` the reader also follows the
input topic and the texts of the newest messages are kept beside the events (without it none is read). Thread-safe:
the reader thread writes, the web handlers read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from core.records import Alert, ChatMessage, EmotionEvent
from core.settings import Settings

#: Seconds per bucket of the per-tenant negative-rate series, and buckets kept (one hour).
RATE_BUCKET_S = 60
RATE_BUCKETS = 60


@dataclass
class ConversationView:
    tenant: str | None
    conversation_id: str
    turns: deque = field(default_factory=deque)  # dicts, oldest first
    alerts: int = 0
    updated: float = 0.0  # wall clock of the newest event

    def risk(self, recent: int) -> tuple[int, float]:
        streak = 0
        for t in reversed(self.turns):
            if not t["negative"]:
                break
            streak += 1
        last = list(self.turns)[-recent:]
        share = sum(t["negative"] for t in last) / len(last) if last else 0.0
        return streak, round(share, 3)


class LiveState:
    """Conversations, the alert feed, per-tenant negative rates and the stream's health."""

    def __init__(self, settings: Settings) -> None:
        d = settings.dashboard
        self.show_texts = d.show_texts
        self.max_conversations = d.max_conversations
        self.timeline_turns = d.timeline_turns
        self.recent_turns = d.recent_turns
        self.negative = {k: set(v) for k, v in settings.alerts.negative_labels.items()}  # what the alert rules count
        self._lock = threading.Lock()
        self._conversations: OrderedDict[tuple[str | None, str], ConversationView] = OrderedDict()
        self._alerts: deque[dict[str, Any]] = deque(maxlen=500)
        self._rates: dict[str | None, deque[list[float]]] = {}  # tenant -> [bucket start, events, negative]
        self._event_times: deque[float] = deque(maxlen=10_000)
        self._texts: OrderedDict[tuple[str | None, str, str], str] = OrderedDict()  # (tenant, conv, message) -> text
        self.max_texts = 50_000
        self.events = 0
        self.alerts = 0
        self.adapters: dict[str, str | None] = {}  # "model/adapter" -> version, newest seen
        self.lag: int | None = None

    # -- writes (the reader thread) ------------------------------------------------------------------

    def add_event(self, e: EmotionEvent, now: float | None = None) -> None:
        now = time.time() if now is None else now
        negative = e.label in self.negative.get(e.label_set, set())
        turn = {"turn": e.turn, "message_id": e.message_id, "speaker": e.speaker, "role": e.role, "label": e.label,
                "probability": round(e.probabilities.get(e.label, 0.0), 3), "negative": negative,
                "degraded": e.window_degraded, "reply_to": e.reply_to}
        with self._lock:
            key = (e.tenant, e.conversation_id)
            view = self._conversations.get(key)
            if view is None:
                view = self._conversations[key] = ConversationView(e.tenant, e.conversation_id,
                                                                   deque(maxlen=self.timeline_turns))
            self._conversations.move_to_end(key)
            view.turns.append(turn)
            view.updated = now
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
            self._rate(e.tenant, now, negative)
            self._event_times.append(now)
            self.events += 1
            self.adapters[f"{e.model}/{e.adapter or 'base'}"] = e.adapter_version

    def add_message(self, m: ChatMessage) -> None:
        """A message's text, for its timeline (only called when texts are shown)."""
        with self._lock:
            self._texts[(m.tenant, m.conversation_id, m.message_id)] = m.text
            while len(self._texts) > self.max_texts:
                self._texts.popitem(last=False)

    def add_alert(self, a: Alert) -> None:
        evidence = [{"message_id": x.message_id, "turn": x.turn, "label": x.label,
                     "probability": round(x.probability, 3), "speaker": x.speaker}
                    for x in a.evidence]
        with self._lock:
            self._alerts.appendleft({"alert_id": a.alert_id, "rule": a.rule, "severity": a.severity,
                                     "summary": a.summary, "tenant": a.tenant, "conversation_id": a.conversation_id,
                                     "raised_at": a.raised_at.isoformat(), "evidence": evidence,
                                     "metrics": a.metrics})
            view = self._conversations.get((a.tenant, a.conversation_id)) if a.conversation_id else None
            if view is not None:
                view.alerts += 1
            self.alerts += 1

    def _rate(self, tenant: str | None, now: float, negative: bool) -> None:
        series = self._rates.setdefault(tenant, deque(maxlen=RATE_BUCKETS))
        start = now - now % RATE_BUCKET_S
        if not series or series[-1][0] != start:
            series.append([start, 0, 0])
        series[-1][1] += 1
        series[-1][2] += negative

    # -- reads (the web handlers) --------------------------------------------------------------------

    def snapshot(self, tenant: str | None = None, limit: int = 50, now: float | None = None) -> dict[str, Any]:
        """The page's data: conversations by risk (of ``tenant``, or all), alerts, rates, health."""
        now = time.time() if now is None else now
        with self._lock:
            views = [v for v in self._conversations.values() if tenant is None or v.tenant == tenant]
            ranked = sorted(views, key=lambda v: (v.risk(self.recent_turns), v.updated), reverse=True)[:limit]
            conversations = [self._summary(v) for v in ranked]
            alerts = [a for a in self._alerts if tenant is None or a["tenant"] == tenant][:100]
            rates = {str(t): [{"t": b[0], "events": b[1], "negative_rate": round(b[2] / b[1], 3)} for b in series]
                     for t, series in self._rates.items() if tenant is None or t == tenant}
            recent = sum(1 for t in self._event_times if t > now - 10)
            return {
                "conversations": conversations, "alerts": alerts, "negative_rate": rates,
                "tenants": sorted({str(v.tenant) for v in self._conversations.values() if v.tenant is not None}),
                "health": {"events": self.events, "alerts": self.alerts, "events_per_s": round(recent / 10, 2),
                           "consumer_lag": self.lag, "adapters": dict(self.adapters)},
                "show_texts": self.show_texts,
            }

    def conversation(self, tenant: str | None, conversation_id: str) -> dict[str, Any] | None:
        with self._lock:
            view = self._conversations.get((tenant, conversation_id))
            if view is None:
                return None
            turns = list(view.turns)
            if self.show_texts:
                turns = [{**t, "text": self._texts.get((tenant, conversation_id, t["message_id"]))} for t in turns]
            return {**self._summary(view), "turns": turns}

    def _summary(self, v: ConversationView) -> dict[str, Any]:
        streak, share = v.risk(self.recent_turns)
        last = v.turns[-1] if v.turns else {}
        return {"tenant": v.tenant, "conversation_id": v.conversation_id, "negative_streak": streak,
                "recent_negative_share": share, "turns": len(v.turns), "alerts": v.alerts,
                "last_label": last.get("label"), "last_role": last.get("role"), "updated": v.updated}
