"""The model registry: base models and adapters, with their metadata, and one active adapter per label set.

Adapters live in ``<store>/adapters/<name>/`` (trained here) or ``model_store/adapters/<name>/``
(shipped with the project, LoRA weights only). Each holds the peft files, ``erc_meta.json`` (base,
label set, window, data hash, dev scores, created, the command that trained it) and, when it was
trained with demonstrations, ``demos/`` (its retrieval index). The active adapter per label set is
``<store>/registry.json``; where the store names none, ``model_store/adapters/defaults.json`` does.
A running consumer watches the registry file and switches adapters between batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model_store.base_models import EMBEDDED
from scoring.adapters import AdapterRef

#: Adapters committed with the project (LoRA weights only).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"


def resolve_adapter(adapter: str, store_dir: Path) -> AdapterRef:
    """An adapter given as a directory, a name in the store, or a name shipped with the project."""
    candidate = Path(adapter).expanduser()
    if (candidate / "adapter_config.json").exists():
        return AdapterRef(candidate.name, candidate)
    for root in (store_dir / "adapters", SHIPPED_ADAPTERS):
        if (root / adapter / "adapter_config.json").exists():
            return AdapterRef(adapter, root / adapter)
    raise FileNotFoundError(
        f"adapter {adapter!r} is neither an adapter directory nor in {store_dir / 'adapters'} or {SHIPPED_ADAPTERS}"
    )


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    shipped: bool
    meta: dict

    @property
    def label_set(self) -> str | None:
        return self.meta.get("label_set")


class Registry:
    def __init__(self, store_dir: Path) -> None:
        self.store_dir = Path(store_dir)
        self.file = self.store_dir / "registry.json"

    # -- reading ---------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        found: dict[str, AdapterInfo] = {}
        for root, shipped in ((SHIPPED_ADAPTERS, True), (self.store_dir / "adapters", False)):
            if not root.is_dir():
                continue
            for d in sorted(root.iterdir()):
                if (d / "adapter_config.json").exists():
                    found[d.name] = AdapterInfo(d.name, d, shipped, _meta(d))  # the store's copy wins
        return list(found.values())

    def bases(self) -> list[dict]:
        out = [{"name": EMBEDDED, "path": str(self.store_dir / "base" / EMBEDDED),
                "converted": (self.store_dir / "base" / EMBEDDED / "config.json").exists(), "embedded": True}]
        base_dir = self.store_dir / "base"
        if base_dir.is_dir():
            out += [{"name": d.name, "path": str(d), "converted": True, "embedded": False}
                    for d in sorted(base_dir.iterdir()) if d.is_dir() and d.name != EMBEDDED and (d / "config.json").exists()]
        return out

    def info(self, name: str) -> AdapterInfo:
        ref = resolve_adapter(name, self.store_dir)
        return AdapterInfo(ref.name, ref.path, ref.path.is_relative_to(SHIPPED_ADAPTERS), _meta(ref.path))

    def active(self, label_set: str) -> AdapterRef | None:
        """The active adapter for a label set, or None (zero-shot)."""
        name = self._state().get("active", {}).get(label_set)
        if name is None:
            name = _read_json(SHIPPED_ADAPTERS / "defaults.json").get(label_set)
        return resolve_adapter(name, self.store_dir) if name else None

    def version(self) -> float:
        """Changes whenever a promotion is written (the consumer polls this between batches)."""
        try:
            return self.file.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    # -- writing ---------------------------------------------------------------------------

    def promote(self, name: str, label_set: str | None = None) -> AdapterInfo:
        info = self.info(name)
        label_set = label_set or info.label_set
        if not label_set:
            raise ValueError(f"adapter {name!r} has no label set in its metadata; pass one")
        state = self._state()
        state.setdefault("active", {})[label_set] = name
        state.setdefault("history", []).append(
            {"label_set": label_set, "adapter": name, "at": datetime.now(UTC).isoformat(timespec="seconds")}
        )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.file)  # atomic: a watching consumer never reads half a file
        return info

    def record_eval(self, name: str, key: str, result: dict) -> None:
        """Store an evaluation result in an adapter's metadata (only for adapters in the store)."""
        info = self.info(name)
        if info.shipped:
            return
        meta = dict(info.meta)
        meta.setdefault("evals", {})[key] = result
        if key.endswith(":dev"):
            meta["dev"] = {"weighted_f1": result.get("weighted_f1"), "accuracy": result.get("accuracy"),
                           "n": result.get("n")}
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
