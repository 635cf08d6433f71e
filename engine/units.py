"""How numbers read to people, the same in the CLI and the studio: durations and large counts."""
from __future__ import annotations

MISSING = "–"


def format_duration(seconds: float | None) -> str:
    """`1:05`, `2:03:04`; MISSING for an unknown (None, NaN or negative) duration."""
    if seconds is None or seconds != seconds or seconds < 0:
        return MISSING
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_count(value: float | None) -> str:
    """`950`, `3.1k`, `134.5M`, `8.0B` (parameters, tokens, tokens/s); MISSING for None."""
    if value is None:
        return MISSING
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
