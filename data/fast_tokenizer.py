"""Exact, fast encoding of byte-level BPE tokenizer.json files (OLMoE's among them) on tiktoken.

HF tokenizers encodes a text (add_special_tokens=False) in four steps, and the fast path repeats
each one:

1. Added tokens with `normalized: false` are split off the raw text, leftmost-longest (an
   Aho-Corasick automaton). Here: each becomes a sentinel character (`_AddedTokenReplacer`: a
   regex with the alternatives longest first, and str.replace for runs of one character).
2. Each remaining piece is normalised (NFC or nothing): `unicodedata.normalize`.
3. Added tokens with `normalized: true` are split off each normalised piece (their content
   normalised too): a second replacer.
4. Each remaining piece is split by the GPT-2 regex and byte-pair-encoded: one tiktoken `encode`
   call with the same pattern, which encodes the text between sentinels piece by piece and emits
   each sentinel as its added token's id.

Why tiktoken's BPE gives HF's: tiktoken repeatedly merges the adjacent pair whose concatenated
bytes have the lowest rank, HF the listed pair of lowest merge index (leftmost first in both). With
rank(t) = the index of the one merge that makes t, the two agree on every listed pair; they can
only part where tiktoken merges an unlisted pair (c, d) whose concatenation t is a token. At the
first such step both runs have made the same merges inside t's span, and replaying them on t's
bytes alone (merges inside a span never depend on what lies outside it) leaves HF at [c, d] and
stuck, so HF would not encode t's own bytes as [t]. `_check_vocabulary` therefore encodes every
merge result alone with HF's BPE and keeps in tiktoken's ranks only those that come out as
themselves (the others can never appear in HF's output); it also refuses a token made by two
merges. tiktoken's shortcut (a whole piece that is a token is emitted as is) agrees by the same
check. Ranks are the HF ids where ids grow with merge index (OLMoE's and the demo BPE's), else a
table maps ranks to ids.

Unicode: `unicodedata` and tiktoken's regex classes agree with HF tokenizers' on every code point
except those `unicode_agreement` finds (measured once per library versions, cached); a document
containing one of those goes to HF tokenizers as a whole.

Anything the fast path does not model (another model type or normaliser, a pre-tokenizer other
than ByteLevel without prefix space, lstrip/rstrip/single_word added tokens, BPE dropout,
byte fallback, ...) falls back to HF tokenizers with one log line naming the reason. Setting
`OLMOE_TOKENIZER_ENCODER=hf` (or `TokenizeConfig.encoder="hf"`) forces HF tokenizers.
"""

from __future__ import annotations

import array
import functools
import json
import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.unicode_agreement import GPT2_SPLIT_PATTERN, cached_unsafe_ranges

logger = logging.getLogger(__name__)

ENCODER_ENV = "OLMOE_TOKENIZER_ENCODER"
ENCODER_CHOICES = ("auto", "hf")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: the character HF's ByteLevel uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


# Bytes that valid UTF-8 never contains: a vocabulary may lack them.
_NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


class FastPathRefused(Exception):
    """The tokenizer.json has something the fast path does not reproduce (the message says what)."""


class HFEncoder:
    """Encodes with HF tokenizers (the reference, and the fallback)."""

    name = "hf"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._encode(texts, add_special_tokens=False)]

    def encode_flat(self, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents' ids in one int64 array, `eos` after each, and their lengths (EOS included)."""
        documents = self.encode_batch(texts)
        flat = array.array("q")
        for ids in documents:
            flat.extend(ids)
            flat.append(eos)
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents)) + 1
        return np.frombuffer(flat, dtype=np.int64), lengths


def _token_alternation(contents: list[str]) -> str:
    """A regex matching any of `contents`, the longest first at each position (Python's
    alternation is leftmost-first, so at the leftmost match position the longest token wins)."""
    return "|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True))


class _AddedTokenReplacer:
    """Replaces every added token of one matching stage by its sentinel, leftmost-longest.

    A character whose tokens are all runs of it, of every length lo..hi, and that no other token
    contains (OLMoE's 2..24 spaces), is handled by run: leftmost-longest matching cuts a run of n
    into n // hi tokens of length hi from the left, then a token of the remainder if it is at least
    lo long, else leaves the remainder as text. The other tokens go through one regex, alternatives
    longest first.
    """

    def __init__(self, sentinels: dict[str, str]) -> None:
        by_first: dict[str, list[str]] = {}
        for content in sentinels:
            by_first.setdefault(content[0], []).append(content)
        self._runs = []  # (split function, chunk function, cache of runs -> replacements)
        literal = dict(sentinels)
        for char, group in by_first.items():
            lengths = sorted(len(c) for c in group)
            lo, hi = lengths[0], lengths[-1]
            if len(group) > 1 and all(c == char * len(c) for c in group) and lengths == list(range(lo, hi + 1)) \
                    and not any(char in other for other in sentinels if other[0] != char):
                by_length = {len(c): sentinels[c] for c in group}

                def chunk(run: str, *, char=char, lo=lo, hi=hi, by_length=by_length) -> str:
                    whole, rest = divmod(len(run), hi)
                    return by_length[hi] * whole + (by_length[rest] if rest >= lo else char * rest)

                cache = {char * n: chunk(char * n) for n in range(lo, 4 * hi + 1)}
                self._runs.append((re.compile(f"({re.escape(char) * lo}{re.escape(char)}*)").split, chunk, cache))
                for c in group:
                    del literal[c]
        self._literal_sub = re.compile(_token_alternation(list(literal))).sub if literal else None
        self._literal = literal

    def __call__(self, text: str) -> str:
        for split, chunk, cache in self._runs:
            parts = split(text)
            if len(parts) > 1:
                get = cache.get
                parts[1::2] = [get(run) or chunk(run) for run in parts[1::2]]
                text = "".join(parts)
        if self._literal_sub is not None:
            literal = self._literal
            text = self._literal_sub(lambda match: literal[match.group()], text)
        return text


# Each added token is replaced by one private-use character of plane 16 (a "sentinel") that
# tiktoken knows as a special token whose rank is the added token's id. Plane 16 is never probed
# by unicode_agreement, so a document that itself contains such a character goes to HF tokenizers:
# a sentinel in the fast path always stands for an added token.
_SENTINEL_BASE = 0x100000
_MAX_SENTINELS = 0xFFFE


class FastBPEEncoder:
    """Encodes like HF tokenizers for a byte-level BPE tokenizer.json that `_check_vocabulary` proved.

    Per document: added tokens matched on the raw text become sentinels (regex, longest first); the
    text is NFC-normalised (sentinels are starters that compose with nothing, so normalising the
    whole equals normalising each piece between them, as HF does); added tokens matched on the
    normalised text become sentinels; one tiktoken `encode` call then splits at the sentinels,
    encodes each piece between them on its own (a slice: the regex sees its end, as in HF) and
    emits each sentinel's rank.
    """

    name = "fast"

    def __init__(self, *, ranks: dict[bytes, int], rank_to_id: list[int] | None, raw_tokens: dict[str, int],
                 normalized_tokens: dict[str, int], nfc: bool, hf: HFEncoder,
                 unsafe_ranges: list[tuple[int, int]]) -> None:
        import tiktoken

        contents = [*raw_tokens, *normalized_tokens]
        if len(contents) > _MAX_SENTINELS:
            raise FastPathRefused(f"{len(contents)} added tokens are more than {_MAX_SENTINELS}")
        sentinel = {content: chr(_SENTINEL_BASE + k) for k, content in enumerate(contents)}
        table = None if rank_to_id is None else list(rank_to_id)
        special: dict[str, int] = {}
        for content, token_id in [*raw_tokens.items(), *normalized_tokens.items()]:
            if table is None:
                special[sentinel[content]] = token_id
            else:
                special[sentinel[content]] = len(table)
                table.append(token_id)
        self._core = tiktoken.Encoding("olmoe-fast-bpe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=special)._core_bpe
        self._special = frozenset(special)
        self._rank_to_id = None if table is None else np.asarray(table, dtype=np.int64)

        self._raw_sub = _AddedTokenReplacer({c: sentinel[c] for c in raw_tokens}) if raw_tokens else None
        self._normalized_sub = (_AddedTokenReplacer({c: sentinel[c] for c in normalized_tokens})
                                if normalized_tokens else None)
        self._nfc = nfc
        self._hf = hf
        self.tokenizer = hf.tokenizer
        self._unsafe_table = np.zeros(0x110000, dtype=bool)
        for a, b in unsafe_ranges:
            self._unsafe_table[a:b + 1] = True
        assert self._unsafe_table[_SENTINEL_BASE:_SENTINEL_BASE + len(contents)].all(), "sentinels must be unsafe"
        self.hf_documents = 0

    def is_safe(self, text: str) -> bool:
        """True when `text` holds no code point on which the fast path might differ from HF."""
        if text.isascii():
            return True
        try:
            code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # a lone surrogate (HF tokenizers refuses those)
            return False
        return not self._unsafe_table[code_points].any()

    def encode_ids(self, text: str) -> np.ndarray:
        """One document's ids (uint32 or int64), whatever its code points: callers check `is_safe`."""
        if self._raw_sub is not None:
            text = self._raw_sub(text)
        if self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if self._normalized_sub is not None:
            text = self._normalized_sub(text)
        ranks = np.frombuffer(self._core.encode_to_tiktoken_buffer(text, self._special), dtype=np.uint32)
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks]

    def encode(self, text: str) -> list[int]:
        return self.encode_ids(text).tolist()

    def _encode_or_none(self, text: str) -> np.ndarray | None:
        if not self.is_safe(text):
            return None
        try:
            return self.encode_ids(text)
        except ValueError:  # tiktoken's regex gave up (its backtracking limit): HF tokenizers decides
            return None

    def _encode_all(self, texts: list[str]) -> list[np.ndarray]:
        out = [self._encode_or_none(text) for text in texts]
        fallback = [i for i, ids in enumerate(out) if ids is None]
        if fallback:
            self.hf_documents += len(fallback)
            for i, ids in zip(fallback, self._hf.encode_batch([texts[i] for i in fallback])):
                out[i] = np.asarray(ids, dtype=np.int64)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self._encode_all(texts)]

    def encode_flat(self, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents' ids in one int64 array, `eos` after each, and their lengths (EOS included)."""
        documents = self._encode_all(texts)
        end = np.array([eos], dtype=np.int64)
        parts = []
        for ids in documents:
            parts.append(ids)
            parts.append(end)
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents)) + 1
        flat = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
        return flat, lengths


def _reason_to_refuse(config: dict) -> str | None:
    """Why the fast path cannot reproduce this tokenizer.json's pipeline, or None."""
    model = config.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    for key, allowed in (("dropout", (None,)), ("unk_token", (None,)), ("continuing_subword_prefix", (None, "")),
                         ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False)),
                         ("ignore_merges", (None, False))):
        if model.get(key) not in allowed:
            return f"BPE option {key}={model.get(key)!r} is not modelled"
    normalizer = config.get("normalizer")
    if normalizer is not None and normalizer != {"type": "NFC"}:
        return f"normalizer {json.dumps(normalizer)[:120]} is not None or NFC"
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex", True) is not True:
        return (f"pre_tokenizer {json.dumps(pre)[:120]} is not ByteLevel with add_prefix_space=false and "
                "use_regex=true")
    for key in ("post_processor", "decoder"):
        value = config.get(key)
        if value is not None and value.get("type") != "ByteLevel":
            return f"{key} type {value.get('type')!r} is not None or ByteLevel"
    for key in ("truncation", "padding"):
        if config.get(key) is not None:
            return f"{key} is set"
    for token in config.get("added_tokens") or []:
        for flag in ("single_word", "lstrip", "rstrip"):
            if token.get(flag):
                return f"added token {token.get('content')!r} has {flag}=true"
        if not token.get("content"):
            return f"added token id {token.get('id')} is empty"
        if max(map(ord, token["content"])) >= 0xF0000:
            return f"added token {token['content']!r} holds a private-use character of planes 15-16 (sentinels)"
    return None


def _unreachable_merge_results(config: dict, made: dict[str, int]) -> list[str]:
    """The merge results that HF's BPE does not encode as themselves (the bare model, no
    normaliser or pre-tokenizer, all of them as one pre-tokenized sequence)."""
    from tokenizers import Tokenizer

    bare = {**config, "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "added_tokens": [], "truncation": None, "padding": None}
    words = list(made)
    encoding = Tokenizer.from_str(json.dumps(bare)).encode(words, is_pretokenized=True, add_special_tokens=False)
    per_word: list[list[int]] = [[] for _ in words]
    for word, token_id in zip(encoding.word_ids, encoding.ids):
        per_word[word].append(token_id)
    vocab = config["model"]["vocab"]
    return [w for w, ids in zip(words, per_word) if ids != [vocab[w]]]


def _check_vocabulary(config: dict, path: Path) -> tuple[dict[bytes, int], list[int] | None]:
    """tiktoken ranks (and a rank->id table where ids do not grow with merge index) that give HF's BPE.

    Raises:
        FastPathRefused: a byte is missing, a merge makes an unknown or already-made token, ...
    """
    model = config["model"]
    vocab: dict[str, int] = model["vocab"]
    alphabet = byte_level_alphabet()
    missing = [b for ch, b in alphabet.items() if ch not in vocab and b not in _NEVER_IN_UTF8]
    if missing:
        raise FastPathRefused(f"the vocabulary lacks the byte-level token of byte(s) {missing[:8]}")
    to_latin1 = str.maketrans({ch: chr(b) for ch, b in alphabet.items()})
    made: dict[str, int] = {}
    made_bytes: dict[str, bytes] = {}
    for index, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
            raise FastPathRefused(f"merge {index} {merge!r} is not a pair of vocabulary tokens")
        token = pair[0] + pair[1]
        if token not in vocab:
            raise FastPathRefused(f"merge {index} {merge!r} makes {token!r}, which is not in the vocabulary")
        if token in made:
            raise FastPathRefused(f"token {token!r} is made by merges {made[token]} and {index}")
        try:
            made_bytes[token] = token.translate(to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            raise FastPathRefused(f"merge {index} makes {token!r}, which is not byte-level") from None
        made[token] = index
    unreachable = set(_unreachable_merge_results(config, made))
    if unreachable:
        logger.info("%s: %d merge results do not encode to themselves under HF's BPE (unreachable); left out",
                    path, len(unreachable))
    kept = [w for w in made if w not in unreachable]  # in merge order (dicts keep insertion order)
    byte_ids = {b: vocab[ch] for ch, b in alphabet.items() if ch in vocab}
    merged_ids = [vocab[w] for w in kept]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:])):
        ranks = {bytes([b]): token_id for b, token_id in byte_ids.items()}
        ranks.update(zip(map(made_bytes.__getitem__, kept), merged_ids))
        spare = max(vocab.values()) + 1
        for b in sorted(_NEVER_IN_UTF8 - byte_ids.keys()):  # tiktoken wants all 256 bytes; never emitted
            ranks[bytes([b])] = spare
            spare += 1
        return ranks, None
    ranks = {bytes([b]): b for b in range(256)}
    table = [byte_ids.get(b, -1) for b in range(256)]
    for rank, w in enumerate(kept, start=256):
        ranks[made_bytes[w]] = rank
        table.append(vocab[w])
    return ranks, table


def build_fast_encoder(path: str | os.PathLike, hf: HFEncoder) -> FastBPEEncoder:
    """The fast encoder of a tokenizer.json, or FastPathRefused saying why not."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        raise FastPathRefused("tiktoken is not installed (pip install tiktoken)") from None
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable tokenizer JSON file ({exc})") from None
    reason = _reason_to_refuse(config)
    if reason is not None:
        raise FastPathRefused(reason)
    ranks, table = _check_vocabulary(config, path)
    nfc = config.get("normalizer") is not None
    raw_tokens, normalized_tokens = {}, {}
    for token in config.get("added_tokens") or []:
        token_id = hf.tokenizer.token_to_id(token["content"])  # the id HF emits for it
        if token_id is None:
            raise FastPathRefused(f"added token {token['content']!r} has no id in the loaded tokenizer")
        if token.get("normalized", not token.get("special", False)):
            normalized_tokens[unicodedata.normalize("NFC", token["content"]) if nfc else token["content"]] = token_id
        else:
            raw_tokens[token["content"]] = token_id
    return FastBPEEncoder(ranks=ranks, rank_to_id=table, raw_tokens=raw_tokens, normalized_tokens=normalized_tokens,
                          nfc=nfc, hf=hf, unsafe_ranges=cached_unsafe_ranges())


def encoder_choice(configured: str = "auto") -> str:
    """'hf' when forced by the config or by $OLMOE_TOKENIZER_ENCODER=hf, else 'auto'."""
    env = os.environ.get(ENCODER_ENV, "").strip().lower()
    if env and env not in ENCODER_CHOICES:
        raise DataError(f"${ENCODER_ENV}={env!r} must be one of {', '.join(ENCODER_CHOICES)} (or unset)")
    return "hf" if "hf" in (configured, env) else "auto"


@functools.lru_cache(maxsize=4)
def load_encoder(path: str, sha256: str, choice: str = "auto") -> FastBPEEncoder | HFEncoder:
    """The encoder for a tokenizer.json: the fast path when `choice` is 'auto' and it can prove it
    reproduces HF tokenizers, else HF tokenizers (one log line says why). Cached per process
    (`sha256` keys a changed file); forked tokenize workers inherit the parent's.
    """
    from olmoe_megatron.data.tokenizer import load_tokenizer

    hf = HFEncoder(load_tokenizer(path))
    if choice == "hf":
        logger.info("tokenizer %s: HF tokenizers (forced by encoder=hf or $%s=hf)", path, ENCODER_ENV)
        return hf
    try:
        return build_fast_encoder(path, hf)
    except FastPathRefused as exc:
        logger.info("tokenizer %s: HF tokenizers, not the fast path, because %s", path, exc)
        return hf
