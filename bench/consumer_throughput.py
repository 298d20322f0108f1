"""Consumer overhead with the null backend: messages/s of ONE consumer process through a real broker and Redis.

Issue #6: "With a null backend, the consumer's own overhead (Kafka + Redis + prompt) must stay far below
inference". This measures it:

1. start a tansu broker and a Redis on free ports (or use the ones ``settings`` points at);
2. pre-produce ``messages`` valid chat messages across ``conversations`` conversations (interleaved like
   live traffic, keyed by conversation) onto a fresh input topic with ``partitions`` partitions, through
   ``producer_sim.replay`` (its rate is reported as ``producer_msgs_per_s``);
3. run ONE consumer process (a spawned child: the real ``StreamApp``, ``model.backend = null``). The null
   backend does no inference, but the labeler still builds every InstructERC prompt (window, speaker
   anonymisation, token budget) before calling it, so prompt cost is counted;
4. time it from the first records polled to the commit of the last offsets, with the child's CPU seconds
   over that span and, with ``stages=True``, a per-stage breakdown (wrapping the app's own calls in the
   child: no code path of the app is changed for it).

The consumer runs in a ``multiprocessing`` "spawn" child, so a script that calls ``measure()`` needs the usual
``if __name__ == "__main__":`` guard. ``measure()`` returns a flat dict (``messages_per_s``, ``messages``, ``seconds``, ``cpu_seconds``, ``stage_*``
seconds …); ``erc-stream bench`` uses it for its "consumer overhead" figure. Run it alone::

    python -m bench.consumer_throughput --messages 20000 --conversations 500 --json

On a shared machine the figure is noisy: repeat it (``--repeat 3``) and report the best and the spread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from core.records import ChatMessage
from core.settings import Settings

#: The stages of a batch the breakdown reports, in pipeline order ("other": loop, metrics, stats, offsets).
STAGES = ("poll", "decode", "clean", "window", "prompt", "inference", "events", "alerts", "emit", "commit",
          "lag", "other")


# -- input -------------------------------------------------------------------------------------


def make_messages(messages: int, conversations: int, *, seed: int = 0, run_id: str | None = None) -> list[ChatMessage]:
    """``messages`` valid chat messages over ``conversations`` conversations (turn-ordered within each,
    interleaved across them), texts and speakers cycled from the synthetic templates, 8 tenants."""
    from producer_sim.replay import interleave
    from producer_sim.synthetic import templates

    if messages < 1 or conversations < 1:
        raise ValueError("messages and conversations must be >= 1")
    conversations = min(conversations, messages)
    run_id = run_id or f"bench-{uuid.uuid4().hex[:8]}"
    utterances = [u for conv in templates() for u in conv.utterances]
    start = datetime.now(UTC)
    per_conv: list[list[ChatMessage]] = []
    for c in range(conversations):
        turns = messages // conversations + (c < messages % conversations)
        conv_id = f"{run_id}:c{c:06d}"
        per_conv.append([
            ChatMessage(
                message_id=f"{conv_id}:{t}", conversation_id=conv_id, turn=t,
                speaker=(u := utterances[(c * 7 + t) % len(utterances)]).speaker, text=u.text,
                sent_at=start, tenant=f"tenant-{c % 8}", gold_label=u.label,
            )
            for t in range(turns)
        ])
    return list(interleave(per_conv, concurrency=conversations, seed=seed))


# -- the consumer process ----------------------------------------------------------------------


class _Clock:
    """Per-stage wall time, accumulated by wrappers around the app's own calls (child process only)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.started: float | None = None  # first records received (perf_counter)
        self.cpu_started = 0.0

    def wrap(self, obj: Any, name: str, stage: str, *, inner: str | None = None) -> None:
        """Time ``obj.name`` as ``stage``; if it calls a wrapped ``inner`` stage, that time is not counted twice."""
        fn = getattr(obj, name)
        seconds = self.seconds
        perf = time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            before_inner = seconds[inner] if inner else 0.0
            t0 = perf()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.started is not None:  # nothing before the first records (group join) is counted
                    spent = perf() - max(t0, self.started)
                    seconds[stage] += spent - ((seconds[inner] - before_inner) if inner else 0.0)

        setattr(obj, name, timed)


