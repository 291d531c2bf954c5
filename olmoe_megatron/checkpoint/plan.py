"""What a run loads when it starts, decided from its CheckpointConfig alone (no process group).

    checkpoint.init_from set (a new run from trained weights, e.g. OLMoE's anneal):
        dir has a `latest` of its own -> resume it with all its state (a restart of this run)
        otherwise                     -> init_from's weights (and its optimizer state with
                                         init_optimizer, OLMoE's anneal): step, tokens, schedule
                                         and data order from 0
    checkpoint.load='latest'          -> resume dir's latest if there is one, else start fresh
    checkpoint.load=PATH              -> PATH (a root follows its `latest`), with its optimizer and
                                         progress unless load_optimizer=false; reset_data_position
                                         restarts the data order
    checkpoint.load=None              -> start fresh
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from olmoe_megatron.checkpoint.format import CheckpointFormatError, follow_latest, read_latest

if TYPE_CHECKING:
    from olmoe_megatron.training.config import CheckpointConfig


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """The checkpoint a run starts from, and how much of it to restore."""

    path: Path | None
    """The checkpoint directory to load (None: start from the model's initialisation)."""
    load_optimizer: bool
    """Restore optimizer state, progress (step, tokens, data position) and RNG where the checkpoint
    has them (a model-only checkpoint restores weights alone); False: weights only, from step 0."""
    reset_data_position: bool
    """After restoring progress, start the data order from its beginning."""
    reason: str
    """One line for the log: what is loaded and why."""
    restore_progress: bool = True
    """With load_optimizer: also restore the saved progress (step, tokens, data position) and RNG;
    False (init_from with init_optimizer): the optimizer state alone, the run starts at step 0."""


def plan_load(checkpoint: CheckpointConfig) -> LoadPlan:
    """Resume, a new run from weights, or nothing: see the module docstring.

    Raises:
        CheckpointFormatError: a named path does not exist (the message names the field), or a
            `latest` names a missing step directory.
    """
    if checkpoint.init_from is not None:
        own = read_latest(checkpoint.dir) if checkpoint.dir is not None else None
        if own is not None:
            return LoadPlan(path=own, load_optimizer=True, reset_data_position=False,
                            reason=f"resuming this run from {own} (it has saved: checkpoint.init_from is not used)")
        path = _resolve(checkpoint.init_from, field="checkpoint.init_from")
        if checkpoint.init_optimizer:
            return LoadPlan(path=path, load_optimizer=True, reset_data_position=False, restore_progress=False,
                            reason=f"new run from the weights and optimizer state of {path} (AdamW moments kept; "
                                   "step, tokens, schedule and data order from 0)")
        return LoadPlan(path=path, load_optimizer=False, reset_data_position=False,
                        reason=f"new run from the weights of {path} (fresh optimizer, schedule and data order)")
    if checkpoint.load is None:
        return LoadPlan(path=None, load_optimizer=False, reset_data_position=False,
                        reason="checkpoint.load=None: starting from initialisation")
    if checkpoint.load == "latest":
        path = read_latest(checkpoint.dir) if checkpoint.dir is not None else None
        if path is None:
            return LoadPlan(path=None, load_optimizer=False, reset_data_position=False,
                            reason=f"no checkpoint in checkpoint.dir={checkpoint.dir!r} yet: "
                                   "starting from initialisation")
    else:
        path = _resolve(checkpoint.load, field="checkpoint.load")
    return LoadPlan(path=path, load_optimizer=checkpoint.load_optimizer,
                    reset_data_position=checkpoint.reset_data_position,
                    reason=f"loading {path} (checkpoint.load={checkpoint.load!r}, "
                           f"load_optimizer={checkpoint.load_optimizer}, "
                           f"reset_data_position={checkpoint.reset_data_position})")


def _resolve(spec: str, *, field: str) -> Path:
    """A root with `latest` -> its newest step; otherwise the path itself, which must exist."""
    path = follow_latest(spec)
    if not path.exists():
        raise CheckpointFormatError(f"{field}={spec!r}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointFormatError(f"{field}={spec!r} is a file, not a checkpoint directory; give the checkpoint "
                                    "root (with its `latest`) or one of its step_XXXXXXX directories")
    return path
