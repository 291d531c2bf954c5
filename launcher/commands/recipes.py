"""`olmoe recipes`: list the run recipes."""

from __future__ import annotations

import argparse

from olmoe_megatron.recipes import list_recipes

NAME = "recipes"
HELP = "List the run recipes (use one with --recipe NAME)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    del args
    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, summary in recipes.items():
        print(f"{name:<{width}}  {summary}")
    return 0
