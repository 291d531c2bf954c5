"""bf16 OLMoE-1B-7B slice on one GPU: forward, backward and optimizer steps through our trainer's step.

Full OLMoE-1B-7B width (d_model 2048, 16 heads, 64 experts top-8, expert FFN 1024, vocab 50,304),
`--layers` decoder layers (2 to 4), sequence 4096, one micro-batch per step. The step is the
trainer's (olmoe_megatron.training.step: Megatron DDP with fp32 gradient buffers, Megatron's
optimizer with fp32 main weights, OLMoE's AdamW and clipping, expert-load counting). The process
group is NCCL with world size 1: of the backend patches (olmoe_megatron.parallel.backend_patches)
only those for a missing Transformer Engine or apex apply. Layers are Transformer Engine's when it
imports (`--spec auto`), local otherwise; local experts run torch._grouped_mm (a CUTLASS grouped GEMM on Hopper).

What one run proves on a GPU without Transformer Engine: the local spec trains (the no-TE backend
patches apply on CUDA), with the trainer's expert-load metrics on (their collectives on the GPU),
the distributed optimizer with overlapped gradient reduction and parameter gather, and a checkpoint
saved, a step taken, loaded and the same step taken again (the two losses must agree). It prints
and writes tokens/s, MFU against the H200's dense bf16 peak (989 TFLOP/s; model FLOPs per token
from ModelConfig.flops_per_token: 6 x active matmul parameters + attention, no recompute), peak
allocated and reserved memory, and the static memory per term (bf16 weights, fp32 gradient buffers,
fp32 main weights, Adam moments). The 4-layer slice's checkpoint is about 25 GB on disk.

`--cpu-smoke` runs the same code end to end on CPU at a tiny width (gloo; the CPU backend is
needed there) so that the script can be checked on a machine without a GPU.

Usage: python benchmarks/gpu/olmoe_slice.py [--layers 4] [--micro-batch 2] [--steps 10] [--json out.json]
       python benchmarks/gpu/olmoe_slice.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
H200_BF16_PEAK = 989e12


def _import_project() -> None:
    """Makes olmoe_megatron importable from the checkout when it is not pip-installed.

    setup.py installs the top-level parallel/, data/ and launcher/ directories as
    olmoe_megatron.parallel etc.; without an install, the repository root is added to the
    package's search path so that those subpackages resolve the same way.
    """
    if importlib.util.find_spec("olmoe_megatron") is None:
        sys.path.insert(0, _REPO)
    import olmoe_megatron

    if importlib.util.find_spec("olmoe_megatron.parallel") is None:
        olmoe_megatron.__path__.append(_REPO)


def _model_config(args):
    from olmoe_megatron.model.config import ModelConfig

    if args.cpu_smoke:
        # Same structure (64 experts top-8, QK-norm, untied 128-padded vocab), tiny width.
        return ModelConfig(num_layers=args.layers, d_model=128, num_heads=4, num_experts=64, top_k=8,
                           expert_ffn_hidden_size=64, vocab_size=1000, padded_vocab_size=1024,
                           max_sequence_length=args.seq_length)
    return dataclasses.replace(ModelConfig(), num_layers=args.layers, max_sequence_length=max(4096, args.seq_length))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _memory_terms(models, optimizer) -> dict:
    """Static memory by term, in bytes: bf16 weights, DDP's fp32 gradient buffers, and the
    optimizer's fp32 main weights and Adam moments (counted from the tensors themselves)."""
    weights = _bytes(p for m in models for p in m.parameters())
    grads = _bytes(b.grad_data for m in models for b in list(m.buffers) + list(m.expert_parallel_buffers))
    import torch

    main, moments = 0, 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if param.dtype == torch.float32:
                    main += param.numel() * param.element_size()
                state = inner.state.get(param, {})
                moments += _bytes(v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"weights": weights, "grad_buffers": grads, "main_weights_fp32": main, "adam_moments": moments}


