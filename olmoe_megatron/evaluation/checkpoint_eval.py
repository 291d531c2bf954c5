"""`olmoe eval`'s library half: load any checkpoint of ours into this job's layout and evaluate it.

    result = evaluate_checkpoint("runs/demo/checkpoints", ["--eval.tasks=[demo-next-line]"])

The run config comes from the checkpoint (its olmoe_run.yaml; a converted model checkpoint has
only olmoe_model.yaml, and then the demo-corpus defaults and its hf_tokenizer/ when present). The
layout is data parallel only unless `--parallel.*` overrides say otherwise: Megatron's
distributed checkpoints reshard into any layout the model allows.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from olmoe_megatron.checkpoint.format import MODEL_FILE, RUN_FILE, TOKENIZER_DIR, CheckpointFormatError, follow_latest
from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import config_to_dict, load_yaml, parse_override_args
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.tables import markdown_table

logger = logging.getLogger(__name__)


def checkpoint_run_config(ckpt: str | Path, overrides: list[str]):
    """(step directory, RunConfig) for evaluating `ckpt` with `overrides` applied."""
    from olmoe_megatron.data.config import DataConfig
    from olmoe_megatron.model.config import ModelConfig
    from olmoe_megatron.run_config import RunConfig

    step_dir = follow_latest(ckpt)
    if not step_dir.is_dir():
        raise ConfigError(f"--ckpt {str(ckpt)!r} is not a directory; give a checkpoint root (with `latest`) or a "
                          "step directory")
    if (step_dir / RUN_FILE).is_file():
        run = load_yaml(RunConfig, step_dir / RUN_FILE)
    elif (step_dir / MODEL_FILE).is_file():
        tokenizer = step_dir / TOKENIZER_DIR / "tokenizer.json"
        data = DataConfig(demo_corpus=True, tokenizer=str(tokenizer)) if tokenizer.is_file() else DataConfig(demo_corpus=True)
        run = RunConfig(name=step_dir.name, model=load_yaml(ModelConfig, step_dir / MODEL_FILE), data=data)
    else:
        raise CheckpointFormatError(f"{step_dir} has neither {RUN_FILE} nor {MODEL_FILE}: not a checkpoint of ours")
    # Data parallel only unless the command line gives a layout (--parallel.*): the checkpoint's own
    # layout would tie the evaluation to the training job's size.
    data = config_to_dict(run)
    data["parallel"] = config_to_dict(ParallelLayout())
    run = RunConfig.from_dict(data)
    flags = parse_override_args(overrides)
    return step_dir, (run.with_overrides(flags) if flags else run)


def checkpoint_step(step_dir: Path) -> int | None:
    match = re.fullmatch(r"step_(\d+)", step_dir.name)
    return int(match.group(1)) if match else None


def load_checkpoint_model(step_dir: Path, run):
    """(ParallelContext, model chunks) with `step_dir`'s weights, in `run`'s layout on this job's ranks
    (Megatron's distributed checkpoints reshard: an expert-parallel save loads into one process)."""
    from olmoe_megatron.checkpoint.weights import load_model
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.parallel.context import initialize

    context = initialize(run.parallel, run.model, seed=run.train.seed,
                         timeout_minutes=run.train.collective_timeout_minutes)
    run.parallel.validate(run.model, context.world_size, backend=context.backend)
    config, _ = build_transformer_config(run.model, context, precision=run.precision)
    chunks = build_model_chunks(run.model, context, precision=run.precision, config=config)
    load_model(chunks, step_dir)
    return context, chunks


def evaluate_checkpoint(ckpt: str | Path, overrides: list[str]) -> dict:
    """Evaluates the checkpoint on this job's ranks; returns the same result dict on every rank."""
    import torch.distributed as dist

    from olmoe_megatron.evaluation.evaluator import Evaluator

    step_dir, run = checkpoint_run_config(ckpt, overrides)
    if not run.eval.enabled:
        raise ConfigError("nothing to evaluate: give --eval.datasets='[{name: NAME, paths: [PREFIX]}]' and/or "
                          "--eval.tasks=[FILE.jsonl or demo-next-line]")
    context, chunks = load_checkpoint_model(step_dir, run)
    evaluator = Evaluator.build(run, context)
    metrics = evaluator.evaluate(chunks)
    dist.barrier()
    return {"checkpoint": str(step_dir), "step": checkpoint_step(step_dir),
            "layout": run.parallel.describe(context.world_size), "precision": run.precision.dtype,
            "eval": config_to_dict(run.eval), "metrics": metrics}


def format_table(result: dict) -> str:
    """A Markdown table: one row per source (loss, ppl, tokens) and per task (acc, acc_norm, items)."""
    metrics = result["metrics"]
    rows = [["name", "kind", "loss", "ppl", "acc", "acc_norm", "count"]]
    for key in metrics:
        if key.endswith("/loss"):
            name = key[len("eval/"):-len("/loss")]
            rows.append([name, "validation", f"{metrics[key]:.4f}", f"{metrics[f'eval/{name}/ppl']:.2f}", "", "",
                         f"{metrics[f'eval/{name}/tokens']:,} tokens"])
        elif key.endswith("/acc"):
            name = key[len("eval/"):-len("/acc")]
            rows.append([name, "task", "", "", f"{metrics[key]:.4f}", f"{metrics[f'eval/{name}/acc_norm']:.4f}",
                         f"{metrics[f'eval/{name}/items']:,} items"])
    return markdown_table(rows)
