"""Which alerts the notifier may commit past: an alert is finished once every target it routes to has it delivered
(alone or in a summary), skipped (delivered before) or dead-lettered; a partition's offset is committed up to its
first unfinished alert. Targets finish at their own pace, from their own threads: a slow one holds back the
commit, never another target's deliveries."""

from __future__ import annotations

import threading

from kafka import TopicPartition


class Ticket:
    """One alert's record, finished after ``targets`` calls of :meth:`done` (one per target, from any thread)."""

    __slots__ = ("tp", "offset", "_left", "_tracker")

    def __init__(self, tracker: OffsetTracker, tp: TopicPartition, offset: int, targets: int) -> None:
        self.tp, self.offset, self._left, self._tracker = tp, offset, targets, tracker

    @property
    def partition(self) -> int:
        return self.tp.partition

    def done(self) -> None:
        self._tracker._done(self)


class OffsetTracker:
    """The unfinished alerts per partition, shared by the polling thread and the targets' workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[TopicPartition, dict[int, Ticket]] = {}

    def open(self, tp: TopicPartition, offset: int, targets: int) -> Ticket:
        ticket = Ticket(self, tp, offset, targets)
        if targets > 0:
            with self._lock:
                self._open.setdefault(tp, {})[offset] = ticket
        return ticket

    def _done(self, ticket: Ticket) -> None:
        with self._lock:
            ticket._left -= 1
            if ticket._left == 0:
                self._open.get(ticket.tp, {}).pop(ticket.offset, None)

    def first_open(self, tp: TopicPartition) -> int | None:
        """The partition's lowest unfinished offset (None: everything read is finished)."""
        with self._lock:
            return min(self._open.get(tp) or (), default=None)

    def pending(self) -> int:
        with self._lock:
            return sum(len(o) for o in self._open.values())
