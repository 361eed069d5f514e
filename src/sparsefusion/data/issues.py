"""Bad input: the exception sources raise for an unusable document, and the counter that keeps it.

A source's ``document(index)`` raises :class:`BadInput` (file, line, reason) for a missing file, a
path that is not a regular file (a FIFO, a device, a NUL byte), a corrupt or truncated image or
audio clip, a file, image, clip or line over its ``data.max_*`` limit (see ``limits.py``), a
malformed JSON line, text breaking the text rule (``text.py``: a lone surrogate), an unknown
segment type or an empty document. Readers (the packed loader,
tokenizer training, the preview) catch it, count it per reason in a :class:`DataIssues`, log it
with its place, and go on; in strict mode they re-raise.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("sparsefusion")

REASONS = (
    "missing_file",
    "not_regular_file",
    "oversize_file",
    "corrupt_image",
    "oversize_image",
    "corrupt_audio",
    "oversize_audio",
    "bad_json",
    "bad_text",
    "unknown_segment",
    "empty_document",
    "oversize_document",
    "nonfinite_latent",
)
MAX_LOGGED_PER_REASON = 20


class BadInput(ValueError):
    """An input item that cannot become a document.

    Args:
        reason: one of ``REASONS``.
        where: the place, e.g. ``"docs.jsonl:17"`` or ``"shard-0001.tar:cat.png"``.
        detail: a human-readable explanation.
    """

    def __init__(self, reason: str, where: str, detail: str) -> None:
        assert reason in REASONS, reason
        where, detail = one_line(where), one_line(detail)
        super().__init__(f"{where}: {detail} ({reason})")
        self.reason, self.where, self.detail = reason, where, detail


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str) -> str:
    """``text`` with control characters, line separators and lone surrogates escaped
    (``\\n``, ``\\x00``, ``\\ud800``): a message naming a hostile path stays one printable line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class DataIssues:
    """Counts of skipped items per reason; logs the first few of each reason with their place.

    Args:
        strict: re-raise instead of counting (``data.strict=true``).
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.counts: dict[str, int] = {}

    def record(self, err: BadInput) -> None:
        """Count ``err`` (or raise it in strict mode)."""
        if self.strict:
            raise err
        n = self.counts.get(err.reason, 0) + 1
        self.counts[err.reason] = n
        if n <= MAX_LOGGED_PER_REASON:
            log.warning("data: skipped %s", err)
        if n == MAX_LOGGED_PER_REASON:
            log.warning("data: further %r items are counted but not logged", err.reason)

    @property
    def total(self) -> int:
        """Items skipped so far."""
        return sum(self.counts.values())

    def metrics(self) -> dict[str, int]:
        """``data/skipped`` and ``data/skipped/<reason>`` counters for the metrics rows."""
        out = {"data/skipped": self.total}
        out.update({f"data/skipped/{r}": n for r, n in sorted(self.counts.items())})
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in state.items()}
