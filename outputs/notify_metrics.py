"""The notifier's metrics (``/metrics`` on ``notify.metrics_port``), one registry per notifier."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


class NotifyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.delivered = Counter("erc_notify_delivered_total", "Alerts a target accepted, alone or in a summary.",
                                 ["target"], registry=self.registry)
        self.notifications = Counter("erc_notify_notifications_total", "Notifications a target accepted, by kind "
                                     "(alert: one alert; summary: several of one tenant and rule).",
                                     ["target", "kind"], registry=self.registry)
        self.folded = Counter("erc_notify_folded_total", "Alerts a target accepted inside a summary.", ["target"],
                              registry=self.registry)
        self.skipped = Counter("erc_notify_skipped_total", "Alerts not sent again: the target already has them.",
                               ["target"], registry=self.registry)
        self.failures = Counter("erc_notify_failures_total", "Failed delivery attempts.", ["target", "reason"],
                                registry=self.registry)
        self.dead = Counter("erc_notify_dead_letters_total", "Alerts dead-lettered for a target (refused, failed "
                            "every try, or its backlog full).", ["target"], registry=self.registry)
        self.backlog = Gauge("erc_notify_backlog", "Alerts a target holds undelivered (grouped, queued, retried).",
                             ["target"], registry=self.registry)
        self.seconds = Histogram("erc_notify_delivery_seconds", "One delivery attempt.", ["target"],
                                 registry=self.registry)
        self.last_beat = time.monotonic()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
