"""The embedded demo corpus: this interpreter's standard-library source, tokenized like real data.

Every machine with Python has it, so the default run needs nothing from outside but the tokenizer
(a code corpus, like the StarCoder share of OLMoE-mix). Files are taken in sorted path order until
`max_bytes`; each file is one document. The corpus goes through the same `tokenize` pipeline as user
data and is reused when a build with the same settings exists (built once under a file lock).

The files that come after the corpus's cutoff in the same order are the held-out text
(`stdlib_heldout_files`, `build_demo_heldout`): never in the corpus nor in the demo BPE's training
text, so the held-out loss and the demo-next-line task measure text the model never saw.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fileutil import atomic_path, default_cache_root, file_lock, sha256_file
from olmoe_megatron.data.index_cache import description_hash
from olmoe_megatron.data.tokenize_text import TokenizeConfig, manifest_path, tokenize
from olmoe_megatron.data.tokenizer import (  # noqa: F401 - the demo-bpe names are re-exported
    DEMO_BPE_EOS,
    DEMO_BPE_EOS_ID,
    DEMO_BPE_PREFIX,
    demo_bpe_vocab_size,
    resolve_tokenizer_path,
)

logger = logging.getLogger(__name__)

DEFAULT_DEMO_BYTES = 4_000_000
DEFAULT_HELDOUT_BYTES = 400_000
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> Iterator[tuple[Path, int]]:
    """Every non-empty standard-library .py file and its size, in sorted relative-path order."""
    root = stdlib_root()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if _EXCLUDED_DIRS.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        yield path, size


def _take_bytes(files: Iterator[tuple[Path, int]], max_bytes: int) -> list[Path]:
    """The next files of `files` until their sizes reach `max_bytes` (the file that crosses it included)."""
    chosen, total = [], 0
    for path, size in files:
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    return chosen


def stdlib_source_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files in sorted relative-path order, up to `max_bytes` in total."""
    return _take_bytes(_stdlib_files(), max_bytes)


# Generated code-page tables: long runs of near-identical lines, not code; their low loss would
# dominate a validation set that starts among them (the 4 MB cutoff falls inside encodings/).
_HELDOUT_EXCLUDED = ("encodings",)


def stdlib_heldout_files(max_bytes: int, heldout_bytes: int = DEFAULT_HELDOUT_BYTES) -> list[Path]:
    """The files after `stdlib_source_files(max_bytes)` in the same order, the generated tables of
    encodings/ left out, up to `heldout_bytes`: the library's next top-level modules (enum, fractions,
    functools, gzip, ...), code like the corpus's and never in it.

    Disjoint from the demo corpus of `max_bytes`; empty when the corpus already takes every file.
    """
    root = stdlib_root()
    files = _stdlib_files()
    _take_bytes(files, max_bytes)  # skip the corpus's files
    rest = ((path, size) for path, size in files if path.relative_to(root).parts[0] not in _HELDOUT_EXCLUDED)
    return _take_bytes(rest, heldout_bytes)


def _corpus_settings(max_bytes: int) -> dict:
    """What the corpus text depends on (cache keys of the corpus and of its BPE)."""
    return {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "max_bytes": max_bytes}


