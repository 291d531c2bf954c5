"""Which code points HF tokenizers and the fast path (tiktoken + Python's unicodedata) treat alike.

The fast byte-level BPE path (fast_tokenizer.py) replaces two pieces of HF tokenizers' Unicode
handling: its NFC normaliser (a Rust crate with its own Unicode tables) by `unicodedata`, and its
pre-tokenizer regex (Oniguruma's `\\p{L}`, `\\p{N}`, `\\s`) by tiktoken's (the Rust regex crate's
tables). The tables are of different Unicode versions, so they disagree on some code points (for
example combining marks newer than HF's normaliser, which it treats as starters).

`disagreeing_code_points()` measures, once per set of library versions, every code point that
`unicodedata` calls assigned: the regex class of each (by three probes that join or split on
`\\p{L}`, `\\p{N}` and `[^\\s\\p{L}\\p{N}]`) and NFC (the code point alone, its decomposition
re-composed, and its canonical combining class being zero or not). A code point that any probe
shows different, or that was not probed (unassigned, surrogate, the private-use planes 15-16), is
"unsafe": a document that contains one is encoded by HF tokenizers itself.

The full measurement (151,162 code points for Unicode 14) takes several CPU seconds, so its
result for the versions this project pins is kept in `MEASURED` (test_fast_tokenizer.py probes
those code points again, with a seeded sample of the others); other versions are measured on first
use and cached as JSON under the tokenizer cache.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

from olmoe_megatron.data.fileutil import atomic_write_text, default_cache_root, file_lock

logger = logging.getLogger(__name__)

# HF tokenizers' ByteLevel pre-tokenizer regex (tokenizers/src/pre_tokenizers/byte_level.rs).
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PROBED_BELOW = 0xF0000  # planes 15-16 are private use only: not probed, so unsafe
_CACHE_VERSION = 1

# Disagreements found by `measure_unsafe_ranges()` (2026-12-02): none in the regex classes; in NFC,
# combining marks of Unicode 13 and 14 that HF tokenizers' normaliser treats as starters.
MEASURED = {
    ("0.23.3", "0.14.0", "14.0.0"): {
        "regex_class": (),
        "nfc": (0x898, 0x89C, 0x89D, 0x89E, 0x89F, 0x8CA, 0x8CB, 0x8CC, 0x8CD, 0x8CE, 0x9FE, 0x1AC1, 0x1AC2,
                0x1AC5, 0x1AC6, 0x1AC7, 0x1AC8, 0x1AC9, 0x1ACB, 0x1ACC, 0x1ACD, 0x1ACE, 0x1DF6, 0x1DF7, 0x1DF8,
                0x10D24, 0x10D25, 0x10D26, 0x10D27, 0x10EAB, 0x10EAC, 0x10F48, 0x10F49, 0x10F4A, 0x10F4C,
                0x10F82, 0x10F84, 0x1145E, 0x11938, 0x1E130, 0x1E131, 0x1E132, 0x1E133, 0x1E134, 0x1E135,
                0x1E136, 0x1E2AE, 0x1E2EC, 0x1E2ED, 0x1E2EE, 0x1E2EF),
    },
}


def library_versions() -> dict[str, str]:
    import tiktoken
    import tokenizers

    return {"tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
            "unicodedata": unicodedata.unidata_version, "python": sys.version.split()[0],
            "probe": str(_CACHE_VERSION)}


def measured_disagreements() -> dict | None:
    """The recorded disagreements for the installed versions, or None when not recorded."""
    versions = library_versions()
    return MEASURED.get((versions["tokenizers"], versions["tiktoken"], versions["unicodedata"]))


def assigned_code_points(stop: int = _PROBED_BELOW) -> np.ndarray:
    """Code points below `stop` that unicodedata calls assigned (not Cn, not a surrogate)."""
    return np.array([c for c in range(stop) if unicodedata.category(chr(c)) not in ("Cn", "Cs")], dtype=np.int64)


def _utf8_offsets(text: str) -> np.ndarray:
    """Byte offset of each character of `text` in its UTF-8 encoding, plus the total."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lengths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    offsets = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def regex_class_disagreements(code_points: np.ndarray) -> list[int]:
    """Code points whose GPT-2-regex class (letter, number, other, whitespace) differs between
    HF tokenizers' ByteLevel pre-tokenizer and tiktoken with the same pattern.

    Each code point c is probed as "a"+c (joined iff c is a letter), "1"+c (iff a number) and
    c+"!" (iff neither letter, number nor whitespace), each followed by a newline. HF tells its
    piece boundaries; for tiktoken the probe encoding's only merges are "a"+byte, "1"+byte and
    byte+"!", so a probe's two sides share a token exactly when they share a piece.
    """
    import tiktoken
    from tokenizers import pre_tokenizers

    ranks = {bytes([b]): b for b in range(256)}
    for x in range(256):
        for pair in (b"a" + bytes([x]), b"1" + bytes([x]), bytes([x]) + b"!"):
            ranks.setdefault(pair, len(ranks))
    probe = tiktoken.Encoding("olmoe-class-probe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                              special_tokens={})
    text = "".join(f"a{c}\n1{c}\n{c}!\n" for c in map(chr, code_points.tolist()))
    junctions = np.arange(1, len(text), 3)  # probe k's second character is character 3k+1
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf_starts = np.zeros(len(text) + 1, dtype=bool)
    step = 3 * 3 * 1024  # pre_tokenize_str slows down more than linearly on long strings: whole probes per call
    for offset in range(0, len(text), step):
        pieces = pre_tokenizer.pre_tokenize_str(text[offset:offset + step])
        hf_starts[[offset + start for _, (start, _) in pieces]] = True
    hf_joined = ~hf_starts[junctions]
    tokens = np.asarray(probe.encode_ordinary(text), dtype=np.int64)
    token_starts = np.zeros(len(text.encode("utf-8")) + 1, dtype=bool)
    token_starts[np.concatenate([[0], np.cumsum(np.where(tokens < 256, 1, 2))[:-1]])] = True
    tiktoken_joined = ~token_starts[_utf8_offsets(text)[junctions]]
    return sorted({int(code_points[k // 3]) for k in np.nonzero(hf_joined != tiktoken_joined)[0]})


def _nfc_probes(c: str) -> str:
    return f"{c}\n{unicodedata.normalize('NFD', c)}\na\u0301{c}\u0316\n"


def nfc_disagreements(code_points: np.ndarray, *, chunk: int = 512) -> list[int]:
    """Code points where HF tokenizers' NFC differs from unicodedata's on: the code point alone,
    its canonical decomposition (re-composed), and between two marks of combining classes 230 and
    220 (reordered around it iff its own class is not zero)."""
    from tokenizers import normalizers

    hf_nfc = normalizers.NFC()
    found = []
    for start in range(0, len(code_points), chunk):
        block = [chr(c) for c in code_points[start:start + chunk].tolist()]
        text = "".join(map(_nfc_probes, block))
        if hf_nfc.normalize_str(text) == unicodedata.normalize("NFC", text):
            continue
        for c in block:  # the newline between probes is a starter that composes with nothing
            probes = _nfc_probes(c)
            if hf_nfc.normalize_str(probes) != unicodedata.normalize("NFC", probes):
                found.append(ord(c))
    return found


def unsafe_ranges(agreeing: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive ranges of the code points (0..0x10FFFF) not in the sorted array `agreeing`."""
    safe = np.zeros(0x110000, dtype=bool)
    safe[agreeing] = True
    steps = np.diff(np.concatenate([[0], (~safe).astype(np.int8), [0]]))
    return [(int(a), int(b) - 1) for a, b in zip(np.flatnonzero(steps == 1), np.flatnonzero(steps == -1))]


def measure_unsafe_ranges() -> tuple[list[tuple[int, int]], dict]:
    """Probes every assigned code point below plane 15; returns the unsafe ranges and a summary."""
    start = time.monotonic()
    code_points = assigned_code_points()
    classes = regex_class_disagreements(code_points)
    nfc = nfc_disagreements(code_points)
    agreeing = np.setdiff1d(code_points, np.array(classes + nfc, dtype=np.int64))
    summary = {"probed": int(len(code_points)), "regex_class_disagreements": classes,
               "nfc_disagreements": nfc, "seconds": round(time.monotonic() - start, 2)}
    return unsafe_ranges(agreeing), summary


def cached_unsafe_ranges(cache_dir: str | Path | None = None) -> list[tuple[int, int]]:
    """The unsafe code point ranges for the installed library versions, measured once and cached."""
    recorded = measured_disagreements()
    if recorded is not None:
        disagreeing = np.array([*recorded["regex_class"], *recorded["nfc"]], dtype=np.int64)
        return unsafe_ranges(np.setdiff1d(assigned_code_points(), disagreeing))
    versions = library_versions()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_root() / "tokenizers"
    name = "unicode-agreement-" + "-".join(f"{k}{v}" for k, v in versions.items()).replace("/", "_") + ".json"
    target = directory / name

    def read() -> list[tuple[int, int]] | None:
        try:
            payload = json.loads(target.read_text())
            if payload.get("versions") == versions:
                return [(int(a), int(b)) for a, b in payload["unsafe_ranges"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def measure() -> tuple[list[tuple[int, int]], str]:
        ranges, summary = measure_unsafe_ranges()
        logger.info("measured Unicode agreement of HF tokenizers and the fast path in %.1f s: %d code points "
                    "probed, %d regex-class and %d NFC disagreements (documents with them use HF tokenizers)",
                    summary["seconds"], summary["probed"], len(summary["regex_class_disagreements"]),
                    len(summary["nfc_disagreements"]))
        payload = json.dumps({"versions": versions, **summary, "unsafe_ranges": ranges})
        return ranges, payload

    ranges = read()
    if ranges is not None:
        return ranges
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with file_lock(directory / f"{name}.lock"):
            ranges = read()
            if ranges is None:
                ranges, payload = measure()
                atomic_write_text(target, payload)
    except OSError as exc:
        logger.warning("cannot cache the Unicode agreement under %s (%s); measuring it for this run only",
                       directory, exc)
        if ranges is None:
            ranges, _ = measure()
    return ranges
