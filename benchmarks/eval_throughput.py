"""Evaluation throughput: forward-only validation tokens/s against the training step's, in one process.

The olmoe_small recipe (4 layers, d_model 256, 16 experts top-4, vocab 4096; micro-batches and
global batch of 4 x 256 tokens, one micro-batch per step) in one process (world size 1, gloo, torch
threads = all cores), built as `olmoe train` builds it (Megatron DDP, Megatron's optimizer with
OLMoE's AdamW, training hooks, expert-load counter):

- train: `train_step` (olmoe_megatron.training.step), full optimizer steps, as benchmarks/train_step.py;
- eval: `validation_loss` over `--eval-windows` fixed windows of random tokens (seq_length 256,
  eval micro-batch = train.micro_batch_size, as EvalConfig.micro_batch_size=None gives) inside
  `evaluation_mode`: exactly what `Evaluator.evaluate` runs per validation source.

After `--warmup` untimed rounds, `--repeats` rounds alternate train (`--train-steps` steps) and eval
(one call), so slow drifts of a shared machine hit both sides alike; the medians over rounds count,
and `paired` is the median of each round's eval/train ratio. The target (issue): forward only at
least 2.5x the training step's tokens/s. The eval share of a run's wall-clock uses the recipe's
eval.interval if it has one, else `--interval` (1000 steps: OLMo-core's EvaluatorCallback and
LMEvaluatorCallbackConfig default, and OLMo's OLMoE configs, where eval_interval = save_interval =
1000), and eval.tokens (EvalConfig default 1,048,576 per source), one source:
share = eval_time / (interval x step_time + eval_time), eval_time extrapolated linearly from the
measured eval tokens/s (a real call amortises its fixed costs over more windows).

On a CPU without bf16 matrix instructions (AVX2 only), bf16 matmuls run ~100x slower than fp32: the
run then uses precision.dtype=fp32 (as `olmoe demo` does, from the same matmul probe, and also from
torch's CPU capability: the probe misreads a loaded machine) and says so; `--precision` forces one.
The defaults take about a minute and a half on 2 idle cores, `--profile` included.
`--profile DIR` adds a phase breakdown (forward with autograd, forward+backward, optimizer, the eval
forward per micro-batch) and torch.profiler tables of one train step and one eval call.

Usage: python benchmarks/eval_throughput.py --out benchmarks/results/eval_throughput.json
           [--repeats 15] [--warmup 3] [--train-steps 4] [--eval-windows 32] [--interval 1000]
           [--precision auto|bf16|fp32] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings

import provenance  # benchmarks/provenance.py (this folder is on sys.path)

RECIPE = "olmoe_small"
TARGET_RATIO = 2.5
DEFAULT_INTERVAL = 1000  # OLMo-core EvaluatorCallback.eval_interval; OLMo configs/OLMoE-*.yml


# ----------------------------------------------------------------------------- setup
def _precision(run, requested: str) -> tuple[str, str, dict]:
    """(dtype, why, matmul rates): the recipe's dtype unless bf16 is slow on this CPU (or forced)."""
    import torch

    from olmoe_megatron.training.metrics import cpu_bf16_is_slow

    recipe_dtype = run.precision.dtype
    if requested != "auto":
        return requested, f"--precision {requested} (recipe: {recipe_dtype})", {}
    if recipe_dtype != "bf16" or torch.cuda.is_available():
        return recipe_dtype, "the recipe's", {}
    slow, bf16, fp32 = cpu_bf16_is_slow()
    rates = {"bf16_matmul_flops": bf16, "fp32_matmul_flops": fp32}
    # The 0.2 s probe misreads a loaded machine (fp32 at 3 GFLOP/s under a load of 5 on 2 cores, so
    # bf16 looked only 3x slower): without AVX-512 torch has no fast bf16 GEMM on x86 either way.
    capability = torch.backends.cpu.get_cpu_capability()
    no_bf16_isa = capability in ("AVX2", "DEFAULT")
    if not (slow or no_bf16_isa):
        return "bf16", f"the recipe's (bf16 matmuls {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f})", rates
    why = (f"bf16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} GFLOP/s in fp32 "
           f"(torch CPU capability {capability}: no bf16 matrix instructions): precision.dtype=fp32 instead of "
           "the recipe's bf16")
    return "fp32", why, rates


