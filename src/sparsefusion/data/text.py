"""The text boundary: one rule for every string that becomes tokens.

The rule: text must be a sequence of Unicode scalar values, i.e. hold no lone UTF-16 surrogate
(U+D800..U+DFFF; JSON's ``"\\ud800"`` escapes and undecodable bytes in a command line produce
them). Such text cannot be encoded to UTF-8, so it is never repaired: the record is skipped and
counted (reason ``bad_text``, naming the place and the character offset) by every reader of
datasets (the packed loader, tokenizer training, ``data tokenize``, ``data preview``), and a
prompt holding one is refused with an error naming its line. Any other character, control
characters and NUL included, is valid text and is tokenized byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sparsefusion.data.issues import BadInput

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` breaks the text rule (None when it is fine)."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"text holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()}"


def check_text(text: str, where: str) -> str:
    """Return ``text``; raise ``BadInput("bad_text", where, ...)`` when it breaks the rule."""
    problem = text_problem(text)
    if problem is not None:
        raise BadInput("bad_text", where, problem)
    return text


def check_json_strings(obj: Any, where: str) -> None:
    """Apply the rule to every string (keys included) of a parsed JSON value (no recursion)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            check_text(x, where)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def read_document(source: Any, index: int, modalities: Sequence[str] | None = None) -> Any:
    """``source.document(index)`` with its segments checked: the one way readers read.

    Args:
        source: the document source.
        index: the document index.
        modalities: the modalities the reader can tokenize (None: any); a segment of another
            modality (speech for a tokenizer trained without clips) skips the document.

    Raises:
        BadInput: the source's own, ``bad_text`` for a text segment breaking the rule, or
            ``unknown_segment`` for a modality outside ``modalities``.
        IndexError: past the end of a finite source.
    """
    doc = source.document(index)
    for seg in getattr(doc, "segments", ()):
        if modalities is not None and seg.modality not in modalities:
            raise BadInput(
                "unknown_segment",
                _where(doc, source, index),
                f"a {seg.modality} segment, but the tokenizer has only {list(modalities)}",
            )
        if seg.modality == "text":
            if not isinstance(seg.payload, str):
                where = _where(doc, source, index)
                raise BadInput("bad_text", where, f"text segment is {type(seg.payload).__name__}")
            problem = text_problem(seg.payload)
            if problem is not None:
                raise BadInput("bad_text", _where(doc, source, index), problem)
    return doc


def _where(doc: Any, source: Any, index: int) -> str:
    meta = getattr(doc, "meta", None) or {}
    return str(meta.get("where") or f"{getattr(source, 'name', 'source')}[{index}]")
