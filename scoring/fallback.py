"""One bad item must fail only itself, and a part that is down must fail no item: a batched call that raises is
redone item by item, and an item is blamed only if the part still answers.

The stream batches everything it can (one backend call per micro-batch, one demonstration lookup, one
Redis round trip), so one poisonous input would otherwise fail its whole batch, and the batch would fail
again on every redelivery. ``batch_or_each`` runs the call on the whole batch; if it raises, it runs the
call on each item alone, and an item that still fails gets its exception in its place. Exceptions that are
nobody's item's fault (``passthrough``: Redis is down, say) are raised as they are.

Whether a failure is the item's or the part's is decided by a ``probe``: a small request known to be good
(:func:`probe_backend` for a model backend). When the first item fails alone, the probe runs; if it fails too,
the part is down — a dead engine, a lost CUDA context, a server that stopped answering — and
:class:`PartDown` is raised instead of blaming any item (the stream pauses and waits for the part, see
:mod:`consumer.app`). If the probe answers, the part is up and the failing items are their own fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

from scoring.backends.base import Backend, ScoreRequest

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The probe's request: short, adapter-free, with two one-token choices; any working backend scores it.
PROBE_REQUEST = ScoreRequest("Is this a question? Answer yes or no:", ("yes", "no"), None)


class PartDown(Exception):
    """A part every item needs is down: its call failed for a batch, for an item alone, and for the probe."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


def probe_backend(backend: Backend) -> None:
    """Raise unless ``backend`` scores a known-good request."""
    backend.score([PROBE_REQUEST])


def batch_or_each(call: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T], *, what: str,
                  passthrough: Callable[[BaseException], bool] = lambda e: False,
                  probe: Callable[[], object] | None = None, part: str = "backend") -> list[R | Exception]:
    """``call(items)``, or, if that raises, ``call([item])[0]`` for each item (its exception where it raises).

    With a ``probe``: when the first item fails alone, the probe runs; if it raises, :class:`PartDown` (``part``)
    is raised and no item is blamed."""
    if not items:
        return []
    try:
        results = list(call(items))
        if len(results) != len(items):
            raise RuntimeError(f"{what} answered {len(results)} of {len(items)} items")
        return results
    except Exception as e:  # noqa: BLE001 - any failure falls back to item by item
        if passthrough(e) or isinstance(e, PartDown):
            raise
        log.warning(f"{what} failed for a batch; retrying item by item", error=repr(e), size=len(items))
    out: list[R | Exception] = []
    part_ok = probe is None
    for item in items:
        try:
            out.append(call([item])[0])
        except Exception as e:  # noqa: BLE001 - this item's failure, in its place
            if passthrough(e) or isinstance(e, PartDown):
                raise
            if not part_ok:
                try:
                    probe()  # type: ignore[misc]
                except Exception as down:  # noqa: BLE001 - the part, not the item
                    raise PartDown(part, f"{what} failed for a batch, for one item alone and for the probe: "
                                         f"{describe(down)}") from e
                part_ok = True
            out.append(e)
    return out


def describe(e: BaseException) -> str:
    """An exception as a dead letter's reason: its type and message."""
    return f"{type(e).__name__}: {e}"
