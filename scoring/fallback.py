"""One bad item must fail only itself: a batched call that raises is redone item by item.

The stream batches everything it can (one backend call per micro-batch, one demonstration lookup, one
Redis round trip), so one poisonous input would otherwise fail its whole batch, and the batch would fail
again on every redelivery. ``batch_or_each`` runs the call on the whole batch; if it raises, it runs the
call on each item alone, and an item that still fails gets its exception in its place. Exceptions that are
nobody's item's fault (``passthrough``: Redis is down, say) are raised as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def batch_or_each(call: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T], *, what: str,
                  passthrough: Callable[[BaseException], bool] = lambda e: False) -> list[R | Exception]:
    """``call(items)``, or, if that raises, ``call([item])[0]`` for each item (its exception where it raises)."""
    if not items:
        return []
    try:
        results = list(call(items))
        if len(results) != len(items):
            raise RuntimeError(f"{what} answered {len(results)} of {len(items)} items")
        return results
    except Exception as e:  # noqa: BLE001 - any failure falls back to item by item
        if passthrough(e):
            raise
        log.warning(f"{what} failed for a batch; retrying item by item", error=repr(e), size=len(items))
    out: list[R | Exception] = []
    for item in items:
        try:
            out.append(call([item])[0])
        except Exception as e:  # noqa: BLE001 - this item's failure, in its place
            if passthrough(e):
                raise
            out.append(e)
    return out


def describe(e: BaseException) -> str:
    """An exception as a dead letter's reason: its type and message."""
    return f"{type(e).__name__}: {e}"
