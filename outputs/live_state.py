"""What the supervisors' page shows, kept in memory from the emotion and alert topics.

Fed one record at a time (events deduped by ``event_id``, alerts by ``alert_id``, before they get here), read
by the web handlers as JSON snapshots. A conversation's **risk** orders the list: its current negative streak
first (consecutive negative turns up to its latest), then its negative share over its last
``dashboard.recent_turns`` turns. Events carry no text: with ``dashboard.show_texts`` the reader also follows the
input topic and the texts of the newest messages are kept beside the events, cut to ``dashboard.text_chars``
(without it none is read). Thread-safe: the reader thread writes, the web handlers read.

Bounded whatever the traffic: ``dashboard.max_conversations`` conversations of ``dashboard.timeline_turns`` turns,
``dashboard.max_tenants`` tenants' rates and counters (the least recently active leave first, in both), 500 alerts,
:data:`MAX_TEXTS` texts.

**Scopes.** Every read takes ``allowed``: the tenants the caller's token may see (``None``: every tenant, the admin
token). Nothing of another tenant — a conversation, an alert, a rate, a counter, an adapter — is in what it gets.

**Incremental timelines.** Every change to a timeline (a new turn, a text that arrived after its event) takes the
next number of one counter, its ``seq``; a turn keeps its first one as ``id``. A page that has a timeline up to
``seq`` S asks for ``after=S`` and gets only the turns changed since, with ``kept`` (how many turns the timeline
holds now: the page drops its oldest beyond that) — not the whole timeline each second.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from core.records import Alert, ChatMessage, EmotionEvent
from core.settings import Settings

#: Seconds per bucket of the per-tenant negative-rate series, and buckets kept (one hour).
RATE_BUCKET_S = 60
RATE_BUCKETS = 60
#: Message texts kept at most (each cut to ``dashboard.text_chars``).
MAX_TEXTS = 50_000
#: Alerts kept for the feed (every tenant together).
MAX_ALERTS = 500
#: Seconds over which events/s is measured, and event times kept for it.
EPS_WINDOW_S = 10
EVENT_TIMES = 10_000


def cut(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters, an ellipsis marking a cut."""
    return text if len(text) <= chars else text[: max(chars - 1, 0)] + "…"


@dataclass
class ConversationView:
    tenant: str | None
    conversation_id: str
    turns: deque = field(default_factory=deque)  # dicts, oldest first
    alerts: int = 0
    updated: float = 0.0  # wall clock of the newest event
    seq: int = 0  # the newest change to its timeline

    def risk(self, recent: int) -> tuple[int, float]:
        streak = 0
        for t in reversed(self.turns):
            if not t["negative"]:
                break
            streak += 1
        last = list(self.turns)[-recent:]
        share = sum(t["negative"] for t in last) / len(last) if last else 0.0
        return streak, round(share, 3)


@dataclass
class TenantStats:
    """One tenant's negative-rate series (``[bucket start, events, negative]``) and counters."""

    rates: deque = field(default_factory=lambda: deque(maxlen=RATE_BUCKETS))
    events: int = 0
    alerts: int = 0
    adapters: dict[str, str | None] = field(default_factory=dict)  # "model/adapter" -> version, newest seen


