"""The evaluator the trainer and `olmoe eval` share: validation losses per source and task accuracy.

    evaluator = Evaluator.build(run, context)      # reads sources and tasks once, on every rank
    metrics = evaluator.evaluate(models)           # {"eval/<source>/loss": ..., "eval/<task>/acc": ...}

Everything is forward only inside `evaluation_mode`: no gradient buffer, optimizer state, RNG
stream or data position of training is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from olmoe_megatron.evaluation.config import EvalConfig
from olmoe_megatron.evaluation.forward import evaluation_mode
from olmoe_megatron.evaluation.scoring import choice_logliks, validation_loss
from olmoe_megatron.evaluation.sources import EvalWindows, build_sources
from olmoe_megatron.parallel.context import ParallelContext

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Task:
    name: str
    items: list
    requests: list[tuple[list[int], list[int]]]


def pad_multiple(context: ParallelContext) -> int:
    """Sequence lengths every layout accepts: a multiple of 8, of TP (sequence parallel) and of 2 x CP."""
    layout = context.layout
    return math.lcm(8, layout.tp, 2 * layout.cp)


def run_tokenizer(data):
    """The `tokenizers.Tokenizer` of the run's data.tokenizer ('olmoe', 'demo-bpe-N' or a path)."""
    from olmoe_megatron.data.corpus import demo_bpe_tokenizer
    from olmoe_megatron.data.tokenizer import demo_bpe_vocab_size, load_tokenizer

    bpe_vocab = demo_bpe_vocab_size(data.tokenizer)
    spec = demo_bpe_tokenizer(bpe_vocab, max_bytes=data.demo_max_bytes) if bpe_vocab is not None else data.tokenizer
    return load_tokenizer(spec)


def task_tokenizer(data) -> "callable":
    """`encode(text) -> ids` with the run's tokenizer (data.tokenizer), no special tokens added."""
    tokenizer = run_tokenizer(data)
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


class Evaluator:
    """Validation windows and tokenized tasks, evaluated on demand in the models' current layout."""

    def __init__(self, *, sources: list[EvalWindows], tasks: list[_Task], micro_batch_size: int, max_length: int,
                 context: ParallelContext) -> None:
        self.sources = sources
        self.tasks = tasks
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.context = context

    @classmethod
    def build(cls, run, context: ParallelContext, *, eval_config: EvalConfig | None = None) -> "Evaluator":
        """Reads every source's windows and tokenizes every task (same result on every rank)."""
        from olmoe_megatron.evaluation.tasks import load_task, task_requests

        config = eval_config or run.eval
        micro_batch_size = config.micro_batch_size or run.train.micro_batch_size
        seq_length = run.train.seq_length
        sources = build_sources(config, run.data, seq_length=seq_length, vocab_size=run.model.vocab_size,
                                micro_batch_size=micro_batch_size)
        tasks = []
        if config.tasks:
            encode = task_tokenizer(run.data)
            for spec in config.tasks:
                name, items = load_task(spec, limit=config.task_limit, demo_max_bytes=run.data.demo_max_bytes)
                requests = task_requests(items, encode, prefix_token_id=run.data.eos_token_id)
                _check_vocab(name, requests, run.model.vocab_size)
                tasks.append(_Task(name, items, requests))
        max_length = seq_length // pad_multiple(context) * pad_multiple(context)
        for source in sources:
            logger.info("eval source %s: %d windows of %d tokens (%s)", source.name, source.num_windows, seq_length,
                        source.description)
        for task in tasks:
            logger.info("eval task %s: %d items, %d choices scored", task.name, len(task.items), len(task.requests))
        return cls(sources=sources, tasks=tasks, micro_batch_size=micro_batch_size, max_length=max_length,
                   context=context)

    def evaluate(self, models: list[torch.nn.Module]) -> dict[str, float]:
        """Every source's loss and perplexity and every task's acc and acc_norm (same on every rank)."""
        from olmoe_megatron.evaluation.tasks import choice_accuracy

        start = time.perf_counter()
        metrics: dict[str, float] = {}
        with evaluation_mode(models):
            for source in self.sources:
                result = validation_loss(models, source, self.context, micro_batch_size=self.micro_batch_size)
                metrics[f"eval/{source.name}/loss"] = result["loss"]
                metrics[f"eval/{source.name}/ppl"] = result["ppl"]
                metrics[f"eval/{source.name}/tokens"] = result["tokens"]
            for task in self.tasks:
                logliks = choice_logliks(models, task.requests, self.context, micro_batch_size=self.micro_batch_size,
                                         max_length=self.max_length, pad_multiple=pad_multiple(self.context))
                scores = choice_accuracy(task.items, logliks)
                metrics[f"eval/{task.name}/acc"] = scores["acc"]
                metrics[f"eval/{task.name}/acc_norm"] = scores["acc_norm"]
                metrics[f"eval/{task.name}/items"] = scores["num_items"]
        metrics["eval/time_s"] = time.perf_counter() - start
        return metrics


def _check_vocab(name: str, requests, vocab_size: int) -> None:
    from olmoe_megatron.config import ConfigError

    largest = max((max(c + r) for c, r in requests if c or r), default=0)
    if largest >= vocab_size:
        raise ConfigError(f"eval.tasks[{name}]: the tokenizer data.tokenizer gives id {largest}, >= the model's "
                          f"vocab_size {vocab_size}; evaluate with the tokenizer the model was trained with")


def format_eval_line(step: int, metrics: dict[str, float]) -> str:
    """One console line: `eval step N | <source> loss L ppl P | <task> acc A acc_norm B | T s`."""
    parts = [f"eval step {step:>6}"]
    names = [key[len("eval/"):-len("/loss")] for key in metrics if key.endswith("/loss")]
    parts += [f"{name} loss {metrics[f'eval/{name}/loss']:.4f} ppl {metrics[f'eval/{name}/ppl']:.2f}" for name in names]
    tasks = [key[len("eval/"):-len("/acc")] for key in metrics if key.endswith("/acc")]
    parts += [f"{name} acc {metrics[f'eval/{name}/acc']:.3f} acc_norm {metrics[f'eval/{name}/acc_norm']:.3f}"
              for name in tasks]
    parts.append(f"{metrics.get('eval/time_s', 0.0):.1f} s")
    return " | ".join(parts)
