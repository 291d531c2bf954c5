"""DataConfig: which token files, in which order and blend; `build()` makes the trainer's dataset."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from olmoe_megatron.config import Config, ConfigError
from olmoe_megatron.data.index_cache import default_index_cache_dir
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.tokenizer import DEMO_BPE_EOS_ID, OLMOE_EOS_TOKEN_ID, demo_bpe_vocab_size


#: A run that would read the embedded demo corpus more often than this is refused (see build).
DEMO_MAX_PASSES = 1000


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig(Config):
    """Token data for training: sources, blend weights, sample order and caches."""

    paths: tuple[str, ...] = ()
    """Megatron .bin/.idx prefixes, OLMo .npy token files, or tokenize *.manifest.json files."""
    weights: tuple[float, ...] | None = None
    """Blend weight per path (normalised); None: Megatron order weighs by tokens, OLMo order concatenates."""
    format: Literal["megatron", "olmo_npy"] = "megatron"
    """On-disk format of `paths` (manifests are always megatron)."""
    order: Literal["megatron", "olmo"] = "megatron"
    """Sample order: Megatron's GPTDataset (samples cross documents) or OLMo's fixed windows."""
    seed: int = 6198
    """Shuffle seed (OLMoE's run used 6198)."""
    cache_dir: str | None = None
    """Index cache directory shared by all ranks; None: $OLMOE_CACHE/index (~/.cache/olmoe_megatron/index)."""
    demo_corpus: bool = False
    """With no paths: train on the embedded demo corpus (the interpreter's standard library source)."""
    demo_max_bytes: int = 4_000_000
    """Text bytes of the demo corpus."""
    tokenizer: str = "olmoe"
    """Tokenizer of the demo corpus: 'olmoe', 'demo-bpe-N' (a byte-level BPE of N entries trained on
    the demo corpus, for models with a smaller vocabulary; end-of-text id 0) or a tokenizer.json path."""
    eos_token_id: int = OLMOE_EOS_TOKEN_ID
    """End-of-document id (splits OLMo .npy files into documents)."""
    npy_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of OLMo .npy files (OLMoE-mix: uint16)."""
    mask_repeated_ngrams: bool = True
    """Mask all labels of a sample in which a 1..repetition_max_period-gram repeats back to back."""
    repetition_max_period: int = 13
    """Longest repeated pattern checked (OLMo: 13)."""
    repetition_min_repeats: int = 32
    """Repeats that trigger the mask (OLMo: 32)."""

    def validate(self) -> None:
        if not self.paths and not self.demo_corpus:
            raise ConfigError("data.paths is empty and data.demo_corpus=False; give token file prefixes "
                              "(data.paths=[...]) or set data.demo_corpus=true")
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ConfigError(f"data.weights has {len(self.weights)} entries but data.paths has "
                                  f"{len(self.paths)}; give one weight per path or data.weights=null")
            bad = [w for w in self.weights if not (math.isfinite(w) and w > 0)]
            if bad:
                raise ConfigError(f"data.weights={list(self.weights)} has {bad[0]!r}; every weight must be a "
                                  f"positive finite number")
        if self.seed < 0:
            raise ConfigError(f"data.seed={self.seed} must be >= 0")
        if self.demo_max_bytes < 1:
            raise ConfigError(f"data.demo_max_bytes={self.demo_max_bytes} must be positive; try 4000000")
        if self.eos_token_id < 0:
            raise ConfigError(f"data.eos_token_id={self.eos_token_id} must be >= 0 (OLMoE: 50279)")
        try:
            bpe_vocab = demo_bpe_vocab_size(self.tokenizer)
        except DataError as exc:
            raise ConfigError(f"data.tokenizer: {exc}") from None
        if bpe_vocab is not None and self.eos_token_id != DEMO_BPE_EOS_ID:
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} ends documents with id {DEMO_BPE_EOS_ID}, but "
                              f"data.eos_token_id={self.eos_token_id}; set data.eos_token_id={DEMO_BPE_EOS_ID}")
        if not 1 <= self.repetition_max_period:
            raise ConfigError(f"data.repetition_max_period={self.repetition_max_period} must be >= 1 (OLMo: 13)")
        if self.repetition_min_repeats < 2:
            raise ConfigError(f"data.repetition_min_repeats={self.repetition_min_repeats} must be >= 2 (OLMo: 32)")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_index_cache_dir()

    def build(self, *, seq_length: int, num_samples: int, vocab_size: int, heldout_share: float = 0.0):
        """The trainer's dataset: `num_samples` samples of `seq_length` tokens, in a global order.

        Cheap on every rank: index caches are built once under a file lock and memory-mapped.

        Args:
            seq_length: Tokens per sample.
            num_samples: Samples the run will read (train_iters * global_batch_size).
            vocab_size: Model vocabulary; a token id >= it raises DataError when read.
            heldout_share: Share of every source's documents (OLMo order: windows) that the order
                never draws, kept for evaluation (the run's `eval.heldout_share`).

        Returns:
            A picklable `TokenDataset`.
        """
        from olmoe_megatron.data.token_dataset import DatasetPlan, TokenDataset

        for name, value in (("seq_length", seq_length), ("num_samples", num_samples), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"DataConfig.build({name}={value!r}): must be a positive integer")
        if self.eos_token_id >= vocab_size:
            raise ConfigError(
                f"data.eos_token_id={self.eos_token_id} must be below the model's vocab_size={vocab_size}: this "
                f"tokenizer's ids do not fit the model. Use a model vocabulary of at least {self.eos_token_id + 1} "
                "(OLMoE's: 50304 padded), or, for the demo corpus, a smaller tokenizer: "
                "--data.tokenizer=demo-bpe-<vocab> --data.eos_token_id=0"
            )
        if not self.paths and num_samples * seq_length > DEMO_MAX_PASSES * self.demo_max_bytes:
            # A byte-level BPE token covers at least one byte: the demo corpus has at most about
            # demo_max_bytes tokens, so this run would read it more than DEMO_MAX_PASSES times.
            raise ConfigError(
                f"data.paths is empty, so this run would train on the embedded demo corpus (at most "
                f"{self.demo_max_bytes:,} bytes of standard-library source): {num_samples:,} samples of {seq_length} "
                f"tokens read it more than {num_samples * seq_length // self.demo_max_bytes:,} times. Give the "
                "run's token files with --data.paths=[...] (from `olmoe prep tokenize`), or shorten the run "
                f"(train.max_steps) to at most {DEMO_MAX_PASSES} passes over the demo corpus")
        cache_dir = self.resolved_cache_dir()
        plan = DatasetPlan(
            order=self.order, groups=self.token_groups(cache_dir), weights=self.weights, seq_length=seq_length,
            num_samples=num_samples, vocab_size=vocab_size, seed=self.seed, eos_token_id=self.eos_token_id,
            index_cache_dir=str(cache_dir), mask_repeated_ngrams=self.mask_repeated_ngrams,
            repetition_max_period=self.repetition_max_period, repetition_min_repeats=self.repetition_min_repeats,
            heldout_share=heldout_share,
        )
        return TokenDataset(plan)

    def token_groups(self, cache_dir: Path | None = None):
        """The token files of each path (weight group), building the demo corpus when there are none."""
        from olmoe_megatron.data.corpus import build_demo_corpus
        from olmoe_megatron.data.token_files import expand_path, megatron_file, npy_file

        cache_dir = self.resolved_cache_dir() if cache_dir is None else cache_dir
        paths = self.paths
        if not paths:
            paths = (str(build_demo_corpus(cache_dir / "demo_corpus", tokenizer_path=self.tokenizer,
                                           max_bytes=self.demo_max_bytes)),)
        npy_cache = str(cache_dir) if self.order == "megatron" else None
        groups = []
        for path in paths:
            file_format, items = expand_path(str(Path(path).expanduser()), self.format)
            if file_format == "olmo_npy":
                files = [npy_file(item, dtype=self.npy_dtype, eos_token_id=self.eos_token_id,
                                  index_cache_dir=npy_cache) for item in items]
            else:
                files = [megatron_file(item) for item in items]
            if sum(f.num_tokens for f in files) == 0:
                from olmoe_megatron.data.errors import DataError

                raise DataError(f"data.paths entry {path!r} holds 0 tokens ({len(files)} file(s): "
                                f"{', '.join(f.raw_path for f in files[:3])}); it cannot be sampled from: remove it "
                                "or tokenize input that has text")
            groups.append(tuple(files))
        return tuple(groups)
