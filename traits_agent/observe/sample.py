"""Samples of hostile values for log lines: short, bounded, and never an exception.

A rejected event is logged with a sample so a broken client is visible. The value came from a
peer, so describing it must cost little and must not fail whatever its shape: `repr()` of a
list nested 1,000 deep raises RecursionError (that one datagram used to stop the agent), and
`repr()` of a 32 MiB string builds 32 MiB of text before it is cut. `describe` walks the value
iteratively, stops at `max_chars` characters and `max_depth` levels, and looks at no more than
`max_items` elements of any container, so its cost is bounded by its limits, not by the value.
"""

from __future__ import annotations

from typing import Any

MAX_CHARS = 300
MAX_DEPTH = 8
MAX_ITEMS = 8
#: characters of a single str/bytes shown before it is cut
_MAX_SCALAR = 60


def describe(
    value: Any,
    *,
    max_chars: int = MAX_CHARS,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
) -> str:
    """A Python-like rendering of `value`, at most `max_chars` characters (plus "..." when cut).

    Containers deeper than `max_depth` show as `[...]` / `{...}`; past `max_items` elements
    a container shows `...` and its length. Never raises (short of MemoryError).
    """
    out: list[str] = []
    size = 0
    # a stack of things still to write: either a value (with its depth) or a literal string
    stack: list[tuple[Any, int, bool]] = [(value, 0, False)]
    while stack and size <= max_chars:
        item, depth, literal = stack.pop()
        if literal:
            text = item
        else:
            text = _scalar(item)
            if text is None:  # a container: push its parts, in reverse
                text = _open(item, depth, max_depth, max_items, stack)
        out.append(text)
        size += len(text)
    rendered = "".join(out)
    if stack or len(rendered) > max_chars:
        return rendered[:max_chars] + "..."
    return rendered


def _scalar(value: Any) -> str | None:
    kind = type(value)
    if kind is str or kind is bytes or kind is bytearray:
        head = value[:_MAX_SCALAR]
        text = repr(head)
        if len(value) > _MAX_SCALAR:
            text += f"...({len(value)} long)"
        return text
    if value is None or kind is bool or kind is float:
        return repr(value)
    if kind is int:
        # a huge int: str() past 4,300 digits raises ValueError
        return repr(value) if -(10**60) < value < 10**60 else f"<int of {value.bit_length()} bits>"
    if kind is list or kind is tuple or kind is dict:
        return None
    try:
        return f"<{kind.__name__}>"
    except Exception:  # pragma: no cover - a type whose name fails: nothing to show
        return "<?>"


def _open(
    value: Any, depth: int, max_depth: int, max_items: int, stack: list[tuple[Any, int, bool]]
) -> str:
    """Push the parts of a container onto `stack` (in reverse) and return its opening text."""
    is_map = type(value) is dict
    opening, closing = ("{", "}") if is_map else ("[", "]")
    if depth >= max_depth:
        return f"{opening}...{closing}" if value else f"{opening}{closing}"
    parts: list[tuple[Any, int, bool]] = []
    items = iter(value.items()) if is_map else iter(value)
    for index, element in enumerate(items):
        if index >= max_items:
            parts.append((f", ...({len(value)} elements)", 0, True))
            break
        if index:
            parts.append((", ", 0, True))
        if is_map:
            key, element = element
            parts.append((key, depth + 1, False))
            parts.append((": ", 0, True))
        parts.append((element, depth + 1, False))
    parts.append((closing, 0, True))
    stack.extend(reversed(parts))
    return opening
