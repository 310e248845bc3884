"""`finetune VERB ...`: parse argv, call one handler, print errors. Imports nothing heavy at import time.

Each verb lives in its own module here, with `add(verbs)` declaring its arguments next to the handler that
reads them; this file only orders the verbs and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from finetune import __version__
from finetune.cli import data, evaluate, export, generate, merge, push, recipe, run, runs, tiny_model
from finetune.errors import FinetuneError

# the order `finetune --help` lists them in: the path from a recipe to what is shipped
VERB_MODULES = (run, recipe, data, evaluate, generate, merge, export, push, runs, tiny_model)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args so that overrides may come after options: `run r.yaml --overwrite train.lr=1e-4`
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        return args.handler(args) or 0
    except FinetuneError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}" if "\n" not in str(e) else str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune LLaMA-family models from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERB_MODULES:
        module.add(verbs)
    return parser
