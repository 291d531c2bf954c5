"""`olmoe prep tokenize`: raw text to sharded Megatron .bin/.idx with a manifest.

Inputs are planned into shards of about `shard_bytes` of input text (a shard is one or more input
segments). Shards run in parallel worker processes, each encoding its documents and appending EOS
after every one. The encoder is the exact fast path of fast_tokenizer.py (tiktoken) when it can
prove it reproduces HF tokenizers for the tokenizer.json (OLMoE's and the demo BPE's qualify),
else HF tokenizers; both give byte-identical shards (`encoder="hf"` or $OLMOE_TOKENIZER_ENCODER=hf
forces HF tokenizers). A shard is written under temporary names and renamed when complete; its
small `<shard>.json` record is written last, so a rerun skips exactly the shards whose record
matches the plan. `<output_prefix>.manifest.json` lists every shard with its documents, tokens,
source segments and checksums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import time
from pathlib import Path
from typing import Literal

import numpy as np

from olmoe_megatron.config import Config, ConfigError
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fast_tokenizer import ENCODER_CHOICES, encoder_choice, load_encoder
from olmoe_megatron.data.fileutil import atomic_write_text, sha256_file
from olmoe_megatron.data.megatron_format import ShardWriter, token_dtype_for_vocab
from olmoe_megatron.data.text_inputs import ReadStats, Segment, expand_inputs, iter_text_batches, plan_segments
from olmoe_megatron.data.tokenizer import find_eos_token_id, resolve_tokenizer_path

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_PROGRESS_SECONDS = 2.0


@dataclasses.dataclass(kw_only=True, frozen=True)
class TokenizeConfig(Config):
    """What `olmoe prep tokenize` reads, how it tokenizes, and where it writes."""

    inputs: tuple[str, ...]
    """Input files or globs: .jsonl, .jsonl.gz, .jsonl.zst, .parquet."""
    output_prefix: str
    """Shards are written as `<output_prefix>_00000.bin/.idx`, plus `<output_prefix>.manifest.json`."""
    tokenizer: str = "olmoe"
    """'olmoe' (gpt-neox-olmo-dolma-v1_5, fetched and cached) or a tokenizer.json path."""
    text_field: str = "text"
    """JSON key (or parquet column) holding the document text."""
    eos_token_id: int | None = None
    """End-of-document id appended to every document; None finds <|endoftext|>/</s>/<eos>."""
    dtype: Literal["auto", "uint16", "int32"] = "auto"
    """Token dtype; auto is uint16 below 65,500 ids, else int32."""
    shard_bytes: int = 1 << 30
    """Input text bytes per output shard (shards are the unit of parallelism and of resuming)."""
    num_workers: int = 0
    """Worker processes; 0 means one per CPU core."""
    batch_bytes: int = 1 << 20
    """Text bytes per encode_batch call."""
    skip_bad_records: bool = False
    """Skip (and count) undecodable lines or records without the text field instead of failing."""
    encoder: Literal["auto", "hf"] = "auto"
    """'auto': the exact fast path (tiktoken, fast_tokenizer.py) where it can prove it reproduces HF
    tokenizers for this tokenizer.json, else HF tokenizers (one log line says why); 'hf': always HF
    tokenizers. $OLMOE_TOKENIZER_ENCODER=hf forces HF too. The shards are the same bytes either way."""

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("tokenize.inputs is empty; name at least one .jsonl/.jsonl.gz/.jsonl.zst/.parquet file or glob")
        if self.shard_bytes < 1:
            raise ConfigError(f"tokenize.shard_bytes={self.shard_bytes} must be positive; try {1 << 30} (1 GiB)")
        if self.batch_bytes < 1:
            raise ConfigError(f"tokenize.batch_bytes={self.batch_bytes} must be positive; try {1 << 20}")
        if self.num_workers < 0:
            raise ConfigError(f"tokenize.num_workers={self.num_workers} must be >= 0 (0 = one per core)")
        if self.eos_token_id is not None and self.eos_token_id < 0:
            raise ConfigError(f"tokenize.eos_token_id={self.eos_token_id} must be >= 0")
        if self.encoder not in ENCODER_CHOICES:
            raise ConfigError(f"tokenize.encoder={self.encoder!r} must be one of {', '.join(ENCODER_CHOICES)}; "
                              f"'auto' is the fast path where exact, 'hf' forces HF tokenizers")


def shard_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}_{index:05d}"


def manifest_path(output_prefix: str) -> Path:
    return Path(f"{output_prefix}.manifest.json")


def plan_shards(files: list[str], shard_bytes: int) -> list[list[Segment]]:
    """Groups input segments into shards of about `shard_bytes` each, in input order."""
    shards: list[list[Segment]] = []
    current: list[Segment] = []
    current_bytes = 0
    for path in files:
        for segment in plan_segments(path, max_bytes=shard_bytes):
            if current and current_bytes + segment.weight_bytes > shard_bytes:
                shards.append(current)
                current, current_bytes = [], 0
            current.append(segment)
            current_bytes += segment.weight_bytes
    if current:
        shards.append(current)
    return shards


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    index: int
    prefix: str
    segments: tuple[Segment, ...]
    tokenizer_path: str
    tokenizer_sha256: str
    encoder: str
    text_field: str
    eos_token_id: int
    dtype: str
    batch_bytes: int
    skip_bad_records: bool
    fingerprint: str


def tokenize(config: TokenizeConfig) -> dict:
    """Runs the pipeline; returns the manifest (also written next to the shards).

    Raises:
        DataError: a missing input, bad record (file and line named), or tokenizer problem.
    """
    files = expand_inputs(config.inputs)
    _check_output_directory(config.output_prefix)
    tokenizer_path = resolve_tokenizer_path(config.tokenizer)
    tokenizer_sha = sha256_file(tokenizer_path)
    try:
        choice = encoder_choice(config.encoder)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    # Built here, before any worker forks: the workers inherit it (load_encoder is cached).
    encoder = load_encoder(str(tokenizer_path), tokenizer_sha, choice)
    tokenizer = encoder.tokenizer
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = config.eos_token_id if config.eos_token_id is not None else find_eos_token_id(tokenizer, path=tokenizer_path)
    if eos >= vocab_size:
        raise ConfigError(f"tokenize.eos_token_id={eos} must be below the tokenizer's vocabulary size {vocab_size}")
    dtype = token_dtype_for_vocab(vocab_size) if config.dtype == "auto" else np.dtype(config.dtype)
    if dtype == np.uint16 and vocab_size > 65536:
        raise ConfigError(f"tokenize.dtype=uint16 cannot hold {vocab_size} token ids; use int32 or auto")
    settings = {"tokenizer_sha256": tokenizer_sha, "text_field": config.text_field, "eos_token_id": eos,
                "dtype": str(dtype), "skip_bad_records": config.skip_bad_records}
    jobs = []
    for index, segments in enumerate(plan_shards(files, config.shard_bytes)):
        fingerprint = json.dumps({"settings": settings, "segments": [s.fingerprint() for s in segments]},
                                 sort_keys=True)
        jobs.append(_ShardJob(index, shard_prefix(config.output_prefix, index), tuple(segments),
                              str(tokenizer_path), tokenizer_sha, choice, config.text_field, eos, str(dtype),
                              config.batch_bytes, config.skip_bad_records, fingerprint))
    records = {job.index: _finished_record(job) for job in jobs}
    todo = [job for job in jobs if records[job.index] is None]
    logger.info("tokenize: %d input files, %d shards (%d already complete), tokenizer %s (%d ids, EOS %d), %s, "
                "%s encoder", len(files), len(jobs), len(jobs) - len(todo), tokenizer_path, vocab_size, eos, dtype,
                encoder.name)
    for record in _run_jobs(todo, config.num_workers or os.cpu_count() or 1):
        records[record["index"]] = record
    shards = [records[job.index] for job in jobs]
    if sum(s["tokens"] for s in shards) == 0:
        for job in jobs:  # nothing worth keeping: no manifest, no empty shards
            for suffix in (".bin", ".idx", ".json"):
                Path(f"{job.prefix}{suffix}").unlink(missing_ok=True)
        skipped = sum(s.get("empty_documents_skipped", 0) for s in shards)
        raise DataError(f"tokenize: {len(files)} input file(s) ({', '.join(map(str, files[:3]))}) hold no text in "
                        f"field {config.text_field!r} ({skipped} empty documents skipped): nothing to train on; "
                        "check the files and --text-field")
    manifest = {
        "version": MANIFEST_VERSION,
        "format": "megatron",
        "tokenizer": {"path": str(tokenizer_path), "sha256": tokenizer_sha, "vocab_size": vocab_size},
        "eos_token_id": eos,
        "dtype": str(dtype),
        "text_field": config.text_field,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "source_files": [os.path.abspath(f) for f in files],
        "shards": [{k: v for k, v in s.items() if k not in ("index", "fingerprint")} for s in shards],
    }
    atomic_write_text(manifest_path(config.output_prefix), json.dumps(manifest, indent=1))
    return manifest


def _check_output_directory(prefix: str) -> None:
    """Creates the shards' directory and checks it is writable, before any work is done."""
    import tempfile

    directory = Path(prefix).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise DataError(f"--output-prefix {prefix}: cannot write shards in {directory} ({exc.strerror or exc}); "
                        "give a prefix in a writable directory, e.g. data/tokens/corpus") from None


