"""train.loss_normalization: OLMo divides the summed cross-entropy by all tokens of the batch, masked
instances included; Megatron-LM by the unmasked tokens."""

import pytest
import torch

from olmoe_megatron.recipes import get_recipe, list_recipes
from olmoe_megatron.config import ConfigError
from olmoe_megatron.testing.distributed import run_on_one_rank
from olmoe_megatron.testing.loss_check import masked_instance_losses
from olmoe_megatron.training.step import micro_batch_lm_loss


def test_micro_batch_loss_by_all_or_unmasked_tokens():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert micro_batch_lm_loss(per_token, mask, normalization="all_tokens").item() == 10.0 / 8
    assert micro_batch_lm_loss(per_token, mask, normalization="unmasked_tokens").item() == 10.0 / 4
    assert micro_batch_lm_loss(per_token, torch.zeros(2, 4), normalization="unmasked_tokens").item() == 0.0
    with pytest.raises(ValueError, match="train.loss_normalization='mean'"):
        micro_batch_lm_loss(per_token, mask, normalization="mean")


def test_masked_instance_scales_the_loss_and_its_gradient():
    """One of 4 instances masked: OLMo's loss and gradient are 3/4 of the masked mean's; with nothing
    masked the two are the same numbers bit for bit."""
    r = run_on_one_rank(masked_instance_losses, {"case": {}})["case"]
    olmo, megatron = r["masked/all_tokens"], r["masked/unmasked_tokens"]
    assert olmo["lm_loss"] == pytest.approx(0.75 * megatron["lm_loss"], rel=1e-6)
    assert olmo["grad_norm"] == pytest.approx(0.75 * megatron["grad_norm"], rel=1e-5)
    assert r["unmasked/all_tokens"] == r["unmasked/unmasked_tokens"]
    assert r["unmasked/all_tokens"]["lm_loss"] != olmo["lm_loss"]


def test_olmo_normalisation_is_every_recipes_default():
    for name in list_recipes():
        assert get_recipe(name).train.loss_normalization == "all_tokens", name
    with pytest.raises(ConfigError, match="loss_normalization"):
        get_recipe("olmoe_tiny").with_overrides(["train.loss_normalization=per_token"])
