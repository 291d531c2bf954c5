"""Training, checkpoint and metrics configs (OLMoE's optimizer and token-based schedule by default)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from olmoe_megatron.config import Config, ConfigError


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrainConfig(Config):
    """Batch, optimizer, schedule and loop settings. Defaults are OLMoE-1B-7B's (OLMOE_FACTS.md)."""

    seed: int = 6198
    """Seed of init, data order and dropout-free RNG streams."""
    seq_length: int = 4096
    """Tokens per training sequence."""
    global_batch_size: int = 1024
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run to max_tokens)."""
    max_tokens: int | None = 5_117_050_880_000
    """Stop once this many tokens have been trained on (None: run to max_steps). OLMoE-1B-7B's
    pretraining: 1,220,000 steps of 4,194,304 tokens (its pre-anneal checkpoint is
    step1220000-tokens5117B), before the 100B-token anneal."""
    lr: float = 4e-4
    """Peak learning rate."""
    schedule: Literal["olmoe", "anneal", "constant"] = "olmoe"
    """'olmoe': linear warmup from warmup_start_ratio*lr, cosine to min_lr_ratio*lr at t_max_tokens,
    constant after. 'anneal': lr*anneal_start_ratio linearly to 0 over anneal_tokens.
    'constant': lr throughout."""
    warmup_tokens: int = 10_485_760_000
    """Linear warmup length in tokens (OLMoE: 2,500 steps of 4M tokens)."""
    warmup_start_ratio: float = 0.1
    """Warmup starts at this fraction of lr (OLMoE: 0.1 -> 4e-5)."""
    t_max_tokens: int = 5_000_000_000_000
    """Tokens at which the cosine reaches min_lr_ratio*lr."""
    min_lr_ratio: float = 0.1
    """Final lr of the cosine as a fraction of lr."""
    anneal_tokens: int = 100_000_000_000
    """Length of the anneal phase (schedule='anneal')."""
    anneal_start_ratio: float = 0.1
    """Anneal starts at this fraction of lr (OLMoE's anneal: 4e-5 with lr 4e-4)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to EVERY parameter (norms and embeddings included) unless
    decay_norms_and_embeddings is off."""
    decay_norms_and_embeddings: bool = True
    """Decay the norm weights (every 1-D parameter: block, final and QK norms; biases, had we any) and
    the input embedding too (OLMoE: `decay_norm_and_bias: true`, `decay_embeddings: true`). False:
    they get weight decay 0 (OLMo's defaults for both flags, the paper's ablation); the output layer
    is a linear map and still decays, as in OLMo."""
    loss_normalization: Literal["all_tokens", "unmasked_tokens"] = "all_tokens"
    """What the summed cross-entropy of a micro-batch is divided by. 'all_tokens': every token of
    the micro-batch, masked ones included (OLMo's train.py divides by the rank's batch size in tokens;
    with equal micro-batches that is this mean of the micro-batches' losses); an instance masked by
    the repetition filter then lowers the loss and the weight of the rest, and in OLMo's order (whose
    window's last token has no label) the loss is (S-1)/S of the per-label mean, as OLMo reports it.
    'unmasked_tokens': the tokens whose labels count (Megatron-LM's masked mean). The two agree when
    nothing is masked; validation losses are always per label."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with backward, bucket by bucket (off: one
    bucket reduced after the whole backward). On in `olmoe_1b_7b`; equal to off (the equivalence tests)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient bucket when overlap_grad_reduce is on (None: Megatron-Core's default,
    max(40M, 1M x data-parallel size), large enough at any DP to stay bandwidth-bound)."""
    recompute: Literal["selective", "full"] | None = None
    """Activation recompute: selective (attention core + MoE activation) or full layers."""
    max_nonfinite_steps: int = 3
    """Skip this many consecutive steps with a NaN/inf loss, then save and stop."""
    log_interval: int = 1
    """Console progress line every this many steps."""
    collective_timeout_minutes: float = 10.0
    """A collective that waits longer (a hung or dead rank) fails, so the whole job ends non-zero."""

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def validate(self) -> None:
        if self.collective_timeout_minutes <= 0:
            raise ConfigError(
                f"train.collective_timeout_minutes={self.collective_timeout_minutes} must be > 0 (default 10)"
            )
        for name in ("seq_length", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("set train.max_steps or train.max_tokens (both are null)")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.warmup_start_ratio <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"train.warmup_start_ratio={self.warmup_start_ratio} and train.min_lr_ratio={self.min_lr_ratio} "
                "must lie in [0, 1]"
            )
        if self.schedule == "olmoe" and self.t_max_tokens <= self.warmup_tokens:
            raise ConfigError(
                f"train.t_max_tokens={self.t_max_tokens} must exceed train.warmup_tokens={self.warmup_tokens}"
            )
        if self.schedule == "anneal" and self.anneal_tokens <= 0:
            raise ConfigError(f"train.anneal_tokens={self.anneal_tokens} must be > 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_eps <= 0:
            raise ConfigError(
                f"train.adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must lie in [0, 1) "
                f"and train.adam_eps={self.adam_eps} must be > 0"
            )
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(
                f"train.ddp_bucket_size={self.ddp_bucket_size} must be >= 1 parameter (null: Megatron's default)"
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError(
                "train.overlap_param_gather=true needs train.use_distributed_optimizer=true (the parameter "
                "all-gather is the distributed optimizer's); set train.overlap_param_gather=false with "
                "train.use_distributed_optimizer=false"
            )


@dataclasses.dataclass(kw_only=True, frozen=True)
class CheckpointConfig(Config):
    """Where and how often to save, what to load."""

    dir: str | None = None
    """Checkpoint directory (None: never save)."""
    save_interval: int = 5000
    """Save every this many steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints (0: keep all)."""
    load: str | None = "latest"
    """'latest' (resume from dir/latest if present), a checkpoint path, or None."""
    init_from: str | None = None
    """Start a NEW run from this checkpoint's weights (anneal, fine-tune): schedule from token 0,
    step 0, data from the start of its order, a fresh optimizer unless init_optimizer. Used only
    while `dir` holds no checkpoint of its own; once the run has saved, a restart resumes from
    `dir`'s latest (all state), as a requeued Slurm job must. Like Megatron-LM's
    --pretrained-checkpoint."""
    init_optimizer: bool = False
    """With init_from: also take init_from's optimizer state (AdamW moments, their step counts and
    the fp32 master weights), while the trainer state still starts over (step, tokens and data
    position 0, RNG not restored). OLMoE's anneal did this (reset_trainer_state: true,
    reset_optimizer_state: false). init_from must then be a training checkpoint (with optimizer
    state), and one saved as 'dp_reshardable' only loads into its own model-parallel layout."""
    load_optimizer: bool = True
    """Load optimizer state and scheduler position (False: a new run from these weights, e.g. anneal)."""
    reset_data_position: bool = False
    """Start the data order from the beginning when loading (anneal: new data order)."""
    fallback_to_complete: bool = False
    """A resume whose checkpoint fails the size check against its manifest (a file missing or
    truncated), or whose `latest` cannot be followed, resumes from the newest complete step of the
    same root instead (with a warning naming what was wrong). False: such a resume is an error
    naming the file."""
    save_on_exit: bool = True
    """Save when training ends (max steps or a signal)."""
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """How the distributed optimizer's state is saved. 'fully_reshardable': gathered into each
    parameter's own shape, loadable into any layout (TP/PP/EP change), at the cost of a gathered copy
    of the rank's model-parallel shard of optimizer state in host memory (see optimizer_mem_efficient).
    'dp_reshardable': each rank writes its own flat shard, no gather and no extra memory; it loads
    only into the same TP/PP/EP layout (any data-parallel size). A checkpoint says which it holds."""
    optimizer_mem_efficient: bool = False
    """fully_reshardable only: gather the optimizer state on data-parallel rank 0 alone (over gloo),
    so the other ranks hold no gathered copy; rank 0 then writes all of it (Megatron-LM's
    --dist-ckpt-optim-fully-reshardable-mem-efficient)."""
    fully_parallel: bool = True
    """Spread the writes and reads of data-parallel replicas over the data-parallel ranks
    (Megatron-Core's fully parallel save/load wrappers): each replica rank writes and reads about
    1/DP of what its model-parallel shard holds, instead of one rank writing and every rank reading
    all of it."""

    def validate(self) -> None:
        if self.optimizer_mem_efficient and self.optimizer_format != "fully_reshardable":
            raise ConfigError(
                f"checkpoint.optimizer_mem_efficient=true applies to checkpoint.optimizer_format='fully_reshardable', "
                f"not {self.optimizer_format!r} (which gathers nothing); drop optimizer_mem_efficient")
        for name in ("dir", "load", "init_from"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"checkpoint.{name}={value!r} is empty; give a path, or null for none "
                                  f"(--checkpoint.{name}=null)")
        if self.save_interval < 1:
            raise ConfigError(f"checkpoint.save_interval={self.save_interval} must be >= 1")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 keeps all)")
        if self.init_from is not None and self.load not in (None, "latest"):
            raise ConfigError(
                f"checkpoint.init_from={self.init_from!r} and checkpoint.load={self.load!r} both name a checkpoint: "
                "init_from starts a new run from weights, load resumes one; keep one of them"
            )
        if self.init_optimizer and self.init_from is None:
            raise ConfigError(
                "checkpoint.init_optimizer=true takes the optimizer state of checkpoint.init_from, which is not set; "
                "set --checkpoint.init_from=PRETRAINED_CHECKPOINT or drop init_optimizer (checkpoint.load resumes "
                "a run with all its state)")
        if self.init_from is not None and self.dir is None:
            raise ConfigError(
                f"checkpoint.init_from={self.init_from!r} needs checkpoint.dir: without its own directory "
                "a restarted run would start over from init_from; set --checkpoint.dir=PATH"
            )


@dataclasses.dataclass(kw_only=True, frozen=True)
class MetricsConfig(Config):
    """Where per-step metrics go."""

    jsonl: str | None = None
    """Metrics JSONL path (None: <checkpoint.dir>/metrics.jsonl when a checkpoint dir is set)."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (None: off)."""
    expert_load: bool = True
    """Per-layer expert load statistics every step (busiest share, min/max tokens per expert; with
    model.router_expert_bias also the min/max of each layer's expert bias)."""
    peak_flops: float | None = None
    """Hardware peak FLOP/s for MFU (None: measured matmul rate on CPU, datasheet bf16 on GPU)."""
    wandb_project: str | None = None
    """Weights & Biases project (None: off). The same scalars as TensorBoard, the run config as the
    W&B config; needs the `wandb` extra (pip install 'olmoe-megatron[wandb]')."""
    wandb_entity: str | None = None
    """W&B entity (team or user; None: the account's default)."""
    wandb_name: str | None = None
    """W&B run name (None: the run's name)."""
    wandb_tags: tuple[str, ...] = ()
    """W&B run tags."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """'auto': online when W&B credentials are there (WANDB_API_KEY or a `wandb login`), else offline
    (files under wandb_dir, uploaded later with `wandb sync`); clusters without network: offline."""
    wandb_dir: str | None = None
    """Where W&B writes its files (None: checkpoint.dir, else the working directory)."""

    def validate(self) -> None:
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"metrics.peak_flops={self.peak_flops} must be > 0")
        for name in ("wandb_project", "wandb_entity", "wandb_name", "wandb_dir"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"metrics.{name}={value!r} is empty; give a value or null")
        if self.wandb_project is None and (self.wandb_entity or self.wandb_name or self.wandb_tags):
            raise ConfigError("metrics.wandb_entity/wandb_name/wandb_tags are set but metrics.wandb_project is "
                              "not: set --metrics.wandb_project=NAME to log to W&B")
