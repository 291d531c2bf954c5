"""OLMoE's token-based learning-rate schedule, pinned at chosen token counts."""

import math

import pytest

from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.training.config import TrainConfig
from olmoe_megatron.training.schedule import learning_rate

OLMOE = get_recipe("olmoe_1b_7b").train


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (0, 4e-5),  # warmup starts at 0.1 * peak
        (5_242_880_000, 2.2e-4),  # halfway through the 2,500-step warmup
        (10_485_760_000, 4e-4),  # peak
        ((10_485_760_000 + 5e12) / 2, 2.2e-4),  # half the cosine: midway between peak and floor
        (5_000_000_000_000, 4e-5),  # t_max: 0.1 * peak
        (5_117_050_880_000, 4e-5),  # constant after t_max, to the end of pretraining
    ],
)
def test_olmoe_schedule(tokens, expected):
    assert learning_rate(OLMOE, int(tokens)) == pytest.approx(expected, rel=1e-9)


def test_cosine_shape():
    quarter = OLMOE.warmup_tokens + (OLMOE.t_max_tokens - OLMOE.warmup_tokens) / 4
    expected = 4e-5 + 0.5 * (4e-4 - 4e-5) * (1 + math.cos(math.pi / 4))
    assert learning_rate(OLMOE, int(quarter)) == pytest.approx(expected, rel=1e-6)


def test_anneal_is_linear_to_zero():
    anneal = OLMOE.replace(schedule="anneal")
    assert learning_rate(anneal, 0) == pytest.approx(4e-5)
    assert learning_rate(anneal, 50_000_000_000) == pytest.approx(2e-5)
    assert learning_rate(anneal, 100_000_000_000) == 0.0
    assert learning_rate(anneal, 120_000_000_000) == 0.0


def test_olmoe_pretraining_length_and_its_anneal_recipe():
    """1,220,000 steps, 5,117,050,880,000 tokens (step1220000-tokens5117B), then the anneal: 4e-5
    linearly to 0 over 100B tokens (23,842 steps), from the pretraining's checkpoint with its moments."""
    from olmoe_megatron.training.trainer import total_steps

    pretrain = get_recipe("olmoe_1b_7b")
    assert pretrain.train.max_tokens == 5_117_050_880_000 == 1_220_000 * pretrain.train.tokens_per_step
    assert total_steps(pretrain) == 1_220_000
    anneal = get_recipe("olmoe_1b_7b_anneal")
    assert learning_rate(anneal.train, 0) == pytest.approx(4e-5, rel=1e-12)
    assert learning_rate(anneal.train, 100_000_000_000) == 0.0
    assert total_steps(anneal) == 23_842
    assert anneal.checkpoint.init_from == pretrain.checkpoint.dir and anneal.checkpoint.init_optimizer
    assert anneal.checkpoint.dir != pretrain.checkpoint.dir and anneal.data.seed == 42
    assert (anneal.model, anneal.parallel) == (pretrain.model, pretrain.parallel)


def test_defaults_are_olmoe_optimizer():
    t = TrainConfig()
    assert (t.lr, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.clip_grad) == (4e-4, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert t.global_batch_size * t.seq_length == 4_194_304
    assert t.seed == 6198
