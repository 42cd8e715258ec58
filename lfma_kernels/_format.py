"""Markdown tables for what the package and its scripts print (the demo's results, the benchmarks'
tables in benchmarks/report.py)."""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["markdown_table"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Optional[Sequence[bool]] = None) -> str:
    """A pipe table, padded so it also reads well in a terminal; ``right[i]``: column i right-aligned
    (numbers), left-aligned otherwise (default: all left)."""
    right = [False] * len(headers) if right is None else right
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])
