"""Errors of the converters and the atomic output directory they write into."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file or the keys and what to do."""


def list_keys(keys, *, limit: int = 12) -> str:
    """'a, b, c (and 40 more)': a readable, bounded list of keys."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `out`, renamed to `out` only if the block succeeds.

    On any error the temporary directory is removed and `out` is untouched, so a failed or killed
    conversion never leaves a half-written checkpoint under the output name.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