def _consume(settings: Settings, expected: int, stages: bool, profile: str | None, conn) -> None:  # pragma: no cover - child process
    """Child: run one StreamApp until ``expected`` records are consumed and committed; send the figures back."""
    try:
        conn.send(_run_consumer(settings, expected, stages, profile))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _run_consumer(settings: Settings, expected: int, stages: bool, profile: str | None = None) -> dict[str, Any]:
    import consumer.pipeline as pipeline
    from consumer.runner import build_app
    from core.logs import configure

    configure(settings.log_level, settings.log_json)
    clock = _Clock()
    app = build_app(settings)
    result: dict[str, Any] = {}

    poll = app.consumer.poll

    def first_records_poll(*args: Any, **kwargs: Any):
        records = poll(*args, **kwargs)
        if records and clock.started is None:
            clock.started = time.perf_counter()
            clock.cpu_started = time.process_time()
            clock.seconds.clear()
        return records

    app.consumer.poll = first_records_poll  # type: ignore[method-assign]
    if stages:
        clock.wrap(app.partitions, "poll_batch", "poll")
        clock.wrap(pipeline, "decode", "decode")
        clock.wrap(pipeline, "clean_text", "clean")
        clock.wrap(app.conversations, "append_many", "window")
        clock.wrap(app.backend, "score", "inference")
        clock.wrap(app.labeler, "label", "prompt", inner="inference")
        clock.wrap(pipeline, "event", "events")
        for name in ("evaluate", "unsent", "mark_sent"):
            clock.wrap(app.alerts, name, "alerts")
        clock.wrap(app.consumer, "commit", "commit")
        clock.wrap(app.emitter, "send", "emit")
        clock.wrap(app.emitter, "finish", "emit", inner="commit")
        clock.wrap(app.partitions, "update_lag", "lag")
    handle = app._handle

    def handle_and_stop(batch):
        handle(batch)
        if app.stats.consumed >= expected and "seconds" not in result:
            app.checkpoint.commit_pending(force=True)  # the last offsets, whatever the interval
            result["seconds"] = time.perf_counter() - (clock.started or 0.0)
            result["cpu_seconds"] = time.process_time() - clock.cpu_started
            clock.started = None  # the span is over: wrappers stop counting (the loop's lag update, close)
            app.stop()

    app._handle = handle_and_stop  # type: ignore[method-assign]
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        stats = profiler.runcall(app.run, idle_exit_s=60.0)
        profiler.dump_stats(profile)
    else:
        stats = app.run(idle_exit_s=60.0)
    if "seconds" not in result:
        raise RuntimeError(f"consumed {stats.consumed} of {expected} records before going idle")
    out: dict[str, Any] = {
        **result,
        "consumed": stats.consumed, "events": stats.events, "dead_letters": stats.dead_letters,
        "batches": stats.batches, "alerts": stats.alerts, "rewinds": stats.rewinds,
        "degraded": stats.degraded, "pid": os.getpid(),
    }
    if stages:
        counted = sum(clock.seconds.values())
        clock.seconds["other"] = max(0.0, result["seconds"] - counted)
        out.update({f"stage_{s}_s": round(clock.seconds.get(s, 0.0), 4) for s in STAGES})
    return out


# -- the measurement ---------------------------------------------------------------------------


