"""Run recipes: functions that return a whole RunConfig. `olmoe recipes` lists them.

`olmoe_1b_7b` is OLMoE-1B-7B exactly as trained (shared/OLMOE_FACTS.md). The `ablation_*` recipes
are the paper's model ablations at the size of `olmoe_small`, built so that each comparison holds
what the paper held fixed (active and total parameters, data, schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.evaluation.config import EvalConfig, EvalSourceConfig
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.run_config import RunConfig
from olmoe_megatron.training.config import CheckpointConfig, MetricsConfig, TrainConfig

_RECIPES: dict[str, Callable[[], RunConfig]] = {}


def recipe(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    _RECIPES[fn.__name__] = fn
    return fn


def list_recipes() -> dict[str, str]:
    """Name -> first line of the recipe's docstring."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in sorted(_RECIPES.items())}


def get_recipe(name: str) -> RunConfig:
    if name not in _RECIPES:
        import difflib

        close = difflib.get_close_matches(name, _RECIPES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--recipe={name!r} is not a recipe{hint} Known: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]()


@recipe
def olmoe_1b_7b() -> RunConfig:
    """OLMoE-1B-7B as trained: 16 layers, 64 experts top-8, 4M-token batches, 5T tokens."""
    return RunConfig(
        name="olmoe_1b_7b",
        model=ModelConfig(),
        # 256 H100s in the paper; EP8 inside a node keeps the all-to-all on NVLink.
        parallel=ParallelLayout(expert_parallel=8),
        precision=PrecisionConfig(dtype="bf16"),
        # The gradient reduce-scatter overlaps backward, in Megatron's default buckets (40M
        # parameters, 1M x DP beyond DP 40: 256M at DP 256), and the parameter all-gather overlaps
        # the next forward (a checkpoint save finishes that gather first: training/checkpoint.py).
        train=TrainConfig(overlap_grad_reduce=True, overlap_param_gather=True),
        data=DataConfig(demo_corpus=True),
        # Each rank writes its own optimizer shard (0.35 GiB per rank at 256 GPUs, nothing gathered;
        # fully_reshardable would gather 14.3 GiB per rank): `olmoe dry-run --recipe olmoe_1b_7b
        # --world-size 256`. A layout change with optimizer state needs a fully_reshardable save.
        checkpoint=CheckpointConfig(save_interval=5000, optimizer_format="dp_reshardable"),
        metrics=MetricsConfig(),
    )


# Small models: real OLMoE tokenizer (50,280 ids padded to 50,304) unless said otherwise.
_TINY_MODEL = ModelConfig(
    num_layers=4, d_model=64, num_heads=4, num_experts=8, top_k=2, expert_ffn_hidden_size=32,
    max_sequence_length=256,
)


@recipe
def olmoe_tiny() -> RunConfig:
    """Test size: 4 layers, d_model 64, 8 experts top-2, OLMoE vocab; fp32, 20 steps."""
    return RunConfig(
        name="olmoe_tiny",
        model=_TINY_MODEL,
        precision=PrecisionConfig(dtype="fp32", spec="local"),
        train=TrainConfig(
            seed=1234, seq_length=32, global_batch_size=8, micro_batch_size=2, max_steps=20, max_tokens=None,
            lr=3e-3, warmup_tokens=5 * 8 * 32, t_max_tokens=20 * 8 * 32, use_distributed_optimizer=False,
        ),
        data=DataConfig(demo_corpus=True),
        checkpoint=CheckpointConfig(save_interval=10, keep_last=2),
    )


_SMALL_MODEL = ModelConfig(
    num_layers=4, d_model=256, num_heads=4, num_experts=16, top_k=4, expert_ffn_hidden_size=128,
    vocab_size=4096, padded_vocab_size=4096, max_sequence_length=1024,
)


