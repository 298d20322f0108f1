#!/usr/bin/env python3
"""Build the production image from the Dockerfile and run it: the check `.ci/run` makes of the image.

    .venv/bin/python deploy/image_check.py [--base IMAGE] [--remove]

Without a Docker engine: ``buildah`` builds with chroot isolation (docs/deployment.md, "The image"). Steps:

1. A base image: ``--base`` if given, else a stand-in for ``python:3.11-slim`` made with ``mmdebstrap`` (Debian
   bookworm: Python 3.11) and committed with buildah as ``localhost/erc-stream-base:bookworm`` (reused if present).
   The host's CA bundle and wheel folder (what ``pip config list`` names as ``cert`` and ``find-links``) are mounted
   into the build, so pip inside it reaches the package index as the host's pip does and takes the CPU torch wheel
   from that folder.
2. ``buildah bud --format docker`` (HEALTHCHECK is a Docker-format field); the image's size is printed.
3. In the image, as its non-root user, against a broker (tansu) and a Redis started here: every module of every
   package the wheel installed imports; ``erc-stream consume`` labels the message that docs/examples/send_and_read.py
   (the quick-start's client) sends, which prints its event; ``erc-stream export`` writes that event; ``erc-stream
   dashboard`` answers /healthz; ``erc-stream notify`` serves its metrics port.
4. What the runs wrote in the container's file system (``podman diff``) lies under /tmp and the store volume only,
   so the image runs with a read-only root file system given those two writable mounts.

Prints ``skipped: ...`` and exits 0 where buildah cannot run (not installed, or no user namespaces/chroot);
exits 1 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE = "localhost/erc-stream:ci"
BASE = "localhost/erc-stream-base:bookworm"
USER = "10001:10001"
#: What the image's processes may write: everything else can be a read-only root file system.
WRITABLE = ("/tmp", "/var/lib/erc-stream/store")
#: Modules that import an optional extra the CPU image does not install (the vLLM backend).
OPTIONAL_IMPORTS = {"vllm"}
IMPORT_ALL = f"""
import importlib, pkgutil, sys
from importlib.metadata import files
top = sorted({{str(f).split('/')[0] for f in files('erc-stream') if str(f).endswith('.py')}})
failed = []
count = 0
for name in top:
    pkg = importlib.import_module(name)
    for mod in pkgutil.walk_packages(pkg.__path__, name + '.'):
        if mod.name.endswith('.__main__'):  # runs the CLI when imported
            continue
        try:
            importlib.import_module(mod.name)
            count += 1
        except ImportError as e:
            if (e.name or '').split('.')[0] not in {OPTIONAL_IMPORTS!r}:
                failed.append(f'{{mod.name}}: {{e!r}}')
