"""Arguments several verbs share, so each is spelled and explained once."""

from __future__ import annotations

import argparse


def add_recipe(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("recipe", metavar="RECIPE", help="YAML recipe file")
    sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a recipe key, e.g. train.max_steps=10")


def add_debug(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--debug", action="store_true", help="show the traceback of errors")


def add_force_unlock(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over the claim on the folder this command writes, left by a process on another machine "
        "(see Interrupted runs in README.md)",
    )


def add_verb(verbs, name: str, handler, help: str, recipe: bool = True) -> argparse.ArgumentParser:
    """A verb with --debug, and RECIPE plus KEY=VALUE overrides where it reads a recipe."""
    sub = verbs.add_parser(name, help=help, description=help)
    if recipe:
        add_recipe(sub)
    add_debug(sub)
    sub.set_defaults(handler=handler)
    return sub