def _record_path(prefix: str) -> Path:
    return Path(f"{prefix}.json")


def _finished_record(job: _ShardJob) -> dict | None:
    """The shard's record when its files exist and were made from the same plan; else None."""
    path = _record_path(job.prefix)
    if not (path.is_file() and Path(f"{job.prefix}.bin").is_file() and Path(f"{job.prefix}.idx").is_file()):
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != job.fingerprint:
        logger.warning("shard %s was made from different inputs or settings; rebuilding it", job.prefix)
        return None
    return record


def _run_jobs(jobs: list[_ShardJob], num_workers: int):
    """Runs shard jobs in worker processes; yields records as shards finish; logs progress."""
    if not jobs:
        return
    if num_workers == 1 or len(jobs) == 1:
        yield from _run_jobs_inline(jobs)
        return
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks callers without a
    # `if __name__ == "__main__"` guard; the parent never encoded, so no tokenizer threads exist.
    context = multiprocessing.get_context("fork")
    manager = context.Manager()
    progress = manager.Queue()
    start = time.monotonic()
    totals = {"bytes": 0, "tokens": 0}
    last_report = start
    with manager, context.Pool(min(num_workers, len(jobs))) as pool:
        pending = [pool.apply_async(_tokenize_shard, (job, progress)) for job in jobs]
        while pending:
            try:
                num_bytes, num_tokens = progress.get(timeout=0.2)
                totals["bytes"] += num_bytes
                totals["tokens"] += num_tokens
            except queue.Empty:
                pass
            still = []
            for result in pending:
                if result.ready():
                    yield result.get()  # re-raises a worker's DataError
                else:
                    still.append(result)
            pending = still
            now = time.monotonic()
            if now - last_report >= _PROGRESS_SECONDS or not pending:
                _log_progress(totals, now - start, len(jobs) - len(pending), len(jobs))
                last_report = now