def _bench_settings(settings: Settings, *, partitions: int, batch_size: int | None, stream_batch: int | None) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return settings.with_overrides(
        kafka={"input_topic": f"bench-{suffix}.messages", "output_topic": f"bench-{suffix}.emotions",
               "dlq_topic": f"bench-{suffix}.dlq", "alerts_topic": f"bench-{suffix}.alerts",
               "partitions": partitions, "group_id": f"erc-bench-{suffix}", "client_id": f"erc-bench-{suffix}",
               "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
        redis={"key_prefix": f"erc-bench-{suffix}"},
        model={"backend": "null", "adapter": None},
        metrics={"enabled": False},
        batch={**({"micro_batch_size": batch_size} if batch_size else {}),
               **({"stream_batch_size": stream_batch} if stream_batch else {})},
    )


def _count_output(settings: Settings, expected: int, timeout_s: float = 60.0) -> tuple[int, set[str]]:
    """Read the output topic from the start (no group): records and distinct message ids."""
    from kafka import KafkaConsumer, TopicPartition

    k = settings.kafka
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=5000, **k.client_options())
    records, ids = 0, set()
    try:
        tps = [TopicPartition(k.output_topic, p) for p in sorted(consumer.partitions_for_topic(k.output_topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                for r in batch:
                    records += 1
                    ids.add(json.loads(r.value)["message_id"])
            if records >= expected and all(
                (h := consumer.highwater(tp)) is not None and consumer.position(tp) >= h for tp in tps
            ):
                break
    finally:
        consumer.close()
    return records, ids


def _drop_redis_keys(settings: Settings) -> None:
    from core.redis_client import connect

    client = connect(settings.redis)
    try:
        batch = []
        for key in client.scan_iter(match=f"{settings.redis.key_prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def with_services(fn, settings: Settings | None = None):
    """Run ``fn(settings)`` on a fresh tansu broker and Redis on free ports, stopped afterwards (``settings``: the
    rest of the configuration, default the environment's)."""
    import socket

    from local_services.supervisor import kafka_down, kafka_up, redis_down, redis_up

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    with tempfile.TemporaryDirectory(prefix="erc-bench-") as run_dir:
        base = (settings or Settings()).with_overrides(
            kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"},
            redis={"url": f"redis://127.0.0.1:{free_port()}/0"},
            services={"run_dir": run_dir},
        )
        kafka_up(base, create_topics=False)
        try:
            redis_up(base)
            try:
                return fn(base)
            finally:
                redis_down(base)
        finally:
            kafka_down(base)


def measure(
    settings: Settings | None = None,
    *,
    messages: int = 20_000,
    conversations: int = 500,
    batch_size: int | None = None,
    stream_batch: int | None = 500,
    partitions: int = 4,
    stages: bool = True,
    verify: bool = False,
    seed: int = 0,
    profile: str | None = None,
) -> dict[str, Any]:
    """Consumer throughput with the null backend (one consumer process); a flat dict of figures.

    ``settings``: use its broker and Redis (fresh topics, group and key prefix are made per run; the
    topics stay on that broker); None starts a throwaway tansu and Redis. ``batch_size`` overrides
    ``batch.micro_batch_size`` (the inference micro-batch), ``stream_batch`` ``batch.stream_batch_size`` (records per poll,
    Redis round-trip, flush and commit; None keeps the settings'). ``verify`` reads the output topic back and counts events and distinct message ids
    (slow: kafka-python reads ~6k records/s).

    Keys: ``messages_per_s``, ``messages``, ``seconds`` (first records polled → last offsets committed),
    ``cpu_seconds`` (the consumer process's CPU over that span, all its threads), ``cpu_per_message_us``,
    ``conversations``, ``partitions``, ``batch_size``, ``stream_batch``, ``producer_msgs_per_s``, ``events``, ``dead_letters``,
    ``batches``, ``alerts``, ``rewinds``, ``stage_<name>_s`` for each of :data:`STAGES` (with ``stages``), and
    with ``verify`` ``output_records`` and ``output_distinct_messages``. ``profile``: a file the consumer
    process writes its cProfile statistics to (``python -m pstats FILE``; slows it down).
    """
    if settings is None:
        return with_services(lambda base: measure(
            base, messages=messages, conversations=conversations, batch_size=batch_size,
            stream_batch=stream_batch, partitions=partitions,
            stages=stages, verify=verify, seed=seed, profile=profile))
    from local_services.supervisor import ensure_topics
    from producer_sim.replay import replay

    s = _bench_settings(settings, partitions=partitions, batch_size=batch_size, stream_batch=stream_batch)
    ensure_topics(s)
    stream = make_messages(messages, conversations, seed=seed)
    report = replay(s, stream, rate=None, progress=False)

    ctx = mp.get_context("spawn")  # a fresh interpreter: its CPU time is the consumer's alone
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_consume, args=(s, len(stream), stages, profile, child), name="erc-bench-consumer")
    proc.start()
    child.close()
    try:
        figures = parent.recv() if parent.poll(600) else {"error": "the consumer process sent nothing in 600 s"}
    except EOFError:
        figures = {"error": f"the consumer process died (exit code {proc.join(5) or proc.exitcode})"}
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in figures:
        raise RuntimeError(f"consumer benchmark failed: {figures['error']}")

    out: dict[str, Any] = {
        "messages_per_s": round(figures["consumed"] / figures["seconds"], 1),
        "messages": len(stream),
        "seconds": round(figures["seconds"], 3),
        "cpu_seconds": round(figures["cpu_seconds"], 3),
        "cpu_per_message_us": round(figures["cpu_seconds"] / figures["consumed"] * 1e6, 1),
        "conversations": min(conversations, messages),
        "partitions": partitions,
        "batch_size": s.batch.micro_batch_size,
        "stream_batch": s.batch.stream_records,
        "producer_msgs_per_s": round(report.rate, 1),
        **{k: v for k, v in figures.items() if k not in ("seconds", "cpu_seconds", "pid")},
    }
    if verify:
        records, ids = _count_output(s, out["events"])
        out["output_records"] = records
        out["output_distinct_messages"] = len(ids & {m.message_id for m in stream})
    _drop_redis_keys(s)
    return out


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--conversations", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=None, help="batch.micro_batch_size, the inference micro-batch "
                   "(default: the settings')")
    p.add_argument("--stream-batch", type=int, default=500, help="batch.stream_batch_size: records per poll, Redis "
                   "round-trip, flush and commit (0: the settings')")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="Run this many times (same services); report each and the best.")
    p.add_argument("--no-stages", action="store_true", help="No per-stage breakdown (no wrappers at all).")
    p.add_argument("--verify", action="store_true", help="Read the output topic back and count the events.")
    p.add_argument("--external", action="store_true",
                   help="Use the broker and Redis of ERC_KAFKA__BOOTSTRAP_SERVERS / ERC_REDIS__URL instead of fresh ones.")
    p.add_argument("--profile", default=None, help="Write the consumer process's cProfile statistics to this file.")
    p.add_argument("--json", action="store_true", help="One JSON object (the best run, with every run's rate).")
    a = p.parse_args(argv)
    from core.logs import configure

    configure("WARNING")  # stdout is the report (--json: one object); the consumer process logs to stderr

    def runs(base: Settings) -> list[dict[str, Any]]:
        return [measure(base, messages=a.messages, conversations=a.conversations, batch_size=a.batch_size,
                        stream_batch=a.stream_batch or None,
                        partitions=a.partitions, stages=not a.no_stages, verify=a.verify, seed=i,
                        profile=a.profile)
                for i in range(a.repeat)]

    results = runs(Settings()) if a.external else with_services(runs)
    best = max(results, key=lambda r: r["messages_per_s"])
    rates = [r["messages_per_s"] for r in results]
    best = {**best, "runs_messages_per_s": rates, "spread_messages_per_s": round(max(rates) - min(rates), 1)}
    if a.json:
        print(json.dumps(best))
    else:
        for i, r in enumerate(results):
            print(f"run {i + 1}: {r['messages_per_s']:,.0f} msg/s, {r['messages']} messages in {r['seconds']:.2f} s, "
                  f"CPU {r['cpu_seconds']:.2f} s ({r['cpu_per_message_us']:.0f} µs/message), "
                  f"producer {r['producer_msgs_per_s']:,.0f} msg/s")
            if "output_records" in r:
                print(f"  output topic: {r['output_records']} events, {r['output_distinct_messages']} distinct "
                      f"input messages of {r['messages']}")
        stage_cols = [(s, best.get(f"stage_{s}_s")) for s in STAGES if f"stage_{s}_s" in best]
        if stage_cols:
            print("best run, seconds per stage: " + ", ".join(f"{s} {v:.2f}" for s, v in stage_cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
