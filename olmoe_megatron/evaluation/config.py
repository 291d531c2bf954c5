"""EvalConfig: held-out validation sources and ranked-classification tasks, and when to run them."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from olmoe_megatron.config import Config, ConfigError

# The built-in tasks (olmoe_megatron/evaluation/tasks.py builds them from local text).
BUILTIN_TASKS = ("demo-next-line",)


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalSourceConfig(Config):
    """One named held-out source. Exactly one of `paths`, `share` and `demo_heldout` says what it is."""

    name: str
    """Metric name: logged as eval/<name>/loss and eval/<name>/ppl."""
    paths: tuple[str, ...] = ()
    """Megatron .bin/.idx prefixes, OLMo .npy token files or tokenize *.manifest.json files."""
    format: Literal["megatron", "olmo_npy"] = "megatron"
    """On-disk format of `paths` (manifests are always megatron)."""
    share: float | None = None
    """Instead of paths: this share of every training source's documents (OLMo order: windows),
    chosen by a fixed seed, which the training order then never draws."""
    demo_heldout: bool = False
    """Instead of paths: the standard-library files that come after the demo corpus's cutoff
    (never in the demo corpus), tokenized with data.tokenizer."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.strip() != self.name:
            raise ConfigError(f"eval.datasets: name={self.name!r} must be a non-empty name without '/' or "
                              "surrounding spaces (it becomes the metric eval/<name>/loss)")
        kinds = [kind for kind, given in (("paths", bool(self.paths)), ("share", self.share is not None),
                                          ("demo_heldout", self.demo_heldout)) if given]
        if len(kinds) != 1:
            raise ConfigError(
                f"eval.datasets[{self.name}] gives {' and '.join(kinds) if kinds else 'none'} of paths, share and "
                "demo_heldout; give exactly one (e.g. {name: c4, paths: [/data/c4_val_text_document]} or "
                "{name: heldout, share: 0.01})")
        if self.share is not None and not (math.isfinite(self.share) and 0 < self.share < 1):
            raise ConfigError(f"eval.datasets[{self.name}].share={self.share} must lie in (0, 1); "
                              "a typical held-out share is 0.01")


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalConfig(Config):
    """Forward-only evaluation during training and in `olmoe eval`."""

    interval: int | None = None
    """Evaluate every this many optimizer steps (None: only at the end, when at_end)."""
    at_end: bool = True
    """Evaluate after the last step (when there is anything to evaluate)."""
    datasets: tuple[EvalSourceConfig, ...] = ()
    """Named held-out sources; each gives LM loss and perplexity over the same fixed windows every time."""
    tokens: int = 1_048_576
    """Tokens evaluated per source (whole windows of train.seq_length; fewer if the source is smaller).
    The default suits OLMo-sized steps (4M tokens: a 1000-step interval evaluates 0.03% of what it
    trains); small runs want far fewer (benchmarks/eval_throughput.py: 27% of olmoe_small's wall
    clock at 1000 steps, 2.2% with 65,536)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass (None: train.micro_batch_size). Forward only holds no activations
    for backward, so larger than training's is usually faster (olmoe_small on CPU: 16 gives +19%
    tokens/s over 4); the logits are micro_batch_size x seq_length x vocabulary fp32."""
    tasks: tuple[str, ...] = ()
    """Ranked-classification tasks: JSONL files of {"id", "context", "choices", "label"} or built-in
    names (demo-next-line)."""
    task_limit: int | None = None
    """Score at most this many items per task (the first ones; None: all)."""

    def validate(self) -> None:
        if self.interval is not None and self.interval < 1:
            raise ConfigError(f"eval.interval={self.interval} must be >= 1 step (null: evaluate only at the end)")
        if self.interval is not None and not self.enabled:
            raise ConfigError(
                f"eval.interval={self.interval} is set but there is nothing to evaluate: eval.datasets and "
                "eval.tasks are empty; add a source (--eval.datasets='[{name: heldout, share: 0.01}]'), a task "
                "(--eval.tasks=[demo-next-line]) or set --eval.interval=null")
        if self.tokens < 1:
            raise ConfigError(f"eval.tokens={self.tokens} must be >= 1 (default 1048576 per source)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"eval.micro_batch_size={self.micro_batch_size} must be >= 1 (null: train.micro_batch_size)")
        if self.task_limit is not None and self.task_limit < 1:
            raise ConfigError(f"eval.task_limit={self.task_limit} must be >= 1 (null: every item)")
        names = [source.name for source in self.datasets]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ConfigError(f"eval.datasets names {duplicated} more than once; give each source its own name")
        shares = [source for source in self.datasets if source.share is not None]
        if len(shares) > 1:
            raise ConfigError(f"eval.datasets has {len(shares)} held-out shares ({', '.join(s.name for s in shares)}); "
                              "the training sources have one held-out share: keep one")
        for task in self.tasks:
            if not task.endswith((".jsonl", ".json")) and task not in BUILTIN_TASKS:
                raise ConfigError(f"eval.tasks: {task!r} is neither a .jsonl task file nor a built-in task "
                                  f"({', '.join(BUILTIN_TASKS)}); convert public layouts with `olmoe prep mc-task`")

    @property
    def enabled(self) -> bool:
        return bool(self.datasets or self.tasks)

    @property
    def heldout_share(self) -> float:
        """The share of the training sources held out for evaluation (0.0: none)."""
        return next((s.share for s in self.datasets if s.share is not None), 0.0)

    def due(self, step: int, *, last_step: int) -> bool:
        """Whether to evaluate after optimizer step `step` of a run ending at `last_step`."""
        if not self.enabled:
            return False
        if self.interval is not None and step % self.interval == 0:
            return True
        return self.at_end and step == last_step
