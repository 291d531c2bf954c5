"""Raw-text inputs for tokenization: .jsonl, .jsonl.gz, .jsonl.zst and parquet, as documents.

Inputs are planned into segments (a file, or a byte range of a plain .jsonl aligned to line starts,
or a range of parquet row groups). Readers yield batches of document texts and raise `DataError`
naming the file and line (or row) of a bad record: invalid UTF-8 or JSON, a missing or non-string
text field.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator

from olmoe_megatron.data.errors import DataError, describe_place

logger = logging.getLogger(__name__)

KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")


def input_kind(path: str) -> str:
    """The input kind from the file name; raises DataError for anything else."""
    name = path.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"),
                         (".json.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".json", "jsonl"),
                         (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: unknown input type; expected one of .jsonl, .jsonl.gz, .jsonl.zst, .parquet")


def expand_inputs(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Files named by paths or globs, each pattern's matches sorted, duplicates dropped."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"input pattern {pattern!r} matches no file")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise DataError(f"input file {pattern!r} does not exist")
        for match in matches:
            input_kind(match)
            if match not in files:
                files.append(match)
    return files


@dataclasses.dataclass(frozen=True)
class Segment:
    """Part of one input file: bytes [start, stop) of a plain .jsonl, row groups [start, stop) of a
    parquet file, or the whole compressed file (start 0, stop -1)."""

    path: str
    kind: str
    start: int
    stop: int
    weight_bytes: int

    def fingerprint(self) -> dict:
        stat = os.stat(self.path)
        return {"path": os.path.abspath(self.path), "start": self.start, "stop": self.stop,
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def plan_segments(path: str, *, max_bytes: int) -> list[Segment]:
    """Splits one input into segments of at most about `max_bytes` (only where the format allows)."""
    kind = input_kind(path)
    size = os.path.getsize(path)
    if kind == "jsonl":
        return _split_jsonl(path, size, max_bytes)
    if kind == "parquet":
        return _split_parquet(path, max_bytes)
    return [Segment(path, kind, 0, -1, size)]


def _split_jsonl(path: str, size: int, max_bytes: int) -> list[Segment]:
    bounds = [0]
    with open(path, "rb") as handle:
        while bounds[-1] + max_bytes < size:
            handle.seek(bounds[-1] + max_bytes)
            handle.readline()  # move to the start of the next line
            position = handle.tell()
            if position >= size:
                break
            bounds.append(position)
    bounds.append(size)
    return [Segment(path, "jsonl", a, b, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [
        Segment(path, "jsonl", 0, 0, 0)]


def _split_parquet(path: str, max_bytes: int) -> list[Segment]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    segments, start, acc = [], 0, 0
    for group in range(metadata.num_row_groups):
        acc += metadata.row_group(group).total_byte_size
        if acc >= max_bytes:
            segments.append(Segment(path, "parquet", start, group + 1, acc))
            start, acc = group + 1, 0
    if start < metadata.num_row_groups or not segments:
        segments.append(Segment(path, "parquet", start, metadata.num_row_groups, acc))
    return segments


@dataclasses.dataclass
class ReadStats:
    """Counts of records a reader skipped (with `skip_bad_records`) or found empty."""

    empty_documents: int = 0
    bad_records: int = 0
    input_bytes: int = 0


def iter_text_batches(segment: Segment, *, text_field: str, batch_bytes: int, skip_bad_records: bool,
                      stats: ReadStats) -> Iterator[list[str]]:
    """Yields lists of document texts from a segment, about `batch_bytes` of text per batch.

    Empty (or whitespace-only) documents are skipped and counted; they would only add an EOS.
    """
    if segment.kind == "parquet":
        texts = _parquet_texts(segment, text_field, stats)
    else:
        texts = _jsonl_texts(segment, text_field, skip_bad_records, stats)
    batch: list[str] = []
    batch_size = 0
    for text, where in texts:
        if not text.strip():
            stats.empty_documents += 1
            if stats.empty_documents == 1:
                logger.warning("skipping empty document at %s (further ones are only counted)", where())
            continue
        batch.append(text)
        batch_size += len(text)
        if batch_size >= batch_bytes:
            yield batch
            batch, batch_size = [], 0
    if batch:
        yield batch


def _jsonl_texts(segment: Segment, text_field: str, skip_bad_records: bool,
                 stats: ReadStats) -> Iterator[tuple[str, Callable[[], str]]]:
    for line_no, offset, raw in _iter_lines(segment):
        stats.input_bytes += len(raw)
        if not raw.strip():
            continue
        where = functools.partial(describe_place, segment.path, line=line_no, byte_offset=offset)
        try:
            yield _parse_record(raw, text_field), where
        except DataError as exc:
            if not skip_bad_records:
                raise DataError(f"{where()}: {exc}") from None
            stats.bad_records += 1
            logger.warning("skipping bad record at %s: %s", where(), exc)


def _parse_record(raw: bytes, text_field: str) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid UTF-8 at byte {exc.start} of the line; fix the encoding or pass "
                        f"--skip-bad-records") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}); pass --skip-bad-records "
                        f"to skip such lines") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"missing text field {text_field!r} (record has: {keys}); choose it with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"text field {text_field!r} holds {type(text).__name__}, not a string")
    return text


def _iter_lines(segment: Segment) -> Iterator[tuple[int | None, int, bytes]]:
    """(line number or None, byte offset, raw line) for each line of a jsonl segment."""
    if segment.kind == "jsonl":
        with open(segment.path, "rb") as handle:
            handle.seek(segment.start)
            offset = segment.start
            # Line numbers are exact from the file start; other segments know byte offsets only.
            line_no = 1 if segment.start == 0 else None
            while offset < segment.stop:
                raw = handle.readline()
                if not raw:
                    break
                yield line_no, offset, raw
                offset += len(raw)
                line_no = line_no + 1 if line_no is not None else None
        return
    lines = _gzip_lines(segment.path) if segment.kind == "jsonl.gz" else _zstd_lines(segment.path)
    offset = 0
    for line_no, raw in enumerate(lines, start=1):
        yield line_no, offset, raw
        offset += len(raw)


def _damaged(path: str, kind: str, detail: str) -> DataError:
    return DataError(f"{path}: {detail}: the {kind} file is truncated or damaged; re-download or re-compress it, "
                     "or leave it out of the inputs (--skip-bad-records skips bad records, not damaged files)")


def _gzip_lines(path: str) -> Iterator[bytes]:
    """The lines of a gzip file; a truncated or non-gzip file raises DataError (gzip's own errors
    would surface as tracebacks mid-way)."""
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            yield from stream
    except EOFError:
        raise _damaged(path, "gzip", "the data ends before gzip's end-of-stream marker") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _damaged(path, "gzip", f"not valid gzip ({exc})") from None


def _zstd_lines(path: str, *, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a zstd file of one or more frames; a file that ends inside a frame (truncated)
    raises DataError. (zstandard's stream_reader returns what it decoded and stops silently.)"""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, inside_frame, pending = decompressor.decompressobj(), False, []  # pending: the open line's parts
    with open(path, "rb") as raw:
        while chunk := raw.read(chunk_bytes):
            while chunk:
                try:
                    data = frame.decompress(chunk)
                except zstandard.ZstdError as exc:
                    raise _damaged(path, "zstd", f"not valid zstd ({exc})") from None
                inside_frame = not frame.eof
                chunk = frame.unused_data if frame.eof else b""
                if frame.eof:
                    frame = decompressor.decompressobj()
                if b"\n" not in data:
                    pending.append(data)
                    continue
                first, *rest = data.split(b"\n")
                yield b"".join(pending) + first + b"\n"
                for line in rest[:-1]:
                    yield line + b"\n"
                pending = [rest[-1]]
    if inside_frame:
        raise _damaged(path, "zstd", "the data ends inside a zstd frame")
    if any(pending):
        yield b"".join(pending)


def _parquet_texts(segment: Segment, text_field: str, stats: ReadStats) -> Iterator[tuple[str, Callable[[], str]]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(segment.path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{segment.path}: missing text column {text_field!r} (columns: "
                        f"{', '.join(parquet.schema_arrow.names)}); choose it with --text-field")
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(segment.start))
    for group in range(segment.start, segment.stop):
        for text in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            where = functools.partial(describe_place, segment.path, row=row)
            if not isinstance(text, str):
                raise DataError(f"{where()}: text column {text_field!r} holds {type(text).__name__}, not a string")
            stats.input_bytes += len(text)
            yield text, where
            row += 1