def _run_jobs_inline(jobs: list[_ShardJob]):
    """Runs shard jobs one after another in this process (one shard, or one worker)."""
    progress: queue.SimpleQueue = queue.SimpleQueue()
    start = time.monotonic()
    totals = {"bytes": 0, "tokens": 0}
    for done, job in enumerate(jobs, start=1):
        record = _tokenize_shard(job, progress)
        while not progress.empty():
            num_bytes, num_tokens = progress.get()
            totals["bytes"] += num_bytes
            totals["tokens"] += num_tokens
        _log_progress(totals, time.monotonic() - start, done, len(jobs))
        yield record


def _log_progress(totals: dict, seconds: float, done: int, total: int) -> None:
    seconds = max(seconds, 1e-9)
    logger.info("tokenize: %d/%d shards, %.1f MB at %.2f MB/s, %d tokens at %.0f tokens/s", done, total,
                totals["bytes"] / 1e6, totals["bytes"] / 1e6 / seconds, totals["tokens"], totals["tokens"] / seconds)


def _tokenize_shard(job: _ShardJob, progress) -> dict:
    """Worker: tokenizes one shard's segments into `<prefix>.bin/.idx` and writes its record."""
    encoder = load_encoder(job.tokenizer_path, job.tokenizer_sha256, job.encoder)
    dtype = np.dtype(job.dtype)
    max_id = np.iinfo(dtype).max
    writer = ShardWriter(job.prefix, dtype)
    stats = ReadStats()
    reported_bytes = 0
    try:
        for segment in job.segments:
            for texts in iter_text_batches(segment, text_field=job.text_field, batch_bytes=job.batch_bytes,
                                           skip_bad_records=job.skip_bad_records, stats=stats):
                flat, lengths = encoder.encode_flat(texts, job.eos_token_id)
                if flat.size and int(flat.max()) > max_id:
                    raise DataError(f"{segment.path}: token id {int(flat.max())} does not fit {dtype}; "
                                    f"use --dtype int32")
                writer.add_documents(flat, lengths)
                progress.put((stats.input_bytes - reported_bytes, int(flat.size)))
                reported_bytes = stats.input_bytes
        checksums = writer.finish()
    except BaseException:
        writer.abort()
        raise
    record = {"index": job.index, "name": Path(job.prefix).name, "documents": writer.num_documents,
              "tokens": writer.num_tokens, **checksums, "empty_documents_skipped": stats.empty_documents,
              "bad_records_skipped": stats.bad_records,
              "sources": [s.fingerprint() for s in job.segments], "fingerprint": job.fingerprint}
    atomic_write_text(_record_path(job.prefix), json.dumps(record))
    return record


def shard_prefixes(manifest_file: str | os.PathLike) -> list[str]:
    """The shard prefixes a manifest lists (shards live next to their manifest)."""
    manifest_file = Path(manifest_file)
    try:
        manifest = json.loads(manifest_file.read_text())
        names = [shard["name"] for shard in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_file}: not a readable tokenize manifest ({exc})") from None
    return [str(manifest_file.parent / name) for name in names]
