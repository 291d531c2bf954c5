"""The test-only fault hooks read their environment variables in one place and reject bad values."""

from __future__ import annotations

import pytest
import torch

from olmoe_megatron.config import ConfigError
from olmoe_megatron.training.faults import Faults


def test_no_variables_no_faults():
    faults = Faults.from_env({})
    assert faults == Faults() and not faults.nan_steps and faults.die_during_save is None


def test_values_are_parsed():
    faults = Faults.from_env({"OLMOE_FAULT_NAN_STEPS": "2, 3,4", "OLMOE_FAULT_DIE_DURING_SAVE": "4"})
    assert faults.nan_steps == {2, 3, 4} and faults.die_during_save == 4


@pytest.mark.parametrize("name, value, expected", [
    ("OLMOE_FAULT_NAN_STEPS", "two", r"OLMOE_FAULT_NAN_STEPS='two': 'two' is not a step number >= 1; "
                                     r"expected comma-separated step numbers, e.g. 2,3"),
    ("OLMOE_FAULT_NAN_STEPS", "2,0", r"OLMOE_FAULT_NAN_STEPS='2,0': '0' is not a step number"),
    ("OLMOE_FAULT_DIE_DURING_SAVE", "4,5", r"OLMOE_FAULT_DIE_DURING_SAVE='4,5': '4,5' is not a step number >= 1; "
                                           r"expected one step number, e.g. 4"),
])
def test_a_bad_value_names_the_variable_the_value_and_the_form(name, value, expected):
    with pytest.raises(ConfigError, match=f"^{expected}"):
        Faults.from_env({name: value})


def test_the_nan_hook_poisons_only_armed_steps_of_loss_chunks():
    loss_chunk, middle_chunk = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    loss_chunk.post_process, middle_chunk.post_process = True, False
    faults = Faults.from_env({"OLMOE_FAULT_NAN_STEPS": "2"})
    faults.attach([middle_chunk, loss_chunk])
    x = torch.ones(1, 2)
    for step in (1, 2, 3):
        faults.arm(step)
        assert torch.isfinite(middle_chunk(x)).all()
        out = loss_chunk(x)
        assert torch.isnan(out).all() == (step == 2)
        out.sum().backward()
        assert torch.isnan(loss_chunk.weight.grad).all() == (step == 2)  # NaN gradients, as a divergence
        loss_chunk.weight.grad = None
