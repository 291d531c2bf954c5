"""`olmoe convert`: HF <-> Megatron checkpoints and sparse upcycling (thin over olmoe_megatron.convert)."""

from __future__ import annotations

import argparse
import logging
import sys

NAME = "convert"
HELP = "convert checkpoints: hf-to-mcore, mcore-to-hf, upcycle (dense -> MoE)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")

    imp = sub.add_parser("hf-to-mcore", help="HF OLMoE (config.json + safetensors) -> our dist checkpoint")
    imp.add_argument("--hf", required=True, help="save_pretrained directory (per-expert or fused expert keys)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--layout", default=None,
                     help="check that the checkpoint fits this layout, e.g. tp=2,pp=2,ep=2,etp=1 (it loads in any)")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="cast weights (default: keep HF's)")
    imp.add_argument("--recipe", default=None,
                     help="take the fields HF does not record (z-loss weight, init cutoff, ...) from this recipe's model")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    exp = sub.add_parser("mcore-to-hf", help="our checkpoint (model, step dir or training root) -> HF OLMoE")
    exp.add_argument("--ckpt", required=True, help="model checkpoint, step_XXXXXXX dir, or training root (follows latest)")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--model-config", default=None, help="ModelConfig YAML if the checkpoint has none")
    exp.add_argument("--vocab-rows", choices=("padded", "vocab"), default=None,
                     help="write padded_vocab_size rows (as OLMoE's HF checkpoints) or vocab_size rows (default: "
                          "the rows of the HF config the checkpoint was imported from, else padded)")
    exp.add_argument("--tokenizer", default=None, help="copy tokenizer files from here (default: the checkpoint's hf_tokenizer/)")
    exp.add_argument("--hf-config", default=None,
                     help="config.json to write back (default: the HF config the checkpoint was imported from, also "
                          "through its run's checkpoint.init_from); 'model' builds it from the model config; a path "
                          "writes that config.json after checking it against the model")
    exp.add_argument("--overwrite", action="store_true")

    up = sub.add_parser("upcycle", help="dense checkpoint -> MoE checkpoint with E copies of the MLP and a new router")
    up.add_argument("--dense", required=True, help="dense model checkpoint (model.num_experts=0)")
    up.add_argument("--num-experts", type=int, required=True)
    up.add_argument("--top-k", type=int, required=True)
    up.add_argument("--method", choices=("olmoe", "function_preserving"), default="olmoe",
                    help="olmoe (default, as OLMoE's sparsify_ckpt_unsharded.py): every expert an unscaled copy "
                         "of the dense MLP, router from N(0, 0.02); function_preserving: experts' fc2 scaled by "
                         "E/K and a zero router, so step 0 reproduces the dense model exactly")
    up.add_argument("--router-std", "--noise", dest="router_std", type=float, default=None,
                    help="std of the (untruncated normal) router init (default: 0.02 for olmoe, 0 for "
                         "function_preserving)")
    up.add_argument("--seed", type=int, default=0,
                    help="seed of the router init (default 0; recorded in the output's olmoe_upcycle.json)")
    up.add_argument("--out", required=True)
    up.add_argument("--model-config", default=None, help="ModelConfig YAML if the checkpoint has none")
    up.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from olmoe_megatron.convert import ConversionError, hf_to_mcore, mcore_to_hf, upcycle
    from olmoe_megatron.convert.hf_to_mcore import parse_layout

    log = logging.getLogger("olmoe.convert")
    try:
        if args.convert_command == "hf-to-mcore":
            base = None
            if args.recipe:
                from olmoe_megatron.recipes import get_recipe

                base = get_recipe(args.recipe).model
            model = hf_to_mcore(args.hf, args.out, layout=parse_layout(args.layout), dtype=args.dtype,
                                base_model=base, overwrite=args.overwrite)
            log.info("wrote %s: %d layers, %d experts top-%d, %.3fB parameters", args.out, model.num_layers,
                     model.num_experts, model.top_k, model.num_params() / 1e9)
        elif args.convert_command == "mcore-to-hf":
            source = mcore_to_hf(args.ckpt, args.out, model_config=args.model_config, vocab_rows=args.vocab_rows,
                                 tokenizer=args.tokenizer, hf_config=args.hf_config, overwrite=args.overwrite)
            log.info("exported %s to %s", source, args.out)
        else:
            model = upcycle(args.dense, args.out, num_experts=args.num_experts, top_k=args.top_k,
                            method=args.method, router_std=args.router_std, seed=args.seed,
                            model_config=args.model_config, overwrite=args.overwrite)
            log.info("wrote %s: %d experts top-%d (%s upcycling)", args.out, model.num_experts, model.top_k,
                     args.method)
    except ConversionError as exc:
        print(f"olmoe convert {args.convert_command}: {exc}", file=sys.stderr)
        return 2
    return 0
