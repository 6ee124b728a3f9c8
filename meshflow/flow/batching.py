"""``batch``: one run per up to ``max_size`` events of a key, started when full or ``timeout`` after
the first event. Pure: whether a batch takes one more event."""

from __future__ import annotations

#: A batch's run record holds its events; past this many bytes of them the batch starts early,
#: so the record stays well within the server's max_payload.
MAX_BATCH_BYTES = 512 * 1024


def takes(count: int, size_bytes: int, event_bytes: int, *, max_size: int) -> bool:
    """Whether a batch of ``count`` events (``size_bytes`` encoded) takes one more."""
    return count < max_size and size_bytes + event_bytes <= MAX_BATCH_BYTES


def full(count: int, *, max_size: int) -> bool:
    return count >= max_size