def _train_batches(vocab_size: int, *, micro_batch: int, num_micro_batches: int, seq_length: int,
                   count: int = 4) -> list:
    """`count` global batches of random tokens, each a list of `num_micro_batches` micro-batches."""
    import torch

    generator = torch.Generator().manual_seed(0)
    position_ids = torch.arange(seq_length).unsqueeze(0).expand(micro_batch, seq_length).contiguous()
    steps = []
    for _ in range(count):
        step = []
        for _ in range(num_micro_batches):
            b = torch.randint(0, vocab_size, (micro_batch, seq_length + 1), generator=generator)
            step.append({"tokens": b[:, :-1].contiguous(), "labels": b[:, 1:].contiguous(),
                         "loss_mask": torch.ones(micro_batch, seq_length), "position_ids": position_ids})
        steps.append(step)
    return steps


def _eval_windows(vocab_size: int, *, num_windows: int, seq_length: int):
    """Stride-seq_length windows of one random token stream, every token counted (as a real source)."""
    import numpy as np

    from olmoe_megatron.evaluation.sources import EvalWindows

    stream = np.random.default_rng(1).integers(0, vocab_size, num_windows * seq_length + 1, dtype=np.int64)
    index = np.arange(num_windows)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    rows = stream[index]
    return EvalWindows("random", np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]),
                       np.ones((num_windows, seq_length), dtype=np.float32), "random tokens")


def _build(dtype: str):
    """The recipe's run, built as the trainer builds it, in `dtype`."""
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.parallel import cpu_perf
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.moe_metrics import ExpertLoadCounter
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, wrap_ddp

    run = get_recipe(RECIPE)
    run = run.replace(precision=run.precision.replace(dtype=dtype))
    model_cfg, train_cfg = run.model, run.train
    context = initialize(ParallelLayout(), model_cfg, seed=train_cfg.seed, backend="gloo")
    cpu_perf.tune_malloc()  # as `olmoe train` does on CPU
    config, _ = build_transformer_config(model_cfg, context, precision=run.precision)
    chunks = build_model_chunks(model_cfg, context, precision=run.precision, config=config)
    models = wrap_ddp(chunks, config, train=train_cfg, precision=run.precision)
    optimizer = build_optimizer(models, train=train_cfg, precision=run.precision)
    attach_training_hooks(config, models, optimizer)
    # as the trainer does: expert load is counted for MoE models only
    load_counter = None
    if model_cfg.is_moe:
        load_counter = ExpertLoadCounter(model_cfg.num_layers, model_cfg.num_experts).attach(chunks)
    return run, context, models, optimizer, load_counter


# ----------------------------------------------------------------------------- measurement
class Bench:
    """Alternating train rounds and eval calls on one built model."""

    def __init__(self, run, context, models, optimizer, load_counter, *, eval_windows: int) -> None:
        self.run, self.context, self.models = run, context, models
        self.optimizer, self.load_counter = optimizer, load_counter
        train = run.train
        self.seq_length = train.seq_length
        self.tokens_per_step = train.global_batch_size * train.seq_length
        self.eval_micro_batch = run.eval.micro_batch_size or train.micro_batch_size
        # world size 1: a step is global_batch_size / micro_batch_size micro-batches (olmoe_small: 1)
        self.num_micro_batches = train.global_batch_size // train.micro_batch_size
        self.batches = _train_batches(run.model.vocab_size, micro_batch=train.micro_batch_size,
                                      num_micro_batches=self.num_micro_batches, seq_length=self.seq_length)
        self.windows = _eval_windows(run.model.vocab_size, num_windows=eval_windows, seq_length=self.seq_length)
        self.step_index = 0

    def train_step(self) -> tuple[float, float]:
        from olmoe_megatron.training.schedule import learning_rate
        from olmoe_megatron.training.step import set_learning_rate, train_step

        i = self.step_index
        self.step_index += 1
        set_learning_rate(self.optimizer, learning_rate(self.run.train, i * self.tokens_per_step))
        start = time.perf_counter()  # the span the trainer logs as compute_s
        result = train_step(self.models, self.optimizer, self.batches[i % len(self.batches)], self.context,
                            model_config=self.run.model, seq_length=self.seq_length, expert_load=self.load_counter)
        return time.perf_counter() - start, result.lm_loss

    def evaluate(self) -> tuple[float, dict]:
        from olmoe_megatron.evaluation.forward import evaluation_mode
        from olmoe_megatron.evaluation.scoring import validation_loss

        start = time.perf_counter()
        with evaluation_mode(self.models):
            result = validation_loss(self.models, self.windows, self.context, micro_batch_size=self.eval_micro_batch)
        return time.perf_counter() - start, result

    def round(self, train_steps: int) -> dict:
        steps = [self.train_step() for _ in range(train_steps)]
        eval_s, result = self.evaluate()
        train_s = [s for s, _ in steps]
        train_tps = self.tokens_per_step * len(train_s) / sum(train_s)
        eval_tps = result["tokens"] / eval_s
        return {"train_step_s": train_s, "eval_s": eval_s, "train_tokens_per_s": train_tps,
                "eval_tokens_per_s": eval_tps, "eval_over_train": eval_tps / train_tps,
                "lm_losses": [loss for _, loss in steps], "eval_loss": result["loss"], "eval_tokens": result["tokens"]}


