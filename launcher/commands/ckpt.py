"""`olmoe ckpt`: check and describe checkpoints without loading them into a model.

    olmoe ckpt verify runs/demo/checkpoints            # latest step: sizes and checksums
    olmoe ckpt verify runs/demo/checkpoints --all      # every step directory of the root
    olmoe ckpt inspect runs/demo/checkpoints/step_0000250 [--json]

`verify` exits 0 when every file matches the manifest, 1 when something does not (each problem
named with its file), 2 for a path that is no checkpoint. `inspect` prints step, tokens, the layout
the checkpoint was saved from, the model config and its size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "ckpt"
HELP = "check (verify) and describe (inspect) checkpoints from their files alone"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="check every file against the checkpoint's manifest (sizes, checksums)")
    verify.add_argument("path", help="checkpoint root (follows latest) or step directory")
    verify.add_argument("--all", action="store_true", help="every step directory of the root, not only latest")
    inspect = sub.add_parser("inspect", help="step, tokens, saved layout, model config and size of a checkpoint")
    inspect.add_argument("path", help="checkpoint root (follows latest) or step directory")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")


def _step_dirs(path: Path, every: bool) -> list[Path]:
    from olmoe_megatron.checkpoint.format import STEP_NAME, CheckpointFormatError, follow_latest

    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointFormatError(f"{path} is a file, not a checkpoint directory; give a checkpoint root or one "
                                    "of its step_XXXXXXX directories")
    if every:
        steps = sorted(p for p in path.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name))
        if not steps:
            raise CheckpointFormatError(f"{path} has no step_XXXXXXX directories (--all takes a checkpoint root)")
        return steps
    return [follow_latest(path)]


def _verify(args: argparse.Namespace) -> int:
    from olmoe_megatron.checkpoint.manifest import verify

    failed = 0
    for step in _step_dirs(Path(args.path), args.all):
        manifest, problems = verify(step)
        if problems:
            failed += 1
            print(f"{step}: FAILED")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"{step}: OK ({len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB, "
                  f"{manifest['checksum']} checked)")
    return 1 if failed else 0


def describe_checkpoint(step: Path) -> dict:
    """What `inspect` prints, from the checkpoint's files (common.pt read without running code)."""
    import torch

    from olmoe_megatron.checkpoint.format import RUN_FILE, CheckpointFormatError, read_model_config
    from olmoe_megatron.checkpoint.manifest import list_files, read_manifest
    from olmoe_megatron.config.base import config_to_dict

    common_file = step / "common.pt"
    try:
        common = torch.load(common_file, map_location="cpu", weights_only=True) if common_file.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file raises many kinds
        raise CheckpointFormatError(f"{common_file} cannot be read ({type(exc).__name__}: {str(exc)[:160]}); "
                                    "run `olmoe ckpt verify` on it") from None
    model = read_model_config(step)
    manifest = read_manifest(step)
    files = list_files(step)
    on_disk = sum((step / name).stat().st_size for name in files)
    layout = common.get("model_parallel") or {}
    world = common.get("world_size")
    dp = None
    if world and layout:
        dp = world // ((layout.get("tensor_parallel") or 1) * (layout.get("pipeline_parallel") or 1)
                       * (layout.get("context_parallel") or 1))
    run_name = dtype = None
    if (step / RUN_FILE).is_file():
        import yaml

        run = yaml.safe_load((step / RUN_FILE).read_text(encoding="utf-8")) or {}
        run_name = run.get("name")
        dtype = (run.get("precision") or {}).get("dtype")
    progress = common.get("progress")
    return {
        "path": str(step),
        "kind": "training" if progress is not None else "model",
        "run": run_name,
        "progress": progress,
        "saved_layout": {"world_size": world, **layout, "data_parallel": dp} if layout else None,
        "optimizer": ({"format": common.get("optimizer_format"), "parts": common.get("optimizer_parts")}
                      if progress is not None else None),
        "dtype": dtype,
        "model": config_to_dict(model),
        "parameters": model.num_params(),
        "active_parameters": model.num_params(active=True),
        "files": len(files),
        "bytes": on_disk,
        "manifest": None if manifest is None else {"files": len(manifest["files"]),
                                                   "bytes": manifest["total_bytes"],
                                                   "checksum": manifest["checksum"]},
    }


def format_description(d: dict) -> str:
    m = d["model"]
    lines = [f"checkpoint  {d['path']} ({d['kind']} checkpoint{', run ' + d['run'] if d['run'] else ''})"]
    if d["progress"] is not None:
        p = d["progress"]
        lines.append(f"progress    step {p['step']:,}, {p['tokens']:,} tokens, {p['consumed_samples']:,} samples")
    if d["saved_layout"]:
        s = d["saved_layout"]
        lines.append(
            f"saved from  {s['world_size']} ranks: tp {s.get('tensor_parallel')}, pp {s.get('pipeline_parallel')}"
            f" (vpp {s.get('virtual_pipeline_parallel')}), cp {s.get('context_parallel')}, ep "
            f"{s.get('expert_parallel')}, etp {s.get('expert_tensor_parallel')}, dp {s['data_parallel']}")
    if d["optimizer"]:
        lines.append(f"optimizer   {d['optimizer']['format']} ({d['optimizer']['parts']} part(s))")
    experts = f"{m['num_experts']} experts top-{m['top_k']}" if m["num_experts"] else "dense"
    lines.append(f"model       {m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads, {experts}, "
                 f"vocab {m['vocab_size']} (padded {m['padded_vocab_size']})"
                 + (f", {d['dtype']}" if d["dtype"] else ""))
    lines.append(f"parameters  {d['parameters'] / 1e9:.4f}B total, {d['active_parameters'] / 1e9:.4f}B active")
    manifest = (f"manifest of {d['manifest']['files']} files ({d['manifest']['checksum']})" if d["manifest"]
                else "no manifest")
    lines.append(f"on disk     {d['bytes'] / 2**20:,.1f} MiB in {d['files']} files; {manifest}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from olmoe_megatron.checkpoint.format import CheckpointFormatError
    from olmoe_megatron.config import ConfigError

    try:
        if args.ckpt_command == "verify":
            return _verify(args)
        step = _step_dirs(Path(args.path), False)[0]
        description = describe_checkpoint(step)
    except (CheckpointFormatError, ConfigError) as exc:
        print(f"olmoe ckpt {args.ckpt_command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(description, indent=1) if args.json else format_description(description), end="\n" if args.json else "")
    return 0