def run(args) -> dict:
    import tempfile

    import torch

    _import_project()
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel import backend_patches
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.run_config import RunConfig
    from olmoe_megatron.training.checkpoint import Progress, load_checkpoint, save_checkpoint
    from olmoe_megatron.training.config import TrainConfig
    from olmoe_megatron.training.moe_metrics import ExpertLoadCounter
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, set_learning_rate, train_step, wrap_ddp

    if args.cpu_smoke:
        backend, device = "gloo", torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on CPU")
        backend, device = "nccl", torch.device("cuda", 0)
    model = _model_config(args)
    expert_impl = "grouped"
    if not args.cpu_smoke and torch.cuda.get_device_capability() < (9, 0):
        expert_impl = "sequential"  # torch._grouped_mm's CUDA kernel needs Hopper (sm90) or newer
    model = dataclasses.replace(model, expert_impl=expert_impl)
    seq, mbs = args.seq_length, args.micro_batch
    # The trainer's GPU defaults under test: the distributed optimizer with overlapped gradient
    # reduction and parameter gather (a world of one still runs the overlap machinery).
    train = TrainConfig(seed=6198, seq_length=seq, global_batch_size=mbs, micro_batch_size=mbs,
                        max_steps=args.warmup + args.steps, max_tokens=None, schedule="constant",
                        use_distributed_optimizer=True, overlap_grad_reduce=args.overlap,
                        overlap_param_gather=args.overlap)
    precision = PrecisionConfig(dtype="bf16", spec="local" if args.cpu_smoke else args.spec)

    context = initialize(ParallelLayout(), model, seed=train.seed, backend=backend)
    config, use_te = build_transformer_config(model, context, precision=precision)
    chunks = build_model_chunks(model, context, precision=precision, config=config)
    models = wrap_ddp(chunks, config, train=train, precision=precision)
    optimizer = build_optimizer(models, train=train, precision=precision)
    attach_training_hooks(config, models, optimizer)
    set_learning_rate(optimizer, train.lr)
    load_counter = ExpertLoadCounter(model.num_layers, model.num_experts).attach(chunks) if args.expert_load else None

    generator = torch.Generator().manual_seed(0)
    micro_batches = []
    for _ in range(2):
        tokens = torch.randint(0, model.vocab_size, (mbs, seq + 1), generator=generator)
        micro_batches.append([{
            "tokens": tokens[:, :-1].contiguous().to(device),
            "labels": tokens[:, 1:].contiguous().to(device),
            "loss_mask": torch.ones(mbs, seq, device=device),
            "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(mbs, seq).contiguous(),
        }])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int):
        return train_step(models, optimizer, micro_batches[i % 2], context, model_config=model,
                          seq_length=seq, expert_load=load_counter)

    losses = []
    for i in range(args.warmup):
        losses.append(step(i).lm_loss)
    sync()
    static = _memory_terms(models, optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    step_times = []
    for i in range(args.steps):
        start = time.perf_counter()
        result = step(args.warmup + i)
        sync()  # train_step reads the loss on the host, but keep the timing honest
        step_times.append(time.perf_counter() - start)
        losses.append(result.lm_loss)
    memory = {"static_bytes": static}
    if device.type == "cuda":
        memory.update(allocated_before_step_bytes=allocated_before,
                      peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                      activations_and_workspace_peak_bytes=torch.cuda.max_memory_allocated() - allocated_before)

    # Checkpoint round trip: save, take one more step, load, take the same step again: the
    # losses must agree (the saved weights and optimizer state came back).
    done = args.warmup + args.steps
    run_config = RunConfig(name="olmoe_slice", model=model, precision=precision, train=train)
    with tempfile.TemporaryDirectory(prefix="olmoe_slice_ckpt_") as root:
        progress = Progress(step=done, consumed_samples=done * mbs, tokens=done * mbs * seq)
        start = time.perf_counter()
        saved = save_checkpoint(root, models=models, optimizer=optimizer, progress=progress, run_config=run_config,
                                keep_last=1)
        save_s = time.perf_counter() - start
        checkpoint_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        after_save = step(done).lm_loss
        start = time.perf_counter()
        loaded = load_checkpoint(saved, models=models, optimizer=optimizer, load_optimizer=True)
        load_s = time.perf_counter() - start
        set_learning_rate(optimizer, train.lr)
        after_load = step(done).lm_loss
    checkpoint = {"save_s": save_s, "load_s": load_s, "bytes": checkpoint_bytes, "loaded_step": loaded.step,
                  "loss_after_save": after_save, "loss_after_load": after_load,
                  "round_trip_loss_abs_diff": abs(after_save - after_load)}

    tokens_per_step = mbs * seq
    tokens_per_s = tokens_per_step * len(step_times) / sum(step_times)
    flops_per_token = model.flops_per_token(seq)
    total, active = model.num_params(), model.num_params(active=True)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "spec": "te" if use_te else "local",
        "backend_patches": backend_patches.installed(),
        "expert_impl": expert_impl,
        "layers": model.num_layers,
        "d_model": model.d_model,
        "experts": f"{model.num_experts} top-{model.top_k}",
        "seq_length": seq,
        "micro_batch": mbs,
        "overlap_grad_reduce_and_param_gather": args.overlap,
        "expert_load_metrics": result.expert_load is not None,
        "busiest_expert_share_last": max(result.expert_load["busiest_expert_share"]) if result.expert_load else None,
        "params_total": total,
        "params_active": active,
        "steps": args.steps,
        "step_time_s_median": sorted(step_times)[len(step_times) // 2],
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "model_tflops": tokens_per_s * flops_per_token / 1e12,
        "mfu_vs_989_tflops": tokens_per_s * flops_per_token / H200_BF16_PEAK,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "memory": memory,
        "checkpoint": checkpoint,
        "losses": losses,
        "grad_norm_last": result.grad_norm,
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the slice (2 to 4)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--spec", choices=("auto", "local", "te"), default="auto",
                        help="layer modules: te when Transformer Engine imports (auto), or local")
    parser.add_argument("--no-expert-load", dest="expert_load", action="store_false",
                        help="skip the trainer's per-layer expert-load counting")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="without overlapped gradient reduction and parameter gather")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny width on CPU (gloo): checks the script end to end")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.cpu_smoke:
        if "--seq-length" not in sys.argv:
            args.seq_length = 64
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if not 1 <= args.layers <= 16:
        parser.error(f"--layers={args.layers} must be between 1 and 16 (OLMoE-1B-7B has 16; the slice is meant for 2 to 4)")

    out = run(args)
    print(f"{out['device']}: OLMoE-1B-7B slice, {out['layers']} layers x d_model {out['d_model']}, "
          f"{out['experts']}, {out['spec']} spec, {out['expert_impl']} experts, {out['micro_batch']} x {out['seq_length']} tokens/step")
    print(f"params {out['params_total'] / 1e9:.3f} B total, {out['params_active'] / 1e9:.3f} B active; "
          f"{out['flops_per_token'] / 1e9:.2f} GFLOP/token")
    print(f"losses {', '.join(f'{x:.4f}' for x in out['losses'])}")
    mem = f", peak memory {out['peak_memory_gib']:.1f} GiB" if out["peak_memory_gib"] is not None else ""
    static = out["memory"]["static_bytes"]
    print("static memory " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in static.items()))
    ck = out["checkpoint"]
    print(f"checkpoint {ck['bytes'] / 2**30:.2f} GiB, save {ck['save_s']:.1f} s, load {ck['load_s']:.1f} s; "
          f"loss after save {ck['loss_after_save']:.6f}, after load {ck['loss_after_load']:.6f}")
    print(f"backend patches: {', '.join(out['backend_patches']) or 'none'}; expert-load metrics "
          f"{'on' if out['expert_load_metrics'] else 'off'}; overlap {'on' if out['overlap_grad_reduce_and_param_gather'] else 'off'}")
    print(f"tokens/s {out['tokens_per_s']:,.0f} | {out['model_tflops']:.1f} TFLOP/s | "
          f"MFU {100 * out['mfu_vs_989_tflops']:.1f}% of 989 TFLOP/s bf16 dense{mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
