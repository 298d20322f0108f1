"""The model registry: base models and adapters, each adapter in immutable versions, and one active
adapter version per label set.

Adapters trained here live in ``<store>/adapters/<name>/<version>/``; ``models train --name X`` on an
existing name adds a version and never touches the old ones. A version is a content hash
(:func:`adapter_version`) of the weights, the peft config, the label set, base and training config and the
label-prior correction, so the same name can never mean two different adapters in an event. Adapters shipped
with the project (``model_store/adapters/<name>/``) and adapters given as a directory are one version each,
hashed the same way (a store from before versions, ``<store>/adapters/<name>/`` holding the files directly,
too). Each version holds the peft files, ``erc_meta.json`` (base, label set, window, data hash, dev scores,
created, the command that trained it) and, when it was trained with demonstrations, ``demos/``.

An adapter is named ``NAME`` (its newest version) or ``NAME@VERSION``. The active version per label set is
``<store>/registry.json`` (with the history of promotions, which ``rollback`` walks back); where the store
names none, ``model_store/adapters/defaults.json`` does. A running consumer watches the registry file and
switches adapters between batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from model_store.base_models import EMBEDDED
from scoring.adapters import AdapterRef

#: Adapters committed with the project (LoRA weights only).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"
#: A version's directory name: its content hash.
_VERSION_DIR = re.compile(r"[0-9a-f]{12}")
#: What goes into an adapter's version, besides its weights and peft config.
_VERSIONED_META = ("label_set", "base", "config", "calibration")


def adapter_version(path: Path) -> str:
    """The content hash that identifies an adapter directory (12 hex digits)."""
    files = [path / "adapter_config.json", path / "adapter_model.safetensors", path / "erc_meta.json"]
    return _version(str(path), tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files))


@lru_cache(maxsize=256)
def _version(path: str, _mtimes: tuple[int, ...]) -> str:
    # Cached per (directory, file times): the registry is polled between batches; the hash reads the weights.
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = Path(path) / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    meta = _meta(Path(path))
    h.update(json.dumps({k: meta.get(k) for k in _VERSIONED_META}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def versions(name: str, store_dir: Path) -> list[AdapterRef]:
    """Every version of an adapter name, oldest first; a shipped one counts as older than any in the store."""
    found: list[tuple[str, AdapterRef]] = []
    shipped = SHIPPED_ADAPTERS / name
    if _is_adapter(shipped):
        found.append(("", AdapterRef(name, shipped, adapter_version(shipped))))
    root = store_dir / "adapters" / name
    candidates = [root] if _is_adapter(root) else []
    if root.is_dir():
        candidates += [d for d in root.iterdir() if _VERSION_DIR.fullmatch(d.name) and _is_adapter(d)]
    for d in candidates:
        created = str(_meta(d).get("created") or datetime.fromtimestamp(d.stat().st_mtime, UTC).isoformat())
        found.append((created, AdapterRef(name, d, adapter_version(d))))
    return [ref for _, ref in sorted(found, key=lambda pair: pair[0])]


def resolve_adapter(adapter: str, store_dir: Path) -> AdapterRef:
    """An adapter given as a directory, ``NAME`` (its newest version) or ``NAME@VERSION``, in the store or shipped."""
    candidate = Path(adapter).expanduser()
    if _is_adapter(candidate):
        return AdapterRef(candidate.name, candidate, adapter_version(candidate))
    name, _, version = adapter.partition("@")
    found = versions(name, store_dir)
    if version:
        found = [ref for ref in found if ref.version == version]
    if not found:
        which = f"version {version!r} of adapter {name!r}" if version else f"adapter {name!r}"
        raise FileNotFoundError(
            f"{which} is neither an adapter directory nor in {store_dir / 'adapters'} or {SHIPPED_ADAPTERS}"
        )
    return found[-1]


def publish(staging: Path, store_dir: Path, name: str) -> Path:
    """Move a finished adapter directory into the store as a new version of ``name``; its directory.

    The same content again is the same version: the staging copy is dropped and the existing one kept."""
    version = adapter_version(staging)
    target = store_dir / "adapters" / name / version
    if _is_adapter(target):
        shutil.rmtree(staging)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return target


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    shipped: bool
    meta: dict
    version: str | None = None

    @property
    def dev_weighted_f1(self) -> float | None:
        """Weighted F1 on the dev split of the adapter's own (first) training dataset, from its recorded
        evaluations (not another dataset's, nor the scripted conversations'); None if never evaluated there.
        Adapters written before evaluations were keyed by dataset carry it as ``dev``."""
        own = (self.meta.get("datasets") or [self.meta.get("dataset") or self.meta.get("label_set")])[0]
        found = (self.meta.get("evals") or {}).get(f"{own}:dev") or self.meta.get("dev") or {}
        return found.get("weighted_f1")

    @property
    def label_set(self) -> str | None:
        return self.meta.get("label_set")

    @property
    def spec(self) -> str:
        """``NAME@VERSION``: what the registry records."""
        return f"{self.name}@{self.version}" if self.version else self.name


def _info(ref: AdapterRef) -> AdapterInfo:
    return AdapterInfo(ref.name, ref.path, ref.path.is_relative_to(SHIPPED_ADAPTERS), _meta(ref.path), ref.version)


class Registry:
    def __init__(self, store_dir: Path) -> None:
        self.store_dir = Path(store_dir)
        self.file = self.store_dir / "registry.json"

    # -- reading ---------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        """Every version of every adapter, shipped and in the store, by name then age."""
        names = {d.name for root in (SHIPPED_ADAPTERS, self.store_dir / "adapters") if root.is_dir()
                 for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        return [_info(ref) for name in sorted(names) for ref in versions(name, self.store_dir)]

    def bases(self) -> list[dict]:
        out = [{"name": EMBEDDED, "path": str(self.store_dir / "base" / EMBEDDED),
                "converted": (self.store_dir / "base" / EMBEDDED / "config.json").exists(), "embedded": True}]
        base_dir = self.store_dir / "base"
        if base_dir.is_dir():
            out += [{"name": d.name, "path": str(d), "converted": True, "embedded": False}
                    for d in sorted(base_dir.iterdir()) if d.is_dir() and d.name != EMBEDDED and (d / "config.json").exists()]
        return out

    def info(self, adapter: str) -> AdapterInfo:
        return _info(resolve_adapter(adapter, self.store_dir))

    def active(self, label_set: str) -> AdapterRef | None:
        """The active adapter version for a label set, or None (zero-shot)."""
        spec = self._state().get("active", {}).get(label_set)
        if spec is None:
            spec = _read_json(SHIPPED_ADAPTERS / "defaults.json").get(label_set)
        return resolve_adapter(spec, self.store_dir) if spec else None

    def version(self) -> float:
        """Changes whenever a promotion or rollback is written (the consumer polls this between batches)."""
        try:
            return self.file.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    # -- writing ---------------------------------------------------------------------------

    def promote(self, adapter: str, label_set: str | None = None) -> AdapterInfo:
        """Make ``NAME`` (its newest version now) or ``NAME@VERSION`` the active adapter of its label set."""
        info = self.info(adapter)
        label_set = label_set or info.label_set
        if not label_set:
            raise ValueError(f"adapter {adapter!r} has no label set in its metadata; pass one")
        self._activate(label_set, info.spec, "promote")
        return info

    def rollback(self, label_set: str) -> AdapterInfo:
        """Make the version that was active before the current one active again."""
        history = [h for h in self._state().get("history", []) if h["label_set"] == label_set]
        if not history:
            raise ValueError(f"nothing was promoted for label set {label_set!r}; nothing to roll back to")
        current = history[-1]["adapter"]
        earlier = [h["adapter"] for h in history[:-1] if h["adapter"] != current]
        if not earlier:
            defaults = _read_json(SHIPPED_ADAPTERS / "defaults.json").get(label_set)
            if not defaults:
                raise ValueError(f"label set {label_set!r} had no other adapter before {current!r}")
            earlier = [self.info(defaults).spec]
        info = self.info(earlier[-1])
        self._activate(label_set, info.spec, "rollback")
        return info

    def _activate(self, label_set: str, spec: str, how: str) -> None:
        state = self._state()
        state.setdefault("active", {})[label_set] = spec
        state.setdefault("history", []).append(
            {"label_set": label_set, "adapter": spec, "how": how, "at": datetime.now(UTC).isoformat(timespec="seconds")}
        )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.file)  # atomic: a watching consumer never reads half a file

    def record_eval(self, name: str, key: str, result: dict) -> None:
        """Store an evaluation result (``key``: ``dataset:split``) in an adapter version's metadata (only for
        adapters in the store)."""
        try:
            info = self.info(name)
        except FileNotFoundError:  # an adapter given as a directory outside the store
            return
        if info.shipped:
            return
        meta = dict(info.meta)
        meta.setdefault("evals", {})[key] = result
        (info.path / "erc_meta.json").write_text(json.dumps(meta, indent=2, default=str))

    def _state(self) -> dict:
        return _read_json(self.file)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _meta(path: Path) -> dict:
    return _read_json(path / "erc_meta.json")
