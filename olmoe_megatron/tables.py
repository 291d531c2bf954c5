"""Markdown tables for the command-line reports (`olmoe eval`, `olmoe analyze`)."""

from __future__ import annotations


def markdown_table(rows: list[list[str]]) -> str:
    """`rows[0]` is the header; every cell is a string. Columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"
