"""A local three-master Redis Cluster for tests: ``redis-server --cluster-enabled yes`` on three ports.

:class:`RedisClusterProcs` starts the nodes (no persistence; each node's ``nodes-<port>.conf`` in a
directory of its own, so no two runs share cluster state), joins them with
``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`` and waits until every node
reports ``cluster_state:ok``. ``host`` is the address the nodes bind and announce: 127.0.0.1 for
tests on this machine, an address reachable from other network namespaces for the multi-host test
(a cluster client connects to the addresses the nodes announce, not to the one it was given).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port


class RedisClusterProcs:
    def __init__(self, workdir: Path, host: str = "127.0.0.1", masters: int = 3) -> None:
        self.workdir = workdir
        self.host = host
        self.ports = [free_port(host) for _ in range(masters)]
        # The cluster bus defaults to port + 10000, which fails above 55535 and may be taken: pick it too.
        self.bus_ports = [free_port(host) for _ in range(masters)]
        self.procs: list[subprocess.Popen] = []
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """A seed URL for ``RedisCluster.from_url`` (it discovers the other nodes)."""
        return f"redis://{self.host}:{self.ports[0]}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports):
            node_dir = self.workdir / f"node-{port}"
            node_dir.mkdir(exist_ok=True)
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", self.host, "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node_dir / f"nodes-{port}.conf"), "--cluster-announce-ip", self.host,
                 "--cluster-port", str(bus_port),
                 # Off the loopback, protected mode refuses password-less clients; these nodes listen only on
                 # this machine (loopback or the test's bridge to its own namespaces).
                 "--protected-mode", "no" if self.host != "127.0.0.1" else "yes",
                 "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
                stdout=(node_dir / "redis.log").open("a"), stderr=subprocess.STDOUT,
            ))
        try:
            for port in self.ports:
                self._wait(lambda c: c.ping(), port, timeout_s, "answer PING")
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"{self.host}:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout_s,
            )
            for port in self.ports:
                self._wait(lambda c: c.cluster("info").get("cluster_state") == "ok", port, timeout_s,
                           "report cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    def _wait(self, check, port: int, timeout_s: float, what: str) -> None:
        client = redis.Redis(host=self.host, port=port, socket_timeout=1, socket_connect_timeout=1,
                             decode_responses=True)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if check(client):
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"redis cluster node {self.host}:{port} did not {what} within {timeout_s} s")
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = []
