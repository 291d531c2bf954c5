"""The fast byte-level BPE path (tiktoken) gives HF tokenizers' ids exactly, or is not used.

Every comparison is against HF tokenizers' own encode_batch on the same texts. Where a test could
pass by routing everything to HF (documents with unsafe code points do), it also checks how many
documents the fast path encoded itself.
"""

import json
import logging
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fast_tokenizer import (
    ENCODER_ENV,
    FastBPEEncoder,
    HFEncoder,
    _unreachable_merge_results,
    byte_level_alphabet,
    encoder_choice,
    load_encoder,
)
from olmoe_megatron.data.fileutil import sha256_file
from olmoe_megatron.data.tokenizer import load_tokenizer, olmoe_tokenizer_path
from olmoe_megatron.data.unicode_agreement import (
    assigned_code_points,
    cached_unsafe_ranges,
    measured_disagreements,
    nfc_disagreements,
    regex_class_disagreements,
    unsafe_ranges,
)


@pytest.fixture(scope="module")
def olmoe_json() -> str:
    try:
        return str(olmoe_tokenizer_path())
    except DataError as exc:
        pytest.skip(f"OLMoE tokenizer neither cached nor downloadable from PyPI here: {exc}")


@pytest.fixture(scope="module")
def olmoe(olmoe_json):
    """(fast encoder, HF encoder) for OLMoE's tokenizer."""
    fast = load_encoder(olmoe_json, sha256_file(olmoe_json), "auto")
    assert isinstance(fast, FastBPEEncoder), "OLMoE's tokenizer must take the fast path"
    return fast, HFEncoder(load_tokenizer(olmoe_json))


def _added_tokens(path) -> list[str]:
    return [t["content"] for t in json.loads(Path(path).read_text())["added_tokens"]]


def assert_same(fast: FastBPEEncoder, hf: HFEncoder, texts: list[str], *, min_fast_share: float = 1.0) -> None:
    """fast == HF on every text, and at least `min_fast_share` of them encoded by the fast path itself."""
    before = fast.hf_documents
    got, want = fast.encode_batch(texts), hf.encode_batch(texts)
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if bad:
        first = bad[0]
        at = next((i for i, (a, b) in enumerate(zip(got[first], want[first])) if a != b),
                  min(len(got[first]), len(want[first])))
        raise AssertionError(f"{len(bad)} of {len(texts)} texts differ; first {texts[first][:200]!r}: from id "
                             f"{at} fast {got[first][at:at + 12]} != HF {want[first][at:at + 12]}")
    fast_share = 1 - (fast.hf_documents - before) / max(len(texts), 1)
    assert fast_share >= min_fast_share, f"only {fast_share:.0%} of the texts took the fast path"


# ---- whole inputs ------------------------------------------------------------------------------

def test_whole_demo_corpus(olmoe):
    from olmoe_megatron.data.corpus import DEFAULT_DEMO_BYTES, stdlib_source_files

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_source_files(DEFAULT_DEMO_BYTES)]
    assert sum(map(len, texts)) >= DEFAULT_DEMO_BYTES * 0.9
    assert_same(*olmoe, texts)


def prose_sample(max_bytes: int) -> list[str]:
    """Man pages (roff source in a dozen languages), every k-th file in sorted order, as documents."""
    root = Path("/usr/share/man")
    files = sorted(p for p in root.rglob("*.gz") if p.is_file()) if root.is_dir() else []
    if not files:
        pytest.skip("no man pages under /usr/share/man on this machine")
    import gzip

    texts, total = [], 0
    for path in files[:: max(1, len(files) // 300)]:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return texts


def test_prose_sample(olmoe):
    texts = prose_sample(1_000_000)
    assert len(texts) > 50 and any(not t.isascii() for t in texts)
    assert_same(*olmoe, texts, min_fast_share=0.95)


# ---- added tokens ----------------------------------------------------------------------------

def test_every_added_token_alone_and_in_text(olmoe, olmoe_json):
    fast, hf = olmoe
    tokens = _added_tokens(olmoe_json)
    assert len(tokens) == 28
    texts = []
    for token in tokens:
        texts += [token, token + token, f"a{token}b", f" {token} ", f"x {token}", f"{token} x", f"\n{token}\n",
                  f"  {token}  ", f"{token}{tokens[0]}", f"def f():\n{token}return {token}", f"{token[:-1]}",
                  f"{token[1:]}", f"é{token}é", f"\t{token}\t", f"{token}'s", f"1{token}2"]
    assert_same(fast, hf, texts)
    ids = fast.encode_batch(tokens)
    assert [len(i) for i in ids] == [1] * len(tokens)  # each added token alone is its own id


def test_pii_markers_inside_punctuation_and_partial_markers(olmoe):
    texts = ["mail |||EMAIL_ADDRESS|||, call |||PHONE_NUMBER|||.", "ip=|||IP_ADDRESS|||;", "||||IP_ADDRESS||||",
             "|||IP_ADDRESS||||||EMAIL_ADDRESS|||", "|||IP_ADDR|||", "<|endoftext|><|padding|>", "<|endoftext|",
             "<<|endoftext|>>", "a<|endoftext|>b c<|padding|> d", "|||||", "<|", "|>"]
    assert_same(*olmoe, texts)


# ---- Unicode -----------------------------------------------------------------------------------

NFC_CASES = [
    "e\u0301", "cafe\u0301 na\u0131ve", "A\u030a \u212b \u00c5",  # composes; the Angstrom sign becomes Å
    "a\u0316\u0301 a\u0301\u0316", "q\u0307\u0323 \u1e0b\u0323",  # canonical reordering
    "\ufb01le \u2460 \uff76 \u00b2 \u2126 \u1e9b\u0323",  # compatibility characters NFC leaves (or not)
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af \ud55c\uae00",  # Hangul jamo compose
    "\u0915\u093c \u0929 \u09c7\u09be", "\u05e9\u05c1\u05b8", "\u0ddd \u0dd9\u0dcf\u0dca",
    "\u0301 leading mark", "x" + "\u0301" * 40,
]
CONTROL_CASES = ["".join(map(chr, range(32))), "a\x00b\x7fc\x85d", "line\r\nline\r\n\r\n", "\rx\r",
                 "\u2028\u2029x\u2028", "\v\f\x1c\x1d\x1e\x1f", "\t\tindent\t", "a\tb\t\tc", " \t \n \r\n "]
EMOJI_CASES = ["\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family", "\U0001f1e9\U0001f1ea flag",
               "\U0001f44d\U0001f3fd ok", "\u2764\ufe0f love", "\U0001f600\U0001f600x\U0001f600 1\U0001f600",
               "\u200b\u200c\u200d\ufeff"]
SCRIPT_CASES = ["English, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, \u4e2d\u6587\u5b57, "
                "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
                "\u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22 \u65e5\u672c\u8a9e\u306e\u30ab\u30ca",
                "\u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u05e2\u05d1\u05e8\u05d9\u05ea \ud55c\uad6d\uc5b4",
                "mixed\u4e2dA1\u0661\u0662\u00bd\u2167 x\u00b2\u2083", "I'm you're we'll they've she'd it's O'NEIL'S"]


def test_nfc_control_emoji_and_scripts(olmoe):
    changed = [t for t in NFC_CASES if not unicodedata.is_normalized("NFC", t)]
    assert len(changed) >= 6  # the cases do exercise normalisation
    assert_same(*olmoe, NFC_CASES + CONTROL_CASES + EMOJI_CASES + SCRIPT_CASES)


def test_runs_of_spaces_newlines_and_long_pieces(olmoe):
    texts = []
    for n in range(1, 61):
        texts += [" " * n, f"a{' ' * n}b", f"{' ' * n}x", f"x{' ' * n}", f"\n{' ' * n}def", "\n" * n,
                  f"a{chr(10) * n}b", f"{' ' * n}\n", f"\t{' ' * n}\t", f"x\n{' ' * n}\n{' ' * (61 - n)}y"]
    texts += ["a" * 500, "7" * 333, "!" * 1000, "ab" * 400, "\u00e9" * 300, "\u4e2d" * 200, "Zm9v" * 100 + "==",
              " " + "x" * 150]  # pieces of 100 bytes or more take tiktoken's other merge loop
    assert_same(*olmoe, texts)


def test_random_unicode_strings(olmoe, olmoe_json):
    fast, hf = olmoe
    rng = random.Random(16)
    pieces = _added_tokens(olmoe_json) + ["|||", "IP_ADDRESS", "<|", "|>", "endoftext", " ", "  ", "\n", "\r\n",
                                          "\t", "'s", "'ll", "\u0301", "\u200d", "\ufe0f"]
    ascii_chars = [chr(c) for c in range(128)]

    def code_point() -> str:
        while True:
            c = rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                            rng.randrange(0x10000, 0x110000), rng.randrange(0x300, 0x370)])
            if not 0xD800 <= c < 0xE000:
                return chr(c)

    texts = []
    for _ in range(3000):
        parts = []
        for _ in range(rng.randrange(1, 30)):
            kind = rng.random()
            if kind < 0.35:
                parts.append("".join(rng.choices(ascii_chars, k=rng.randrange(1, 8))))
            elif kind < 0.55:
                parts.append(" " * rng.randrange(1, 30))
            elif kind < 0.75:
                parts.append(rng.choice(pieces))
            else:
                parts.append(code_point())
        texts.append("".join(parts))
    assert_same(fast, hf, texts, min_fast_share=0.3)
    # and the same strings without the code points unicodedata calls unassigned (or planes 15-16): fast
    assigned = ["".join(ch for ch in t if unicodedata.category(ch) != "Cn" and ord(ch) < 0xF0000) for t in texts]
    assert_same(fast, hf, [t for t in assigned if t], min_fast_share=0.97)


def test_documents_with_code_points_hf_normalises_differently_go_to_hf(olmoe):
    fast, hf = olmoe
    text = "a\u0898\u0316 x"  # U+0898 (Unicode 14, class 230) is unknown to HF's NFC: no reordering there
    assert fast.encode(text) != hf.encode_batch([text])[0]  # so the fast path alone would be wrong here
    assert_same(fast, hf, [text], min_fast_share=0.0)
    assert fast.hf_documents > 0


def test_recorded_unicode_disagreements_hold():
    """The recorded full measurement (MEASURED) is probed again: its code points, the blocks around
    the first ones, and a seeded sample of 4,000 other assigned code points."""
    recorded = measured_disagreements()
    if recorded is None:
        pytest.skip("no recorded measurement for these library versions (it is measured on first use)")
    assigned = assigned_code_points()
    sample = np.union1d(np.random.default_rng(0).choice(assigned, 4000, replace=False), recorded["nfc"])
    sample = np.union1d(sample, assigned[(assigned >= 0x880) & (assigned < 0xA00)])
    assert nfc_disagreements(sample) == sorted(recorded["nfc"])
    assert regex_class_disagreements(sample) == sorted(recorded["regex_class"])
    ranges = cached_unsafe_ranges()
    unsafe = lambda c: any(a <= c <= b for a, b in ranges)  # noqa: E731
    assert unsafe(0x898) and unsafe(0xD800) and unsafe(0x378) and unsafe(0xF0000) and unsafe(0x10FFFF)
    assert not unsafe(ord("a")) and not unsafe(0x4E2D) and not unsafe(0x1F600) and not unsafe(0x301)
    assert unsafe_ranges(np.array([0, 1, 2, 5])) == [(3, 4), (6, 0x10FFFF)]


# ---- the BPE proof's conditions on hand-made vocabularies ------------------------------------

def _byte_level_bpe(path, merges: list[tuple[str, str]], *, shuffle_ids: bool = False) -> str:
    """A byte-level BPE tokenizer.json with all 256 bytes and the given merges (text, not byte chars)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    to_char = {b: ch for ch, b in byte_level_alphabet().items()}
    level = lambda s: "".join(to_char[b] for b in s.encode())  # noqa: E731
    tokens = sorted(to_char.values()) + [level(a + b) for a, b in merges]
    ids = list(range(len(tokens)))
    if shuffle_ids:
        random.Random(0).shuffle(ids)
    vocab = dict(zip(tokens, ids))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(level(a), level(b)) for a, b in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.save(str(path))
    return str(path)


def test_unreachable_merge_results_are_left_out(tmp_path):
    # "abc" is in the vocabulary, but HF's BPE on "abc" merges "bc" first and stops at [a, bc]:
    # tiktoken, given "abc", would emit it whole.
    path = _byte_level_bpe(tmp_path / "t.json", [("b", "c"), ("a", "b"), ("ab", "c"), ("x", "abc")])
    config = json.loads(Path(path).read_text())
    made = {a + b: i for i, (a, b) in enumerate(m.split(" ") if isinstance(m, str) else m
                                               for m in config["model"]["merges"])}
    assert _unreachable_merge_results(config, made) == ["abc", "xabc"]  # the check itself, not its cache
    fast = load_encoder(path, sha256_file(path), "auto")
    assert isinstance(fast, FastBPEEncoder)
    texts = ["abc", "xabc", "abcabc", "zabc", "ab c abcd", "bca"]
    assert_same(fast, HFEncoder(load_tokenizer(path)), texts)
    assert fast.encode("abc") == HFEncoder(load_tokenizer(path)).encode_batch(["abc"])[0] != [258]


def test_ids_not_in_merge_order_are_mapped(tmp_path):
    merges = [("t", "h"), ("th", "e"), (" ", "the"), ("i", "n"), (" ", "in"), ("e", "r"), (" ", "a"), ("a", "n")]
    path = _byte_level_bpe(tmp_path / "t.json", merges, shuffle_ids=True)
    fast = load_encoder(path, sha256_file(path), "auto")
    assert isinstance(fast, FastBPEEncoder) and fast._rank_to_id is not None
    assert_same(fast, HFEncoder(load_tokenizer(path)), ["the in an the inner", "thethe rather", "ain't", "\u00e9 x"])


def test_overlapping_added_tokens_raw_and_normalized(tmp_path):
    """Longest match first among overlapping added tokens; normalized=false ones match the raw text,
    normalized=true ones the NFC text (their content NFC'd too)."""
    from tokenizers import AddedToken, Tokenizer, normalizers

    path = _byte_level_bpe(tmp_path / "base.json", [("a", "b"), ("ab", "c"), (" ", "ab")])
    tokenizer = Tokenizer.from_file(path)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in ["<x>", "<x><y>", "<x><y><z>", "e\u0301!"]])
    tokenizer.add_tokens([AddedToken(t, normalized=True) for t in ["ab", "abab", "\u00e9", "--", "---", "----"]])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(path)
    fast = load_encoder(path, sha256_file(path), "auto")
    assert isinstance(fast, FastBPEEncoder)
    texts = ["<x><y><z>", "<x><y>z", "<x><x><y>", "ababab abc", "e\u0301! e\u0301 \u00e9", "caf\u00e9s",
             "a----b---c--d-e-----f", "<x>ab<|endoftext|>abab", "\u212b e\u0301e\u0301!", "<x><y><z><z>"]
    assert_same(fast, HFEncoder(load_tokenizer(path)), texts)


def test_demo_bpe_takes_the_fast_path(tmp_path_factory):
    from olmoe_megatron.data.corpus import demo_bpe_tokenizer, stdlib_source_files

    path = str(demo_bpe_tokenizer(1024, max_bytes=300_000, cache_dir=tmp_path_factory.mktemp("bpe")))
    fast = load_encoder(path, sha256_file(path), "auto")
    assert isinstance(fast, FastBPEEncoder)
    texts = [p.read_text(encoding="utf-8") for p in stdlib_source_files(300_000)]
    assert_same(fast, HFEncoder(load_tokenizer(path)), texts + ["<|endoftext|>x<|endoftext|>", "caf\u00e9 \u4e2d"])


# ---- fallback and forcing --------------------------------------------------------------------

@pytest.mark.parametrize("change, reason", [
    (lambda c: c.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda c: c["added_tokens"][0].update(lstrip=True), "lstrip=true"),
    (lambda c: c["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda c: c["model"].update(dropout=0.1), "dropout"),
])
def test_unmodelled_options_fall_back_with_one_log_line(tmp_path, caplog, change, reason):
    config = json.loads(Path(_byte_level_bpe(tmp_path / "base.json", [("a", "b")])).read_text())
    config["added_tokens"] = [{"id": 256 + 1, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True}]
    change(config)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="olmoe_megatron.data.fast_tokenizer"):
        encoder = load_encoder(str(path), sha256_file(path), "auto")
    assert isinstance(encoder, HFEncoder)
    lines = [r.getMessage() for r in caplog.records if r.name == "olmoe_megatron.data.fast_tokenizer"]
    assert len(lines) == 1 and "HF tokenizers, not the fast path, because" in lines[0] and reason in lines[0], lines


def test_wordpiece_falls_back(tmp_path, caplog):
    from tokenizers import Tokenizer, models

    path = tmp_path / "wp.json"
    Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with caplog.at_level(logging.INFO, logger="olmoe_megatron.data.fast_tokenizer"):
        assert isinstance(load_encoder(str(path), sha256_file(path), "auto"), HFEncoder)
    assert "model type 'WordPiece' is not BPE" in caplog.text


def test_forcing_hf(monkeypatch, olmoe_json):
    assert encoder_choice("auto") == "auto" and encoder_choice("hf") == "hf"
    monkeypatch.setenv(ENCODER_ENV, "hf")
    assert encoder_choice("auto") == "hf"
    assert isinstance(load_encoder(olmoe_json, sha256_file(olmoe_json), encoder_choice("auto")), HFEncoder)
    monkeypatch.setenv(ENCODER_ENV, "tiktoken")
    with pytest.raises(DataError, match=r"OLMOE_TOKENIZER_ENCODER='tiktoken' must be one of auto, hf"):
        encoder_choice("auto")
