"""Chaos: kill -9 consumers at random points, kill one of two, restart Redis empty; every killed consumer
comes back (its restart answers ready and delivers messages), nothing is lost, no message gets two event ids,
copies are counted, windows stay in turn order, the DLQ holds exactly the malformed input.

The full run (≥ 5,000 messages, ≥ 100 conversations, 20 kills) is marked ``chaos`` and runs on its own:

    .venv/bin/pytest -m chaos -s tests/consumer/test_chaos.py

A short run is part of the default suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from tests.chaos import ChaosPlan, ChaosReport, run_chaos


def _check(report: ChaosReport, capsys, plan: ChaosPlan) -> None:
    with capsys.disabled():
        print(f"\nchaos: {report.line()}")
    assert report.lost == 0
    assert report.distinct_duplicates == 0
    # Every kill planned was made, and each measured as survived: the killed consumer's restarted process
    # answered ready and delivered messages of its own, and the run lost nothing.
    assert report.kills == plan.kills + (1 if plan.pair_kill else 0)
    assert len(report.comebacks) == report.kills
    assert [c for c in report.comebacks if not c.came_back] == []
    assert report.kills_survived == report.kills
    assert report.missing_dead_letters == 0 and report.unexpected_dead_letters == 0
    assert report.out_of_order == 0 and report.bad_windows == 0
    assert report.degraded_before_redis_restart == 0
    assert report.ok


def _settings(settings: Settings, session_timeout_ms: int) -> Settings:
    return settings.with_overrides(
        kafka={"session_timeout_ms": session_timeout_ms, "heartbeat_interval_ms": 1000},
        batch={"micro_batch_size": 25, "max_wait_ms": 50},
        model={"max_prompt_tokens": 100_000},  # whole windows: the report checks each event's window length
    )


def test_chaos_short(settings: Settings, tmp_path: Path, capsys) -> None:
    plan = ChaosPlan(conversations=20, turns=30, kills=2, pair_kill=True, redis_restart=True, malformed_every=50,
                     rate=10, pause_s=(0.2, 1.2), burst=120, kill_delay_s=(0.02, 0.12), join_after_pair=False, seed=1)
    report = run_chaos(_settings(settings, 4000), plan, tmp_path, log=print)
    _check(report, capsys, plan)


@pytest.mark.chaos
def test_chaos_full(settings: Settings, tmp_path: Path, capsys) -> None:
    # 19 lone kills and the pair kill: 20 kill -9s; each kill's burst and nudge are held back from the steady feed
    plan = ChaosPlan(conversations=100, turns=50, kills=19, pair_kill=True, redis_restart=True, malformed_every=100,
                     rate=10, burst=200, kill_delay_s=(0.03, 0.25), seed=5)
    with capsys.disabled():
        report = run_chaos(_settings(settings, 6000), plan, tmp_path, log=print)
    _check(report, capsys, plan)
    assert report.valid_in >= 5000 and plan.conversations >= 100 and report.kills >= 20