def demo_bpe_tokenizer(vocab_size: int, *, max_bytes: int = DEFAULT_DEMO_BYTES, cache_dir: str | os.PathLike | None = None) -> Path:
    """A byte-level BPE tokenizer with `vocab_size` entries, trained on the demo corpus text.

    For models whose vocabulary is smaller than OLMoE's 50,280 (olmoe_small and the ablations):
    OLMoE's tokenizer would emit ids they cannot embed. Its end-of-text token
    `<|endoftext|>` has id 0. Trained once per (vocab, corpus) and cached as tokenizer.json.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    directory = Path(cache_dir) if cache_dir is not None else default_cache_root() / "tokenizers"
    files = stdlib_source_files(max_bytes)
    settings = {**_corpus_settings(max_bytes), "vocab_size": vocab_size, "tokenizers": tokenizers.__version__}
    target = directory / f"{DEMO_BPE_PREFIX}{vocab_size}-{description_hash(settings)[:12]}.json"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / f"{target.stem}.lock"):
        if not target.is_file():
            tokenizer = tokenizers.Tokenizer(models.BPE())
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DEMO_BPE_EOS], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tokenizer.train_from_iterator(
                (path.read_text(encoding="utf-8", errors="replace") for path in files), trainer=trainer)
            if tokenizer.token_to_id(DEMO_BPE_EOS) != DEMO_BPE_EOS_ID or tokenizer.get_vocab_size() > vocab_size:
                raise DataError(f"demo BPE training gave eos id {tokenizer.token_to_id(DEMO_BPE_EOS)} and "
                                f"{tokenizer.get_vocab_size()} entries (want {DEMO_BPE_EOS_ID}, <= {vocab_size})")
            with atomic_path(target) as tmp:
                tokenizer.save(str(tmp))
            logger.info("trained a %d-entry byte-level BPE on %d standard-library files: %s", vocab_size,
                        len(files), target)
    return target


def _demo_tokenizer_file(tokenizer_path: str | None, max_bytes: int) -> Path:
    """The tokenizer.json of `tokenizer_path`; 'demo-bpe-N' is trained on the corpus of `max_bytes`."""
    bpe_vocab = demo_bpe_vocab_size(str(tokenizer_path)) if tokenizer_path is not None else None
    if bpe_vocab is not None:
        return demo_bpe_tokenizer(bpe_vocab, max_bytes=max_bytes)
    return resolve_tokenizer_path(tokenizer_path)


def build_demo_corpus(out_dir: str | os.PathLike, *, tokenizer_path: str | None = None,
                      max_bytes: int = DEFAULT_DEMO_BYTES) -> Path:
    """Builds (or reuses) the demo corpus and returns its tokenize manifest path.

    Args:
        out_dir: Directory for the jsonl text, the .bin/.idx shards and the manifest.
        tokenizer_path: 'olmoe' / None (OLMoE's tokenizer), 'demo-bpe-N' (a BPE of N entries trained
            on this corpus, see `demo_bpe_tokenizer`) or a tokenizer.json path.
        max_bytes: Text bytes to take from the standard library.

    Returns:
        Path of `<out_dir>/<name>.manifest.json`, usable as a DataConfig path.
    """
    tokenizer_file = _demo_tokenizer_file(tokenizer_path, max_bytes)
    settings = {**_corpus_settings(max_bytes), "tokenizer_sha256": sha256_file(tokenizer_file)}
    return _build_stdlib_manifest(out_dir, name=f"stdlib-{description_hash(settings)[:12]}", settings=settings,
                                  files=lambda: stdlib_source_files(max_bytes), tokenizer_file=tokenizer_file,
                                  what="demo corpus")


def build_demo_heldout(out_dir: str | os.PathLike, *, tokenizer_path: str | None = None,
                       max_bytes: int = DEFAULT_DEMO_BYTES, heldout_bytes: int = DEFAULT_HELDOUT_BYTES) -> Path:
    """Builds (or reuses) the demo corpus's held-out text and returns its tokenize manifest path.

    The held-out files are `stdlib_heldout_files(max_bytes, heldout_bytes)`: never in the demo corpus
    of `max_bytes`, nor in the text a 'demo-bpe-N' tokenizer is trained on.

    Args:
        out_dir: Directory for the jsonl text, the .bin/.idx shards and the manifest (may be the
            corpus's own: the names differ).
        tokenizer_path: As for `build_demo_corpus`; give the training run's tokenizer.
        max_bytes: The demo corpus's size (data.demo_max_bytes): the held-out files start after it.
        heldout_bytes: Text bytes to hold out.

    Returns:
        Path of `<out_dir>/<name>.manifest.json`, usable as an eval source path.

    Raises:
        DataError: No standard-library files come after the corpus's cutoff.
    """
    if not stdlib_heldout_files(max_bytes, heldout_bytes):
        sizes = [size for _, size in _stdlib_files()]
        raise DataError(f"no held-out text: the demo corpus of max_bytes={max_bytes} already takes every "
                        f"standard-library file ({len(sizes)} files, {sum(sizes)} bytes under {stdlib_root()}); "
                        f"set data.demo_max_bytes <= {sum(sizes[:-1])} to leave files for held-out text")
    tokenizer_file = _demo_tokenizer_file(tokenizer_path, max_bytes)
    settings = {**_corpus_settings(max_bytes), "heldout_bytes": heldout_bytes, "heldout_excluded": _HELDOUT_EXCLUDED,
                "tokenizer_sha256": sha256_file(tokenizer_file)}
    return _build_stdlib_manifest(out_dir, name=f"stdlib-heldout-{description_hash(settings)[:12]}",
                                  settings=settings, files=lambda: stdlib_heldout_files(max_bytes, heldout_bytes),
                                  tokenizer_file=tokenizer_file, what="demo held-out text")


def _build_stdlib_manifest(out_dir: str | os.PathLike, *, name: str, settings: dict,
                           files: Callable[[], list[Path]], tokenizer_file: Path, what: str) -> Path:
    """Writes `files` as one document each to `<name>.jsonl` and tokenizes it, once, under a lock.

    A finished build leaves `<name>.settings.json` last, so a build that stopped half-way is redone.
    """
    out_dir = Path(out_dir)
    prefix = out_dir / name
    stamp = out_dir / f"{name}.settings.json"
    if stamp.is_file() and manifest_path(str(prefix)).is_file():
        return manifest_path(str(prefix))
    with file_lock(out_dir / f"{name}.lock"):
        if not (stamp.is_file() and manifest_path(str(prefix)).is_file()):
            jsonl = out_dir / f"{name}.jsonl"
            paths = files()
            with atomic_path(jsonl) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                for path in paths:
                    text = path.read_text(encoding="utf-8", errors="replace")
                    handle.write(json.dumps({"text": text, "path": path.name}) + "\n")
            tokenize(TokenizeConfig(inputs=(str(jsonl),), output_prefix=str(prefix), tokenizer=str(tokenizer_file),
                                    shard_bytes=1 << 40, num_workers=1))
            with atomic_path(stamp) as tmp:
                tmp.write_text(json.dumps(settings, indent=1))
            logger.info("built %s %s from %d standard-library files", what, prefix, len(paths))
    return manifest_path(str(prefix))
