"""Which conversations a replay uses: a dataset file, or the built-in synthetic ones as a fallback."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.settings import Settings
from model_store.data import Conversation, default_file, load_conversations
from producer_sim.synthetic import synthetic_conversations


@dataclass(frozen=True)
class Source:
    conversations: list[Conversation]
    description: str
    synthetic: bool


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')[:-3]}"


def load_source(
    settings: Settings,
    *,
    dataset: str = "meld",
    file: Path | None = None,
    split: str = "dev",
    dialogues: int | None = None,
    synthetic: int | None = None,
    seed: int = 0,
    fallback: bool = False,
) -> Source:
    """The conversations to replay.

    With ``synthetic`` the built-in conversations are used. Otherwise ``file`` (or the dataset's
    split under the data directory) is read; when that default file does not exist and ``fallback``
    is set (the demo on a fresh machine), synthetic conversations stand in, and the description says so.
    """
    if synthetic:
        convs = synthetic_conversations(synthetic, seed=seed)
        return Source(convs, f"replaying {len(convs)} synthetic conversations", True)
    path = file or default_file(settings.data.dir, dataset, split)
    if file is None and not Path(path).exists() and fallback:
        convs = synthetic_conversations(dialogues or 6, seed=seed)
        return Source(
            convs,
            f"no data at {path} (set ERC_DATA__DIR to a folder holding meld/ and emorynlp/); "
            f"falling back to {len(convs)} built-in synthetic conversations",
            True,
        )
    convs = load_conversations(dataset, path, split=split)
    if dialogues is not None:
        convs = convs[:dialogues]
    return Source(convs, f"replaying {len(convs)} {dataset} dialogues from {path}", False)
