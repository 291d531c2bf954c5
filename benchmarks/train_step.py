"""Training-step throughput: our Megatron-Core trainer against HF transformers' OlmoeForCausalLM.

Both sides train olmoe_small (4 layers, d_model 256, 16 experts top-4, vocab 4096) on micro-batches
of 4 x 256 tokens in one process (world size 1), torch threads = all cores:

- ours: exactly what `olmoe train` runs per step (olmoe_megatron.training.step: Megatron DDP with
  fp32 gradient buffers, Megatron's optimizer with OLMoE's AdamW and clipping, Megatron's schedule,
  router-loss reduction and expert-load counting); bf16 means bf16 parameters with fp32 main
  parameters in Megatron's optimizer.
- HF: OlmoeForCausalLM (transformers' default attention and experts implementations) with
  torch.optim.AdamW (same hyper-parameters, clipping at 1.0, router aux loss on); bf16 means fp32
  parameters under torch.autocast(bfloat16).

Each run is a fresh subprocess (build, `--warmup` untimed steps, `--steps` timed steps); runs
alternate ours, HF, ours, HF... `--repeats` times per precision and the median run counts. The
default warmup (10 steps) measures the steady state of both: during the first steps oneDNN compiles
a GEMM kernel for every new shape (the experts' row counts change with the routing) and the
allocator grows to its working set. Every
run first measures the machine's matmul rate in its precision (1024^3 matmuls on the same
threads); MFU = ModelConfig.flops_per_token(256) x tokens/s / median measured matmul FLOP/s.

`--baseline-checkout DIR` adds a third side: our step at another checkout (say, the commit before a
refactor), with `--baseline-python` as its interpreter; runs then alternate ours, baseline, HF, and
the table gains ours / baseline. `--expert-choice` adds our step with expert-choice routing
(olmoe_small with model.router_type='expert_choice', no load-balancing loss: the
ablation_expert_choice change) as one more side, so token choice and expert choice are timed
side by side, in the same alternation; the table gains EC tok/s and EC / ours. The JSON records
this checkout's commit, the baseline's, the machine (CPU model, cores, torch's CPU capability, load
per run) and the peers' versions.

Usage: python benchmarks/train_step.py --json out.json [--steps 20] [--warmup 10] [--repeats 3]
           [--baseline-checkout DIR [--baseline-python PY]] [--expert-choice]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import provenance  # benchmarks/provenance.py (this folder is on sys.path)

RECIPE = "olmoe_small"
MICRO_BATCH = 4
SEQ_LENGTH = 256
TOKENS_PER_STEP = MICRO_BATCH * SEQ_LENGTH
PRECISIONS = ("bf16", "fp32")


# ----------------------------------------------------------------------------- workers
def _batches(vocab_size: int, count: int = 4) -> list:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (MICRO_BATCH, SEQ_LENGTH + 1), generator=generator) for _ in range(count)]


def _timed(step, *, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - start)
    return times


def worker_ours(precision_name: str, *, warmup: int, steps: int, profile: str | None,
                router: str = "token_choice") -> dict:
    import torch

    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel import cpu_perf
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.moe_metrics import ExpertLoadCounter
    from olmoe_megatron.training.schedule import learning_rate
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, set_learning_rate, train_step, wrap_ddp

    run = get_recipe(RECIPE)
    model_cfg, train_cfg = run.model, run.train
    if router == "expert_choice":  # as ablation_expert_choice changes its token-choice model
        model_cfg = model_cfg.replace(router_type="expert_choice", router_aux_loss_coeff=0.0)
    assert (train_cfg.micro_batch_size, train_cfg.global_batch_size, train_cfg.seq_length) == (
        MICRO_BATCH, MICRO_BATCH, SEQ_LENGTH)
    precision = PrecisionConfig(dtype=precision_name, spec="local")
    context = initialize(ParallelLayout(), model_cfg, seed=train_cfg.seed, backend="gloo")
    cpu_perf.tune_malloc()  # as `olmoe train` does on CPU
    config, _ = build_transformer_config(model_cfg, context, precision=precision)
    chunks = build_model_chunks(model_cfg, context, precision=precision, config=config)
    models = wrap_ddp(chunks, config, train=train_cfg, precision=precision)
    optimizer = build_optimizer(models, train=train_cfg, precision=precision)
    attach_training_hooks(config, models, optimizer)
    # as the trainer does: expert load is counted for MoE models only
    load_counter = ExpertLoadCounter(model_cfg.num_layers, model_cfg.num_experts).attach(chunks) if model_cfg.is_moe else None
    position_ids = torch.arange(SEQ_LENGTH).unsqueeze(0).expand(MICRO_BATCH, SEQ_LENGTH).contiguous()
    micro_batches = [[{
        "tokens": b[:, :-1].contiguous(),
        "labels": b[:, 1:].contiguous(),
        "loss_mask": torch.ones(MICRO_BATCH, SEQ_LENGTH),
        "position_ids": position_ids,
    }] for b in _batches(model_cfg.vocab_size)]
    losses = []

    def step(i: int) -> None:
        set_learning_rate(optimizer, learning_rate(train_cfg, i * TOKENS_PER_STEP))
        result = train_step(models, optimizer, micro_batches[i % len(micro_batches)], context,
                            model_config=model_cfg, seq_length=SEQ_LENGTH, expert_load=load_counter)
        losses.append(result.lm_loss)

    times = _profiled(step, warmup=warmup, steps=steps, profile=profile)
    impl = f"{model_cfg.expert_impl} experts, {model_cfg.token_dispatcher} dispatcher, {model_cfg.router_type} router"
    return {"times": times, "losses": losses, "impl": impl}


def worker_hf(precision_name: str, *, warmup: int, steps: int, profile: str | None) -> dict:
    import contextlib

    import torch
    from transformers import OlmoeForCausalLM

    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.testing.hf_parity import hf_config

    run = get_recipe(RECIPE)
    model_cfg, train_cfg = run.model, run.train
    torch.manual_seed(train_cfg.seed)
    config = hf_config(model_cfg)
    config.output_router_logits = True  # train with the load-balancing loss, as ours does
    hf = OlmoeForCausalLM(config).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                  eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay)
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in _batches(model_cfg.vocab_size)]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision_name == "bf16" else contextlib.nullcontext
    losses = []

    def step(i: int) -> None:
        tokens, labels = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            # labels are already the next tokens (shift_labels): the same 4 x 256 predictions as ours
            out = hf(input_ids=tokens, labels=labels, shift_labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), train_cfg.clip_grad)
        optimizer.step()
        losses.append(float(out.loss))

    times = _profiled(step, warmup=warmup, steps=steps, profile=profile)
    impl = f"attention {config._attn_implementation}, experts {config._experts_implementation}"
    return {"times": times, "losses": losses, "impl": impl}


def _profiled(step, *, warmup: int, steps: int, profile: str | None) -> list[float]:
    if not profile:
        return _timed(step, warmup=warmup, steps=steps)
    import torch

    _timed(step, warmup=warmup, steps=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        times = _timed(step, warmup=0, steps=steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45)
    with open(profile, "w") as f:
        f.write(table)
    return times


def run_worker(args) -> None:
    import torch

    from olmoe_megatron.training.metrics import measure_matmul_flops

    threads = provenance.set_threads()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    matmul = measure_matmul_flops(dtype)
    if args.worker == "ours":
        result = worker_ours(args.precision, warmup=args.warmup, steps=args.steps, profile=args.profile,
                             router=args.router)
    else:
        result = worker_hf(args.precision, warmup=args.warmup, steps=args.steps, profile=args.profile)
    result.update(matmul_flops=matmul, threads=threads, tokens_per_s=TOKENS_PER_STEP * len(result["times"]) / sum(result["times"]))
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver
def _spawn(worker: str, precision: str, args) -> dict:
    python, script, cwd = sys.executable, os.path.abspath(__file__), None
    extra = []
    if worker == "ours_ec":  # our step, expert-choice routing
        worker, extra = "ours", ["--router", "expert_choice"]
    if worker == "baseline":  # our step at the baseline checkout, run by its own script
        python = args.baseline_python or sys.executable
        script = os.path.join(args.baseline_checkout, "benchmarks", "train_step.py")
        cwd, worker = args.baseline_checkout, "ours"
    cmd = [python, script, "--worker", worker, "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{worker} {precision} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _load() -> float:
    return os.getloadavg()[0]


def _commit(checkout: str) -> str:
    """The checkout's HEAD commit, with '+dirty' when tracked files differ from it."""
    head = provenance.git(checkout, "rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + ("+dirty" if provenance.dirty_paths(checkout) else "")


def _machine() -> dict:
    return {**provenance.cpu_description(), "load_average_1m_at_end": _load()}


def _versions() -> dict:
    return provenance.versions("torch", "megatron-core", "transformers")


def measure(precision: str, args) -> dict:
    """Alternating runs of ours and HF in `precision`; medians over runs."""
    from olmoe_megatron.recipes import get_recipe

    sides = ("ours",) + (("baseline",) if args.baseline_checkout else ()) + (("ours_ec",) if args.expert_choice else ()) \
        + ("hf",)
    runs = {side: [] for side in sides}
    loads = []
    for repeat in range(args.repeats):
        for worker in sides:
            loads.append(_load())
            result = _spawn(worker, precision, args)
            runs[worker].append(result)
            print(f"  {precision} run {repeat + 1}/{args.repeats} {worker:>8}: {result['tokens_per_s']:>8,.0f} tok/s "
                  f"(matmul {result['matmul_flops'] / 1e9:.0f} GFLOP/s, load {loads[-1]:.2f})", flush=True)
    ours = statistics.median(r["tokens_per_s"] for r in runs["ours"])
    hf = statistics.median(r["tokens_per_s"] for r in runs["hf"])
    matmul = statistics.median(r["matmul_flops"] for r in runs["ours"] + runs["hf"])
    flops_per_token = get_recipe(RECIPE).model.flops_per_token(SEQ_LENGTH)
    baseline = {}
    if args.baseline_checkout:
        base = statistics.median(r["tokens_per_s"] for r in runs["baseline"])
        baseline = {
            "baseline_tokens_per_s": base,
            "ours_over_baseline": ours / base,
            "ours_over_baseline_paired_median": statistics.median(
                o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(runs["ours"], runs["baseline"])),
            "baseline_runs_tokens_per_s": [r["tokens_per_s"] for r in runs["baseline"]],
            "baseline_first_losses": runs["baseline"][0]["losses"][:3],
        }
    expert_choice = {}
    if args.expert_choice:
        ec = statistics.median(r["tokens_per_s"] for r in runs["ours_ec"])
        expert_choice = {
            "ours_ec_tokens_per_s": ec,
            "ec_over_ours": ec / ours,
            "ec_over_ours_paired_median": statistics.median(
                e["tokens_per_s"] / o["tokens_per_s"] for e, o in zip(runs["ours_ec"], runs["ours"])),
            # Expert choice routes factor * top_k rows per token on average (factor 1): the same FLOPs.
            "ec_mfu": flops_per_token * ec / matmul,
            "ours_ec_runs_tokens_per_s": [r["tokens_per_s"] for r in runs["ours_ec"]],
            "ours_ec_impl": runs["ours_ec"][0]["impl"],
            "ours_ec_first_losses": runs["ours_ec"][0]["losses"][:3],
        }
    return {
        **baseline,
        **expert_choice,
        "ours_tokens_per_s": ours,
        "hf_tokens_per_s": hf,
        "ratio": ours / hf,
        "mfu": flops_per_token * ours / matmul,
        "hf_mfu": flops_per_token * hf / matmul,
        "matmul_flops": matmul,
        "flops_per_token": flops_per_token,
        # Each ours run is followed by an HF run: their ratio cancels slow drifts of the machine.
        "paired_ratio_median": statistics.median(o["tokens_per_s"] / h["tokens_per_s"]
                                                 for o, h in zip(runs["ours"], runs["hf"])),
        "ours_runs_tokens_per_s": [r["tokens_per_s"] for r in runs["ours"]],
        "hf_runs_tokens_per_s": [r["tokens_per_s"] for r in runs["hf"]],
        "ours_impl": runs["ours"][0]["impl"],
        "hf_impl": runs["hf"][0]["impl"],
        "ours_first_losses": runs["ours"][0]["losses"][:3],
        "hf_first_losses": runs["hf"][0]["losses"][:3],
        "threads": runs["ours"][0]["threads"],
        "load_average_1m": loads,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run, first (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per precision (alternating)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: bf16,fp32")
    parser.add_argument("--expert-choice", action="store_true",
                        help="also time our step with expert-choice routing (model.router_type='expert_choice')")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--router", choices=("token_choice", "expert_choice"), default="token_choice",
                        help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help="(with --worker) write a torch.profiler table of the timed steps here")
    parser.add_argument("--baseline-checkout", help="another checkout of this repository whose step runs as a third side")
    parser.add_argument("--baseline-python", help="the interpreter for the baseline checkout (default: this one)")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return 0
    if not args.json:
        parser.error("--json PATH is required")

    precisions = [p for p in args.precisions.split(",") if p]
    results = {}
    for precision in precisions:
        print(f"{precision}: {args.repeats} x (ours{', EC' if args.expert_choice else ''}, HF), {args.warmup} warmup + {args.steps} timed steps of "
              f"{MICRO_BATCH}x{SEQ_LENGTH} tokens", flush=True)
        results[precision] = measure(precision, args)

    print()
    print(f"{'precision':<10}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'paired':>8}{'matmul GFLOP/s':>16}"
          f"{'ours MFU':>10}{'HF MFU':>9}")
    for precision, r in results.items():
        print(f"{precision:<10}{r['ours_tokens_per_s']:>12,.0f}{r['hf_tokens_per_s']:>12,.0f}{r['ratio']:>8.2f}"
              f"{r['paired_ratio_median']:>8.2f}{r['matmul_flops'] / 1e9:>16.0f}{100 * r['mfu']:>9.1f}%"
              f"{100 * r['hf_mfu']:>8.1f}%")
    print("ratio: median ours / median HF; paired: median of (ours run / the HF run after it)")
    if args.baseline_checkout:
        print(f"\n{'precision':<10}{'ours tok/s':>12}{'baseline tok/s':>16}{'ours/base':>11}{'paired':>8}"
              f"   baseline: {_commit(args.baseline_checkout)} at {args.baseline_checkout}")
        for precision, r in results.items():
            print(f"{precision:<10}{r['ours_tokens_per_s']:>12,.0f}{r['baseline_tokens_per_s']:>16,.0f}"
                  f"{r['ours_over_baseline']:>11.3f}{r['ours_over_baseline_paired_median']:>8.3f}")
    if args.expert_choice:
        print(f"\n{'precision':<10}{'ours tok/s':>12}{'EC tok/s':>12}{'EC/ours':>9}{'paired':>8}{'EC MFU':>9}"
              "   EC: expert-choice routing, the same model")
        for precision, r in results.items():
            print(f"{precision:<10}{r['ours_tokens_per_s']:>12,.0f}{r['ours_ec_tokens_per_s']:>12,.0f}"
                  f"{r['ec_over_ours']:>9.3f}{r['ec_over_ours_paired_median']:>8.3f}{100 * r['ec_mfu']:>8.1f}%")
    any_run = next(iter(results.values()))
    print(f"ours: {any_run['ours_impl']}; HF: {any_run['hf_impl']}; threads {any_run['threads']}; "
          f"{any_run['flops_per_token'] / 1e6:.1f} MFLOP/token")

    out = dict(results.get("bf16", {}))
    for precision, r in results.items():
        if precision != "bf16":
            out[precision] = r
    out.update(recipe=RECIPE, micro_batch=MICRO_BATCH, seq_length=SEQ_LENGTH, steps=args.steps,
               warmup=args.warmup, repeats=args.repeats, commit=_commit(provenance.REPOSITORY), machine=_machine(),
               versions=_versions())
    if args.baseline_checkout:
        out.update(baseline_commit=_commit(args.baseline_checkout), baseline_checkout=args.baseline_checkout)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
