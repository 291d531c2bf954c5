"""The one error type for bad data on disk or bad input text.

Every `DataError` names the file and the place in it (byte offset, line, row, token offset or
sequence index) and, where one exists, the fix.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file, the offset or line, the rule and the fix."""


def describe_place(path: str, *, line: int | None = None, byte_offset: int | None = None,
                   row: int | None = None) -> str:
    """`path:line N (byte B)` style location text used in error messages.

    Args:
        path: The file.
        line: 1-based line number, when known.
        byte_offset: Byte offset of the line or record, when known.
        row: 0-based row of a parquet file, when that is the unit.

    Returns:
        A short human-readable location.
    """
    parts = [str(path)]
    if line is not None:
        parts.append(f"line {line}")
    if row is not None:
        parts.append(f"row {row}")
    if byte_offset is not None:
        parts.append(f"byte offset {byte_offset}")
    return ", ".join(parts)
