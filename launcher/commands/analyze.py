"""`olmoe analyze trace|saturation|coactivation|domains|vocab`: the paper's routing analysis.

    olmoe analyze trace --ckpt runs/demo/checkpoints/step_0000100 --tokens 32768 \\
        --data '[{name: stdlib, demo_heldout: true}]' --out runs/demo/traces/step_0000100.zarr
    olmoe analyze saturation runs/demo/traces/step_0000100.zarr runs/demo/traces/step_0000250.zarr
    olmoe analyze coactivation runs/demo/traces/step_0000250.zarr
    olmoe analyze domains runs/demo/traces/step_0000250.zarr
    olmoe analyze vocab runs/demo/traces/step_0000250.zarr

`trace` records a checkpoint's routing over fixed tokens (analysis/trace.py); each analysis prints
a table, writes JSON and a PNG (default: beside the trace, `<trace>.<analysis>.json|png`; the
saturation's beside the most trained trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmoe_megatron.config import ConfigError

NAME = "analyze"
HELP = "routing analysis: record a checkpoint's routing trace, then saturation, co-activation, domains, vocabulary"

ANALYSES = ("saturation", "coactivation", "domains", "vocab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    trace = sub.add_parser("trace", help="record a checkpoint's routing over fixed held-out tokens (zarr)")
    trace.add_argument("--ckpt", required=True, help="checkpoint root (its latest step) or step directory")
    trace.add_argument("--data", required=True,
                       help="sources as eval.datasets takes them: '[{name: N, paths: [PREFIX]}, {name: M, "
                            "demo_heldout: true}]'")
    trace.add_argument("--tokens", type=int, required=True, help="tokens per source")
    trace.add_argument("--out", required=True, help="zarr store to create (must not exist)")
    trace.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward")
    trace.epilog = "Overrides as --section.field=value: --train.seq_length, --precision.dtype, --data.tokenizer."
    trace.set_defaults(_accepts_overrides=True)
    for name, text in (("saturation", "router saturation of checkpoints against the most trained one"),
                       ("coactivation", "expert co-activation matrices per layer"),
                       ("domains", "domain specialisation per source and expert"),
                       ("vocab", "vocabulary specialisation by input and predicted token")):
        p = sub.add_parser(name, help=text)
        p.add_argument("traces", nargs="+" if name == "saturation" else 1, help="routing trace(s) (zarr)")
        p.add_argument("--out", default=None, help="output prefix for .json and .png (default: beside the trace)")
        if name != "saturation":
            p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
        if name == "vocab":
            p.add_argument("--top-tokens", type=int, default=10, help="most specialised tokens listed per expert")
            p.add_argument("--min-count", type=int, default=5, help="a token id counts once seen this often")


def _write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers={text!r}: give comma-separated layer numbers, e.g. --layers=0,7,15") from None


def _decoder(trace):
    """decode(id) -> text with the trace's tokenizer, or None when it cannot be loaded here."""
    from olmoe_megatron.data.config import DataConfig
    from olmoe_megatron.evaluation.evaluator import run_tokenizer

    data = trace.root.attrs.get("data")
    if not data:
        return None
    try:
        tokenizer = run_tokenizer(DataConfig.from_dict(data))
    except Exception as exc:  # the tokenizer may live on another machine: ids stay undecoded
        print(f"olmoe analyze vocab: tokens not decoded ({exc})", file=sys.stderr)
        return None
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


def run(args: argparse.Namespace) -> int:
    if args.analysis == "trace":
        return _run_trace(args)
    from olmoe_megatron.analysis import plots, reports, routing

    traces = [routing.Trace.open(path) for path in args.traces]
    if args.analysis == "saturation":
        result = routing.saturation(traces)
        default = Path(result["final"])
    else:
        trace = traces[0]
        default = trace.path
        layers = _layers(args.layers)
        if args.analysis == "coactivation":
            result = routing.coactivation(trace, layers)
        elif args.analysis == "domains":
            result = routing.domains(trace, layers)
        else:
            result = routing.vocab(trace, layers, top_tokens=args.top_tokens, min_count=args.min_count,
                                   decode=_decoder(trace))
    prefix = Path(args.out) if args.out else default.with_name(f"{default.name}.{args.analysis}")
    json_path, png_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".png")
    _write_json(json_path, result)
    getattr(plots, f"plot_{args.analysis}")(result, png_path)
    print(getattr(reports, f"{args.analysis}_table")(result), end="")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _run_trace(args: argparse.Namespace) -> int:
    from olmoe_megatron.analysis.trace import record_trace
    from olmoe_megatron.data.errors import DataError

    try:
        attrs = record_trace(args.ckpt, data=args.data, tokens=args.tokens, out=args.out,
                             overrides=list(args.overrides or []), micro_batch_size=args.micro_batch_size)
    except (DataError, FileNotFoundError) as exc:
        print(f"olmoe analyze trace: {exc}", file=sys.stderr)
        return 2
    sources = ", ".join(f"{s['name']} ({s['count']:,} tokens)" for s in attrs["sources"])
    print(f"traced {attrs['checkpoint']} (step {attrs['step']}, {attrs['model']['num_layers']} layers, "
          f"top-{attrs['model']['top_k']} of {attrs['model']['num_experts']}) over {sources}")
    print(f"wrote {args.out}")
    return 0
