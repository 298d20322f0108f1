"""Hosts on this machine: Linux network namespaces joined by a bridge (needs root, ``ip`` from iproute2).

:class:`Hosts` makes, under names unique to the run:

- a bridge in the root namespace with ``<subnet>.1/24`` (the "network"; servers for the hosts bind
  this address: the broker, the Redis Cluster nodes);
- ``count`` namespaces, each with one end of a veth pair as its only interface (``<subnet>.<i+2>/24``),
  the other end on the bridge, and its own loopback.

A process started with :meth:`Hosts.exec_prefix` sees only its namespace's interfaces: it reaches the
broker and Redis over its veth like a separate machine would over a switch (one kernel, one CPU set:
it isolates the network, not the compute). :meth:`destroy` removes everything, also after a failed
:meth:`create`; deleting a namespace deletes the veth end in it and with it the peer.
"""

from __future__ import annotations

import random
import subprocess
import uuid


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None if they can): not root, no ``ip``, or not permitted."""
    name = f"erc-probe-{uuid.uuid4().hex[:6]}"
    try:
        added = _ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> str:
    """A 10.x.y /24 that no interface or route of this machine uses."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    rng = random.Random()
    for _ in range(100):
        subnet = f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.200-250.x.0/24 subnet")


class Hosts:
    def __init__(self, count: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"erc{tag}br"  # interface names: at most 15 characters
        self.names = [f"erc-{tag}-h{i + 1}" for i in range(count)]
        self._veths = [(f"erc{tag}h{i + 1}", f"erc{tag}n{i + 1}") for i in range(count)]
        self.subnet = _free_subnet()

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: bind the hosts' servers here."""
        return f"{self.subnet}.1"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 2}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def create(self) -> None:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (name, (root_end, host_end)) in enumerate(zip(self.names, self._veths)):
                _ip("netns", "add", name)
                _ip("link", "add", root_end, "type", "veth", "peer", "name", host_end)
                _ip("link", "set", root_end, "master", self.bridge)
                _ip("link", "set", root_end, "up")
                _ip("link", "set", host_end, "netns", name)
                _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", host_end)
                _ip("-n", name, "link", "set", host_end, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        for name in self.names:
            _ip("netns", "del", name, check=False)
        for root_end, _ in self._veths:  # gone with their namespace, unless it was never moved there
            _ip("link", "del", root_end, check=False)
        _ip("link", "del", self.bridge, check=False)

    def namespace_of(self, pid: int) -> str:
        """The named namespace process ``pid`` runs in ('' for the root one)."""
        return _ip("netns", "identify", str(pid), check=False).stdout.strip()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (empty after ``destroy``)."""
        out = _ip("netns", "list").stdout + _ip("link").stdout
        return [n for n in [*self.names, self.bridge, *(r for r, _ in self._veths)] if n in out]
