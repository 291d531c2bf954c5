"""`olmoe demo` (what `make demo` runs): the main job on the embedded default, end to end.

1. obtains OLMoE's tokenizer (once; cached),
2. builds the embedded corpus: this interpreter's standard-library source, tokenized by the same
   pipeline as real data (`olmoe prep tokenize`),
3. trains the `olmoe_demo` recipe on 2 CPU processes with expert parallelism 2, saving checkpoints,
4. evaluates on held-out standard-library files every 125 steps (validation loss, and accuracy on
   picking a line's true next line among 4),
5. stops, then resumes from the latest checkpoint for the last steps (as a requeued job would),
6. writes runs/demo/loss_curve.png and prints a summary with the final validation loss and accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from olmoe_megatron.launcher.commands.launch import torchrun_command
from olmoe_megatron.recipes import get_recipe

NAME = "demo"
HELP = "Train a small OLMoE on the embedded corpus (2 CPU processes, EP2), resume it, plot the loss."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (replaced on each run)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (expert_parallel is set to this)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: the recipe's)")
    parser.add_argument("--resume-steps", type=int, default=20, help="steps trained after the resume")


def _train(out: Path, nproc: int, steps: int, extra: list[str]) -> int:
    args = [
        "train", "--recipe", "olmoe_demo", f"--parallel.expert_parallel={nproc}", f"--train.max_steps={steps}",
        f"--checkpoint.dir={out / 'checkpoints'}", f"--metrics.jsonl={out / 'metrics.jsonl'}",
        f"--metrics.tensorboard_dir={out / 'tensorboard'}", *extra,
    ]
    return subprocess.call(torchrun_command(nproc, args), env=_env(nproc))


def _precision_flags(recipe) -> list[str]:
    """The recipe trains in bf16; on a CPU without bf16 matrix instructions that is ~100x slower than
    fp32, so the demo trains in fp32 there (and says so)."""
    import torch

    from olmoe_megatron.training.metrics import cpu_bf16_is_slow

    if recipe.precision.dtype != "bf16" or torch.cuda.is_available():
        return []
    slow, bf16, fp32 = cpu_bf16_is_slow()
    if not slow:
        return []
    print(f"[demo] bf16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} GFLOP/s in fp32 "
          "(no bf16 matrix instructions): training the demo in fp32", flush=True)
    return ["--precision.dtype=fp32"]


def _env(nproc: int) -> dict:
    import os

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Megatron's import-time notice that TE/apex are absent (expected on CPU) and torch's deprecation
    # notices would repeat on every rank and bury the progress lines.
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore:Transformer Engine and Apex are not installed")
    return env


def _plot(records: list[dict], evals: list[dict], resume_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["lm_loss"] for r in records], label="LM loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval/stdlib-heldout/loss"] for e in evals], "o-",
                label="validation loss (held-out stdlib files)")
    ax.axvline(resume_step, color="grey", linestyle="--", label=f"resumed from checkpoint (step {resume_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("olmoe_demo: 4 layers, 8 experts top-2, EP2 on 2 CPU processes, stdlib corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.tokenizer import olmoe_tokenizer_path

    started = time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    recipe = get_recipe("olmoe_demo")
    steps = args.steps or recipe.train.max_steps
    first = steps - args.resume_steps
    print(f"[demo] tokenizer: {olmoe_tokenizer_path(download=True)}", flush=True)
    extra = _precision_flags(recipe)
    print(f"[demo] training olmoe_demo on {args.nproc} processes (EP{args.nproc}) to step {first}, "
          f"then resuming to step {steps}", flush=True)
    code = _train(out, args.nproc, first, extra)
    if code != 0:
        print(f"[demo] training failed with exit code {code}", file=sys.stderr)
        return code
    latest = (out / "checkpoints" / "latest").read_text().strip()
    print(f"[demo] stopped at step {first}; checkpoint {out / 'checkpoints' / latest}; resuming", flush=True)
    code = _train(out, args.nproc, steps, extra)
    if code != 0:
        print(f"[demo] resumed training failed with exit code {code}", file=sys.stderr)
        return code
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in lines if r.get("kind") != "eval"]
    evals = [r for r in lines if r.get("kind") == "eval" and "eval/stdlib-heldout/loss" in r]
    _plot(records, evals, first, out / "loss_curve.png")
    head = sum(r["lm_loss"] for r in records[:10]) / min(10, len(records))
    tail = sum(r["lm_loss"] for r in records[-10:]) / min(10, len(records))
    speed = sorted(r["tokens_per_s"] for r in records)[len(records) // 2]
    mfu = sorted(r["mfu"] for r in records)[len(records) // 2]
    print(f"[demo] loss {head:.3f} (first 10 steps) -> {tail:.3f} (last 10); median {speed:,.0f} tokens/s, "
          f"MFU {100 * mfu:.1f}%", flush=True)
    for record in evals:
        print(f"[demo] eval at step {record['step']}: validation loss {record['eval/stdlib-heldout/loss']:.3f} "
              f"(ppl {record['eval/stdlib-heldout/ppl']:.1f}) on held-out stdlib files; next-line task accuracy "
              f"{100 * record['eval/demo-next-line/acc']:.1f}% (acc_norm {100 * record['eval/demo-next-line/acc_norm']:.1f}%; "
              f"chance 25%) over {record['eval/demo-next-line/items']} items", flush=True)
    print(f"[demo] loss curve: {out / 'loss_curve.png'}; metrics: {out / 'metrics.jsonl'}; "
          f"TensorBoard: {out / 'tensorboard'}; {time.time() - started:.0f} s in all", flush=True)
    return 0 if tail < head else 1
