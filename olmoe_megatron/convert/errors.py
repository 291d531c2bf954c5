"""Errors of the converters and the atomic output directory they write into."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file or the keys and what to do."""


def list_keys(keys, *, limit: int = 12) -> str:
    """'a, b, c (and 40 more)': a readable, bounded list of keys."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_output_apart(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raises ConversionError when `out` is one of `inputs`, lies inside one, or holds one: writing
    it (with --overwrite: replacing it) would destroy or mix into what is being read."""
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise ConversionError(f"--out {out} {relation} the input {given}: writing it would replace or mix into the "
                              f"input; give an output directory outside {given}")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yields a temporary directory next to `out`, renamed to `out` only if the block succeeds.

    On any error the temporary directory is removed and `out` is untouched, so a failed or killed
    conversion never leaves a half-written checkpoint under the output name. `out` may be none of
    `inputs`, nor inside or around one (check_output_apart).
    """
    check_output_apart(out, inputs)
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
