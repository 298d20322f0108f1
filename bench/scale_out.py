"""Scale-out: messages/s of 1, 2, 3 … consumer processes in one group, and how the partition count bounds them.

One configuration (``measure_group``) = N consumer processes (spawned children, each a real ``StreamApp``,
as in :mod:`bench.consumer_throughput`) in one fresh group on a fresh input topic of P partitions, with M
messages over C conversations pre-produced on it:

1. every child records, per stream batch it handles, the wall-clock time and the record count, and the
   time of each partition assignment it receives (the app's own calls are wrapped; no code path changes);
2. the group's rate is taken over the span where the group is complete and all busy: from the last
   assignment any child received (after it, nobody joins or rebalances) to the moment the first busy
   child handled its last batch (after it, the work is no longer spread). Records handled inside that
   span / its length = messages/s of the group; each child's CPU seconds in it are reported too;
3. a child that receives no partition (N > P) is reported as idle: the partition count is the bound on
   parallelism of a consumer group, whatever the number of processes.

The broker (tansu) and Redis are fresh ones on free ports (from ``bench.consumer_throughput``), on the same
machine as the consumers: on a 2-core box they compete for the same CPUs, which is the point of the knee.
Run it alone (keep it short on a shared machine)::

    python -m bench.scale_out --backend null --messages 24000 --conversations 600 --configs 1x6,2x6,3x6,3x2
    python -m bench.scale_out --backend hf --messages 64 --conversations 16 --configs 1x6,2x6,3x6 --threads 1

``--configs`` lists ``NxP`` (N processes on P partitions). ``--redis-cluster`` keeps the state in a local
three-master Redis Cluster instead. ``--json`` prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from bench.consumer_throughput import _bench_settings, _drop_redis_keys, make_messages, with_services
from core.settings import Settings


def _child(settings: Settings, expected: int, done, loaded, conn) -> None:  # pragma: no cover - child process
    """One group member: run until the group consumed ``expected`` records (``done``, shared by all children),
    then stop; send back its batches (time, records), assignments and CPU seconds.

    Every child loads its model, then waits for the others (``loaded``, a barrier) before it joins the group:
    a model that loads in 10-20 s would otherwise let the first child take every partition for a while.
    No idle exit: a member without partitions leaving early would rebalance the group mid-run."""
    try:
        import threading

        from consumer.partitions import Partitions
        from consumer.runner import build_app
        from core.logs import configure

        configure("WARNING")
        batches: list[tuple[float, int, float]] = []  # (end time, records, process CPU seconds at the end)
        assignments: list[tuple[float, list[str]]] = []
        assigned = Partitions.on_partitions_assigned

        async def on_assigned(listener, parts):
            assignments.append((time.time(), sorted(f"{tp.topic}/{tp.partition}" for tp in parts)))
            await assigned(listener, parts)

        Partitions.on_partitions_assigned = on_assigned  # this child's class only (spawned process)
        app = build_app(settings)
        handle = app._handle

        def timed_handle(batch):
            handle(batch)
            if batch:
                batches.append((time.time(), len(batch), time.process_time()))
                with done.get_lock():
                    done.value += len(batch)

        def stop_when_done() -> None:
            while done.value < expected and not app.stopping:
                time.sleep(0.1)
            app.stop()

        app._handle = timed_handle  # type: ignore[method-assign]
        loaded.wait(600)
        threading.Thread(target=stop_when_done, daemon=True).start()
        cpu0 = time.process_time()
        stats = app.run(idle_exit_s=None)
        conn.send({"batches": batches, "assignments": assignments, "consumed": stats.consumed,
                   "cpu_seconds": time.process_time() - cpu0})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _service_cpu_s(settings: Settings) -> dict[str, float]:
    """CPU seconds used so far by the broker and Redis we started (from /proc; empty where unknown)."""
    import os

    from local_services.supervisor import services_status

    out = {}
    for status in services_status(settings):
        try:
            fields = Path(f"/proc/{status.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[status.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, TypeError, IndexError, ValueError):
            pass
    return out


def _group_rate(children: list[dict[str, Any]]) -> dict[str, Any]:
    """The group's messages/s over the span where it is complete and every busy member still has work."""
    busy = [c for c in children if c["batches"]]
    start = max(t for c in children for t, _ in c["assignments"])
    end = min(c["batches"][-1][0] for c in busy)
    if end <= start:
        return {"messages_per_s": None, "span_s": 0.0, "span_records": 0, "note": "no common busy span"}
    records = 0
    cpu = []
    for c in busy:
        inside = [(t, n, p) for t, n, p in c["batches"] if start < t <= end]
        records += sum(n for _, n, _ in inside)
        if len(inside) >= 2:
            cpu.append(inside[-1][2] - inside[0][2])
    span = end - start
    return {"messages_per_s": round(records / span, 1), "span_s": round(span, 2), "span_records": records,
            "busy_cpu_s_per_process": [round(x, 2) for x in cpu]}