print('packages:', ' '.join(top), '| modules imported:', count)
sys.exit('\\n'.join(failed) if failed else 0)
"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def buildah_usable() -> str | None:
    """None when buildah can build here, else why not."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian: apt-get install buildah podman mmdebstrap)"
    probe = subprocess.run(["buildah", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`buildah info` failed: {probe.stderr.strip()[:300]}"
    return None


def pip_config() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".")[-1]] = value.strip().strip("'")
    return conf


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def make_base() -> None:
    if image_exists(BASE):
        print(f"{BASE}: present")
        return
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("no base image: give --base, or install mmdebstrap to make the stand-in")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=ca-certificates,python3,python3-venv",
             '--customize-hook=rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED; ln -sf python3 "$1"/usr/bin/python',
             "bookworm", str(tar)])
        container = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        try:
            run(["buildah", "add", "--quiet", container, str(tar), "/"])
            run(["buildah", "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--env", "LANG=C.UTF-8", "--cmd", "python3", container])
            run(["buildah", "commit", "--quiet", "--format", "docker", container, BASE])
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)


def build(base: str) -> None:
    conf = pip_config()
    cmd = ["buildah", "bud", "--isolation", "chroot", "--pull=never", "--format", "docker", "--layers",
           "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE]
    cert = conf.get("cert")
    if cert and Path(cert).is_file():
        cmd += ["-v", f"{cert}:{cert}:ro"]
    wheels = [Path(p) for p in conf.get("find-links", "").split() if Path(p).is_dir()]
    if wheels and any(wheels[0].glob("torch-2.13.0*cpu*.whl")):
        cmd += ["-v", f"{wheels[0]}:/wheels:ro", "--build-arg", "TORCH_INDEX=--find-links /wheels"]
    run(cmd + [str(ROOT)])
    size = json.loads(subprocess.run(["buildah", "images", "--json", IMAGE], check=True, capture_output=True,
                                     text=True).stdout)[0]["size"]  # e.g. "2.77 GB"
    print(f"image {IMAGE}: {size} (uncompressed)")


class Container:
    """A working container of the image; commands run in it as the image's user, on the host's network."""

    def __init__(self, env: dict[str, str]) -> None:
        self.id = subprocess.run(["buildah", "from", "--pull=never", IMAGE], check=True, capture_output=True,
                                 text=True).stdout.strip()
        self.env = env

    def command(self, args: list[str], env: dict[str, str] | None = None) -> list[str]:
        flags = [f"--env={k}={v}" for k, v in {**self.env, **(env or {})}.items()]
        return ["buildah", "run", "--isolation", "chroot", "--user", USER, *flags, self.id, "--", *args]

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
        print("$ (image)", " ".join(args), flush=True)
        done = subprocess.run(self.command(args, env), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        print("$ (image, background)", " ".join(args), flush=True)
        return subprocess.Popen(self.command(args, env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def written(self) -> list[str]:
        """Paths the runs added or changed in the container's file system (podman reads buildah's storage)."""
        out = subprocess.run(["podman", "diff", "--format", "json", self.id], check=True, capture_output=True,
                             text=True).stdout
        changes = json.loads(out) or {}
        return sorted({*changes.get("added", []), *changes.get("changed", [])})

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.id], capture_output=True)


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the erc-stream process itself, as an orchestrator's stop sends it (buildah, signalled, would
    SIGKILL its child); SIGKILL to the whole group if it does not exit in time."""
    import psutil

    if proc.poll() is not None:
        return
    inner = [p for p in psutil.Process(proc.pid).children(recursive=True)  # not buildah's own helpers
             if (c := p.cmdline()) and not c[0].startswith("buildah") and any(a.endswith("erc-stream") for a in c[:2])]
    for p in inner or [psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: exited {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                print(f"{what}: ok")
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{what}: not ready within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


def port_open(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return True


def run_in_image(work: Path) -> None:
    from core.labels import get_label_set
    from core.settings import KafkaSettings, RedisSettings, ServicesSettings, Settings
    from local_services.broker import kafka_down, kafka_up
    from local_services.redis_server import redis_down, redis_up

    services = Settings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
                        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"),
                        services=ServicesSettings(run_dir=work / "services", start_timeout_s=30.0))
    step("broker (tansu) and Redis for the image to use")
    kafka_up(services)
    redis_up(services)
    bootstrap = services.kafka.bootstrap_servers
    env = {"ERC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "ERC_REDIS__URL": services.redis.url.get_secret_value(),
           "ERC_METRICS__TOKEN": "image-check", "ERC_MODEL__THREADS": "2"}
    container = Container(env)
    procs: list[subprocess.Popen] = []
    try:
        step("every module of the installed packages imports")
        print(container.run(["python", "-c", IMPORT_ALL]).strip())

        step("erc-stream consume labels a message sent by the quick-start's client")
        metrics = free_port()
        consume_log = work / "consume.log"
        consumer = container.start(["erc-stream", "consume"], consume_log, {"ERC_METRICS__PORT": str(metrics)})
        procs.append(consumer)
        wait_until("consume /readyz", lambda: http_ok(f"http://127.0.0.1:{metrics}/readyz"), consumer, consume_log)
        client = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "send_and_read.py"),
                                 "--bootstrap", bootstrap, "--timeout", "180"], capture_output=True, text=True)
        print(client.stdout.strip())
        if client.returncode != 0:
            raise SystemExit(f"the quick-start client failed: {client.stderr[-2000:]}\n"
                             f"consumer log:\n{consume_log.read_text()[-3000:]}")
        event = json.loads(client.stdout.split("\n", 1)[1])
        if event["label"] not in get_label_set("meld"):
            raise SystemExit(f"event label {event['label']!r} is not a MELD label")
        stop(consumer)  # a graceful stop: the batch finished, offsets committed, the group left, exit 0
        stopped = [line for line in consume_log.read_text().splitlines() if "consumer stopped" in line]
        if consumer.returncode != 0 or not stopped:
            raise SystemExit(f"consume did not stop cleanly on SIGTERM (exit {consumer.returncode}):\n"
                             f"{consume_log.read_text()[-2000:]}")
        print("consume: stopped on SIGTERM, exit 0:", stopped[-1].split("]", 1)[-1].strip()[:200])

        step("erc-stream export writes the event")
        exported = container.run(["erc-stream", "export", "--format", "jsonl"])
        if event["event_id"] not in exported:
            raise SystemExit(f"export did not write event {event['event_id']}:\n{exported[-2000:]}")
        print("export: wrote", len(exported.splitlines()), "event(s)")

        step("erc-stream dashboard answers /healthz")
        port = free_port()
        log = work / "dashboard.log"
        board = container.start(["erc-stream", "dashboard", "--port", str(port)], log,
                                {"ERC_DASHBOARD__TOKEN": "image-check"})
        procs.append(board)
        wait_until("dashboard /healthz", lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), board, log)
        stop(board)

        step("erc-stream notify serves its metrics")
        port = free_port()
        log = work / "notify.log"
        target = json.dumps([{"name": "check", "url": f"http://127.0.0.1:{free_port()}/hook"}])  # no alert comes
        notifier = container.start(["erc-stream", "notify"], log, {"ERC_NOTIFY__METRICS_PORT": str(port),
                                                                    "ERC_NOTIFY__TARGETS": target})
        procs.append(notifier)
        wait_until("notify metrics port", lambda: port_open(port), notifier, log)
        stop(notifier)

        step("what the runs wrote lies under " + " and ".join(WRITABLE))
        if shutil.which("podman") is None:
            print("podman is not installed: the file-system diff is not checked")
        else:
            written = container.written()
            outside = [p for p in written if not any(p == w or p.startswith(w + "/") or w.startswith(p + "/")
                                                     for w in WRITABLE)]
            print(f"{len(written)} paths written ({', '.join(written)}); outside the writable mounts: {outside or 'none'}")
            if outside:
                raise SystemExit("the image writes outside its writable mounts: " + ", ".join(outside[:20]))
    finally:
        for proc in procs:
            stop(proc)
        container.remove()
        kafka_down(services)
        redis_down(services)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base image already in local storage (default: the mmdebstrap stand-in)")
    parser.add_argument("--remove", action="store_true", help="remove the image and its build cache afterwards")
    args = parser.parse_args()
    why = buildah_usable()
    if why:
        print(f"skipped: the image is not built here: {why}")
        return 0
    started = time.monotonic()
    step("base image")
    if args.base is None:
        make_base()
    step("build")
    build(args.base or BASE)
    with tempfile.TemporaryDirectory(prefix="erc-image-check-") as tmp:
        run_in_image(Path(tmp))
    if args.remove:  # the image and its build stage's layers; the base stays for the next build
        subprocess.run(["buildah", "rmi", IMAGE], capture_output=True)
        subprocess.run(["buildah", "rmi", "--prune"], capture_output=True)
    print(f"\nimage check: ok ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
