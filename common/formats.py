"""How a figure reads in a report or on the Space's Leaderboard: one format for compare's report and the Space."""

from __future__ import annotations


def format_number(value, pattern: str = "{:,.2f}", suffix: str = "") -> str:
    """A figure for the report, or '–' when there is none.

    >>> format_number(1234.5678), format_number(None), format_number(0.25, "{:.0%}")
    ('1,234.57', '–', '25%')
    >>> format_number(3.14159, "{:.2f}", " s")
    '3.14 s'
    """
    return "–" if value is None else pattern.format(value) + suffix


def format_size(size: int | None) -> str:
    """A file size for the report: GB from 0.1 GB up, MB below, '–' when unknown.

    >>> format_size(812_345_678), format_size(5_000_000), format_size(None)
    ('0.81 GB', '5.0 MB', '–')
    """
    if size is None:
        return "–"
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
