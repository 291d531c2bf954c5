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

Every checkpoint chosen is checked against its manifest first (files present, sizes as written;
olmoe_megatron.checkpoint.manifest): an incomplete one is an error naming the file, or, with
checkpoint.fallback_to_complete, a resume from a root falls back to its newest complete step.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from olmoe_megatron.checkpoint.format import CheckpointFormatError, read_latest
from olmoe_megatron.checkpoint.manifest import check_sizes, newest_complete, require_complete

if TYPE_CHECKING:
    from olmoe_megatron.training.config import CheckpointConfig

logger = logging.getLogger(__name__)


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
    field: str = "checkpoint.load"
    """The config field that chose `path` (for errors about it)."""


def plan_load(checkpoint: CheckpointConfig) -> LoadPlan:
    """Resume, a new run from weights, or nothing: see the module docstring.

    Raises:
        CheckpointFormatError: a named path does not exist (the message names the field), a
            `latest` names a missing step directory, or the checkpoint is incomplete (a file
            missing or shorter than its manifest says) and no fallback was asked for or found.
    """
    fallback = checkpoint.fallback_to_complete
    if checkpoint.init_from is not None:
        own, note = (_latest(checkpoint.dir, fallback=fallback, field="checkpoint.dir")
                     if checkpoint.dir is not None else (None, ""))
        if own is not None:
            return LoadPlan(path=own, load_optimizer=True, reset_data_position=False, field="checkpoint.dir",
                            reason=f"resuming this run from {own} (it has saved: checkpoint.init_from is not "
                                   f"used){note}")
        path, note = _resolve(checkpoint.init_from, field="checkpoint.init_from", fallback=fallback)
        if checkpoint.init_optimizer:
            return LoadPlan(path=path, load_optimizer=True, reset_data_position=False, restore_progress=False,
                            field="checkpoint.init_from",
                            reason=f"new run from the weights and optimizer state of {path} (AdamW moments kept; "
                                   f"step, tokens, schedule and data order from 0){note}")
        return LoadPlan(path=path, load_optimizer=False, reset_data_position=False, field="checkpoint.init_from",
                        reason=f"new run from the weights of {path} (fresh optimizer, schedule and data order){note}")
    if checkpoint.load is None:
        return LoadPlan(path=None, load_optimizer=False, reset_data_position=False,
                        reason="checkpoint.load=None: starting from initialisation")
    if checkpoint.load == "latest":
        path, note = (_latest(checkpoint.dir, fallback=fallback, field="checkpoint.load")
                      if checkpoint.dir is not None else (None, ""))
        if path is None:
            return LoadPlan(path=None, load_optimizer=False, reset_data_position=False,
                            reason=f"no checkpoint in checkpoint.dir={checkpoint.dir!r} yet: "
                                   "starting from initialisation")
    else:
        path, note = _resolve(checkpoint.load, field="checkpoint.load", fallback=fallback)
    return LoadPlan(path=path, load_optimizer=checkpoint.load_optimizer,
                    reset_data_position=checkpoint.reset_data_position,
                    reason=f"loading {path} (checkpoint.load={checkpoint.load!r}, "
                           f"load_optimizer={checkpoint.load_optimizer}, "
                           f"reset_data_position={checkpoint.reset_data_position}){note}")


def _fall_back(root: Path, problem: str, *, below: str | None, field: str) -> tuple[Path, str]:
    older = newest_complete(root, below=below)
    if older is None:
        raise CheckpointFormatError(
            f"{field}: {problem}, and no complete checkpoint is left in {root} to fall back to "
            "(checkpoint.fallback_to_complete=true); restore the damaged files or start the run over "
            "with another checkpoint.dir")
    logger.warning("%s; resuming from the newest complete checkpoint, %s (checkpoint.fallback_to_complete=true)",
                   problem, older)
    return older, f" [{problem}: fell back to the newest complete checkpoint, {older.name}]"


def _latest(root: str | Path, *, fallback: bool, field: str) -> tuple[Path | None, str]:
    """ROOT's latest step (None: nothing saved yet), checked complete; with `fallback`, a damaged
    `latest` or an incomplete step gives the newest complete step older than it."""
    root = Path(root)
    try:
        path = read_latest(root)
    except CheckpointFormatError as exc:
        if not fallback:
            raise
        return _fall_back(root, str(exc).split("; ")[0], below=None, field=field)
    if path is None:
        return None, ""
    return _checked(path, root=root, fallback=fallback, field=field)


def _checked(path: Path, *, root: Path | None, fallback: bool, field: str) -> tuple[Path, str]:
    if fallback and root is not None:
        problems = check_sizes(path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return _fall_back(root, f"checkpoint {path} is incomplete: {problems[0]}{more}", below=path.name,
                              field=field)
        return path, ""
    require_complete(path, field=field)
    return path, ""


def _resolve(spec: str, *, field: str, fallback: bool) -> tuple[Path, str]:
    """A root with `latest` -> its newest step; otherwise the path itself, which must exist."""
    root = Path(spec)
    latest, note = _latest(root, fallback=fallback, field=field) if root.is_dir() else (None, "")
    if latest is not None:
        return latest, note
    if not root.exists():
        raise CheckpointFormatError(f"{field}={spec!r}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointFormatError(f"{field}={spec!r} is a file, not a checkpoint directory; give the checkpoint "
                                    "root (with its `latest`) or one of its step_XXXXXXX directories")
    return _checked(root, root=None, fallback=False, field=field)