@recipe
def olmoe_small() -> RunConfig:
    """CPU benchmark size: 4 layers, d_model 256, 16 experts top-4, expert FFN 128, vocab 4096."""
    return RunConfig(
        name="olmoe_small",
        model=_SMALL_MODEL,
        precision=PrecisionConfig(dtype="bf16", spec="local"),
        train=TrainConfig(
            seed=1234, seq_length=256, global_batch_size=4, micro_batch_size=4, max_steps=100, max_tokens=None,
            lr=1e-3, warmup_tokens=10 * 4 * 256, t_max_tokens=100 * 4 * 256, use_distributed_optimizer=False,
        ),
        # OLMoE's tokenizer has 50,280 entries: this vocabulary of 4096 gets a BPE trained on the corpus.
        data=DataConfig(demo_corpus=True, tokenizer="demo-bpe-4096", eos_token_id=0),
    )


@recipe
def olmoe_demo() -> RunConfig:
    """`make demo`: 4 layers, d_model 128, 8 experts top-2 on 2 CPU processes (EP2), 250 steps,
    evaluated every 125 steps on held-out standard-library text and its next-line task."""
    steps, batch, seq = 250, 16, 128
    return RunConfig(
        name="olmoe_demo",
        model=ModelConfig(
            num_layers=4, d_model=128, num_heads=4, num_experts=8, top_k=2, expert_ffn_hidden_size=128,
            max_sequence_length=seq,
        ),
        parallel=ParallelLayout(expert_parallel=2),
        precision=PrecisionConfig(dtype="bf16", spec="local"),
        train=TrainConfig(
            seed=6198, seq_length=seq, global_batch_size=batch, micro_batch_size=4, max_steps=steps,
            max_tokens=None, lr=2e-3, warmup_tokens=20 * batch * seq, t_max_tokens=steps * batch * seq,
            use_distributed_optimizer=True, log_interval=10,
        ),
        data=DataConfig(demo_corpus=True),
        checkpoint=CheckpointConfig(dir="runs/demo/checkpoints", save_interval=100, keep_last=2),
        metrics=MetricsConfig(jsonl="runs/demo/metrics.jsonl"),
        eval=EvalConfig(interval=125, datasets=(EvalSourceConfig(name="stdlib-heldout", demo_heldout=True),),
                        tokens=16_384, micro_batch_size=16, tasks=("demo-next-line",), task_limit=200),
    )


# ------------------------------------------------------------------ paper ablations (section 4)
def _ablation(name: str, **model_changes) -> RunConfig:
    """olmoe_small's width with 64 experts top-8 of width 64 (8x512 active, 64x64 total per layer)."""
    base = olmoe_small()
    model = dataclasses.replace(
        base.model, num_experts=64, top_k=8, expert_ffn_hidden_size=64
    ).replace(**model_changes)
    return base.replace(name=name, model=model)


@recipe
def ablation_64e_top8() -> RunConfig:
    """Granularity: 64 experts top-8, expert FFN 64 (OLMoE's choice, scaled down)."""
    return _ablation("ablation_64e_top8")


@recipe
def ablation_32e_top4() -> RunConfig:
    """Granularity: 32 experts top-4, expert FFN 128 (same active and total parameters)."""
    return _ablation("ablation_32e_top4", num_experts=32, top_k=4, expert_ffn_hidden_size=128)


@recipe
def ablation_8e_top1() -> RunConfig:
    """Granularity: 8 experts top-1, expert FFN 512 (same active and total parameters)."""
    return _ablation("ablation_8e_top1", num_experts=8, top_k=1, expert_ffn_hidden_size=512)


@recipe
def ablation_shared_expert() -> RunConfig:
    """Shared expert: 1 always-on + top-7 of 64 routed (same active; total +1 expert)."""
    return _ablation("ablation_shared_expert", top_k=7, num_shared_experts=1)


@recipe
def ablation_no_lb() -> RunConfig:
    """Load-balancing loss off (the paper sees expert collapse)."""
    return _ablation("ablation_no_lb", router_aux_loss_coeff=0.0)


@recipe
def ablation_no_zloss() -> RunConfig:
    """Router z-loss off (the paper: less stable)."""
    return _ablation("ablation_no_zloss", router_z_loss_coeff=0.0)


@recipe
def ablation_dense() -> RunConfig:
    """Dense baseline with the MoE's active parameters: SwiGLU FFN 512."""
    return _ablation("ablation_dense", num_experts=0, ffn_hidden_size=512)
