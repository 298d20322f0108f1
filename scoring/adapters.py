"""What a labeler serves with: an adapter's name and files, its demonstration index and its label-prior correction.

The model store finds and loads these (:mod:`model_store.loading`); the scoring path only uses them, so it
needs no knowledge of where adapters live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from scoring.calibration import Calibration

if TYPE_CHECKING:
    from core.settings import Settings
    from scoring.prompts import Demonstration


class Demonstrations(Protocol):
    """A retrieval index: the top-1 demonstration for each target text (None where it has none)."""

    def lookup(self, texts: Sequence[str]) -> list["Demonstration | None"]: ...


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version: its name, its files and its content hash (``model_store.registry.adapter_version``)."""

    name: str
    path: Path
    version: str | None = None

    @property
    def key(self) -> str:
        """What a backend knows this version by: a new version of a name is a different adapter to load."""
        return f"{self.name}@{self.version}" if self.version else self.name


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a labeler uses (None = zero-shot), the demonstration index and the label-prior
    correction trained with it."""

    ref: AdapterRef | None
    demos: Demonstrations | None = None
    calibration: Calibration | None = None
    label_set: str | None = None  # the label set it was trained for (its erc_meta.json), when known
    layout: str | None = None  # the prompt layout it was trained with (erc_meta.json; absent: instructerc)

    @property
    def name(self) -> str | None:
        return self.ref.name if self.ref else None

    @property
    def version(self) -> str | None:
        return self.ref.version if self.ref else None

    @property
    def key(self) -> str | None:
        return self.ref.key if self.ref else None


#: Chooses a route's adapter from its settings (``model_store.loading.choose_adapter`` in the product).
AdapterChooser = Callable[["Settings"], AdapterChoice]
