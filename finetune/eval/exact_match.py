"""Goat exact match of a model: `finetune eval RUN_DIR`, and eval.exact_match at the end of a run.

The problems are held-out rows (see `eval/goat.py`), answered greedily and scored per operation x
operand digit lengths; the result is written to the run folder's eval.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, read_json, read_trained_recipe

Echo = Callable[[str], None]


def evaluate(
    run_path: str | Path, *, n: int = 500, batch_size: int = 32, force_unlock: bool = False, echo: Echo = print
):
    """Score a finished Goat run by exact match on held-out problems; writes eval.json into its folder.

    Raises:
        InputError: not a run folder, not a Goat run, or the folder is claimed by another command.
    """
    from finetune.eval.generate import load_trained
    from finetune.lock import claim
    from finetune.model.load import pick_device

    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    formats = recipe.data.formats
    if "goat" not in formats:
        raise InputError(
            f"{run_dir.path}: finetune eval scores exact match for data.format: goat runs; this run's data.format "
            f"is {', '.join(formats)} (its eval loss is in metrics.jsonl)"
        )
    with claim(run_dir.path, subject=None, force_unlock=force_unlock, echo=echo):
        model, tokenizer = load_trained(run_dir.path, recipe, device=pick_device(recipe.train.use_cpu))
        return score_exact_match(model, tokenizer, recipe, run_dir, n=n, batch_size=batch_size, echo=echo)


def score_exact_match(model, tokenizer, recipe: Recipe, run_dir: RunDir, *, n: int, batch_size: int, echo: Echo):
    """Greedy answers of `model` to `n` held-out Goat problems, scored and written to the run's eval.json."""
    from finetune.data.formats.goat import format_prompt
    from finetune.eval.generate import generate_greedy
    from finetune.eval.goat import held_out_rows, score

    rows, source = held_out_rows(recipe.data, n, run_dir.data)
    echo(f"eval: {len(rows)} problems from {source}")
    longest = max(len(tokenizer(row["output"], add_special_tokens=False).input_ids) for row in rows)
    prompts = [format_prompt(row["instruction"]) for row in rows]
    model.eval()
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=longest + 8, batch_size=batch_size)
    result = score(rows, completions, source)
    run_dir.write_json(run_dir.eval, read_json(run_dir.eval) | result.to_json())  # keeps lm_eval `tasks`
    return result