def measure_group(base: Settings, *, processes: int, partitions: int, messages: int, conversations: int,
                  backend: str = "null", threads: int | None = None, batch_size: int | None = None,
                  adapter: str | None = "meld-smollm2-lora",
                  seed: int = 0) -> dict[str, Any]:
    """N consumer processes on a P-partition topic holding M messages: the group's rate and who worked."""
    from local_services.supervisor import ensure_topics
    from producer_sim.replay import replay

    # The null backend's stream batches are the measured default (500); the model's are one micro-batch, so a
    # child's records arrive in many timed batches (the span below needs them) and no poll hoards a backlog.
    stream_batch = 500 if backend == "null" else (batch_size or 16)
    s = _bench_settings(base, partitions=partitions, batch_size=batch_size, stream_batch=stream_batch)
    if backend != "null":
        s = s.with_overrides(model={"backend": backend, "threads": threads, "adapter": adapter})
    ensure_topics(s)
    stream = make_messages(messages, conversations, seed=seed)
    replay(s, stream, rate=None, progress=False)
    services_before, started = _service_cpu_s(s), time.monotonic()

    ctx = mp.get_context("spawn")
    done = ctx.Value("l", 0)  # records handled by the whole group (a redelivered record counts again)
    loaded = ctx.Barrier(processes)
    pipes, procs = [], []
    for i in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(s, len(stream), done, loaded, child), name=f"erc-scale-{i}")
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    children = []
    try:
        for parent in pipes:
            children.append(parent.recv() if parent.poll(1800) else {"error": "no answer in 1,800 s"})
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    wall = time.monotonic() - started
    services_after = _service_cpu_s(s)
    errors = [c["error"] for c in children if "error" in c]
    if errors:
        raise RuntimeError(f"scale-out run failed: {errors}")
    consumed = sum(c["consumed"] for c in children)
    if consumed < len(stream):
        raise RuntimeError(f"the group consumed {consumed} of {len(stream)} messages")
    _drop_redis_keys(s)
    return {
        "backend": backend, "redis": "cluster" if s.redis.cluster else "standalone", "processes": processes, "partitions": partitions, "messages": len(stream),
        "conversations": min(conversations, messages), "threads_per_process": threads,
        "adapter": adapter if backend != "null" else None, "batch_size": s.batch.micro_batch_size,
        "stream_batch": stream_batch,
        **_group_rate(children),
        "idle_processes": sum(1 for c in children if not c["batches"]),
        "consumed_per_process": [c["consumed"] for c in children],
        "cpu_s_per_process": [round(c["cpu_seconds"], 2) for c in children],
        # Over the whole consuming run (start of the processes to their exit), not only the busy span:
        "run_wall_s": round(wall, 2),
        **{f"{name}_cpu_s": round(services_after[name] - services_before[name], 2)
           for name in services_after if name in services_before},
        "loadavg_1m_after": float(Path("/proc/loadavg").read_text().split()[0]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["null", "hf"], default="null")
    p.add_argument("--configs", default="1x6,2x6,3x6,3x2", help="NxP: N consumer processes on P partitions, comma-separated")
    p.add_argument("--messages", type=int, default=24_000)
    p.add_argument("--conversations", type=int, default=600)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (hf backend)")
    p.add_argument("--adapter", default="meld-smollm2-lora", help="hf backend: the LoRA adapter (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=None, help="batch.micro_batch_size, the inference micro-batch")
    p.add_argument("--redis-cluster", action="store_true",
                   help="state in a local three-master Redis Cluster (tests/redis_cluster.py) instead of one Redis")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from core.logs import configure

    configure("WARNING")
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]

    def run(base: Settings) -> None:
        for n, parts in configs:
            r = measure_group(base, processes=n, partitions=parts, messages=a.messages, conversations=a.conversations,
                              backend=a.backend, threads=a.threads, batch_size=a.batch_size, adapter=a.adapter)
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                rate = f"{r['messages_per_s']:,.1f}" if r["messages_per_s"] is not None else "n/a"
                print(f"{a.backend}: {n} process(es) on {parts} partitions: {rate} msg/s over {r['span_s']} s "
                      f"({r['span_records']} records); idle {r['idle_processes']}; consumed {r['consumed_per_process']}; "
                      f"CPU s {r['cpu_s_per_process']}; broker CPU s {r.get('kafka_cpu_s')}, redis CPU s {r.get('redis_cpu_s')} "
                      f"in {r['run_wall_s']} s; load {r['loadavg_1m_after']}", flush=True)

    def on_cluster(base: Settings) -> None:
        import tempfile

        from tests.redis_cluster import RedisClusterProcs

        with tempfile.TemporaryDirectory(prefix="erc-bench-cluster-") as workdir:
            cluster = RedisClusterProcs(Path(workdir))
            cluster.start()
            try:
                run(base.with_overrides(redis={"url": cluster.url, "cluster": True}))
            finally:
                cluster.stop()

    with_services(on_cluster if a.redis_cluster else run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
