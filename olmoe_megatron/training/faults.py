"""Test-only fault injection, configured by environment variables and applied through hooks.

    OLMOE_FAULT_NAN_STEPS=2,3          the losses of steps 2 and 3 (1-based) are NaN
    OLMOE_FAULT_DIE_DURING_SAVE=4      the process group is killed inside the save of step 4

The trainer builds one `Faults` from the environment, `attach`es it to its model chunks, `arm`s it
before each step and hands `before_commit` to `save_checkpoint`; without the variables every
hook is a no-op and no module hook is registered. Nothing else in training knows about faults.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Mapping

import torch

from olmoe_megatron.config import ConfigError

NAN_STEPS_ENV = "OLMOE_FAULT_NAN_STEPS"
DIE_DURING_SAVE_ENV = "OLMOE_FAULT_DIE_DURING_SAVE"


@dataclasses.dataclass
class Faults:
    """The faults of this process and the step they are armed for."""

    nan_steps: frozenset[int] = frozenset()
    """Steps (1-based) whose loss is poisoned with NaN: backward fills the gradients with NaN,
    as a real divergence does, so the trainer's non-finite path runs."""
    die_during_save: int | None = None
    """The step whose save the process group dies in, after writing and before the commit."""
    _step: int = dataclasses.field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        """Reads both variables (os.environ by default); a malformed value is a ConfigError."""
        environ = os.environ if environ is None else environ
        nan_raw = environ.get(NAN_STEPS_ENV, "")
        nan_steps = [_step_number(NAN_STEPS_ENV, nan_raw, part, form="comma-separated step numbers, e.g. 2,3")
                     for part in nan_raw.split(",") if part.strip()]
        die_raw = environ.get(DIE_DURING_SAVE_ENV, "")
        die = _step_number(DIE_DURING_SAVE_ENV, die_raw, die_raw, form="one step number, e.g. 4") \
            if die_raw.strip() else None
        return cls(nan_steps=frozenset(nan_steps), die_during_save=die)

    def attach(self, chunks: list[torch.nn.Module]) -> None:
        """Registers the NaN hook on the chunks that compute the loss (only if NaN steps are set)."""
        if not self.nan_steps:
            return
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            if getattr(module, "post_process", True):
                module.register_forward_hook(self._poison_loss)

    def arm(self, step: int) -> None:
        """The step (1-based) about to run."""
        self._step = step

    def _poison_loss(self, module, args, output):
        del module, args
        if self._step in self.nan_steps:
            return output * float("nan")
        return output

    def before_commit(self, progress) -> None:
        """save_checkpoint's hook: the node dies with the new checkpoint half-written (every
        process of this process group, including the checkpoint writer's helper, at once)."""
        if self.die_during_save is not None and progress.step == self.die_during_save:
            os.killpg(0, signal.SIGKILL)


def _step_number(name: str, raw: str, part: str, *, form: str) -> int:
    try:
        step = int(part.strip())
    except ValueError:
        step = 0
    if step < 1:
        raise ConfigError(f"{name}={raw!r}: {part.strip()!r} is not a step number >= 1; expected {form}")
    return step
