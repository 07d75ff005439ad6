"""The two ways the project writes a value for people: a number in a report table, an exception in one line."""
from __future__ import annotations

import math

MISSING = "–"


def number(value, digits: int = 2, suffix: str = "") -> str:
    """`value` with `digits` decimals and `suffix`, or "–" where it is missing (None or NaN)."""
    if value is None:
        return MISSING
    try:
        if math.isnan(value):
            return MISSING
    except TypeError:
        pass
    return f"{value:.{digits}f}{suffix}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (at most `limit` characters), or the type alone."""
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def case_error(exc: BaseException, path, limit: int = 300) -> str:
    """Why one case failed, for `error: <path>: <reason>`: the message without the path prefix that
    common.core.io puts in front of its own messages; an InputError (a bad file) without its type name."""
    from pathlib import Path

    from common.core.io import InputError

    text = (str(exc).strip().splitlines() or [""])[0]
    for prefix in (f"{path}: ", f"{Path(path).absolute()}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if not isinstance(exc, InputError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
