"""`olmoe prep`: tokenize raw text, convert token formats, pack zarr archives, build the demo corpus,
convert multiple-choice tasks.

Thin: every subcommand parses its flags and calls one function of `olmoe_megatron.data` (mc-task:
of `olmoe_megatron.evaluation.task_formats`).
"""

from __future__ import annotations

import argparse
import json
import sys


NAME = "prep"
HELP = "prepare token data: tokenize, convert, zarr-pack/zarr-unpack, demo-corpus, tokenizer, mc-task"


def _size(text: str) -> int:
    """'512M', '1G', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().rstrip("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1G, 512M or 1048576") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prep_command", required=True, metavar="STEP")

    tok = sub.add_parser("tokenize", help="raw text (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) -> Megatron .bin/.idx shards")
    tok.add_argument("inputs", nargs="+", help="input files or globs")
    tok.add_argument("-o", "--output-prefix", required=True, help="shards are <prefix>_00000.bin/.idx, plus <prefix>.manifest.json")
    tok.add_argument("--tokenizer", default="olmoe", help="'olmoe' (default) or a tokenizer.json path")
    tok.add_argument("--text-field", default="text", help="JSON key or parquet column with the text")
    tok.add_argument("--eos-id", type=int, default=None, help="end-of-document id (default: the tokenizer's <|endoftext|>)")
    tok.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    tok.add_argument("--shard-size", type=_size, default=1 << 30, help="input text per shard (default 1G)")
    tok.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    tok.add_argument("--batch-size", type=_size, default=1 << 20, help="text per encode_batch call (default 1M)")
    tok.add_argument("--skip-bad-records", action="store_true", help="skip undecodable lines instead of failing")

    conv = sub.add_parser("convert", help="Megatron .bin/.idx <-> OLMo headerless .npy")
    conv.add_argument("--to", choices=("olmo", "megatron"), required=True)
    conv.add_argument("source", help="Megatron prefix (--to olmo) or .npy file (--to megatron)")
    conv.add_argument("target", help=".npy path (--to olmo) or Megatron prefix (--to megatron)")
    conv.add_argument("--eos-id", type=int, default=50279)
    conv.add_argument("--dtype", default="uint16", help="target dtype (olmo: uint16/uint32; megatron: uint16/int32)")
    conv.add_argument("--source-dtype", default="uint16", help="dtype of the source .npy (--to megatron)")

    pack = sub.add_parser("zarr-pack", help="pack token files into a compressed zarr archive")
    pack.add_argument("inputs", nargs="+", help="Megatron prefixes and/or .npy files")
    pack.add_argument("-o", "--output", required=True, help="zarr store directory to create")
    pack.add_argument("--npy-dtype", choices=("uint16", "uint32"), default="uint16")
    pack.add_argument("--chunk-tokens", type=int, default=1 << 20)
    pack.add_argument("--level", type=int, default=5, help="zstd level")

    unpack = sub.add_parser("zarr-unpack", help="unpack a zarr archive to memory-mappable files")
    unpack.add_argument("store")
    unpack.add_argument("-o", "--output", required=True, help="directory for the files")

    demo = sub.add_parser("demo-corpus", help="build the embedded demo corpus (standard-library source)")
    demo.add_argument("-o", "--output", default=None, help="directory (default: the index cache's demo_corpus)")
    demo.add_argument("--tokenizer", default="olmoe")
    demo.add_argument("--max-bytes", type=_size, default=4_000_000)

    tokenizer = sub.add_parser("tokenizer", help="fetch and cache OLMoE's tokenizer; print its path")
    tokenizer.add_argument("--cache-dir", default=None)

    task = sub.add_parser("mc-task", help="public multiple-choice files (hellaswag, arc, piqa, mmlu) -> task JSONL")
    task.add_argument("--layout", choices=("hellaswag", "arc", "piqa", "mmlu"), required=True)
    task.add_argument("--input", nargs="+", required=True, metavar="FILE", help="local .jsonl/.json/.parquet files")
    task.add_argument("--output", required=True, help="task .jsonl to write (an eval.tasks entry)")
    task.add_argument("--limit", type=int, default=None, help="convert only the first N records")


def run(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.errors import DataError

    try:
        return _STEPS[args.prep_command](args)
    except DataError as exc:
        print(f"olmoe prep {args.prep_command}: {exc}", file=sys.stderr)
        return 1


def _tokenize(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.tokenize_text import TokenizeConfig, manifest_path, tokenize

    config = TokenizeConfig(inputs=tuple(args.inputs), output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                            text_field=args.text_field, eos_token_id=args.eos_id, dtype=args.dtype,
                            shard_bytes=args.shard_size, num_workers=args.workers, batch_bytes=args.batch_size,
                            skip_bad_records=args.skip_bad_records)
    manifest = tokenize(config)
    print(f"{manifest['documents']} documents, {manifest['tokens']} tokens in {len(manifest['shards'])} shards; "
          f"manifest {manifest_path(args.output_prefix)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.format_conversion import megatron_to_olmo, olmo_to_megatron

    if args.to == "olmo":
        count = megatron_to_olmo(args.source, args.target, eos_token_id=args.eos_id, dtype=args.dtype)
        print(f"wrote {count} tokens to {args.target}")
    else:
        count = olmo_to_megatron(args.source, args.target, eos_token_id=args.eos_id,
                                 source_dtype=args.source_dtype, dtype=args.dtype)
        print(f"wrote {count} documents to {args.target}.bin/.idx")
    return 0


def _zarr_pack(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.zarr_archive import pack

    names = pack(args.inputs, args.output, npy_dtype=args.npy_dtype, chunk_tokens=args.chunk_tokens, clevel=args.level)
    print(f"packed {', '.join(names)} into {args.output}")
    return 0


def _zarr_unpack(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.zarr_archive import unpack

    for path in unpack(args.store, args.output):
        print(path)
    return 0


def _demo_corpus(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.corpus import build_demo_corpus
    from olmoe_megatron.data.index_cache import default_index_cache_dir

    output = args.output or default_index_cache_dir() / "demo_corpus"
    manifest = build_demo_corpus(output, tokenizer_path=args.tokenizer, max_bytes=args.max_bytes)
    summary = json.loads(manifest.read_text())
    print(f"{manifest}: {summary['documents']} documents, {summary['tokens']} tokens")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from olmoe_megatron.data.tokenizer import olmoe_tokenizer_path

    print(olmoe_tokenizer_path(cache_dir=args.cache_dir))
    return 0


def _mc_task(args: argparse.Namespace) -> int:
    from olmoe_megatron.evaluation.task_formats import convert_task

    count = convert_task(args.layout, args.input, args.output, limit=args.limit)
    print(f"wrote {count} {args.layout} items to {args.output}")
    return 0


_STEPS = {"tokenize": _tokenize, "convert": _convert, "zarr-pack": _zarr_pack, "zarr-unpack": _zarr_unpack,
          "demo-corpus": _demo_corpus, "tokenizer": _tokenizer, "mc-task": _mc_task}
