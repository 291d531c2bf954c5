"""The training loop: from a RunConfig to checkpoints and metrics, under torchrun or Slurm.

    run = get_recipe("olmoe_tiny").with_overrides(["train.max_steps=10"])
    exit_code = train(run)

Preemption: SIGUSR1 or SIGTERM sets a flag; the ranks agree on it after the current step, save a
checkpoint and exit with EXIT_REQUEUE (the Slurm entrypoint requeues the job, which resumes from
`latest`). Non-finite losses skip the update; more than `train.max_nonfinite_steps` in a row save
and stop with EXIT_NONFINITE.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from olmoe_megatron.checkpoint.format import check_same_architecture
from olmoe_megatron.checkpoint.plan import plan_load
from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
from olmoe_megatron.parallel import cpu_perf
from olmoe_megatron.parallel.context import ParallelContext, initialize
from olmoe_megatron.run_config import RunConfig
from olmoe_megatron.training.checkpoint import Progress, load_checkpoint, optimizer_has_state, save_checkpoint
from olmoe_megatron.training.exit_codes import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from olmoe_megatron.training.faults import Faults
from olmoe_megatron.training.metrics import MetricsWriter, WandbRun, job_peak, peak_memory_fields, throughput_fields
from olmoe_megatron.training.moe_metrics import ExpertLoadCounter
from olmoe_megatron.training.schedule import learning_rate
from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, set_learning_rate, train_step, wrap_ddp

logger = logging.getLogger(__name__)


class _StopSignal:
    """Remembers SIGUSR1/SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def agreed(self, context: ParallelContext) -> bool:
        """True on every rank once any rank has the signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=context.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def total_steps(run: RunConfig) -> int:
    train = run.train
    if train.max_steps is not None:
        return train.max_steps
    return math.ceil(train.max_tokens / train.tokens_per_step)


@dataclasses.dataclass
class TrainingState:
    """The model chunks, their DDP wrappers, the optimizer and the progress a run starts with."""

    chunks: list
    models: list
    optimizer: object
    progress: Progress


def start_training_state(run: RunConfig, context: ParallelContext) -> TrainingState:
    """Builds the model and optimizer and loads what `plan_load` says (resume, init_from, nothing)."""
    train_cfg, model_cfg = run.train, run.model
    plan = plan_load(run.checkpoint)  # before building anything: a bad checkpoint fails fast
    if plan.path is not None:
        check_same_architecture(plan.path, model_cfg, field=plan.field)
    config, _ = build_transformer_config(model_cfg, context, precision=run.precision, recompute=train_cfg.recompute)
    chunks = build_model_chunks(model_cfg, context, precision=run.precision, config=config)
    models = wrap_ddp(chunks, config, train=train_cfg, precision=run.precision)
    optimizer = build_optimizer(models, train=train_cfg, precision=run.precision)
    attach_training_hooks(config, models, optimizer)
    progress = Progress()
    logger.info("checkpoint: %s", plan.reason)
    if plan.path is not None:
        progress = load_checkpoint(plan.path, models=models, optimizer=optimizer, load_optimizer=plan.load_optimizer,
                                   dp_group=context.groups.dp_cp, fully_parallel=run.checkpoint.fully_parallel,
                                   layout=run.parallel, restore_progress=plan.restore_progress)
        if plan.reset_data_position:
            progress.consumed_samples = 0
    return TrainingState(chunks=chunks, models=models, optimizer=optimizer, progress=progress)


def train(run: RunConfig) -> int:
    """Trains `run` on the ranks of this torchrun/Slurm job; returns the process exit code."""
    from olmoe_megatron.data.loader import MicroBatchIterator

    faults = Faults.from_env()  # test-only; a no-op without its environment variables
    stop_signal = _StopSignal()
    context = initialize(run.parallel, run.model, seed=run.train.seed,
                         timeout_minutes=run.train.collective_timeout_minutes)
    run.validate_world_size(context.world_size, backend=context.backend)
    if not context.uses_cuda:
        cpu_perf.tune_malloc()  # a training step's buffers stay in the process (see cpu_perf)
    if not context.is_logging_rank:
        logging.getLogger().setLevel(logging.WARNING)
    train_cfg, model_cfg = run.train, run.model
    state = start_training_state(run, context)
    chunks, models, optimizer, progress = state.chunks, state.models, state.optimizer, state.progress
    faults.attach(chunks)
    steps = total_steps(run)
    dataset = _build_dataset(run, num_samples=max(steps, 1) * train_cfg.global_batch_size)
    evaluator = None
    if run.eval.enabled:
        from olmoe_megatron.evaluation.evaluator import Evaluator

        evaluator = Evaluator.build(run, context)
    batches = MicroBatchIterator(dataset, global_batch_size=train_cfg.global_batch_size,
                                 micro_batch_size=train_cfg.micro_batch_size, dp_rank=context.dp_rank,
                                 dp_size=context.dp_size, consumed_samples=progress.consumed_samples)

    jsonl = run.metrics.jsonl or (os.path.join(run.checkpoint.dir, "metrics.jsonl") if run.checkpoint.dir else None)
    wandb_run = (lambda: WandbRun(run.metrics, run_config=config_to_dict(run), run_name=run.name,
                                  checkpoint_dir=run.checkpoint.dir)) if run.metrics.wandb_project else None
    writer = MetricsWriter(enabled=context.is_logging_rank, jsonl=jsonl, tensorboard_dir=run.metrics.tensorboard_dir,
                           log_interval=train_cfg.log_interval, wandb_run=wandb_run)
    peak = job_peak(run.precision.torch_dtype, fp8=run.precision.fp8 is not None, override=run.metrics.peak_flops)
    if math.isnan(peak.flops) and context.is_logging_rank:
        logger.warning("MFU is NaN in every record: %s (the GPU's dense %s peak FLOP/s per GPU, e.g. "
                       "--metrics.peak_flops=989e12 for an H100 SXM in bf16)", peak.source, peak.kind)
    if not context.uses_cuda and run.precision.dtype == "bf16":
        _warn_if_cpu_bf16_is_slow(context)
    flops_per_token = model_cfg.flops_per_token(train_cfg.seq_length)
    load_counter = None
    if run.metrics.expert_load and model_cfg.is_moe:
        load_counter = ExpertLoadCounter(model_cfg.num_layers, model_cfg.num_experts).attach(chunks)
    logger.info("training %s: %s; steps %d..%d; MFU peak %.3g FLOP/s (%s)", run.name,
                run.parallel.describe(context.world_size), progress.step, steps, peak.flops, peak.source)

    def save() -> bool:
        """Saves a checkpoint; False when there is nothing a resume could load (see below)."""
        if not run.checkpoint.dir:
            return False
        if not optimizer_has_state(optimizer):
            # Every step so far was skipped (non-finite) and nothing was loaded: the optimizer has
            # no state to save, and a checkpoint without it could not be resumed. The weights are
            # still those the run started from.
            logger.warning("step %d: no checkpoint written: no update has been applied in this run yet, so the "
                           "weights are the starting ones and the optimizer has no state to save", progress.step)
            return False
        save_checkpoint(run.checkpoint.dir, models=models, optimizer=optimizer, progress=progress,
                        run_config=run, keep_last=run.checkpoint.keep_last, dp_group=context.groups.dp_cp,
                        before_commit=faults.before_commit)
        return True

    exit_code = EXIT_OK
    saved_at = progress.step
    batch_iter = iter(batches)
    try:
        while progress.step < steps:
            wait_start = time.perf_counter()
            micro_batches = next(batch_iter)
            data_wait_s = time.perf_counter() - wait_start
            lr = learning_rate(train_cfg, progress.tokens)
            set_learning_rate(optimizer, lr)
            faults.arm(progress.step + 1)
            start = time.perf_counter()
            result = train_step(models, optimizer, micro_batches, context, model_config=model_cfg,
                                seq_length=train_cfg.seq_length, expert_load=load_counter,
                                loss_normalization=train_cfg.loss_normalization)
            compute_s = time.perf_counter() - start
            progress.step += 1
            progress.consumed_samples += train_cfg.global_batch_size
            progress.tokens += train_cfg.tokens_per_step
            progress.nonfinite_streak = 0 if result.finite else progress.nonfinite_streak + 1
            writer.write({
                "step": progress.step, "lm_loss": result.lm_loss, "lb_loss": result.lb_loss,
                "z_loss": result.z_loss, "grad_norm": result.grad_norm, "lr": lr, "tokens": progress.tokens,
                **throughput_fields(tokens_per_step=train_cfg.tokens_per_step, data_wait_s=data_wait_s,
                                    compute_s=compute_s, flops_per_token=flops_per_token, peak=peak),
                "skipped": not result.updated,
                # Peaks since the previous record (CUDA: reset after reading; CPU: the process's peak RSS).
                **peak_memory_fields(uses_cuda=context.uses_cuda),
                "layout": run.parallel.describe(context.world_size),
                "expert_load": result.expert_load,
            })
            if not result.finite:
                logger.warning("step %d: non-finite loss %s (grad norm %s); update skipped (%d in a row, limit %d)",
                               progress.step, result.lm_loss, result.grad_norm, progress.nonfinite_streak,
                               train_cfg.max_nonfinite_steps)
                if progress.nonfinite_streak > train_cfg.max_nonfinite_steps:
                    saved = save()
                    saved_at = progress.step
                    logger.error("stopping at step %d: %d consecutive non-finite losses (last lm loss %s, lb %s, "
                                 "z %s); %s", progress.step, progress.nonfinite_streak,
                                 result.lm_loss, result.lb_loss, result.z_loss,
                                 "checkpoint saved" if saved else "no checkpoint (no update was ever applied)")
                    exit_code = EXIT_NONFINITE
                    break
            stop = stop_signal.agreed(context)
            if evaluator is not None and not stop and run.eval.due(progress.step, last_step=steps):
                writer.write_eval(step=progress.step, tokens=progress.tokens, metrics=evaluator.evaluate(models))
            if run.checkpoint.dir and (progress.step % run.checkpoint.save_interval == 0 or stop):
                save()
                saved_at = progress.step
            if stop:
                logger.warning("signal %s: checkpoint saved at step %d; exiting for requeue",
                               stop_signal.received, progress.step)
                exit_code = EXIT_REQUEUE
                break
        if exit_code == EXIT_OK and run.checkpoint.save_on_exit and saved_at != progress.step:
            save()
    finally:
        writer.close()
        if load_counter is not None:
            load_counter.detach()
    dist.barrier()
    return exit_code


def _warn_if_cpu_bf16_is_slow(context: ParallelContext) -> None:
    from olmoe_megatron.training.metrics import cpu_bf16_is_slow

    slow, bf16, fp32 = cpu_bf16_is_slow()
    if slow and context.is_logging_rank:
        logger.warning("precision.dtype=bf16 on a CPU without bf16 matrix instructions: bf16 matmuls run at %.1f "
                       "GFLOP/s here against %.0f in fp32; --precision.dtype=fp32 trains much faster on this machine",
                       bf16 / 1e9, fp32 / 1e9)


def _build_dataset(run: RunConfig, *, num_samples: int):
    """Every rank builds the dataset at once: each corpus, tokenizer and index cache is built by the
    first rank to take its file lock while the others wait on that lock, not in a collective whose
    timeout a large corpus could outlast."""
    return run.data.build(seq_length=run.train.seq_length, num_samples=num_samples, vocab_size=run.model.vocab_size,
                          heldout_share=run.eval.heldout_share)