def eval_share(*, interval: int, eval_tokens: int, seq_length: int, tokens_per_step: int,
               train_tps: float, eval_tps: float) -> dict:
    """Share of wall-clock spent in one source's eval every `interval` steps, from the medians."""
    windows = math.ceil(eval_tokens / seq_length)  # sources.py keeps the first ceil(tokens / seq) windows
    step_s = tokens_per_step / train_tps
    eval_s = windows * seq_length / eval_tps
    return {"interval_steps": interval, "eval_tokens": windows * seq_length, "eval_windows": windows,
            "step_time_s": step_s, "eval_time_s": eval_s, "train_time_per_interval_s": interval * step_s,
            "share": eval_s / (interval * step_s + eval_s),
            "train_tokens_per_interval": interval * tokens_per_step}


# ----------------------------------------------------------------------------- profile (--profile)
def profile(bench: Bench, out_dir: str, *, repeats: int = 5) -> dict:
    """Where the time goes: the fastest of `repeats` runs of each phase on one micro-batch (the
    minimum: the least disturbed by other work on a shared machine), and profiler tables of one
    train step and one eval call."""
    import torch

    from olmoe_megatron.evaluation.forward import evaluation_mode, token_losses
    from olmoe_megatron.training.moe_metrics import reduce_router_losses
    from olmoe_megatron.training.step import run_forward_backward

    os.makedirs(out_dir, exist_ok=True)
    models, context, seq = bench.models, bench.context, bench.seq_length
    batch = bench.batches[0]
    b = batch[0]

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def reset() -> None:  # what train_step does after the schedule: gradients, router losses, expert load
        for m in models:
            m.zero_grad_buffer()
        bench.optimizer.zero_grad()
        reduce_router_losses(bench.run.model, context, num_microbatches=len(batch))
        if bench.load_counter is not None:
            bench.load_counter.reduce_and_reset(context)

    def eval_model_only() -> None:  # the model call alone: no Megatron schedule, no loss dict
        with evaluation_mode(models):
            models[0](b["tokens"], b["position_ids"], None, labels=b["labels"])

    def eval_token_losses() -> None:  # one micro-batch through the schedule, as validation_loss runs it
        with evaluation_mode(models):
            token_losses(models, batch, context, seq_length=seq)

    def no_grad_train_mode() -> None:  # what eval mode changes besides no_grad
        with torch.no_grad():
            models[0](b["tokens"], b["position_ids"], None, labels=b["labels"])
        reset()

    def forward_autograd() -> None:  # the training step's forward: train mode, graph built (then dropped)
        run_forward_backward(models, batch, context, seq_length=seq, forward_only=True)
        reset()

    def forward_backward() -> None:
        run_forward_backward(models, batch, context, seq_length=seq)
        reset()

    eval_calls = []
    for _ in range(3):
        eval_calls.append(bench.evaluate()[0])
    num_eval_batches = math.ceil(bench.windows.num_windows / bench.eval_micro_batch)
    phases = {
        "eval_call_per_micro_batch": min(eval_calls) / num_eval_batches,
        "eval_token_losses": timed(eval_token_losses),
        "eval_model_only": timed(eval_model_only),
        "no_grad_train_mode": timed(no_grad_train_mode),
        "forward_with_autograd": timed(forward_autograd),
        "forward_backward": timed(forward_backward),
        "train_step": timed(lambda: bench.train_step()),
    }
    phases["optimizer_and_reductions"] = phases["train_step"] - phases["forward_backward"]

    activities = [torch.profiler.ProfilerActivity.CPU]
    for name, fn in (("train_step", lambda: bench.train_step()), ("eval_call", bench.evaluate)):
        with torch.profiler.profile(activities=activities) as prof:
            fn()
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return {"seconds_per_micro_batch_min": phases, "micro_batch_tokens": bench.tokens_per_step // len(batch),
            "eval_micro_batches_per_call": num_eval_batches, "tables": out_dir}


