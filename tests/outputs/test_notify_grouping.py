"""The notifier's grouping, on a clock the test moves: a quiet group's first alert waits group_wait; later ones are
folded into one notification per group_interval; a full group, or a full backlog, goes at once."""

from __future__ import annotations

from outputs.notify_groups import Grouper

A = ("acme", "negative_streak")
B = ("beta", "negative_streak")


def _grouper(wait_s: float = 1.0, interval_s: float = 60.0, max_alerts: int = 100) -> Grouper[str]:
    return Grouper(wait_s=wait_s, interval_s=interval_s, max_alerts=max_alerts)


def test_a_quiet_groups_first_alerts_wait_group_wait_and_go_together() -> None:
    g = _grouper()
    g.add(A, "a1", now=0.0)
    g.add(A, "a2", now=0.5)
    g.add(B, "b1", now=0.7)
    assert g.next_due() == 1.0 and g.take_due(0.99) == []
    assert g.take_due(1.0) == [(A, ["a1", "a2"])]
    assert g.take_due(1.7) == [(B, ["b1"])]
    assert g.held == 0 and g.next_due() is None


def test_a_sustained_storm_makes_one_notification_per_group_and_interval() -> None:
    g = _grouper(wait_s=0.0, interval_s=60.0, max_alerts=1000)
    sent: list[tuple[float, int]] = []
    for second in range(0, 300):  # ten alerts a second for five minutes
        for i in range(10):
            g.add(A, f"{second}-{i}", now=float(second))
        sent += [(float(second), len(items)) for _, items in g.take_due(float(second))]
    sent += [(300.0, len(items)) for _, items in g.take_due(300.0)]
    assert [t for t, _ in sent] == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]
    assert sum(n for _, n in sent) == 3000 and sent[0][1] == 10  # the first alone(s) at once, then one a minute


def test_a_group_quiet_for_an_interval_is_quiet_again() -> None:
    g = _grouper(wait_s=1.0, interval_s=10.0)
    g.add(A, "a1", now=0.0)
    assert g.take_due(1.0) == [(A, ["a1"])]
    g.add(A, "a2", now=5.0)  # within the interval: waits for its end
    assert g.take_due(10.9) == [] and g.take_due(11.0) == [(A, ["a2"])]
    g.forget_idle(now=30.0)
    assert not g.knows(A)
    g.add(A, "a3", now=30.0)  # quiet again: group_wait only
    assert g.take_due(31.0) == [(A, ["a3"])]


def test_a_previous_runs_send_keeps_the_pace_after_a_restart() -> None:
    g = _grouper(wait_s=1.0, interval_s=60.0)
    g.add(A, "a1", now=100.0, sent_at=90.0)
    assert g.next_due() == 150.0


def test_a_full_group_goes_at_once_in_bounded_notifications() -> None:
    g = _grouper(wait_s=5.0, interval_s=60.0, max_alerts=3)
    for i in range(2):
        g.add(A, f"a{i}", now=0.0)
    assert g.take_due(0.0) == []
    g.add(A, "a2", now=0.1)
    assert g.take_due(0.1) == [(A, ["a0", "a1", "a2"])]
    for i in range(3, 10):
        g.add(A, f"a{i}", now=1.0)  # more than max_alerts at once: in chunks of max_alerts
    assert [items for _, items in g.take_due(1.0)] == [["a3", "a4", "a5"], ["a6", "a7", "a8"], ["a9"]]


def test_everything_goes_when_the_backlog_is_full_and_nothing_is_grouped_at_interval_zero() -> None:
    g = _grouper(wait_s=5.0, interval_s=60.0)
    g.add(A, "a1", now=0.0)
    g.add(B, "b1", now=0.0)
    assert g.take_due(0.0) == [] and sorted(g.take_due(0.0, everything=True)) == [(A, ["a1"]), (B, ["b1"])]
    off = _grouper(wait_s=0.0, interval_s=0.0)
    for i in range(3):
        off.add(A, f"a{i}", now=0.0)
    assert off.take_due(0.0) == [(A, ["a0"]), (A, ["a1"]), (A, ["a2"])]


def test_taken_alerts_put_back_are_due_at_once_and_first() -> None:
    g = _grouper(wait_s=1.0, interval_s=60.0)
    g.add(A, "a1", now=0.0)
    taken = g.take_due(1.0)
    g.add(A, "a2", now=2.0)
    g.put_back(A, taken[0][1])
    assert g.held == 2 and g.take_due(2.0) == [(A, ["a1", "a2"])]
