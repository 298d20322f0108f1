"""One target's deliveries, on a thread of its own: a dead or slow webhook holds up nothing but itself.

The polling thread hands each alert to the workers of the targets it routes to (:meth:`TargetWorker.submit`, which
does not wait on the target, but for a full backlog: below). A worker drops what its target already has (the
ledger), groups the rest per (tenant, rule) (:mod:`outputs.notify_groups`), and sends what is due: one alert alone,
or a summary of several. A notification is tried ``notify.attempts`` times with backoff, waiting at least what a
``Retry-After`` asks (up to ``notify.backoff_max_s``); then it is remembered in Redis, or its alerts are
dead-lettered, and only then are its alerts finished (:class:`outputs.notify_offsets.Ticket`) for the offset commit.

The worker's backlog (alerts submitted and not finished) is bounded by ``notify.backlog_max``. A full target sends
its groups at once. While it is delivering, ``submit`` waits for room: that lasts about one request, since one
request carries up to ``notify.summary_max_alerts`` alerts, and a request that outlasts ``notify.timeout_s`` is a
failure. While its last attempt failed (it is down, or times out), an alert that finds it full is dead-lettered
for that target at once: a dead target neither holds up the others nor grows memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from core.records import Alert
from core.settings import NotifySettings, NotifyTarget
from outputs.notify_groups import GroupKey, Grouper
from outputs.notify_ledger import Ledger, Stopped
from outputs.notify_metrics import NotifyMetrics
from outputs.notify_offsets import Ticket
from outputs.notify_payloads import Notification, render
from outputs.notify_webhook import Outcome, headers, post, scrub

log = structlog.get_logger(__name__)

#: ``dead_letter(alert, ticket, target, reason)``: sends the dead letter; its future is waited on before the alert
#: counts as handled.
DeadLetterFn = Callable[[Alert, Ticket, NotifyTarget, str], Any]

#: How long dead letters may wait for the broker's acks (past it the notification is tried again later: nothing
#: is remembered as handled without them).
DEAD_LETTER_ACK_S = 30.0


@dataclass(frozen=True)
class Held:
    alert: Alert
    ticket: Ticket


class TargetWorker:
    """Delivers ``target``'s alerts (see the module). ``stop`` is the notifier's: set, the worker ends after its
    current attempt, leaving what it holds unfinished (read again after a restart)."""

    def __init__(self, target: NotifyTarget, settings: NotifySettings, *, ledger: Ledger, metrics: NotifyMetrics,
                 dead_letter: DeadLetterFn, stop: threading.Event, http: httpx.Client | None = None) -> None:
        self.target = target
        self.n = settings
        self.ledger = ledger
        self.metrics = metrics
        self.dead_letter = dead_letter
        self._stop = stop
        self._own_http = http is None
        self.http = http or httpx.Client(timeout=settings.timeout_s)
        self.grouper: Grouper[Held] = Grouper(wait_s=settings.group_wait_s, interval_s=settings.group_interval_s,
                                              max_alerts=settings.summary_max_alerts)
        self._cond = threading.Condition()
        self._inbox: list[Held] = []
        self._backlog = 0  # submitted, not finished
        self._flush_all = False
        self._full_logged = False
        self._failing = False  # its last attempt failed for a reason worth a retry (down, timing out)
        self.thread = threading.Thread(target=self._run, name=f"notify-{target.name}", daemon=True)

    @property
    def backlog(self) -> int:
        return self._backlog

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def join(self, timeout_s: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def submit(self, alert: Alert, ticket: Ticket) -> None:
        """Hand an alert over (from the polling thread): waits only for a full target that is delivering."""
        with self._cond:
            while self._backlog >= self.n.backlog_max and not self._failing and not self._stop.is_set():
                self._flush_all = True
                self._cond.notify_all()
                self._cond.wait(0.05)
            if self._stop.is_set():
                return  # not handed over, not finished: read again after the restart
            full = self._backlog >= self.n.backlog_max
            if full:
                self._flush_all = True
            else:
                self._inbox.append(Held(alert, ticket))
                self._backlog += 1
                self.metrics.backlog.labels(self.target.name).set(self._backlog)
            self._cond.notify()
        if full:
            self._overflow(alert, ticket)

    def _overflow(self, alert: Alert, ticket: Ticket) -> None:
        if not self._full_logged:
            self._full_logged = True
            log.warning("notify target backlog full and failing; its new alerts are dead-lettered",
                        target=self.target.name, backlog=self._backlog)
        name = self.target.name
        if self.ledger.delivered(name, [alert.alert_id]):
            self.metrics.skipped.labels(name).inc()
        else:
            self.dead_letter(alert, ticket, self.target, f"backlog full ({self.n.backlog_max} alerts)").get(
                timeout=DEAD_LETTER_ACK_S)
            self.ledger.remember(name, [alert.alert_id], how="dead-letter")
            self.metrics.dead.labels(name).inc()
        ticket.done()

    def _finish(self, items: list[Held]) -> None:
        for h in items:
            h.ticket.done()
        with self._cond:
            self._backlog -= len(items)
            self.metrics.backlog.labels(self.target.name).set(self._backlog)
            self._cond.notify_all()
            if self._backlog < self.n.backlog_max and self._full_logged:
                self._full_logged = False
                log.info("notify target backlog below its bound again", target=self.target.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._intake()
                with self._cond:
                    everything, self._flush_all = self._flush_all, False
                due = self.grouper.take_due(time.monotonic(), everything=everything)
                for i, (key, items) in enumerate(due):
                    if self._stop.is_set():
                        return
                    try:
                        self._send(key, items)
                    except BaseException:  # not sent: this one and the rest held again
                        for rest_key, rest in reversed(due[i:]):  # each put in front: keep the order
                            self.grouper.put_back(rest_key, rest)
                        raise
                self.grouper.forget_idle(time.monotonic())
                self._wait()
            except Stopped:
                return
            except Exception as e:  # noqa: BLE001 - a fault of the notifier's own: what it held is tried again
                log.error("notify worker failed; retrying", target=self.target.name,
                          error=scrub(f"{type(e).__name__}: {e}", self.target))
                self._stop.wait(1.0)

    def _intake(self) -> None:
        """The inbox into the groups, less what the target already has."""
        with self._cond:
            batch, self._inbox = self._inbox, []
        if not batch:
            return
        name = self.target.name
        try:
            have = self.ledger.delivered(name, (h.alert.alert_id for h in batch))
        except BaseException:
            with self._cond:
                self._inbox[:0] = batch
            raise
        now = time.monotonic()
        skipped = [h for h in batch if h.alert.alert_id in have]
        for h in batch:
            if h.alert.alert_id in have:
                continue
            key: GroupKey = (h.alert.tenant, h.alert.rule)
            sent_at = None
            if not self.grouper.knows(key):
                ago = self.ledger.group_sent_ago(name, key)
                sent_at = None if ago is None else now - ago
            self.grouper.add(key, h, now, sent_at=sent_at)
        if skipped:
            self.metrics.skipped.labels(name).inc(len(skipped))
            self._finish(skipped)

    def _wait(self) -> None:
        with self._cond:
            if self._inbox or self._flush_all or self._stop.is_set():
                return
            due = self.grouper.next_due()
            timeout = 0.5 if due is None else min(0.5, max(0.0, due - time.monotonic()))
            self._cond.wait(timeout)

    def _send(self, key: GroupKey, items: list[Held]) -> None:
        name = self.target.name
        n = Notification(name, tuple(h.alert for h in items))
        kind = "summary" if n.is_summary else "alert"
        if n.is_summary and self.ledger.summary_delivered(name, n.key):  # sent before a restart, not remembered
            self.ledger.remember(name, n.alert_ids, how="summary", summary_id=n.key)
            self.metrics.skipped.labels(name).inc(len(items))
            self._finish(items)
            return
        self.ledger.group_sent(name, key)
        outcome = self._deliver(n, kind)
        if outcome.delivered:
            self.ledger.remember(name, n.alert_ids, how=kind, summary_id=n.key if n.is_summary else None)
            self.metrics.delivered.labels(name).inc(len(items))
            self.metrics.notifications.labels(name, kind).inc()
            if n.is_summary:
                self.metrics.folded.labels(name).inc(len(items))
            log.info("notification delivered", target=name, kind=kind, alerts=len(items), key=n.key,
                     rule=key[1], tenant=key[0])
        elif self._stop.is_set() and not outcome.final:
            raise Stopped  # shutting down: not a refusal; these alerts are read again after the restart
        else:
            sent = [self.dead_letter(h.alert, h.ticket, self.target, outcome.reason) for h in items]
            for future in sent:
                future.get(timeout=DEAD_LETTER_ACK_S)
            self.ledger.remember(name, n.alert_ids, how="dead-letter")  # handled: not retried
            self.metrics.dead.labels(name).inc(len(items))
            log.warning("alerts dead-lettered", target=name, kind=kind, alerts=len(items), key=n.key,
                        reason=outcome.reason)
        self._finish(items)

    def _deliver(self, n: Notification, kind: str) -> Outcome:
        """Tries until delivered, refused, out of attempts, or stopped."""
        body = render(n, self.target, listed=self.n.summary_list)
        head = headers(self.target, n.key, kind)
        delay = self.n.backoff_s
        outcome = Outcome(False, "no attempt")
        for attempt in range(1, self.n.attempts + 1):
            started = time.monotonic()
            outcome = post(self.http, self.target, body, head, timeout_s=self.n.timeout_s)
            self.metrics.seconds.labels(self.target.name).observe(time.monotonic() - started)
            self._failing = not outcome.delivered and not outcome.final
            if outcome.delivered:
                return outcome
            self.metrics.failures.labels(self.target.name, outcome.label).inc()
            if outcome.final or attempt == self.n.attempts:
                break
            wait = delay if outcome.retry_after_s is None else max(outcome.retry_after_s, self.n.backoff_s)
            wait = min(wait, self.n.backoff_max_s)
            log.info("delivery failed; retrying", target=self.target.name, key=n.key, attempt=attempt,
                     reason=outcome.reason, retry_in_s=round(wait, 3))
            if self._stop.wait(wait):
                break
            delay = min(delay * 2, self.n.backoff_max_s)
        return outcome