# ----------------------------------------------------------------------------- provenance
def _provenance() -> dict:
    """The checkout's HEAD and the tracked files that differ from it."""
    dirty = provenance.dirty_paths()
    commit = provenance.git(provenance.REPOSITORY, "rev-parse", "HEAD").strip() or "unknown"
    return {"commit": commit, "dirty": bool(dirty), "dirty_paths": dirty}


def _machine(load_before: tuple, threads: int) -> dict:
    cpu = provenance.cpu_description()
    return {"cpu": cpu["cpu"], "cores": cpu["cores"], "threads": threads, "cpu_capability": cpu["cpu_capability"],
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}


def _versions() -> dict:
    return provenance.versions("torch", "megatron-core", "numpy")


# ----------------------------------------------------------------------------- driver
def _table(r: dict) -> str:
    share = r["eval_share"]
    rows = [
        ("training step (train_step)", f"{r['train_tokens_per_s']:,.0f}",
         f"{1000 * r['train_step_s_median']:.0f} ms / step",
         f"{r['tokens_per_step']:,} tokens/step"),
        ("eval (validation_loss)", f"{r['eval_tokens_per_s']:,.0f}", f"{1000 * r['eval_call_s_median']:.0f} ms / call",
         f"{r['eval_tokens_per_call']:,} tokens/call"),
        ("eval / train", f"{r['ratio']:.2f}x", f"paired {r['paired_ratio_median']:.2f}x",
         f"target >= {TARGET_RATIO}x: {'met' if r['target_met'] else 'NOT met'}"),
        (f"eval share @ {share['interval_steps']} steps", f"{100 * share['share']:.1f}%",
         f"{share['eval_time_s']:,.0f} s eval / {share['train_time_per_interval_s']:,.0f} s train",
         f"{share['eval_tokens']:,} eval tokens, 1 source"),
    ]
    header = ("measure", "tokens/s", "time", "note")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON results here")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (train steps, then one eval call)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (oneDNN kernels, allocator)")
    parser.add_argument("--train-steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--eval-windows", type=int, default=32, help="windows of seq_length per eval call")
    parser.add_argument("--interval", type=int, default=DEFAULT_INTERVAL,
                        help="eval interval in steps for the share, when the recipe sets no eval.interval")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--profile", help="also write a phase breakdown and profiler tables into this folder")
    args = parser.parse_args()
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])

    warnings.filterwarnings("ignore", message=".*Apex (are|is) not installed")
    warnings.filterwarnings("ignore", category=FutureWarning)
    load_before = os.getloadavg()
    started_at = _provenance()  # of the code that runs (a commit landing meanwhile is noted below)
    threads = provenance.set_threads()
    import torch

    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.metrics import measure_matmul_flops

    dtype, why, rates = _precision(get_recipe(RECIPE), args.precision)
    print(f"[eval_throughput] precision {dtype}: {why}", flush=True)
    run, context, models, optimizer, load_counter = _build(dtype)
    bench = Bench(run, context, models, optimizer, load_counter, eval_windows=args.eval_windows)
    matmul = measure_matmul_flops(torch.float32 if dtype == "fp32" else torch.bfloat16)
    print(f"[eval_throughput] {RECIPE}: {args.warmup} warm-up + {args.repeats} timed rounds of {args.train_steps} "
          f"steps x {bench.tokens_per_step} tokens, then {bench.windows.num_windows} windows x {bench.seq_length} "
          f"(eval micro-batch {bench.eval_micro_batch}); {threads} threads", flush=True)
    for _ in range(args.warmup):
        bench.round(args.train_steps)
    rounds = []
    for i in range(args.repeats):
        rounds.append(bench.round(args.train_steps))
        r = rounds[-1]
        print(f"  round {i + 1:>2}/{args.repeats}: train {r['train_tokens_per_s']:>7,.0f} tok/s, eval "
              f"{r['eval_tokens_per_s']:>7,.0f} tok/s ({r['eval_over_train']:.2f}x), eval loss {r['eval_loss']:.4f}, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)

    train_tps = statistics.median(r["train_tokens_per_s"] for r in rounds)
    eval_tps = statistics.median(r["eval_tokens_per_s"] for r in rounds)
    interval, interval_source = ((run.eval.interval, "recipe eval.interval") if run.eval.interval is not None else
                                 (args.interval, "--interval (recipe sets none; OLMo/OLMo-core default 1000)"))
    share = eval_share(interval=interval, eval_tokens=run.eval.tokens, seq_length=bench.seq_length,
                       tokens_per_step=bench.tokens_per_step, train_tps=train_tps, eval_tps=eval_tps)
    share["interval_source"] = interval_source
    result = {
        "benchmark": "eval_throughput", "recipe": RECIPE, "precision": dtype, "precision_reason": why, **rates,
        "matmul_flops": matmul, "flops_per_token_train": run.model.flops_per_token(bench.seq_length),
        "seq_length": bench.seq_length, "micro_batch_size": run.train.micro_batch_size,
        "eval_micro_batch_size": bench.eval_micro_batch, "global_batch_size": run.train.global_batch_size,
        "tokens_per_step": bench.tokens_per_step, "eval_windows_per_call": bench.windows.num_windows,
        "eval_tokens_per_call": bench.windows.num_tokens, "train_steps_per_round": args.train_steps,
        "warmup_rounds": args.warmup, "repeats": args.repeats,
        "train_tokens_per_s": train_tps, "eval_tokens_per_s": eval_tps, "ratio": eval_tps / train_tps,
        "paired_ratio_median": statistics.median(r["eval_over_train"] for r in rounds),
        # the least disturbed round of each side: a check on the medians when other work shares the cores
        "train_tokens_per_s_best": max(r["train_tokens_per_s"] for r in rounds),
        "eval_tokens_per_s_best": max(r["eval_tokens_per_s"] for r in rounds),
        "train_step_s_median": statistics.median(s for r in rounds for s in r["train_step_s"]),
        "eval_call_s_median": statistics.median(r["eval_s"] for r in rounds),
        "target_ratio": TARGET_RATIO, "target_met": eval_tps / train_tps >= TARGET_RATIO,
        "eval_share": share, "rounds": rounds,
    }
    if args.profile:
        result["profile"] = profile(bench, args.profile)
    if load_counter is not None:
        load_counter.detach()
    at_end = _provenance()["commit"]
    if at_end != started_at["commit"]:
        started_at["commit_at_end"] = at_end
    result.update(**started_at, machine=_machine(load_before, threads), versions=_versions(), command=command)

    print()
    print(_table(result))
    print(f"best rounds: train {result['train_tokens_per_s_best']:,.0f} tok/s, eval "
          f"{result['eval_tokens_per_s_best']:,.0f} tok/s "
          f"({result['eval_tokens_per_s_best'] / result['train_tokens_per_s_best']:.2f}x)")
    print(f"target: eval >= {TARGET_RATIO}x training tokens/s: "
          f"{'met' if result['target_met'] else 'NOT met'} ({result['ratio']:.2f}x)")
    print(f"eval share: {interval_source}; eval.tokens {run.eval.tokens:,}; "
          f"{share['train_tokens_per_interval']:,} training tokens per interval")
    if args.profile:
        print(f"\nseconds per micro-batch of {result['profile']['micro_batch_tokens']} tokens "
              f"(fastest of 5):")
        for name, seconds in result["profile"]["seconds_per_micro_batch_min"].items():
            print(f"  {name:<28}{1000 * seconds:>8.1f} ms")
        print(f"profiler tables: {args.profile}/train_step.txt, {args.profile}/eval_call.txt")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
