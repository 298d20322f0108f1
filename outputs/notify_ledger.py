"""What the notifier has delivered, kept in Redis, so that a restart, a redelivered batch or a copy of an alert on
the topic never reaches a target twice, alone or in a summary.

Keys (each carries the target's ``{<target>}`` hash tag: one slot, so a summary's keys are written in one
transaction, in Redis Cluster too):

- ``<prefix>:notify:sent:{<target>}:<alert_id>``: the alert reached the target, alone or folded into a summary
  (the value says which), or was dead-lettered for it; ``notify.sent_ttl_s``;
- ``<prefix>:notify:summary:{<target>}:<summary_id>``: that summary was delivered; ``notify.sent_ttl_s``;
- ``<prefix>:notify:group:{<target>}:<rule>:<tenant>``: a (tenant, rule) group sent, expiring after
  ``notify.group_interval_s``: a restarted notifier keeps a storm's pace instead of sending every group at once.

While Redis is down every call waits (what was sent is unknown without it), until the notifier stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis
import structlog

from outputs.notify_groups import GroupKey

log = structlog.get_logger(__name__)

R = TypeVar("R")


class Stopped(Exception):
    """The notifier stopped while waiting for Redis."""


class Ledger:
    def __init__(self, client, *, prefix: str, sent_ttl_s: int, interval_s: float, stop: threading.Event) -> None:
        self.client = client
        self.prefix = prefix
        self.sent_ttl_s = sent_ttl_s
        self.interval_s = interval_s
        self._stop = stop

    def _sent(self, target: str, alert_id: str) -> str:
        return f"{self.prefix}:notify:sent:{{{target}}}:{alert_id}"

    def _summary(self, target: str, summary_id: str) -> str:
        return f"{self.prefix}:notify:summary:{{{target}}}:{summary_id}"

    def _group(self, target: str, key: GroupKey) -> str:
        tenant, rule = key
        return f"{self.prefix}:notify:group:{{{target}}}:{rule}:{tenant or '-'}"

    def delivered(self, target: str, alert_ids: Iterable[str]) -> set[str]:
        """The ids among ``alert_ids`` the target already has (or that were dead-lettered for it)."""
        ids = list(alert_ids)

        def ask() -> list:
            pipe = self.client.pipeline(transaction=False)
            for alert_id in ids:
                pipe.exists(self._sent(target, alert_id))
            return pipe.execute()

        return {alert_id for alert_id, n in zip(ids, self._call(ask) if ids else []) if n}

    def summary_delivered(self, target: str, summary_id: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._summary(target, summary_id))))

    def remember(self, target: str, alert_ids: Iterable[str], *, how: str, summary_id: str | None = None) -> None:
        """The alerts (and their summary) handled for ``target``, in one transaction: all or none."""
        ids = list(alert_ids)
        value = f"{int(time.time())} {how}" + (f" {summary_id}" if summary_id else "")

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            for alert_id in ids:
                pipe.set(self._sent(target, alert_id), value, ex=self.sent_ttl_s)
            if summary_id:
                pipe.set(self._summary(target, summary_id), len(ids), ex=self.sent_ttl_s)
            pipe.execute()

        self._call(write)

    def group_sent_ago(self, target: str, key: GroupKey) -> float | None:
        """How long ago a previous run sent this group, when within its interval (None: not within it)."""
        if self.interval_s <= 0:
            return None
        left_ms = self._call(lambda: self.client.pttl(self._group(target, key)))
        return None if left_ms is None or left_ms < 0 else max(0.0, self.interval_s - left_ms / 1000)

    def group_sent(self, target: str, key: GroupKey) -> None:
        if self.interval_s > 0:
            self._call(lambda: self.client.set(self._group(target, key), 1, px=max(1, int(self.interval_s * 1000))))

    def _call(self, call: Callable[[], R]) -> R:
        """A Redis call, waited for while Redis is down; :class:`Stopped` when the notifier stops meanwhile."""
        delay = 0.5
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("redis unreachable; notifier waiting", error=str(e), retry_in_s=delay)
                if self._stop.wait(delay):
                    raise Stopped from e
                delay = min(delay * 2, 30.0)
