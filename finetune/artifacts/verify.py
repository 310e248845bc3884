"""Check a merged folder against the adapter model it came from, on a few samples of the run's training data.

The two models are loaded one after the other, never together, so the check needs the memory of one
model, not two. For a quantized (QLoRA) run the reference is the adapter on the 16-bit base, which is
exactly what was merged; the quantized model the run trained differs from both by the quantization error.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, InputError
from finetune.recipe.schema import Recipe

# max |merged - adapter| allowed, as a share of the largest adapter logit (at least 1): float32 differs only
# by the order of the sums; 16-bit weights are rounded once after the merge.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# ...and as a share of how far the adapter moves the base's logits: a merge that dropped the update (or
# scaled it by 1/2 or 2) is off by 50% to 100% of that, whatever the dtype; rounding alone stays well under.
EFFECT_SHARE = 0.2
FALLBACK_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes it."


def check_merged(merged: Path, adapter_dir: Path, recipe: Recipe, dtype_name: str, device: str, echo) -> tuple:
    """(max |merged - adapter| logit difference, tolerance); prints both.

    Raises:
        FinetuneError: the difference is above the tolerance for `dtype_name`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    prompts = sample_ids(recipe, tokenizer, echo)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, dtype_name)).to(device)
    merged_logits = logits_of(model, prompts)
    del model
    gc.collect()
    model = load_adapter_model(recipe, adapter_dir, dtype_name, device, tokenizer)
    adapter_logits = logits_of(model, prompts)
    with model.disable_adapter():
        base_logits = logits_of(model, prompts)
    del model
    gc.collect()

    diff = largest_difference(merged_logits, adapter_logits)
    effect = largest_difference(adapter_logits, base_logits)
    tolerance = merge_tolerance(dtype_name, adapter_logits, effect)
    tokens = sum(len(ids) for ids in prompts)
    echo(
        f"check: {len(prompts)} training samples ({tokens} tokens): max |merged - adapter| logit difference "
        f"{diff:.3g} (tolerance {tolerance:.3g} for {dtype_name}); the adapter moves the base's logits by up to "
        f"{effect:.3g}"
    )
    if effect == 0:
        echo("warning: the adapter does not change the base model's logits (were its B matrices ever trained?)")
    if not diff <= tolerance:  # NaN fails too
        raise FinetuneError(
            f"merge check failed: the merged model's logits differ from the adapter model's by {diff:.3g}, above "
            f"the {dtype_name} tolerance {tolerance:.3g} ({diff / effect if effect else float('inf'):.0%} of how far "
            f"the adapter moves the base's logits, {effect:.3g}); nothing was written. Try --dtype float32, or "
            "pass --no-verify to write the merged weights unchecked"
        )
    return diff, tolerance


def largest_difference(logits: list, reference: list) -> float:
    """max |logits - reference| over all samples and positions (NaN when either holds one)."""
    return max((a - b).abs().max().item() for a, b in zip(logits, reference, strict=True))


def merge_tolerance(dtype_name: str, adapter_logits: list, effect: float) -> float:
    """The largest merged-vs-adapter difference a right merge shows in `dtype_name`.

    Rounding bounds it by a share of the logits' size; the adapter's own effect bounds it too, so that a
    merge without the update (off by `effect`) fails even where rounding alone would allow that much. An
    adapter that changes nothing (`effect` 0) has nothing to drop: rounding alone bounds it then.
    """
    scale = max(a.abs().max().item() for a in adapter_logits)
    rounding = RELATIVE_TOLERANCE[dtype_name] * max(1.0, scale)
    return min(rounding, EFFECT_SHARE * effect) if effect > 0 else rounding


def load_adapter_model(recipe: Recipe, adapter_dir: Path, dtype_name: str, device: str, tokenizer):
    """The run's adapter on its base, loaded in `dtype_name` and never quantized."""
    from peft import PeftModel

    from finetune.model.load import load_model

    spec = recipe.model.model_copy(update={"dtype": dtype_name})
    model = PeftModel.from_pretrained(load_model(spec, None, device=device, tokenizer=tokenizer), adapter_dir)
    return model.eval()


def logits_of(model, prompts: list[list[int]]) -> list:
    """Float32 logits of each prompt, one at a time (no padding to get wrong)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in prompts]


def sample_ids(recipe: Recipe, tokenizer, echo: Callable[[str], None], n: int = 3, max_tokens: int = 64):
    """Token ids of the first `n` training samples (cut to `max_tokens`), built as training built them.

    Falls back to a fixed prompt, and says so, when the run's data can no longer be read. Samples are built
    without a length limit (a prompt longer than data.max_seq_len would drop its row) and cut afterwards.
    """
    from finetune.data.build import build_datasets, sources_of

    sources = [
        source.model_copy(
            update={"max_rows": 2 * n, "goat": source.goat.model_copy(update={"n": 2 * n}) if source.goat else None}
        )
        for source in sources_of(recipe.data)
    ]
    data = recipe.data.model_copy(
        update={
            "sources": sources,
            "eval_path": None,
            "max_seq_len": 1_000_000,
            "overlong": "truncate",
            "eval_fraction": 0.0,
            "cache": False,
            "dedup": "none",
            "min_tokens": 0,
            "on_bad_row": "skip",
        }
    )
    try:
        samples = build_datasets(data, tokenizer, recipe.train.seed).train[:n]
    except InputError as error:
        echo(f"check: no sample from the run's data ({str(error).splitlines()[0]}); checking on a fixed prompt")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [bos + tokenizer(FALLBACK_PROMPT, add_special_tokens=False).input_ids]
    return [sample.input_ids[:max_tokens] for sample in samples]
