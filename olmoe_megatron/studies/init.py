"""A study's shared initial weights (`same_init: true`): one checkpoint per seed, written once.

Why: a fresh start draws its weights in the member's own layout, and Megatron draws them
differently per layout: each expert-parallel rank initialises its experts from its own seed, and
each pipeline stage draws its layers from its own RNG stream. Two layouts of one model and seed
therefore start from different weights, and their losses differ from step 1 for that reason
alone. With `same_init`, `olmoe study init DIR` builds each seed's model once, as the trainer
builds it in a world of one process (tp = pp = ep = cp = 1, the data-parallel layout's weights),
and writes the weights alone (a dist checkpoint readable in any layout) to DIR/init/seed<N>; every
member of that seed starts from it through `checkpoint.init_from` (a fresh optimizer, step 0).

Every rank of a member reads the same directory, so it is written under a temporary name and
renamed when complete: a killed init leaves no init directory, and members refuse to start
without it (the error says to run `olmoe study init`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The record written beside the weights: which member's config, which seed, which model.
INIT_FILE = "study_init.json"


def pending_inits(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{init directory: the first member that starts from it} for the inits not yet written."""
    out: dict[str, dict[str, Any]] = {}
    for member in plan["members"]:
        directory = member.get("init_from")
        if directory and not Path(directory).is_dir() and directory not in out:
            out[directory] = member
    return out


def write_initial_weights(run: Any, directory: str | Path, *, study: str = "") -> Path:
    """Builds `run`'s model in a world of one process, as the trainer initialises it, and writes its
    weights (dist checkpoint, olmoe_model.yaml, study_init.json) to `directory` atomically.

    Args:
        run: a RunConfig; its model, precision and train.seed decide the weights (its layout not).
        directory: the checkpoint directory to create (must not exist).
        study: the study's name, for the record.

    Raises:
        RuntimeError: called inside a distributed job of more than one process.
    """
    import torch.distributed as dist

    from olmoe_megatron.checkpoint.format import write_model_config
    from olmoe_megatron.checkpoint.weights import save_model
    from olmoe_megatron.convert.errors import atomic_output_dir
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout()
    context = initialize(layout, run.model, seed=run.train.seed)
    if context.world_size != 1:
        raise RuntimeError(f"study init writes the initial weights in a world of one process, not "
                           f"{context.world_size}; run `olmoe study init DIR` as a plain process")
    config, _ = build_transformer_config(run.model, context, precision=run.precision, recompute=None)
    chunks = build_model_chunks(run.model, context, precision=run.precision, config=config)
    directory = Path(directory)
    with atomic_output_dir(directory) as tmp:
        save_model(chunks, tmp)
        write_model_config(tmp, run.model)
        record = {"study": study, "seed": run.train.seed, "member": run.name, "dtype": run.precision.dtype,
                  "params": sum(p.numel() for c in chunks for p in c.parameters()),
                  "layout": "tp=pp=cp=ep=1 (a world of one process)"}
        (tmp / INIT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    dist.barrier()
    logger.info("study %s: initial weights of seed %d (member %s) written to %s", study, run.train.seed,
                run.name, directory)
    return directory


def write_pending_inits(plan: dict[str, Any]) -> list[Path]:
    """Writes every init of `plan` that does not exist yet (in this process); returns their paths."""
    from olmoe_megatron.run_config import RunConfig

    written = []
    for directory, member in pending_inits(plan).items():
        written.append(write_initial_weights(RunConfig.from_dict(member["config"]), directory, study=plan["study"]))
    return written
