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
    """OLMoE-1B-7B as trained: 16 layers, 64 experts top-8, 4M-token batches, 1,220,000 steps (5.117T tokens)."""
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
        checkpoint=CheckpointConfig(dir=_OLMOE_1B_7B_DIR, save_interval=5000, optimizer_format="dp_reshardable"),
        metrics=MetricsConfig(),
    )


_OLMOE_1B_7B_DIR = "runs/olmoe_1b_7b/checkpoints"


@recipe
def olmoe_1b_7b_anneal() -> RunConfig:
    """OLMoE-1B-7B's anneal: from the pretraining's last checkpoint, AdamW moments kept, lr 4e-5 to 0 over 100B tokens."""
    pretrain = olmoe_1b_7b()
    # allenai/OLMoE configs/ablations/olmoe-8x1b-newhp-newds-final-anneal.yml: load the final
    # pretraining checkpoint with its optimizer state (reset_optimizer_state: false) but reset the
    # trainer state (step and tokens from 0, data position not restored), a new data seed (42), and
    # stop after 100B tokens (23,842 steps of 4,194,304 tokens). Point data.paths at the anneal mix.
    return pretrain.replace(
        name="olmoe_1b_7b_anneal",
        train=pretrain.train.replace(schedule="anneal", anneal_tokens=100_000_000_000,
                                     max_tokens=100_000_000_000),
        data=pretrain.data.replace(seed=42),
        checkpoint=pretrain.checkpoint.replace(dir="runs/olmoe_1b_7b_anneal/checkpoints", init_from=_OLMOE_1B_7B_DIR,
                                               init_optimizer=True),
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
        # Every checkpoint is kept (steps 100, 200, the resume point and 250; 0.9 GB): the README's
        # routing analysis compares them.
        checkpoint=CheckpointConfig(dir="runs/demo/checkpoints", save_interval=100, keep_last=0),
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
def ablation_128e_top16() -> RunConfig:
    """Granularity: 128 experts top-16, expert FFN 32 (same active and total parameters; OLMoE's cx5-fine05)."""
    return _ablation("ablation_128e_top16", num_experts=128, top_k=16, expert_ffn_hidden_size=32)


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
    """Shared expert: 1 always-on + top-3 of 32 routed, expert FFN 128 (vs ablation_32e_top4: same active, +1 expert).

    As OLMoE ran it (cx5-fine-shared.yml): against 32 experts top-4, one of the four active experts
    becomes a shared one that every token passes through.
    """
    return _ablation("ablation_shared_expert", num_experts=32, top_k=3, expert_ffn_hidden_size=128,
                     num_shared_experts=1)


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


@recipe
def ablation_normal_init() -> RunConfig:
    """Init: plain normal N(0, 0.02), no truncation at 3 std (the paper: truncated is stable, this diverged)."""
    return _ablation("ablation_normal_init", init_cutoff_stds=None)


@recipe
def ablation_layernorm() -> RunConfig:
    """Norm: LayerNorm (scale, no bias) for the block, final and QK norms instead of RMSNorm (same parameters)."""
    return _ablation("ablation_layernorm", norm_type="layernorm")


@recipe
def ablation_no_qk_norm() -> RunConfig:
    """QK-norm off (the paper: QK-norm helps stability); 2 x 256 fewer parameters per layer."""
    return _ablation("ablation_no_qk_norm", qk_norm=False)


@recipe
def ablation_no_decay_norms_embeddings() -> RunConfig:
    """Optimizer: no weight decay on norm weights and the input embedding (OLMoE decays every parameter)."""
    run = _ablation("ablation_no_decay_norms_embeddings")
    return run.replace(train=run.train.replace(decay_norms_and_embeddings=False))


@recipe
def ablation_adam_eps_1e5() -> RunConfig:
    """Optimizer: AdamW eps 1e-5 instead of 1e-8 (the paper: 1e-8 is better)."""
    run = _ablation("ablation_adam_eps_1e5")
    return run.replace(train=run.train.replace(adam_eps=1e-5))


# Beyond the paper: load balancing as later MoEs do it.
@recipe
def ablation_expert_bias() -> RunConfig:
    """Balancing: aux-loss-free, sigmoid router with a per-expert bias updated each step, no LB loss (DeepSeek-V3).

    Beyond the paper. The bias (moved by 1e-3 a step towards equal load over the global batch) only
    chooses the top-k; the metrics' expert_load gives each layer's bias range. The z-loss stays.
    """
    return _ablation("ablation_expert_bias", router_score_function="sigmoid", router_expert_bias=True,
                     router_aux_loss_coeff=0.0)


@recipe
def ablation_global_lb() -> RunConfig:
    """Balancing: LB loss over the global batch of 4 micro-batches of 1, not each (vs ablation_64e_top8 --train.micro_batch_size=1).

    Beyond the paper (arXiv 2501.11873, Megatron's global_aux_loss). Each expert's share of tokens
    counts over every micro-batch of the step so far (and every data-parallel rank), so a micro-batch
    may be unbalanced when the step is not. At micro-batch 4 on one rank (ablation_64e_top8's) the
    two are the same loss: hence micro-batch 1 here.
    """
    run = _ablation("ablation_global_lb", router_load_balancing="global_batch")
    return run.replace(train=run.train.replace(micro_batch_size=1))


@recipe
def ablation_upcycled() -> RunConfig:
    """Sparse upcycling: ablation_dense upcycled to 8 experts top-1 (each the dense FFN 512), trained on.

    The paper's upcycling ablation (allenai/OLMoE scripts/sparsify_ckpt_unsharded.py turned OLMo-1B
    into 8 copies of its MLP: as many expert parameters as OLMoE-1B-7B). Top-1 keeps the dense
    model's active parameters, so this is ablation_8e_top1's shape, which trains the same MoE from
    scratch. It starts from the upcycled checkpoint (checkpoint.init_from; a missing one is an error,
    never a silent start from initialisation):

        olmoe train --recipe ablation_dense --checkpoint.dir=runs/ablation_dense/checkpoints
        olmoe convert upcycle --dense runs/ablation_dense/checkpoints --num-experts 8 --top-k 1 \\
            --out runs/ablation_upcycled/upcycled_dense
        olmoe train --recipe ablation_upcycled
    """
    run = _ablation("ablation_upcycled", num_experts=8, top_k=1, expert_ffn_hidden_size=512)
    return run.replace(checkpoint=run.checkpoint.replace(dir="runs/ablation_upcycled/checkpoints",
                                                         init_from="runs/ablation_upcycled/upcycled_dense"))


@recipe
def ablation_expert_choice() -> RunConfig:
    """Routing: expert choice, each of 64 experts takes its top 32 of a sequence's 256 tokens (no LB loss).

    Against ablation_64e_top8 (token choice): the same model, 64 experts of width 64 and on average
    8 per token (capacity factor 1: C = 8 * 256 / 64 = 32 tokens per expert and sequence, as
    megablocks' moe_expert_choice in the paper's run), so the same active and total parameters; a
    token gets 0..64 experts. No load-balancing loss (balanced by construction); the z-loss stays.
    """
    return _ablation("ablation_expert_choice", router_type="expert_choice", router_aux_loss_coeff=0.0)
