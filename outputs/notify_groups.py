"""Alertmanager's grouping, per target: the alerts of one (tenant, rule) are held briefly and sent together, so that
a storm reaches people as a few summaries instead of one message per alert.

- a quiet group's first alert waits ``group_wait_s``; the alerts that come meanwhile go with it (one summary);
- once a group has sent, its next alerts wait until ``group_interval_s`` after that send and go as one summary:
  a sustained storm makes one notification per group and interval (Alertmanager's ``repeat_interval`` re-sends
  alerts that are still firing; an alert here is an event, sent once, so the interval is the one bound);
- a group holding ``max_alerts`` is due at once (a payload stays bounded), and so is every group when the
  target's backlog is full;
- ``group_interval_s`` 0: no grouping, each alert is its own notification.

Bookkeeping only, with the clock passed in: the target's worker does the I/O. One thread uses a Grouper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: (tenant, rule)
GroupKey = tuple[str | None, str]


@dataclass
class _Group(Generic[T]):
    held: list[T] = field(default_factory=list)
    opened_at: float = 0.0  # when the oldest held item came
    sent_at: float | None = None  # the group's last notification (monotonic seconds)


class Grouper(Generic[T]):
    """Items held per group until due; ``held`` counts them."""

    def __init__(self, *, wait_s: float, interval_s: float, max_alerts: int) -> None:
        self.wait_s = wait_s
        self.interval_s = interval_s
        self.max_alerts = max_alerts
        self.held = 0
        self._groups: dict[GroupKey, _Group[T]] = {}

    def knows(self, key: GroupKey) -> bool:
        return key in self._groups

    def add(self, key: GroupKey, item: T, now: float, *, sent_at: float | None = None) -> None:
        """Hold ``item``; ``sent_at`` is a new group's last notification known from elsewhere (a previous run)."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(sent_at=sent_at)
        if not group.held:
            group.opened_at = now
        group.held.append(item)
        self.held += 1

    def put_back(self, key: GroupKey, items: list[T]) -> None:
        """Hold taken ``items`` again, due at once (their notification failed for a reason of the notifier's own)."""
        group = self._groups.setdefault(key, _Group())
        group.held[:0] = items
        group.sent_at = None
        group.opened_at = float("-inf")
        self.held += len(items)

    def _due_at(self, group: _Group[T]) -> float:
        if len(group.held) >= self.max_alerts:
            return float("-inf")
        due = group.opened_at + self.wait_s
        return due if group.sent_at is None else max(due, group.sent_at + self.interval_s)

    def next_due(self) -> float | None:
        """When the next group is due (None: nothing held)."""
        return min((self._due_at(g) for g in self._groups.values() if g.held), default=None)

    def take_due(self, now: float, *, everything: bool = False) -> list[tuple[GroupKey, list[T]]]:
        """The groups due at ``now`` (every group holding something, with ``everything``), taken out: each list is
        one notification, in arrival order, at most ``max_alerts`` long (one item when grouping is off)."""
        size = 1 if self.interval_s == 0 else self.max_alerts
        out: list[tuple[GroupKey, list[T]]] = []
        for key, group in self._groups.items():
            if group.held and (everything or self._due_at(group) <= now):
                out += [(key, group.held[i:i + size]) for i in range(0, len(group.held), size)]
                self.held -= len(group.held)
                group.held = []
                group.sent_at = now
        return out

    def forget_idle(self, now: float) -> None:
        """Drop groups holding nothing whose interval has passed: they are quiet again, nothing to remember."""
        idle = [k for k, g in self._groups.items()
                if not g.held and (g.sent_at is None or now - g.sent_at >= self.interval_s)]
        for key in idle:
            del self._groups[key]