class LiveState:
    """Conversations, the alert feed, per-tenant negative rates and the stream's health."""

    def __init__(self, settings: Settings) -> None:
        d = settings.dashboard
        self.show_texts = d.show_texts
        self.max_conversations = d.max_conversations
        self.timeline_turns = d.timeline_turns
        self.recent_turns = d.recent_turns
        self.text_chars = d.text_chars
        self.max_tenants = d.max_tenants
        self.max_texts = min(MAX_TEXTS, d.max_conversations * d.timeline_turns)
        self.negative = {k: set(v) for k, v in settings.alerts.negative_labels.items()}  # what the alert rules count
        self._lock = threading.Lock()
        self._conversations: OrderedDict[tuple[str | None, str], ConversationView] = OrderedDict()
        self._alerts: deque[dict[str, Any]] = deque(maxlen=MAX_ALERTS)
        self._tenants: OrderedDict[str | None, TenantStats] = OrderedDict()  # least recently active first
        self._event_times: deque[tuple[float, str | None]] = deque(maxlen=EVENT_TIMES)
        self._texts: OrderedDict[tuple[str | None, str, str], str] = OrderedDict()  # (tenant, conv, message) -> text
        self._seq = 0
        self.events = 0
        self.alerts = 0
        self.adapters: dict[str, str | None] = {}  # "model/adapter" -> version, newest seen
        self.lag: int | None = None

    # -- writes (the reader thread) ------------------------------------------------------------------

    def add_event(self, e: EmotionEvent, now: float | None = None) -> None:
        now = time.time() if now is None else now
        negative = e.label in self.negative.get(e.label_set, set())
        with self._lock:
            self._seq += 1
            turn = {"id": self._seq, "seq": self._seq, "turn": e.turn, "message_id": e.message_id,
                    "speaker": e.speaker, "role": e.role, "label": e.label,
                    "probability": round(e.probabilities.get(e.label, 0.0), 3), "negative": negative,
                    "degraded": e.window_degraded, "reply_to": e.reply_to}
            key = (e.tenant, e.conversation_id)
            view = self._conversations.get(key)
            if view is None:
                view = self._conversations[key] = ConversationView(e.tenant, e.conversation_id,
                                                                   deque(maxlen=self.timeline_turns))
            self._conversations.move_to_end(key)
            view.turns.append(turn)
            view.updated = now
            view.seq = self._seq
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
            stats = self._tenant(e.tenant)
            self._rate(stats, now, negative)
            stats.events += 1
            adapter = f"{e.model}/{e.adapter or 'base'}"
            stats.adapters[adapter] = self.adapters[adapter] = e.adapter_version
            self._event_times.append((now, e.tenant))
            self.events += 1

    def add_message(self, m: ChatMessage) -> None:
        """A message's text, for its timeline (only called when texts are shown), cut to ``text_chars``."""
        with self._lock:
            key = (m.tenant, m.conversation_id, m.message_id)
            self._texts[key] = cut(m.text, self.text_chars)
            self._texts.move_to_end(key)
            while len(self._texts) > self.max_texts:
                self._texts.popitem(last=False)
            view = self._conversations.get((m.tenant, m.conversation_id))
            if view is not None:  # its event came first: the turn changed, pages fetch it again
                for t in view.turns:
                    if t["message_id"] == m.message_id:
                        self._seq += 1
                        t["seq"] = view.seq = self._seq

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
            self._tenant(a.tenant).alerts += 1
            self.alerts += 1

    def _tenant(self, tenant: str | None) -> TenantStats:
        """The tenant's stats, now the most recently active (the least recent leave beyond ``max_tenants``)."""
        stats = self._tenants.get(tenant)
        if stats is None:
            stats = self._tenants[tenant] = TenantStats()
        self._tenants.move_to_end(tenant)
        while len(self._tenants) > self.max_tenants:
            self._tenants.popitem(last=False)
        return stats

    @staticmethod
    def _rate(stats: TenantStats, now: float, negative: bool) -> None:
        series = stats.rates
        start = now - now % RATE_BUCKET_S
        if not series or series[-1][0] != start:
            series.append([start, 0, 0])
        series[-1][1] += 1
        series[-1][2] += negative

    # -- reads (the web handlers) --------------------------------------------------------------------

    def snapshot(self, tenant: str | None = None, limit: int = 50, now: float | None = None, *,
                 allowed: Collection[str] | None = None) -> dict[str, Any]:
        """The page's data: conversations by risk (of ``tenant``, or all), alerts, rates, health — of the tenants in
        ``allowed`` only (None: every tenant). The health counters are those of ``allowed`` too."""
        now = time.time() if now is None else now

        def seen(t: str | None) -> bool:
            return allowed is None or t in allowed

        def shown(t: str | None) -> bool:
            return seen(t) and (tenant is None or t == tenant)

        with self._lock:
            views = [v for v in self._conversations.values() if shown(v.tenant)]
            ranked = sorted(views, key=lambda v: (v.risk(self.recent_turns), v.updated), reverse=True)[:limit]
            conversations = [self._summary(v) for v in ranked]
            alerts = [a for a in self._alerts if shown(a["tenant"])][:100]
            rates = {str(t): [{"t": b[0], "events": b[1], "negative_rate": round(b[2] / b[1], 3)} for b in s.rates]
                     for t, s in self._tenants.items() if shown(t)}
            recent = sum(1 for at, t in self._event_times if at > now - EPS_WINDOW_S and seen(t))
            if allowed is None:
                events, alert_count, adapters = self.events, self.alerts, dict(self.adapters)
            else:
                mine = [s for t, s in self._tenants.items() if seen(t)]
                events, alert_count = sum(s.events for s in mine), sum(s.alerts for s in mine)
                adapters = {k: v for s in mine for k, v in s.adapters.items()}
            return {
                "conversations": conversations, "alerts": alerts, "negative_rate": rates,
                "tenants": sorted({v.tenant for v in self._conversations.values()
                                   if v.tenant is not None and seen(v.tenant)}),
                "health": {"events": events, "alerts": alert_count,
                           "events_per_s": round(recent / EPS_WINDOW_S, 2),
                           "consumer_lag": self.lag, "adapters": adapters},
                "show_texts": self.show_texts,
            }

    def conversation(self, tenant: str | None, conversation_id: str, *, after: int | None = None,
                     allowed: Collection[str] | None = None) -> dict[str, Any] | None:
        """A conversation's timeline: every turn, or with ``after`` the turns changed since that ``seq``; ``kept``
        says how many it holds. None when unknown, or when ``tenant`` is not in ``allowed`` (the same answer: a
        scoped token cannot tell another tenant's conversation from a missing one)."""
        if allowed is not None and tenant not in allowed:
            return None
        with self._lock:
            view = self._conversations.get((tenant, conversation_id))
            if view is None:
                return None
            turns = [t for t in view.turns if after is None or t["seq"] > after]
            if self.show_texts:
                turns = [{**t, "text": self._texts.get((tenant, conversation_id, t["message_id"]))} for t in turns]
            else:
                turns = [dict(t) for t in turns]
            return {**self._summary(view), "turns": turns, "kept": len(view.turns)}

    def _summary(self, v: ConversationView) -> dict[str, Any]:
        streak, share = v.risk(self.recent_turns)
        last = v.turns[-1] if v.turns else {}
        return {"tenant": v.tenant, "conversation_id": v.conversation_id, "negative_streak": streak,
                "recent_negative_share": share, "turns": len(v.turns), "alerts": v.alerts,
                "last_label": last.get("label"), "last_role": last.get("role"), "updated": v.updated, "seq": v.seq}
